"""``rotate --wait``: follow a change until every live node of the secret's regions serves it."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vault_edge.cli.output import err
from vault_edge.operator import OperatorClient

POLL_S = 0.1


def wait_for_propagation(
    c: OperatorClient, name: str, revision: int, timeout: float, quiet: bool = False
) -> tuple[bool, dict[str, Any]]:
    """(True, last status) once no up node lags behind ``revision``; (False, ...) at the timeout.
    Nodes silent past the control plane's down threshold count as down, not as lagging."""
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=quiet or not err.is_terminal,
    ) as bar:
        task = bar.add_task(f"propagating {name}", total=None)
        while True:
            prop = c.propagation(name, revision)
            up = [n for n in prop["nodes"] if n["state"] != "down"]
            bar.update(task, total=len(up), completed=sum(1 for n in up if n["done"]))
            if prop["complete"]:
                break
            if time.monotonic() >= deadline:
                return False, prop
            time.sleep(POLL_S)
    if prop["down"] and not quiet:
        err.print(f"[yellow]down (not counted): {', '.join(prop['down'])}[/]")
    return True, prop
