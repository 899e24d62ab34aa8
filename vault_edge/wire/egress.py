"""Egress routes: how the agent calls an upstream API on a worker's behalf, adding the key itself.

Pure: strings and bytes in and out. The control plane checks a route with :func:`route_from_json`
when an operator defines it, and the agent again when a sync brings it (the agent takes nothing on
trust from its path, though the sync is signed).

A route (``to_json``)::

    {"name": "openai", "upstream": "https://api.openai.com", "secret": "openai/api-key",
     "inject": ["header:Authorization=Bearer {value}"], "methods": ["GET", "POST"], "paths": ["/v1/"]}

* ``upstream``: ``https://host[:port][/base]`` (``http`` only to a loopback host: a key never crosses
  a network in clear). No user info, query or fragment.
* ``inject``: where the secret goes, one or more of ``header:NAME=TEMPLATE``, ``query:NAME=TEMPLATE``
  and ``basic:USER:PASSWORD`` (HTTP Basic; both parts templates). A template is text with
  placeholders: ``{value}`` (the secret's current value, UTF-8) or ``{value.FIELD}`` (a field of a
  structured secret: the value is a JSON object, the field a string or a number).
* ``retry_previous_on_401`` (optional, off unless ``true``): during a rotation's grace, an upstream
  401 to a call made with the current value is retried once with the ``previous`` one (an upstream
  that has not yet taken the new key). Written only when on, so routes made before it keep their
  canonical text (and MAC).
* ``methods``: the methods a worker may use (never CONNECT or TRACE: TRACE echoes the request's
  headers, the injected key among them). ``paths``: prefixes of the upstream URL's path a worker may
  call (the upstream's base path included).

Rendering (:meth:`Injection.render`) refuses a value that would break out of its place (CR, LF, NUL
or any control character in a header) with :class:`InjectError`, whose message never holds the value.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

from vault_edge.wire import WireError, valid_name

METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_INJECT: Final = 8
MAX_PATHS: Final = 32
MAX_URL: Final = 2048
_ROUTE_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")  # an HTTP header name (RFC 9110 token)
_PARAM_RE = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,128}")
_PLACEHOLDER_RE = re.compile(r"\{value(?:\.([A-Za-z0-9_\-]{1,64}))?\}")
_TEMPLATE_TEXT_RE = re.compile(r"[\x20-\x7e]*")
_PATH_RE = re.compile(r"/[\x21-\x7e]{0,511}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# a DNS name (labels of 1 to 63 letters, digits and inner hyphens: what IDNA encodes), or an IP literal
_LABEL = r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?"
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_HOST_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]{{2,45}}\]")
# headers a route may never set: framing, routing and hop-by-hop ones are the agent's business
_RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "x-vault-edge-token",
    }
)


class InjectError(ValueError):
    """The secret's value cannot be injected as the route says. The message never holds the value."""


def valid_route_name(name: object) -> bool:
    return isinstance(name, str) and _ROUTE_RE.fullmatch(name) is not None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str  # lowercase; IPv6 in brackets
    port: int
    base: str  # "" or a path without its trailing "/"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.authority}{path}"


def parse_upstream(text: str) -> Upstream:
    """``https://host[:port][/base]``; WireError otherwise."""
    # (visible ASCII: urlsplit drops tabs, CR and LF anywhere and C0 controls and spaces in front,
    # so the URL checked would not be the text kept)
    if not isinstance(text, str) or not 0 < len(text) <= MAX_URL or not _VISIBLE.fullmatch(text):
        raise WireError("upstream: an https URL of at most 2048 visible ASCII characters")
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError:
        raise WireError("upstream: not a valid URL") from None
    if port == 0:
        raise WireError("upstream: port 0 is no port")
    if u.scheme not in ("https", "http"):
        raise WireError("upstream: the scheme must be https (http only to a loopback host)")
    if u.username is not None or u.password is not None or u.query or u.fragment or "#" in text or "?" in text:
        raise WireError("upstream: no user info, query or fragment (the route says what is injected)")
    host = (u.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if not _HOST_RE.fullmatch(host):
        raise WireError("upstream: a host name or address is needed")
    if u.scheme == "http" and not _loopback(host):
        raise WireError("upstream: http sends the key in clear; use https (http only to a loopback host)")
    base = u.path.rstrip("/")
    if base and (not _PATH_RE.fullmatch(base) or _dot_segment(base)):
        raise WireError("upstream: the base path must be visible ASCII without '.' or '..' segments")
    return Upstream(u.scheme, host, port or (443 if u.scheme == "https" else 80), base)


def _dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))


# -- injections -----------------------------------------------------------------------------------
Part = str | tuple[str | None]  # literal text, or a placeholder: (None,) for {value}, (FIELD,) for a field


def _template(text: str, what: str, required: bool = True) -> tuple[Part, ...]:
    if not _TEMPLATE_TEXT_RE.fullmatch(text):
        raise WireError(f"{what}: printable ASCII only")
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(text):
        parts.append(text[pos : m.start()])
        parts.append((m.group(1),))
        pos = m.end()
    parts.append(text[pos:])
    literal = "".join(p for p in parts if isinstance(p, str))
    if "{" in literal or "}" in literal:
        raise WireError(f"{what}: placeholders are {{value}} or {{value.FIELD}}")
    if required and not any(isinstance(p, tuple) for p in parts):
        raise WireError(f"{what}: the template must use the secret ({{value}} or {{value.FIELD}})")
    return tuple(p for p in parts if p != "")


@dataclass(frozen=True, slots=True)
class Injection:
    spec: str
    kind: str  # "header", "query" or "basic"
    name: str  # header name (lowercase) or query parameter; "authorization" for basic
    parts: tuple[tuple[Part, ...], ...]  # one template; two for basic (user, password)

    def render(self, value: bytes) -> tuple[str, tuple[bytes, ...]]:
        """The text to put in place, and every form of the secret it holds (for scrubbing answers)."""
        fields: dict[str, Any] | None = None
        needles: list[bytes] = []
        rendered: list[str] = []
        for template in self.parts:
            out: list[str] = []
            for p in template:
                if isinstance(p, str):
                    out.append(p)
                    continue
                field = p[0]
                if field is None:
                    text = _text(value)
                else:
                    if fields is None:
                        fields = _fields(value)
                    if field not in fields:
                        raise InjectError(f"the secret has no field {field!r}")
                    text = fields[field]
                needles.append(text.encode())
                out.append(text)
            rendered.append("".join(out))
        if self.kind == "basic":
            if ":" in rendered[0]:
                raise InjectError("a Basic user name cannot hold ':'")
            creds = base64.b64encode(":".join(rendered).encode()).decode("ascii")
            needles.append(creds.encode())
            return "Basic " + creds, _and_encoded(needles)
        result = rendered[0]
        if self.kind == "query":
            return quote(result, safe=""), _and_encoded(needles)
        if _CONTROL_RE.search(result):
            raise InjectError("the secret holds a control character (CR, LF, NUL...) and cannot go in a header")
        return result, _and_encoded(needles)


def _and_encoded(needles: list[bytes]) -> tuple[bytes, ...]:
    """The forms of the secret, and each percent-encoded where that differs: what an upstream may echo
    of a query parameter, or of a header value put in a URL (a redirect's ``Location``)."""
    encoded = (quote(n.decode(), safe="").encode() for n in needles)
    return tuple(dict.fromkeys([*needles, *encoded]))


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InjectError("the secret is not UTF-8 text") from None


def _fields(value: bytes) -> dict[str, str]:
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        raise InjectError("the secret is not a JSON object (a field was asked for)") from None
    if not isinstance(doc, dict):
        raise InjectError("the secret is not a JSON object (a field was asked for)")
    out = {}
    for k, v in doc.items():
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = json.dumps(v)
    return out


def parse_injection(spec: str) -> Injection:
    """``header:NAME=TEMPLATE``, ``query:NAME=TEMPLATE`` or ``basic:USER:PASSWORD``; WireError otherwise."""
    if not isinstance(spec, str) or not 0 < len(spec) <= 512:
        raise WireError("inject: a spec of at most 512 characters")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("header", "query", "basic"):
        raise WireError("inject: header:NAME=TEMPLATE, query:NAME=TEMPLATE or basic:USER:PASSWORD")
    if kind == "basic":
        user, sep, password = rest.partition(":")
        if not sep:
            raise WireError("inject: basic:USER:PASSWORD (e.g. basic:{value}: or basic:{value.user}:{value.password})")
        parts = (_template(user, "inject", False), _template(password, "inject", False))
        if not any(isinstance(p, tuple) for t in parts for p in t):
            raise WireError("inject: basic credentials must use the secret ({value} or {value.FIELD})")
        return Injection(spec, kind, "authorization", parts)
    name, sep, template = rest.partition("=")
    if not sep:
        raise WireError(f"inject: {kind}:NAME=TEMPLATE")
    if kind == "header":
        if not _TOKEN_RE.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
            raise WireError(f"inject: {name!r} is not a header a route may set")
        name = name.lower()
    elif not _PARAM_RE.fullmatch(name):
        raise WireError("inject: a query parameter name of letters, digits and _.-[]")
    return Injection(spec, kind, name, (_template(template, "inject"),))


# -- routes ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: str
    secret: str
    inject: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    paths: tuple[str, ...] = ("/",)
    retry_previous_on_401: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "upstream": self.upstream,
            "secret": self.secret,
            "inject": list(self.inject),
            "methods": list(self.methods),
            "paths": list(self.paths),
        }
        if self.retry_previous_on_401:
            doc["retry_previous_on_401"] = True
        return doc

    def canonical(self) -> str:
        """The route as stored and MAC'd: one JSON text per route."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A checked route, ready to use."""

    route: Route
    upstream: Upstream
    injections: tuple[Injection, ...]

    @property
    def name(self) -> str:
        return self.route.name

    def allows_path(self, path: str) -> bool:
        """``path`` (of the upstream URL, without query) lies under the upstream's base path and under
        one of the route's prefixes."""
        base = self.upstream.base
        if base and path != base and not path.startswith(base + "/"):
            return False
        return any(path.startswith(p) for p in self.route.paths)


def route_from_json(doc: Any) -> Parsed:
    """Check a route document (the operator's, or a sync's); WireError names the problem."""
    if not isinstance(doc, dict):
        raise WireError("an egress route that is not an object")
    name, upstream, secret = doc.get("name"), doc.get("upstream"), doc.get("secret")
    if not valid_route_name(name):
        raise WireError("route name: lowercase letters, digits, '_' and '-', at most 63")
    if not valid_name(secret):
        raise WireError("secret: an invalid secret name")
    up = parse_upstream(upstream)  # type: ignore[arg-type]
    inject = _strings(doc.get("inject"), "inject", MAX_INJECT)
    if not inject:
        raise WireError("inject: at least one (e.g. 'header:Authorization=Bearer {value}')")
    injections = tuple(parse_injection(s) for s in inject)
    names = [i.name for i in injections if i.kind != "query"]
    if len(set(names)) != len(names):
        raise WireError("inject: one header is set twice")
    methods = tuple(m.upper() for m in _strings(doc.get("methods", list(METHODS)), "methods", len(METHODS)))
    if not methods or any(m not in METHODS for m in methods):
        raise WireError(f"methods: some of {', '.join(METHODS)}")
    paths = _strings(doc.get("paths", ["/"]), "paths", MAX_PATHS)
    if not paths:
        raise WireError('paths: at least one prefix ("/" for every path)')
    for p in paths:
        if not _PATH_RE.fullmatch(p) or _dot_segment(p) or "%" in p or "\\" in p:
            raise WireError("paths: prefixes starting with '/', visible ASCII, no '.'/'..' segments or '%'")
    retry = doc.get("retry_previous_on_401", False)
    if not isinstance(retry, bool):
        raise WireError("retry_previous_on_401: true or false")
    route = Route(
        name,  # type: ignore[arg-type]
        upstream,  # type: ignore[arg-type]
        secret,
        inject,
        tuple(dict.fromkeys(methods)),
        tuple(dict.fromkeys(paths)),
        retry,
    )
    return Parsed(route, up, injections)


def _strings(v: Any, what: str, limit: int) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) for x in v):
        raise WireError(f"{what}: a list of at most {limit} strings")
    return tuple(v)


# -- the agent's egress counts, reported in its signed sync request ---------------------------------
REPORT_PARAM: Final = "egress"  # the sync query parameter (in the signed target: the node vouches for it)
REPORT_FIELDS: Final = ("requests", "1xx", "2xx", "3xx", "4xx", "5xx", "failed", "ms")
REPORT_MAX: Final = 4096  # characters of an encoded report
REPORT_ROUTES: Final = 64
_COUNT_MAX: Final = 2**53 - 1  # exact in JSON and in JavaScript
_COUNT_RE = re.compile(r"0|[1-9][0-9]{0,15}")


@dataclass(frozen=True, slots=True)
class Report:
    """An agent's cumulative egress counters, since ``since`` (unix seconds: when it began counting,
    its start), per route: calls sent upstream (``requests``), upstream answers by status class,
    calls that got no upstream answer (``failed``), and the summed time to the answers' heads in
    milliseconds (``ms``, for a mean). Counters, not rates: a report replaces the one before, and a
    new ``since`` says the agent restarted.

    Encoded for a query parameter with no character that needs escaping (route names are
    ``[a-z0-9_-]``)::

        SINCE/ROUTE:REQUESTS:1XX:2XX:3XX:4XX:5XX:FAILED:MS,ROUTE:...
    """

    since: int
    routes: tuple[tuple[str, tuple[int, ...]], ...]  # (route, one count per REPORT_FIELDS), by name

    def encode(self) -> str:
        parts = ",".join(name + ":" + ":".join(map(str, counts)) for name, counts in self.routes)
        return f"{self.since}/{parts}"

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "routes": {n: dict(zip(REPORT_FIELDS, c, strict=True)) for n, c in self.routes}}

    @property
    def requests(self) -> int:
        return min(sum(c[0] for _, c in self.routes), _COUNT_MAX)  # (exact in JSON's numbers)

    @classmethod
    def decode(cls, text: str) -> Report:
        """Strictly: WireError (its message safe to show) on anything but what :meth:`encode` writes
        within the bounds (``REPORT_MAX`` characters, ``REPORT_ROUTES`` routes, counts below 2^53)."""
        if not isinstance(text, str) or len(text) > REPORT_MAX:
            raise WireError(f"egress report: at most {REPORT_MAX} characters")
        since, sep, rest = text.partition("/")
        if not sep or not _COUNT_RE.fullmatch(since) or int(since) > _COUNT_MAX:
            raise WireError("egress report: SINCE/ROUTE:COUNTS,... (SINCE in unix seconds)")
        routes: list[tuple[str, tuple[int, ...]]] = []
        for item in rest.split(",") if rest else ():
            name, *counts = item.split(":")
            if not valid_route_name(name) or len(counts) != len(REPORT_FIELDS):
                raise WireError(f"egress report: ROUTE:{':'.join(f.upper() for f in REPORT_FIELDS)} per route")
            if not all(_COUNT_RE.fullmatch(c) and int(c) <= _COUNT_MAX for c in counts):
                raise WireError("egress report: counts are integers from 0 to 2^53 - 1")
            routes.append((name, tuple(int(c) for c in counts)))
        if len(routes) > REPORT_ROUTES:
            raise WireError(f"egress report: at most {REPORT_ROUTES} routes")
        names = [n for n, _ in routes]
        if names != sorted(set(names)):
            raise WireError("egress report: routes once each, sorted by name")
        return cls(int(since), tuple(routes))

    @classmethod
    def of(cls, since: int, counts: dict[str, tuple[int, ...]]) -> Report:
        """A report of ``counts`` (route → counts, as REPORT_FIELDS), each clamped to the bounds; past
        ``REPORT_ROUTES`` routes or ``REPORT_MAX`` characters, the busiest routes are kept."""
        clamped = {
            n: tuple(min(max(int(v), 0), _COUNT_MAX) for v in c) for n, c in counts.items() if valid_route_name(n)
        }
        kept = sorted(clamped, key=lambda n: (-clamped[n][0], n))[:REPORT_ROUTES]
        while True:
            report = cls(max(since, 0), tuple((n, clamped[n]) for n in sorted(kept)))
            if len(report.encode()) <= REPORT_MAX:
                return report
            kept.pop()
