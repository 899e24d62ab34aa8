"""The JavaScript worker client (agents/js), through its own `node --test` suite, so `make test` covers it.

The JS tests start real processes themselves (a --dev control plane, agents on unix sockets, and
workerd when a binary is found) with this interpreter as their Python (VAULT_EDGE_PYTHON). Without
`node` (>= 20) the tests are skipped with the reason, except under CI=true, where that fails the run.
The workerd test needs a workerd binary: $WORKERD, agents/js/node_modules/.bin/workerd or PATH. Under
CI=true (or VAULT_EDGE_INSTALL_WORKERD=1) a missing one is installed from the npm registry into
agents/js/node_modules (pinned, not saved to package.json); if that fails the test is skipped with why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT

JS = ROOT / "agents" / "js"
NODE_MIN = 20

pytestmark = pytest.mark.e2e


def _node() -> str:
    node = shutil.which("node")
    why = None
    if node is None:
        why = "node is not installed"
    else:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        m = re.match(r"v(\d+)\.", out)
        if not m or int(m.group(1)) < NODE_MIN:
            why = f"node {out or '(unknown version)'} is older than v{NODE_MIN}"
    if why:
        msg = f"{why}: the JS client's tests (agents/js) need Node >= {NODE_MIN}"
        if IN_CI:
            pytest.fail(f"{msg}, and CI=true requires them")
        pytest.skip(msg)
    assert node is not None
    return node


WORKERD_VERSION = "1.20261117.1"  # the npm package `workerd` (a binary in a registry package)


def _workerd() -> str | None:
    candidates = [os.environ.get("WORKERD"), str(JS / "node_modules" / ".bin" / "workerd"), shutil.which("workerd")]
    return next((c for c in candidates if c and Path(c).exists()), None)


def _install_workerd() -> str:
    """Under CI (or VAULT_EDGE_INSTALL_WORKERD=1), fetch workerd into agents/js/node_modules (not saved
    to package.json: the client itself has no dependencies). Returns why it could not, or ''."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    try:
        proc = subprocess.run(
            [npm, "install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", f"workerd@{WORKERD_VERSION}"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "npm install workerd timed out"
    if proc.returncode != 0:
        return f"npm install workerd failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    return ""


def _run_node_tests(files: list[str], env: dict[str, str] | None = None) -> str:
    node = _node()
    proc = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "VAULT_EDGE_PYTHON": sys.executable, **(env or {})},
    )
    out = proc.stdout + proc.stderr
    counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail|cancelled|skipped) (\d+)$", out, re.M)}
    failed = "\n".join(line for line in out.splitlines() if line.startswith(("not ok", "    not ok")))
    assert proc.returncode == 0, f"node --test failed ({counts}):\n{failed}\n--- tail ---\n{out[-6000:]}"
    assert counts.get("fail", 1) == 0 and counts.get("cancelled", 0) == 0, out[-6000:]
    assert counts.get("pass", 0) > 0, f"no JS test ran:\n{out[-3000:]}"
    return out


def test_js_client_against_real_agent() -> None:
    """get / stage / version / batch / names / health / watch / 404 / binary / tokens, plus transport edge cases."""
    _run_node_tests(["test/client.test.mjs", "test/policy.test.mjs", "test/transport.test.mjs"])


def test_js_client_in_workerd() -> None:
    """deploy/workerd/config.capnp run by a real workerd against a real agent with a token policy."""
    _node()  # node missing is the louder problem
    workerd = _workerd()
    why = "not attempted outside CI"
    if workerd is None and (IN_CI or os.environ.get("VAULT_EDGE_INSTALL_WORKERD") == "1"):
        why = _install_workerd()
        workerd = _workerd()
    if workerd is None:
        pytest.skip(
            f"no workerd binary ($WORKERD, agents/js/node_modules/.bin/workerd or PATH; install: {why}); "
            f"`npm install --no-save workerd@{WORKERD_VERSION}` in agents/js provides one"
        )
    out = _run_node_tests(["test/workerd.test.mjs"], {"WORKERD": workerd})
    assert re.search(r"^# skipped 0$", out, re.M), "the workerd suite skipped itself"
