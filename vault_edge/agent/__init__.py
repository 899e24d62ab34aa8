"""The node agent: enrols once, long-polls the control plane, serves workers on a unix socket.

Imports nothing of the server (no FastAPI, no SQLAlchemy), nor the operator CLI (click, rich): fast
cold start, small footprint (``bench/agent_footprint.py``).
"""

import sys

# ``import httpx`` runs ``from ._main import main`` (httpx's own command-line client), which imports
# click, rich and pygments whenever they are installed, as they are beside vault-edge's CLI: about
# 6 MiB resident and 20 ms in every agent, for a command it never runs. A None entry in sys.modules
# is Python's documented way to make an import fail (ImportError), and httpx falls back to a stub
# ``httpx.main`` on ImportError (as it does when the cli extra is not installed). Only if httpx is
# not imported yet: a process that already holds the real one (the operator CLI, tests) keeps it.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
