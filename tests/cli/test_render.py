"""``agent render``'s parts without processes: names found by rendering and read at one revision,
error lines that never quote a value, the config file, atomic writes, commands, the shared watch.
The whole, with real processes, is tests/e2e/test_render.py."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import wait_until
from vault_edge.cli.render import (
    RenderError,
    Spec,
    check_specs,
    current,
    load_config,
    load_templates,
    parse_perms,
    remove_stale_temps,
    render,
    run_command,
    write_atomic,
)
from vault_edge.cli.watch import AgentWatch
from vault_edge.client import AgentError, Secret


class Agent:
    """A stand-in for AgentClient: values by name, each batch read recorded."""

    def __init__(self, values: dict[str, bytes], revision: int = 7) -> None:
        self.values, self.revision = values, revision
        self.reads: list[list[str]] = []

    def get_many(self, names: list[str]) -> dict[str, Secret]:
        self.reads.append(names)
        missing = [n for n in names if n not in self.values]
        if missing:
            raise AgentError(404, "not_found", f"no secret {missing[0]!r}")
        return {n: Secret(n, self.values[n], 3, "current", self.revision) for n in names}


def template(tmp_path: Path, text: str, name: str = "t.tpl") -> Any:
    (tmp_path / name).write_text(text)
    [t] = load_templates([Spec(tmp_path / name, tmp_path / "out")])
    return t


def test_every_name_a_file_uses_is_read_in_one_batch(tmp_path: Path) -> None:
    """Names that depend on values take more passes; each pass reads all the names again, together,
    so the file's values come from one read (one revision)."""
    t = template(
        tmp_path,
        '{% if secret("mode") == "b" %}{{ secret("b") }}{% else %}{{ secret("a") }}{% endif %}'
        ' {{ secret("db#password") }} {{ secret("db", "user") }}\n',
    )
    agent = Agent({"mode": b"b", "a": b"A", "b": b"B", "db": b'{"user": "u1", "password": "p1"}'})
    r = render(t, agent)  # type: ignore[arg-type]
    assert r.error is None and r.data == b"B p1 u1\n"
    assert agent.reads == [["a", "db", "mode"], ["a", "b", "db", "mode"]]
    assert dict(r.versions or {}) == {"b": 3, "db": 3, "mode": 3}  # "a" was read, not used

    plain = template(tmp_path, "no secrets here\n", "plain.tpl")
    agent.reads.clear()
    assert render(plain, agent).data == b"no secrets here\n" and agent.reads == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{ secret("gone") }}', "t.tpl: no secret 'gone'"),
        ('x\n{{ secret("bin") }}', "t.tpl: line 2: 'bin' is binary: it cannot go into a text template"),
        ('{{ secret("key", "f") }}', "t.tpl: line 1: 'key' is not a structured value"),
        ('{{ secret("key#a", "b") }}', "t.tpl: line 1: secret('key'): give NAME#FIELD or a field argument, not both"),
        ('{{ secret("../x") }}', "t.tpl: line 1: invalid secret name"),
        ("\n\n{{ nope }}", "t.tpl: line 3: 'nope' is undefined"),
        ('{{ secret("key").upper().nope }}', "t.tpl: line 1: 'str object' has no attribute 'nope'"),
        ('{% set d = {} %}{{ d[secret("key")] }}', "t.tpl: line 1: an undefined name or attribute"),
        ('{{ secret("key") | int + "" }}', "t.tpl: line 1: TypeError (its text is not shown"),
        ('{{ secret("key").__class__ }}', "t.tpl: line 1: an operation the sandbox refuses"),
    ],
)
def test_errors_name_the_template_and_line_never_the_value(tmp_path: Path, text: str, expected: str) -> None:
    t = template(tmp_path, text)
    r = render(t, Agent({"key": b"sekrit-value-1", "bin": b"\xff\xfe"}))  # type: ignore[arg-type]
    assert r.error is not None and r.error.startswith(f"{tmp_path}/{expected}"), r.error
    assert "sekrit" not in r.error


def test_a_template_that_does_not_compile_is_located(tmp_path: Path) -> None:
    (tmp_path / "bad.tpl").write_text("a\nb\n{{ x }\n")
    with pytest.raises(RenderError, match=r"bad\.tpl: line 3: unexpected '}'"):
        load_templates([Spec(tmp_path / "bad.tpl", tmp_path / "out")])
    (tmp_path / "bin.tpl").write_bytes(b"\xff")
    with pytest.raises(RenderError, match=r"bin\.tpl is not UTF-8 text"):
        load_templates([Spec(tmp_path / "bin.tpl", tmp_path / "out")])


def test_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "render.toml"
    cfg.write_text(
        '[[template]]\nsource = "a.tpl"\ndestination = "/etc/a.conf"\nperms = "0640"\nuser = "root"\n'
        'group = 0\ncommand = "true"\ncommand_timeout = "2m"\n'
        '[[template]]\nsource = "/abs/b.tpl"\ndestination = "out/b"\n'
    )
    a, b = load_config(cfg)
    assert a == Spec(tmp_path / "a.tpl", Path("/etc/a.conf"), 0o640, 0, 0, "true", 120.0)
    assert b == Spec(Path("/abs/b.tpl"), tmp_path / "out/b")  # relative to the file; mode 0600
    bad = {
        'source = "a"\ndestination = "b"\nmode = "0600"': "unknown key 'mode'",
        'source = "a"': "destination (a path) is required",
        'source = "a"\ndestination = "b"\nperms = 640': "perms is an octal string",
        'source = "a"\ndestination = "b"\nuser = "no-such-user-x"': "no user 'no-such-user-x' on this host",
        'source = "a"\ndestination = "b"\ncommand_timeout = "0s"': "command_timeout is more than 0",
        'source = "a"\ndestination = "b"\ncommand = 3': "command is a shell command line",
    }
    for body, message in bad.items():
        cfg.write_text("[[template]]\n" + body + "\n")
        with pytest.raises(RenderError, match=re.escape(message)):
            load_config(cfg)
    cfg.write_text("[template]\nsource = 1\n")
    with pytest.raises(RenderError, match="no \\[\\[template\\]\\] entries"):
        load_config(cfg)
    with pytest.raises(RenderError, match="is the destination of two templates"):
        check_specs([Spec(Path("a"), tmp_path / "x"), Spec(Path("b"), tmp_path / "y/../x")])
    for good, bits in (("0640", 0o640), ("640", 0o640), ("0o600", 0o600)):
        assert parse_perms(good) == bits
    for wrong in ("4755", "0999", "rw-r-----", 416):
        with pytest.raises(ValueError):
            parse_perms(wrong)


def test_an_atomic_write_beats_the_umask_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    spec = Spec(Path("t.tpl"), tmp_path / "sub" / "f.conf", perms=0o644)
    old = os.umask(0o077)
    try:
        write_atomic(spec, b"one\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(spec.destination.stat().st_mode) == 0o644 and spec.destination.read_bytes() == b"one\n"
    assert current(spec, b"one\n") == (True, True)
    assert current(spec, b"two\n")[0] is False and current(spec, b"one!\n")[0] is False
    assert current(Spec(Path("t"), spec.destination, perms=0o600), b"one\n") == (True, False)

    blocked = Spec(Path("t.tpl"), tmp_path / "dir-in-the-way")
    (blocked.destination / "child").mkdir(parents=True)  # rename over a non-empty directory fails
    with pytest.raises(RenderError, match=r"cannot write .*dir-in-the-way"):
        write_atomic(blocked, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir-in-the-way", "sub"]
    assert [p.name for p in spec.destination.parent.iterdir()] == ["f.conf"]

    # what a killed renderer left is removed at start; nothing else is
    left, other = spec.destination.parent / ".f.conf.0a1b2c.vault-edge-tmp", spec.destination.parent / ".g.tmp"
    left.write_bytes(b"half")
    other.write_bytes(b"keep")
    remove_stale_temps([spec])
    assert sorted(p.name for p in spec.destination.parent.iterdir()) == [".g.tmp", "f.conf"]


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    said: list[str] = []
    pid_file = tmp_path / "pid"
    run_command(f"sleep 30 & echo $! > {pid_file}; wait", 0.5, said.append, "/etc/x.conf")
    assert said == ["the command for /etc/x.conf did not finish within 0.5s: killed"]
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # killed, not reaped yet
        except FileNotFoundError:
            return True

    wait_until(gone, 10, "the grandchild killed")
    said.clear()
    run_command("exit 3", 5, said.append, "a, b")
    run_command("kill -TERM $$", 5, said.append, "c")
    run_command("true", 5, said.append, "d")
    assert said == ["the command for a, b exited with status 3", "the command for c was killed by SIGTERM"]


def test_the_watch_says_an_absent_agent_once_and_its_return_once() -> None:
    said: list[str] = []
    answers: list[Any] = [AgentError(0, "unreachable", "no agent"), AgentError(0, "unreachable", "no agent"), 5, 6]

    class Client:
        def watch(self, since: int, wait: float) -> dict[str, int]:
            a = answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return {"revision": a}

    w = AgentWatch(Client(), 5, said.append, "the files stay", sleep=lambda _s: None)  # type: ignore[arg-type]
    assert [w.next(), w.next(), w.next()] == [None, None, None]
    assert said == ["cannot reach the agent (no agent); the files stay; retrying", "the agent answers again"]
    assert w.next() == 6 and w.revision == 5  # the caller moves it once it has read


def test_files_sharing_a_command_are_all_written_before_it_runs_once(tmp_path: Path) -> None:
    """A certificate and its key: both files in place, then one reload (not one per file)."""
    from vault_edge.cli.render import Renderer

    class Client(Agent):
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def health(self) -> dict[str, int]:
            return {"revision": self.revision}

    (tmp_path / "crt.tpl").write_text('{{ secret("tls#crt") }}')
    (tmp_path / "key.tpl").write_text('{{ secret("tls#key") }}')
    reload = f"cat {tmp_path}/tls.crt {tmp_path}/tls.key >> {tmp_path}/reloads"
    specs = [Spec(tmp_path / f"{n}.tpl", tmp_path / f"tls.{n}", command=reload) for n in ("crt", "key")]
    said: list[str] = []
    client = Client({"tls": b'{"crt": "C1", "key": "K1"}'})
    assert Renderer(specs, lambda: client, say=said.append).run(once=True) == 0  # type: ignore[arg-type,return-value]
    assert (tmp_path / "reloads").read_text() == "C1K1"
    assert said == [f"wrote {tmp_path}/tls.crt (tls v3)", f"wrote {tmp_path}/tls.key (tls v3)"]
