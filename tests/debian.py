"""Debian packages a test needs (promtool from ``prometheus``, ...): installed with apt-get when
missing and we are root, as tests/softhsm.py and the console's browser are. Under CI=true a tool that
still cannot be had fails the test, naming what is missing; elsewhere it skips with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import IN_CI


def install(package: str) -> str | None:
    """``apt-get update && apt-get install -y PACKAGE``; None when it worked, else why not."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "apt-get cannot run here (not root, or not Debian)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}"
    return None


def command(name: str, package: str, purpose: str) -> str:
    """The path of command NAME, from Debian's PACKAGE, installing it if missing (see above)."""
    path = shutil.which(name)
    if path is None:
        problem = install(package)
        path = shutil.which(name)
        if path is None:
            reason = f"{purpose} need {name} (Debian: apt-get install -y {package}): " + (
                problem or f"{name} is still missing after installing {package}"
            )
            if IN_CI:
                pytest.fail(reason + " (CI=true)")
            pytest.skip(reason)
    return path
