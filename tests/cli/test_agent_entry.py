"""``vault-edge agent run`` imports only what the agent uses, and keeps its command line.

The agent is a long-lived process on every PoP host: what it imports it holds for its whole life
(``bench/agent_footprint.py`` measures it). These tests look at ``sys.modules`` in fresh processes,
never at timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tests.conftest import cli
from vault_edge.crypto import aead

# What the agent never uses: the operator CLI's framework and printing (and what they bring), the
# operator client, the server and its stack, httpx (and its own command-line client), and, where
# libsodium computes AES-GCM, cryptography.
NOT_IN_THE_AGENT = (
    "httpx",  # the agent speaks HTTP with its own client (agent/http1.py, agent/upstream.py)
    "httpcore",
    "anyio",
    "rich",
    "click",
    "pygments",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "psycopg",
    "h2",  # HTTP/2 to an egress upstream: loaded only when one picks it (agent/upstream_h2.py)
    "hpack",
    "vault_edge.agent.upstream_h2",
    "httpx._main",
    "vault_edge.operator",
    "vault_edge.server",
    "vault_edge.cli.main",
    "vault_edge.cli.output",
    "vault_edge.cli.agent_cmd",
)
if aead._sodium_available():  # the agent opens AES-256-GCM with libsodium: cryptography stays out
    NOT_IN_THE_AGENT += ("cryptography",)


def loaded(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == bad or m.startswith(bad + ".") for bad in NOT_IN_THE_AGENT))


def run_python(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_console_script_is_the_thin_entry() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vault-edge"]
    assert ep.value == "vault_edge.cli.entry:main"
    assert "vault_edge.cli.entry" in (Path(__file__).parents[2] / "vault_edge" / "__main__.py").read_text()


def test_agent_run_dispatches_without_loading_the_cli_or_the_server(tmp_path: Path) -> None:
    """The real dispatch, as ``vault-edge agent run`` takes it, up to the agent's own refusal to start
    (not enrolled, no --server): by then the agent's modules are all imported."""
    state, sock = tmp_path / "state", tmp_path / "a.sock"
    code = f"""
import json, sys
sys.argv = ["vault-edge", "agent", "run", "--state-dir", {str(state)!r}, "--socket", {str(sock)!r}]
from vault_edge.cli.entry import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "modules": [m for m, v in sys.modules.items() if v is not None]}}))
"""
    doc = run_python(code)
    modules = doc["modules"]
    assert isinstance(modules, list)
    assert doc["code"] == 1  # "give --server URL": the agent itself refused, after its imports
    assert {"vault_edge.agent.run", "vault_edge.agent.sync", "vault_edge.agent.endpoint"} <= set(modules)
    assert loaded(modules) == []


def test_importing_the_agent_alone_loads_nothing_of_the_cli_or_the_server() -> None:
    """The agent's modules and its command line's parser load nothing of the operator CLI, the server
    or httpx (whose ``import`` alone brings its own command-line client: click, rich, pygments)."""
    doc = run_python(
        "import json, sys, vault_edge.agent.run, vault_edge.cli.agent_run, vault_edge.cli.entry; "
        "print(json.dumps({'modules': [m for m, v in sys.modules.items() if v is not None]}))"
    )
    assert loaded(doc["modules"]) == []  # type: ignore[arg-type]


def test_agent_run_help_and_usage_errors(tmp_path: Path) -> None:
    r = cli("agent", "run", "--help")
    assert r.returncode == 0, r.stderr
    for option in (
        "--server",
        "--state-dir",
        "--socket",
        "--join-token",
        "--join-token-file",
        "--policy",
        "--max-stale",
        "--stale-after",
        "--wait",
        "--tls-ca",
        "--idle-timeout",
        "--max-conns-per-uid",
        "--log-level",
        "VAULT_EDGE_ADDR",
        "VAULT_EDGE_SOCKET",
    ):
        assert option in r.stdout.decode(), option
    listed = cli("agent", "--help")
    assert listed.returncode == 0 and b"run" in listed.stdout and b"Run the node agent" in listed.stdout
    assert cli("--help").returncode == 0
    # usage: exit 2, checked before anything starts
    state, sock = str(tmp_path / "state"), str(tmp_path / "a.sock")
    env = {"VAULT_EDGE_SOCKET": "", "VAULT_EDGE_ADDR": ""}
    assert cli("agent", "run", "--socket", sock, env=env).returncode == 2  # no --state-dir
    assert cli("agent", "run", "--state-dir", state, env=env).returncode == 2  # no --socket
    r = cli("agent", "run", "--state-dir", state, "--socket", sock, "--wait", "soon", env=env)
    assert r.returncode == 2 and b"invalid duration" in r.stderr
    r = cli("agent", "run", "--state-dir", state, "--socket", sock, "--max-conns-per-uid", "0", env=env)
    assert r.returncode == 2
    r = cli("agent", "run", "--state-dir", state, "--socket", sock, "--policy", str(tmp_path / "none.toml"), env=env)
    assert r.returncode == 2 and b"does not exist" in r.stderr
    assert not (tmp_path / "state").exists()
    # an error of the agent itself: one line on stderr, exit 1
    r = cli("agent", "run", "--state-dir", state, "--socket", sock, env=env)
    assert r.returncode == 1 and r.stderr.startswith(b"error: ") and r.stderr.decode().count("\n") == 1, r.stderr
    assert b"--server" in r.stderr and b"Traceback" not in r.stderr
    # the environment stands in for --socket and --server, as the other verbs' options do
    r = cli("agent", "run", "--state-dir", state, env={"VAULT_EDGE_SOCKET": sock, "VAULT_EDGE_ADDR": ""})
    assert r.returncode == 1 and b"--server" in r.stderr
    r = cli(
        "agent",
        "run",
        "--state-dir",
        state,
        "--socket",
        sock,
        env={"VAULT_EDGE_ADDR": "http://127.0.0.1:1", "VAULT_EDGE_SOCKET": ""},
    )
    assert r.returncode == 1 and b"not enrolled" in r.stderr


def test_the_click_stub_forwards_to_the_same_command(tmp_path: Path) -> None:
    """Anything that reaches ``agent run`` through the click application (not through the entry
    point) gets the same parser and the same agent."""
    code = f"""
import json, sys
from vault_edge.cli.main import cli
try:
    cli(["agent", "run", "--state-dir", {str(tmp_path / "s")!r}, "--socket", {str(tmp_path / "a.sock")!r},
         "--wait", "soon"], prog_name="vault-edge")
except SystemExit as exc:
    print(json.dumps({{"code": exc.code}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
    )
    assert json.loads(out.stdout.strip())["code"] == 2 and "invalid duration" in out.stderr
