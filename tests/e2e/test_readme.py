"""The README's "First steps" run as a new user would run them, on PostgreSQL (issue 13: a new user
reaches the PostgreSQL backend with the README's commands only).

The block is taken from README.md and run by bash in an empty directory, with these changes only,
each checked to still apply (so an edit of the README that breaks one fails here, naming it):

- the SQLite line is left out (the README says to run one of the two);
- the database gets a name of this run (``vault_edge`` → ``ve_<run>_readme``), dropped afterwards;
- the control plane listens on a free port (``VAULT_EDGE_PORT``, and the address exported with it),
  as port 8420 may be taken on a shared machine;
- ``. .venv/bin/activate`` activates this interpreter's environment (the block runs elsewhere);
- the interactive steps are typed by the script: ``init`` with ``-o json`` into a file, the token
  exported from it, and each ``unseal`` given its share on stdin (``vault-edge unseal -``, which the
  README names).

Everything else (createdb, the server on the README's URL, status, regions, put, get, the node token
in a file, the agent, the reads through its socket, the kill) runs verbatim.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_SERVER, ROOT, RUN_ID, _pg_admin, free_port

pytestmark = pytest.mark.e2e


def first_steps() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## First steps.*?```sh\n(.*?)```", text, re.S)
    assert m, "README.md has no 'First steps' sh block"
    return m.group(1)


def replace(script: str, old: str, new: str) -> str:
    assert old in script, f"the README's first steps no longer contain {old!r}: update tests/e2e/test_readme.py"
    return script.replace(old, new)


@pytest.fixture
def readme_db(request: pytest.FixtureRequest) -> Iterator[str]:
    request.getfixturevalue("pg_template")  # skips (fails under CI=true) without PostgreSQL
    if not PG_SERVER.endswith("postgres@127.0.0.1:5432"):
        pytest.skip("the README's commands name the local PostgreSQL (127.0.0.1:5432, user postgres)")
    name = f"ve_{RUN_ID}_readme"
    yield name
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_readme_first_steps_reach_postgresql(readme_db: str, workdir: Path) -> None:
    port = free_port()
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").exists(), "the tests run from a virtual environment (make test makes .venv)"
    s = first_steps()
    s = replace(s, "vault-edge server &\n", "")
    s = replace(s, "createdb -h 127.0.0.1 -U postgres vault_edge\n", f"createdb -h 127.0.0.1 -U postgres {readme_db}\n")
    s = replace(
        s,
        "vault-edge server --db postgresql://postgres@127.0.0.1:5432/vault_edge &",
        f"vault-edge server --db postgresql://postgres@127.0.0.1:5432/{readme_db} 2> server.log &",
    )
    s = replace(
        s, "export VAULT_EDGE_ADDR=http://127.0.0.1:8420\n", f"export VAULT_EDGE_ADDR=http://127.0.0.1:{port}\n"
    )
    s = replace(s, ". .venv/bin/activate\n", f". {venv}/bin/activate\n")
    s = replace(
        s,
        "vault-edge init                        #",
        "vault-edge init -o json > init.json    #",
    )
    read = "python -c \"import json; d = json.load(open('init.json')); print({})\""
    s = replace(
        s, "export VAULT_EDGE_TOKEN=vet_...", "export VAULT_EDGE_TOKEN=$(" + read.format("d['root_token']") + ")"
    )
    for i in range(3):
        share = read.format(f"d['shares'][{i}]")
        s = s.replace("vault-edge unseal\n", f"{share} | vault-edge unseal -\n", 1)
    assert "vault-edge unseal\n" not in s and s.count("| vault-edge unseal -\n") == 3
    script = "set -e\n" + s
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VAULT_EDGE_")},
        "HOME": str(workdir),
        "VAULT_EDGE_PORT": str(port),
    }
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: what it started is stopped with it on failure
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        out, err = b"", b"timed out"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the script's `kill` ends its jobs; a failure would not
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    log = (workdir / "server.log").read_text() if (workdir / "server.log").exists() else ""
    assert proc.returncode == 0, (err.decode()[-3000:], log[-3000:])
    text = out.decode()
    assert text.count("sk-live-...") >= 3, text  # get, agent get, the curl through the socket
    assert f"database postgresql+psycopg://postgres@127.0.0.1:5432/{readme_db};" in log
    assert "Unsealed." in text
    import psycopg

    url = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + f"/{readme_db}"
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM secrets").fetchone() == (1,)
