"""``vault-edge agent exec --restart-on-change``: run a command with secrets in its environment, and
restart it (or signal it) when one of those secrets changes, as Vault Agent's process supervisor does.

The child runs under this process (not exec'd over it): the supervisor long-polls the agent
(:class:`vault_edge.cli.watch.AgentWatch`, shared with ``agent render``), and when the revision
moves it reads the mapped names again; only if a mapped secret's version changed does it act:
``restart`` stops the child (``stop_signal``, then SIGKILL after ``stop_timeout``) and starts it with
the new environment; ``signal`` sends ``change_signal`` to the running child (for programs that read
their secrets again themselves). SIGTERM, SIGINT and SIGHUP sent to the supervisor are passed to the
child; the supervisor exits with the child's status once it ends on its own. An agent that is down
meanwhile leaves the child running as it is (the supervisor retries, and says so once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from vault_edge.cli.watch import AgentWatch
from vault_edge.client import AgentClient, AgentError


def parse_signal(text: str) -> signal.Signals:
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {text!r} (e.g. TERM, HUP, INT, USR1)") from None


def read_env(c: AgentClient, mapping: dict[str, str]) -> tuple[dict[str, str], dict[str, int], int]:
    """(the variables, each name's version, the revision they were read at). A reference may be
    ``NAME#FIELD``: one field of a structured value (read in the same round trip as the rest)."""
    from vault_edge.wire.fields import FieldError, select, split_ref

    try:
        refs = {var: split_ref(ref) for var, ref in mapping.items()}
    except FieldError as exc:
        raise ValueError(str(exc)) from None
    got = c.get_many(sorted({name for name, _ in refs.values()}))
    env: dict[str, str] = {}
    for var, (name, field) in refs.items():
        try:
            raw = got[name].bytes if field is None else select(got[name].bytes, field, repr(name))
            env[var] = raw.decode("utf-8")
        except FieldError as exc:
            raise ValueError(str(exc)) from None
        except UnicodeDecodeError:
            raise ValueError(f"{name} is binary; it cannot go into an environment variable") from None
    revision = max((s.revision for s in got.values()), default=0)
    return env, {n: s.version for n, s in got.items()}, revision


class Supervisor:
    def __init__(
        self,
        command: list[str],
        mapping: dict[str, str],
        client: Callable[[], AgentClient],
        *,
        mode: str = "restart",
        stop_signal: signal.Signals = signal.SIGTERM,
        change_signal: signal.Signals = signal.SIGHUP,
        stop_timeout: float = 10.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.command, self.mapping, self.client = command, mapping, client
        self.mode, self.stop_timeout = mode, stop_timeout
        self.stop_signal, self.change_signal = stop_signal, change_signal
        self.say = say or (lambda msg: print(f"vault-edge agent exec: {msg}", file=sys.stderr, flush=True))
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def _start(self, env: dict[str, str]) -> None:
        try:
            self.child = subprocess.Popen(self.command, env={**os.environ, **env})
        except OSError as exc:
            raise ValueError(f"cannot run {self.command[0]}: {exc.strerror}") from None

    def _forward(self, signum: int, _frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(self.stop_signal)
        try:
            child.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def run(self) -> int:
        with self.client() as c:
            env, versions, revision = read_env(c, self.mapping)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        self._start(env)
        with self.client() as c:
            watch = AgentWatch(c, revision, self.say, "the command keeps running")
            while True:
                assert self.child is not None
                code = self.child.poll()
                if code is not None:
                    return code if code >= 0 else 128 - code
                if watch.next() is None:
                    continue
                try:
                    new_env, new_versions, watch.revision = read_env(c, self.mapping)
                except AgentError as exc:
                    watch.away(exc)
                    continue
                watch.back()
                if new_versions == versions or self.stopping:
                    continue
                changed = sorted(n for n in new_versions if new_versions[n] != versions.get(n))
                versions = new_versions
                if self.mode == "signal":
                    self.say(f"{', '.join(changed)} changed: sending {self.change_signal.name} to the command")
                    if self.child.poll() is None:
                        self.child.send_signal(self.change_signal)
                    continue
                self.say(f"{', '.join(changed)} changed: restarting the command")
                self._stop_child()
                if self.stopping:
                    continue
                self._start(new_env)
