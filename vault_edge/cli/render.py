"""``vault-edge agent render``: files from templates, rendered again when their secrets rotate, as
Vault Agent's templates do.

A template is Jinja2 text run in a sandbox (``SandboxedEnvironment``, ``StrictUndefined``, no
autoescaping, the trailing newline kept) with one function, ``secret(name, field=None)``: the value
as text, or one field of a structured value (``secret("db/main", "password")`` or
``secret("db/main#password")``).

**One revision a file.** A file never mixes versions: every secret a template names is read in one
batch (``get_many``, one revision). The names are found by rendering: a pass in which a name not yet
read stands as ``""`` notes it; the noted names are read together and the template rendered again,
until a pass names nothing unread (a template whose names depend on values may take a few passes;
each reads all its names again, together).

**Atomic files.** A file is written only when its rendered bytes differ from the destination's (or
its mode or owner do): a temporary file in the destination's directory, created with the final mode
(and ``fchmod`` past the umask, ``fchown`` first when an owner is asked, so no byte is written before
the owner is set), written, fsync'd, renamed over the destination, and the directory fsync'd. A
reader sees the old file or the new one, never a part; a failure leaves no temporary file behind.
When files changed, their commands run after all of them are written (each distinct command once,
so a certificate and its key are both in place before the server reloads), with ``sh -c`` and a
timeout; a command's failure is logged, not fatal.

**Errors.** At start, any error (a missing secret, a template that does not compile, an unreadable
source, an owner that cannot be set) is one line and exit 1, and no file is written. While watching,
a template that fails keeps its previous file, is logged in one line, and is tried again at the next
change; an agent that goes away leaves every file as it is (said once, retried). No line ever holds
a value: errors name the template, the line and the secret, and a Jinja error's own text is shown
only where it cannot quote rendered data (see :func:`_safe_error`).
"""

from __future__ import annotations

import contextlib
import glob
import grp
import hmac
import os
import pwd
import re
import secrets
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jinja2
import jinja2.sandbox

from vault_edge import wire
from vault_edge.cli.output import checked
from vault_edge.cli.watch import AgentWatch, agent_away
from vault_edge.client import AgentClient, AgentError, Secret
from vault_edge.wire.fields import FieldError, check_field, select, split_ref

DEFAULT_PERMS = 0o600
DEFAULT_TIMEOUT_S = 30.0
MAX_PASSES = 8  # renders of one template for one file: a pass reads all the names the last one noted
MAX_NAMES = 256  # the agent's batch read bound
TMP_SUFFIX = ".vault-edge-tmp"
_CONFIG_KEYS = {"source", "destination", "perms", "user", "group", "command", "command_timeout"}
_PERMS = re.compile(r"(?:0o?)?([0-7]{3})")


class RenderError(Exception):
    """One line, safe to print: it names a template, a file, a line or a secret, never a value."""


# ---------------------------------------------------------------------------------- specifications


@dataclass(frozen=True)
class Spec:
    """One template: where it is read from, where it goes, how the file is made, what runs after."""

    source: Path
    destination: Path
    perms: int = DEFAULT_PERMS
    uid: int = -1  # -1: leave as created (the renderer's own)
    gid: int = -1
    command: str | None = None
    command_timeout: float = DEFAULT_TIMEOUT_S


def parse_perms(text: object) -> int:
    """``"0640"``, ``"640"`` or ``"0o640"``: permission bits only (no setuid, setgid or sticky)."""
    m = _PERMS.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f'perms is an octal string such as "0640", not {text!r}')
    return int(m.group(1), 8)


def _principal(text: object, what: str, lookup: Callable[[str], int]) -> int:
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str) and text.isdigit():
        return int(text)
    if isinstance(text, str) and text:
        try:
            return lookup(text)
        except KeyError:
            raise ValueError(f"no {what} {text!r} on this host") from None
    raise ValueError(f"{what} is a name or an id, not {text!r}")


def parse_user(text: object) -> int:
    """A user name or a numeric uid."""
    return _principal(text, "user", lambda name: pwd.getpwnam(name).pw_uid)


def parse_group(text: object) -> int:
    """A group name or a numeric gid."""
    return _principal(text, "group", lambda name: grp.getgrnam(name).gr_gid)


def parse_timeout(value: object) -> float:
    """A duration (``"30s"``, ``"2m"``) or a number of seconds, more than 0."""
    from vault_edge.durations import parse_duration

    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = float(parse_duration(value))
    else:
        raise ValueError(f'command_timeout is a duration such as "30s", not {value!r}')
    if not 0 < seconds <= 86400:
        raise ValueError("command_timeout is more than 0 and at most a day")
    return seconds


def load_config(path: Path) -> list[Spec]:
    """The ``[[template]]`` entries of a TOML file. Relative paths are taken from the file's directory
    (so the config means the same whatever directory the renderer starts in)."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise RenderError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RenderError(f"{path} is not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"template"})
    if extra:
        raise RenderError(f"{path}: unknown key {extra[0]!r} (the file holds [[template]] entries)")
    entries = doc.get("template")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise RenderError(f"{path}: no [[template]] entries")
    base = path.parent
    specs = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[template]] {i}"
        unknown = sorted(set(entry) - _CONFIG_KEYS)
        if unknown:
            raise RenderError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_CONFIG_KEYS))})")
        for key in ("source", "destination"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise RenderError(f"{where}: {key} (a path) is required")
        command = entry.get("command")
        if command is not None and (not isinstance(command, str) or not command.strip()):
            raise RenderError(f"{where}: command is a shell command line")
        try:
            specs.append(
                Spec(
                    source=base / entry["source"],
                    destination=base / entry["destination"],
                    perms=parse_perms(entry.get("perms", "0600")),
                    uid=parse_user(entry["user"]) if "user" in entry else -1,
                    gid=parse_group(entry["group"]) if "group" in entry else -1,
                    command=command,
                    command_timeout=parse_timeout(entry.get("command_timeout", DEFAULT_TIMEOUT_S)),
                )
            )
        except ValueError as exc:
            raise RenderError(f"{where}: {exc}") from None
    return specs


def cli_specs(
    pairs: tuple[str, ...],
    *,
    perms: str | None,
    user: str | None,
    group: str | None,
    command: str | None,
    command_timeout: str | None,
) -> list[Spec]:
    """The ``--template SRC:DEST`` specs, with the global options; a bad value is a usage error (exit 2)."""
    mode = DEFAULT_PERMS if perms is None else checked(parse_perms, perms, "--perms")
    uid = -1 if user is None else checked(parse_user, user, "--user")
    gid = -1 if group is None else checked(parse_group, group, "--group")
    timeout = (
        DEFAULT_TIMEOUT_S if command_timeout is None else checked(parse_timeout, command_timeout, "--command-timeout")
    )
    specs = []
    for pair in pairs:
        src, sep, dest = pair.partition(":")
        if not sep or not src or not dest:
            raise click.BadParameter(f"{pair!r}: expected SRC:DEST", param_hint="--template")
        specs.append(Spec(Path(src), Path(dest), mode, uid, gid, command or None, timeout))
    return specs


def check_specs(specs: list[Spec]) -> None:
    seen: set[Path] = set()
    for s in specs:
        dest = Path(os.path.abspath(s.destination))
        if dest in seen:
            raise RenderError(f"{s.destination} is the destination of two templates")
        seen.add(dest)


# -------------------------------------------------------------------------------------- templates


class _Sources(jinja2.BaseLoader):
    """The sources read at start, by path: a template's file name shows in its tracebacks, so an
    error is located to a line of it (and a source edited later changes nothing until a restart)."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        if template not in self.texts:
            raise jinja2.TemplateNotFound(template)
        return self.texts[template], template, lambda: True


def environment(loader: jinja2.BaseLoader | None = None) -> jinja2.sandbox.SandboxedEnvironment:
    return jinja2.sandbox.SandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class Template:
    spec: Spec
    jinja: jinja2.Template
    text: str  # the source

    @property
    def name(self) -> str:
        return str(self.spec.source)


def load_templates(specs: list[Spec]) -> list[Template]:
    """Read and compile every source: an unreadable or non-UTF-8 file, or a syntax error, is a
    RenderError naming the file and the line (a syntax error's text is about the source, which holds
    no value: the compiler never sees one)."""
    loader = _Sources()
    env = environment(loader)
    out = []
    for spec in specs:
        name = str(spec.source)
        try:
            text = loader.texts[name] = spec.source.read_bytes().decode("utf-8")
        except OSError as exc:
            raise RenderError(f"cannot read template {name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RenderError(f"template {name} is not UTF-8 text") from None
        try:
            out.append(Template(spec, env.get_template(name), text))
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"{name}: line {exc.lineno}: {exc.message}") from None
    return out


class _Pass:
    """``secret()`` for one rendering pass over values read at one revision. A name not among them
    is noted in ``missing`` and stands as ``""``; the pass's text is then thrown away."""

    def __init__(self, got: Mapping[str, Secret]) -> None:
        self.got = got
        self.missing: set[str] = set()
        self.used: set[str] = set()

    def __call__(self, ref: object, field: object = None) -> str:
        if not isinstance(ref, str) or not (field is None or isinstance(field, str)):
            raise RenderError("secret() takes a name and an optional field name, as text")
        try:
            name, ref_field = split_ref(ref)
            if field is not None:
                if ref_field is not None:
                    raise RenderError(f"secret({name!r}): give NAME#FIELD or a field argument, not both")
                ref_field = check_field(field)
        except FieldError as exc:
            raise RenderError(str(exc)) from None
        try:
            wire.check_name(name)
        except wire.WireError as exc:  # its text does not repeat the name
            raise RenderError(str(exc)) from None
        self.used.add(name)
        s = self.got.get(name)
        if s is None:
            self.missing.add(name)
            return ""
        try:
            raw = s.bytes if ref_field is None else select(s.bytes, ref_field, repr(name))
            return raw.decode("utf-8")
        except FieldError as exc:
            raise RenderError(str(exc)) from None
        except UnicodeDecodeError:
            raise RenderError(f"{name!r} is binary: it cannot go into a text template") from None


_UNDEFINED = re.compile(
    r"'([A-Za-z_][A-Za-z0-9_]*)' is undefined|'[a-z_ ]+ object' has no attribute '([A-Za-z_][A-Za-z0-9_]*)'"
)


def _safe_error(t: Template, exc: BaseException) -> RenderError:
    """A rendering error as one safe line: the template, its line, and what went wrong. Only texts
    that cannot hold rendered data are kept: ours (RenderError), and an undefined name or attribute
    that the template's source spells out; any other error (a filter given a value it refuses: its
    text may quote the value) is shown by its type alone."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == t.name:
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(exc, RenderError):
        what = str(exc)
    elif isinstance(exc, jinja2.UndefinedError):
        m = _UNDEFINED.fullmatch(str(exc))
        ident = m and (m.group(1) or m.group(2))
        what = str(exc) if ident and ident in t.text else "an undefined name or attribute"
    elif isinstance(exc, jinja2.sandbox.SecurityError):
        what = "an operation the sandbox refuses"
    else:
        what = f"{type(exc).__name__} (its text is not shown: it may quote a value)"
    return RenderError(f"{t.name}: line {line}: {what}" if line else f"{t.name}: {what}")


@dataclass(frozen=True)
class Rendered:
    data: bytes = b""
    versions: Mapping[str, int] | None = None  # name → version, for the log line
    error: str | None = None
    away: AgentError | None = None  # the agent did not answer: nothing is known


def render(t: Template, client: AgentClient) -> Rendered:
    """Render ``t`` with all the secrets it names read at one revision (see the module's text)."""
    names: set[str] = set()
    got: Mapping[str, Secret] = {}
    for _ in range(MAX_PASSES):
        p = _Pass(got)
        failure: BaseException | None = None
        try:
            text = t.jinja.render(secret=p)
        except Exception as exc:  # any error of the template's; a placeholder may cause one
            failure = exc
        if p.missing:
            names |= p.missing
            if len(names) > MAX_NAMES:
                return Rendered(error=f"{t.name}: names more than {MAX_NAMES} secrets")
            try:
                got = client.get_many(sorted(names))
            except AgentError as exc:
                if agent_away(exc):
                    return Rendered(away=exc)
                return Rendered(error=f"{t.name}: {exc.message}")
            continue
        if failure is not None:
            return Rendered(error=str(_safe_error(t, failure)))
        return Rendered(text.encode("utf-8"), {n: got[n].version for n in sorted(p.used)})
    return Rendered(error=f"{t.name}: the secrets it names change with their values; gave up after {MAX_PASSES} reads")


# ------------------------------------------------------------------------------------------ files


def _owner(uid: int, gid: int) -> str:
    return f"{'' if uid == -1 else uid}:{'' if gid == -1 else gid}"


def current(spec: Spec, data: bytes) -> tuple[bool, bool]:
    """(the destination holds ``data``, and its mode and owner are the spec's)."""
    try:
        fd = os.open(spec.destination, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False, False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False, False
        with os.fdopen(os.dup(fd), "rb") as f:
            same = hmac.compare_digest(f.read(len(data) + 1), data)
    except OSError:
        return False, False
    finally:
        os.close(fd)
    meta = stat.S_IMODE(st.st_mode) == spec.perms and spec.uid in (-1, st.st_uid) and spec.gid in (-1, st.st_gid)
    return same, meta


def write_atomic(spec: Spec, data: bytes) -> None:
    """Write ``data`` to ``spec.destination`` atomically, with its mode and owner (module text)."""
    dest = spec.destination
    parent = dest.parent
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise RenderError(f"cannot make the directory {parent}: {exc.strerror}") from None
    tmp = parent / f".{dest.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, spec.perms)
    except OSError as exc:
        raise RenderError(f"cannot write in {parent}: {exc.strerror}") from None
    done = False
    try:
        if spec.uid != -1 or spec.gid != -1:
            try:
                os.fchown(fd, spec.uid, spec.gid)
            except OSError as exc:
                raise RenderError(
                    f"cannot give {dest} to {_owner(spec.uid, spec.gid)}: {exc.strerror}"
                    " (setting another owner needs root or CAP_CHOWN)"
                ) from None
        try:
            os.fchmod(fd, spec.perms)  # past the umask; after fchown, which may clear mode bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, dest)
            done = True
            dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise RenderError(f"cannot write {dest}: {exc.strerror}") from None
    finally:
        if fd != -1:
            os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def remove_stale_temps(specs: list[Spec]) -> None:
    """Temporary files a killed renderer left (only ours: ``.DEST.<random>.vault-edge-tmp``)."""
    for spec in specs:
        with contextlib.suppress(OSError):
            for p in spec.destination.parent.glob(f".{glob.escape(spec.destination.name)}.*{TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    p.unlink()


# ------------------------------------------------------------------------------------------ commands


def run_command(command: str, timeout: float, say: Callable[[str], None], what: str) -> None:
    """``sh -c command`` in its own session (killed whole at the timeout); failures are said, not raised.
    The command's text is not logged (it might carry a token); ``what`` names the files it follows."""
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        say(f"cannot run the command for {what}: {exc.strerror}")
        return
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        say(f"the command for {what} did not finish within {timeout:g}s: killed")
        return
    if code < 0:
        say(f"the command for {what} was killed by {signal.Signals(-code).name}")
    elif code:
        say(f"the command for {what} exited with status {code}")


# ------------------------------------------------------------------------------------------ the loop


class Renderer:
    def __init__(
        self,
        specs: list[Spec],
        client: Callable[[], AgentClient],
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        check_specs(specs)
        self.specs, self.client = specs, client
        self.say = say or (lambda msg: print(f"vault-edge agent render: {msg}", file=sys.stderr, flush=True))
        self.stopping = False
        self.start_revision = 0

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def run(self, once: bool = False) -> int:
        """Render every template (any error: RenderError, nothing written), then, unless ``once``,
        follow the agent until SIGTERM or SIGINT (exit 0)."""
        templates = load_templates(self.specs)
        remove_stale_temps(self.specs)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self.client() as c:
                self._first(c, templates)
                if not once:
                    self._follow(c, templates)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def _first(self, c: AgentClient, templates: list[Template]) -> None:
        """Render every template, then write: any error is fatal, before any file is written."""
        try:
            self.start_revision = int(c.health()["revision"])  # before the reads: a change meanwhile is seen
        except AgentError as exc:
            raise RenderError(exc.message) from None
        results = [render(t, c) for t in templates]
        for r in results:
            if r.away is not None:
                raise RenderError(r.away.message)
            if r.error is not None:
                raise RenderError(r.error)
        self._apply(templates, results, fatal=True)

    def _follow(self, c: AgentClient, templates: list[Template]) -> None:
        """Render again at each revision the agent passes, until SIGTERM or SIGINT."""
        watch = AgentWatch(c, self.start_revision, self.say, "the files stay as they are")
        while not self.stopping:
            seen = watch.next()
            if seen is None:
                continue
            results = [render(t, c) for t in templates]
            away = next((r.away for r in results if r.away is not None), None)
            if away is not None:
                watch.away(away)  # the revision stays: every template is tried again once it answers
            else:
                watch.back()
                watch.revision = seen
            self._apply(templates, results, fatal=False)

    def _apply(self, templates: list[Template], results: list[Rendered], *, fatal: bool) -> None:
        """Write the files whose bytes (or mode, owner) changed, then run their commands, once each."""
        commands: dict[tuple[str, float], list[str]] = {}
        for t, r in zip(templates, results, strict=True):
            spec = t.spec
            if r.away is not None:  # said once by the watch; the file stays as it is
                continue
            if r.error is not None:
                self.say(f"{r.error}; {spec.destination} keeps its previous content")
                continue
            same, meta = current(spec, r.data)
            if same and meta:
                continue
            try:
                write_atomic(spec, r.data)
            except RenderError as exc:
                if fatal:
                    raise
                self.say(f"{exc}; it keeps its previous content")
                continue
            read = ", ".join(f"{n} v{v}" for n, v in (r.versions or {}).items()) or "no secrets"
            self.say(
                f"wrote {spec.destination} ({read})" if not same else f"set the mode and owner of {spec.destination}"
            )
            if not same and spec.command:
                commands.setdefault((spec.command, spec.command_timeout), []).append(str(spec.destination))
        for (command, timeout), dests in commands.items():
            run_command(command, timeout, self.say, ", ".join(dests))
