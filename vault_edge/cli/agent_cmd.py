"""``vault-edge agent ...``: run the node agent, and local verbs against its socket."""

from __future__ import annotations

import click


@click.group()
def agent() -> None:
    """The node agent (one per PoP host) and local reads through its socket."""
