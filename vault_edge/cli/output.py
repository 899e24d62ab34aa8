"""Printing for the CLI: one JSON document with ``--output json``, rich tables otherwise.

Data goes to stdout; prompts, progress and warnings go to stderr, so pipes get only data. Tables never
cut a cell: on a terminal a long one folds onto the next line, and piped (no terminal) every row is
one line whatever its width, so ``vault-edge node list | awk`` gets whole IDs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1_000_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a hint is one line: its command pastes whole
FORMATS = ("table", "json")
T = TypeVar("T")


def _format(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """This verb's --output, else the global one (``vault-edge -o json VERB``, which also reads
    VAULT_EDGE_FORMAT), else table."""
    if value is not None:
        return value
    root = ctx.find_root().obj
    return getattr(root, "fmt", None) or "table"


output_option = click.option(
    "--output",
    "-o",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    callback=_format,
    expose_value=True,
    help="json: one JSON document on stdout, for scripts [default: table, or VAULT_EDGE_FORMAT]",
)


def usage(message: str) -> NoReturn:
    """A usage error: one line on stderr (with the usage), exit 2."""
    raise click.UsageError(message)


class CliError(click.ClickException):
    """A one-line error on stderr, exit 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    out.print(t)


def when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    s = max(0, int((now or time.time()) - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def checked(parse: Callable[[str], T], value: str, param: click.Parameter | str) -> T:
    """``parse(value)``; its ValueError is a usage error (exit 2) about ``param`` (an option, or its name)."""
    try:
        return parse(value)
    except ValueError as exc:
        if isinstance(param, str):
            raise click.BadParameter(str(exc), param_hint=param) from None
        raise click.BadParameter(str(exc), param=param) from None


def duration_option(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: a duration option checked (into seconds) before the command does anything."""
    from vault_edge.durations import parse_duration

    return None if value is None else checked(parse_duration, value, param)


def duration_text(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback for a duration the control plane takes as text (``--grace``, ``--ttl``,
    ``--rotate-every``): checked here, so a typo is a usage error (exit 2) before anything is sent."""
    from vault_edge.durations import parse_duration

    if value is None:
        return None
    checked(parse_duration, value, param)
    return value.strip()
