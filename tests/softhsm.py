"""SoftHSM2 for the PKCS#11 seal tests: each test gets its own token directory and SOFTHSM2_CONF.

SoftHSM2 (Debian: softhsm2) is installed with apt-get when missing and we are root; with CI=true a
SoftHSM2 that still cannot be had fails the test, as a missing PostgreSQL does; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI

LIBS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
PIN, SO_PIN = "4711-test", "0815-test-so"


def _library() -> str | None:
    return next((p for p in LIBS if os.path.exists(p)), None)


def _ensure_installed() -> str:
    lib = _library()
    if lib is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "softhsm2"], env=env, capture_output=True, timeout=600, check=False
        )
        lib = _library()
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        lib = None
    if lib is None or not shutil.which("softhsm2-util"):
        reason = "SoftHSM2 (apt-get install softhsm2) and python-pkcs11 are needed for the PKCS#11 seal tests"
        if IN_CI:
            pytest.fail(reason + " and could not be installed (CI=true)")
        pytest.skip(reason)
    return lib


@dataclass
class SoftHsm:
    lib: str
    conf: Path
    pin_file: Path
    env: dict[str, str]

    def init_token(self, label: str) -> int:
        """A new token; its slot id (SoftHSM2 assigns it)."""
        out = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip().rsplit(" ", 1)[-1])

    def args(self, slot: int, label: str = "vault-edge-seal", generate: bool = False) -> list[str]:
        return [
            "--seal",
            "pkcs11",
            "--pkcs11-lib",
            self.lib,
            "--pkcs11-slot",
            str(slot),
            "--pkcs11-key-label",
            label,
            "--pkcs11-pin-file",
            str(self.pin_file),
            *(["--pkcs11-generate-key"] if generate else []),
        ]

    def settings(self, slot: int, label: str = "vault-edge-seal", generate: bool = False) -> dict[str, object]:
        return {
            "seal": "pkcs11",
            "pkcs11_lib": self.lib,
            "pkcs11_slot": slot,
            "pkcs11_key_label": label,
            "pkcs11_pin_file": str(self.pin_file),
            "pkcs11_generate_key": generate,
        }


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    lib = _ensure_installed()
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))  # in-process: python-pkcs11 reads it at load
    yield SoftHsm(lib, conf, pin_file, {"SOFTHSM2_CONF": str(conf)})
