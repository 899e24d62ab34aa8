"""The ``vault-edge`` entry point: ``agent run`` goes straight to the agent, everything else to the CLI.

The operator CLI (:mod:`vault_edge.cli.main`) imports click, rich and the operator client, about
10 MiB of resident memory and tens of milliseconds of start-up that the node agent, a long-lived
process on every PoP host, would carry for nothing. So ``agent run`` is dispatched here, on the raw
arguments, before any of it is imported (see :mod:`vault_edge.cli.agent_run`); any other verb,
``--help`` included, goes to the click application as before.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["agent", "run"]:
        from vault_edge.cli.agent_run import main as agent_run

        sys.exit(agent_run(argv[2:]))
    from vault_edge.cli.main import main as cli

    cli()
