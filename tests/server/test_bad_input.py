"""DESIGN, "Bad input and faults": every API answers malformed, oversized or hostile input with a 4xx
and a clear message, never a 500 or a traceback, and never loses or corrupts stored data.

The routes are enumerated from the app itself, so a new route is in the barrage from the day it is
added (a route whose body model or path parameter this file does not know fails
``test_every_route_is_known`` until it is described here). Each barrage collects every bad answer and
reports them together, then checks that the data stored before the barrage reads back unchanged.
Runs on SQLite and PostgreSQL (``make_app`` is parametrised by ``db_url``).

Regression tests for the bugs this suite found are at the end of the file.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import BaseModel

from tests.conftest import Api, enroll_body, enroll_node, init_and_unseal, server_key
from tests.conftest import signed_headers as _signed_headers
from vault_edge import wire
from vault_edge.crypto import signing
from vault_edge.server import deps
from vault_edge.server.routes.egress import EgressCreate
from vault_edge.server.schemas import (
    InitRequest,
    JoinTokenRequest,
    PromoteRequest,
    PutSecret,
    RegionCreate,
    RekeyRequest,
    RollbackRequest,
    RotateRequest,
    RotatorCreate,
    SealMigrateRequest,
    SharesRequest,
    TokenCreate,
    UnsealRequest,
)

LIMIT = 16 * 1024  # Settings.max_body_bytes for these apps: small, so oversized bodies stay cheap
TRACEBACK_MARKERS = ("Traceback", 'File "')
EXCLUDED_PATHS = {"/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
SEALED_EXEMPT = {
    "/v1/sys/status",
    "/v1/sys/unseal",
    "/v1/sys/init",
    "/v1/sys/health",
    # authorised by a threshold of the (recovery) shares, as unseal is: they work sealed too
    "/v1/sys/generate-root",
    "/v1/sys/rekey",
    "/v1/sys/seal-migrate",
}

# A valid body for every request model (a new model must be added here: see test_every_route_is_known).
EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    InitRequest: {"shares": 3, "threshold": 2},
    UnsealRequest: {"share": "not a share at all"},
    PutSecret: {"value": "v", "regions": ["eu"]},
    RotateRequest: {"value": "v2"},
    PromoteRequest: {},
    RollbackRequest: {"to": 1},
    RegionCreate: {"name": "zz"},
    JoinTokenRequest: {"region": "eu"},
    TokenCreate: {"name": "t", "prefixes": ["app/"], "verbs": ["read"]},
    SharesRequest: {"shares": ["not a share at all"]},
    RekeyRequest: {"shares": ["not a share at all"], "new_shares": 3, "new_threshold": 2},
    SealMigrateRequest: {"shares": ["not a share at all"], "to": "shamir"},
    RotatorCreate: {
        "type": "redis",
        "admin_secret": "rotators/rd-admin",
        "admin_value": {"password": "p"},
        "config": {"username": "app"},
    },
    EgressCreate: {
        "name": "zz",
        "upstream": "https://api.example.com",
        "secret": "keep/me",
        "inject": ["header:Authorization=Bearer {value}"],
    },
}
# Path parameters: a value that exists (after seeding) and one that does not.
PATH_VALUES = {
    "name": ("keep/me", "no/such/secret"),
    "node_id": ("n-0123456789abcdef", "n-0123456789abcdef"),
    "token_id": ("0123456789abcdef", "0123456789abcdef"),
}
# Routes whose path parameter is not a secret name.
ROUTE_PATH_VALUES = {
    "/v1/regions/{name}/rekey": {"name": ("eu", "nowhere")},
    "/v1/rotators/{name}": {"name": ("rd", "nowhere")},
    "/v1/egress/{name}": {"name": ("zz", "nowhere")},
}
# The routes where an unknown path name is not an error: PUT creates the secret, or the rotator.
CREATES = {("PUT", "/v1/secrets/{name:path}"), ("PUT", "/v1/rotators/{name}")}


# -- the routes, from the app -----------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    method: str
    path: str
    endpoint: Callable[..., Any]
    body_model: type[BaseModel] | None
    query: dict[str, Any]
    path_params: tuple[str, ...]
    authed: bool
    raw_body: bool  # reads the request body itself (signed agent requests)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def url(self, which: int = 0, **override: str) -> str:
        def fill(m: re.Match[str]) -> str:
            name = m.group(1)
            values = ROUTE_PATH_VALUES.get(self.path, PATH_VALUES)
            return override.get(name, values[name][which])

        return re.sub(r"\{(\w+)(?::\w+)?\}", fill, self.path)


def _route_contexts(app: Any) -> list[Any]:
    try:  # FastAPI >= 0.16x nests included routers; this walks them as the router does
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat list
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _dependency_calls(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)


def operations(app: Any) -> list[Op]:
    ops = []
    for route in _route_contexts(app):
        path = getattr(route, "path", None)
        dependant = getattr(route, "dependant", None)
        if path in EXCLUDED_PATHS or (path or "").startswith("/ui"):  # the console: HTML, tests/server/test_ui.py
            continue
        assert path is not None and dependant is not None, f"{route}: not an API route; exclude it explicitly"
        assert getattr(route, "include_in_schema", True), f"{path} is hidden from the schema: exclude it explicitly"
        endpoint = route.endpoint
        hints = typing.get_type_hints(endpoint)
        models = [t for t in hints.values() if isinstance(t, type) and issubclass(t, BaseModel)]
        source = inspect.getsource(endpoint)
        for method in sorted(route.methods - {"HEAD"}):
            ops.append(
                Op(
                    method=method,
                    path=path,
                    endpoint=endpoint,
                    body_model=models[0] if models else None,
                    query={q.name: q.field_info.annotation for q in dependant.query_params},
                    path_params=tuple(p.name for p in dependant.path_params),
                    authed=deps.principal in set(_dependency_calls(dependant)),
                    raw_body="request.body()" in source or "request.stream()" in source,
                )
            )
    return ops


# -- checks ---------------------------------------------------------------------------------------
def error_shape_problem(resp: Any) -> str | None:
    """None when ``resp`` is exactly ``{"error": {"code": str, "message": str}}`` with no traceback."""
    text = resp.text
    if any(marker in text for marker in TRACEBACK_MARKERS):
        return "traceback in the body"
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {resp.headers.get('content-type')!r}"
    try:
        doc = resp.json()
    except ValueError:
        return "body is not JSON"
    if not (
        isinstance(doc, dict)
        and set(doc) == {"error"}
        and isinstance(doc["error"], dict)
        and set(doc["error"]) == {"code", "message"}
        and all(isinstance(v, str) and v for v in doc["error"].values())
    ):
        return f"body is not the error shape: {text[:200]}"
    return None


def refused(resp: Any, *, status: int | None = None, code: str | None = None) -> str | None:
    """None when ``resp`` is a 4xx (or exactly ``status``) with the JSON error shape."""
    if status is not None and resp.status_code != status:
        return f"status {resp.status_code} (want {status}): {resp.text[:200]}"
    if not 400 <= resp.status_code < 500:
        return f"status {resp.status_code}: {resp.text[:200]}"
    problem = error_shape_problem(resp)
    if problem is None and code is not None and resp.json()["error"]["code"] != code:
        problem = f"code {resp.json()['error']['code']!r} (want {code!r})"
    return problem


def no_crash(resp: Any) -> str | None:
    """None when ``resp`` is not a 5xx, and carries the error shape if it is a 4xx."""
    if resp.status_code >= 500:
        return f"status {resp.status_code}: {resp.text[:200]}"
    if any(marker in resp.text for marker in TRACEBACK_MARKERS):
        return "traceback in the body"
    return refused(resp) if resp.status_code >= 400 else None


# -- the vault under attack -----------------------------------------------------------------------------
@dataclass
class Vault:
    client: Any
    app: Any
    token: str
    shares: list[str]
    ops: list[Op]
    snapshot: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def api(self) -> Api:
        return Api(self.client, self.token)

    def send(self, method: str, url: str, *, token: str | None = "root", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if token == "root":
            token = self.token
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        return self.client.request(method, url, headers=headers, **kw)

    def expect(self, what: str, problem: str | None) -> None:
        if problem is not None:
            self.failures.append(f"{what}: {problem}")

    def assert_no_failures(self) -> None:
        assert not self.failures, f"{len(self.failures)} bad answers:\n" + "\n".join(self.failures)


SEEDED = {
    "keep/me": {"value": "precious value", "regions": ["eu"]},
    "bin/blob": {"value_b64": wire.b64e(bytes(range(256))), "regions": ["eu", "us"]},
    "everywhere": {"value": "in every region", "regions": ["*"]},
}


def snapshot(api: Api) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SEEDED:
        st, doc = api.call("GET", f"/v1/secrets/{name}")
        assert st == 200, doc
        out[f"value:{name}"] = (doc["value"], doc["encoding"], doc["version"], doc["stage"])
        st, doc = api.call("GET", f"/v1/history/{name}")
        assert st == 200, doc
        out[f"history:{name}"] = [(v["version"], v["origin"], v["destroyed"]) for v in doc["versions"]]
    st, doc = api.call("GET", "/v1/secrets")
    out["secrets"] = sorted((s["name"], s["version"], tuple(s["regions"])) for s in doc["secrets"])
    st, doc = api.call("GET", "/v1/regions")
    out["regions"] = sorted((r["name"], r["key_version"]) for r in doc["regions"])
    st, doc = api.call("GET", "/v1/tokens")
    assert st == 200, doc
    out["tokens"] = sorted((t["name"], t["revoked"]) for t in doc["tokens"])
    out["nodes"] = api.call("GET", "/v1/nodes")[1]
    st, doc = api.call("GET", "/v1/sys/status")
    out["status"] = (doc["initialized"], doc["sealed"])
    return out


def assert_intact(vault: Vault) -> None:
    """What was stored before the barrage reads back the same, and the audit chain verifies."""
    assert snapshot(vault.api) == vault.snapshot
    st, doc = vault.api.call("GET", "/v1/audit/verify")
    assert st == 200 and doc["ok"] is True, doc


def _seed(api: Api) -> None:
    for region in ("eu", "us"):
        assert api.call("POST", "/v1/regions", json={"name": region})[0] == 200
    for name, body in SEEDED.items():
        st, doc = api.call("PUT", f"/v1/secrets/{name}", json=body)
        assert st == 200, doc


@pytest.fixture
def vault(make_app: Any) -> Vault:
    client, app = make_app(max_body_bytes=LIMIT)
    # See the 500 the server would send instead of the exception behind it (TestClient re-raises by default).
    client._transport.raise_server_exceptions = False
    shares, token = init_and_unseal(client)
    v = Vault(client, app, token, shares, operations(app))
    _seed(v.api)
    v.snapshot = snapshot(v.api)
    return v


def _is_postgres(request: pytest.FixtureRequest) -> bool:
    return str(request.getfixturevalue("db_url")).startswith("postgresql")


# -- the route table ------------------------------------------------------------------------------
def test_every_route_is_known(sqlite_url: str) -> None:
    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    app = create_app(Settings(db=sqlite_url))
    ops = operations(app)
    app.state.ctx.store.dispose()
    assert len(ops) >= 20, [str(o) for o in ops]
    described = {str(o) for o in ops}
    assert {
        "GET /v1/sys/status",
        "PUT /v1/secrets/{name:path}",
        "POST /v1/agent/enroll",
        "GET /v1/agent/sync",
        "GET /v1/audit/verify",
    } <= described
    for op in ops:
        if op.body_model is not None:
            assert op.body_model in EXAMPLES, f"{op}: add a valid {op.body_model.__name__} body to EXAMPLES"
        for p in op.path_params:
            assert p in PATH_VALUES, f"{op}: add path parameter {p!r} to PATH_VALUES"
    assert not [o for o in ops if o.raw_body and o.body_model], "a route both parses a model and reads raw bytes"


# -- malformed bodies -----------------------------------------------------------------------------
BAD_JSON = [
    b"{",
    b"}",
    b"not json",
    b"\xff\xfe\x00\x01",
    b'{"value":',
    b"null",
    b"[]",
    b'"text"',
    b"123",
    b"true",
    b"{}{}",
    b'{"value": "x"} trailing',
    b"\x00",
    b'{"to": NaN}',
    b'{"to": Infinity}',
    b"[" * 500,
    b'{"value": "\\ud800"',
    b"{'single': 'quotes'}",
    b'{"a" 1}',
    '{"é": 1}'.encode("latin-1"),
    b"\xef\xbb\xbf{}",
]


DEEP = b"[" * 5000
KNOWN_DEEP_500 = {"POST /v1/agent/enroll"}  # see test_enroll_deeply_nested_json_is_400


def test_bad_json_bodies(vault: Vault) -> None:
    for op in vault.ops:
        if op.body_model is None and not op.raw_body:
            continue
        for payload in BAD_JSON + [DEEP] * (str(op) not in KNOWN_DEEP_500):
            resp = vault.send(op.method, op.url(), content=payload, headers={"content-type": "application/json"})
            vault.expect(f"{op} {payload[:20]!r}", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/xml",
    "application/octet-stream",
    "text/html; charset=utf-8",
    "image/png",
]


def test_wrong_content_types(vault: Vault) -> None:
    for op in vault.ops:
        if op.body_model is None and not op.raw_body:
            continue
        body = json.dumps(EXAMPLES.get(op.body_model, {}) if op.body_model else {}).encode()  # type: ignore[arg-type]
        for ctype in CONTENT_TYPES:
            resp = vault.send(op.method, op.url(1), content=body, headers={"content-type": ctype})
            vault.expect(f"{op} as {ctype}", refused(resp))
        if op.body_model is not None:
            resp = vault.send(op.method, op.url(1), data={k: str(v) for k, v in EXAMPLES[op.body_model].items()})
            vault.expect(f"{op} as a form", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


# -- oversized bodies -----------------------------------------------------------------------------
def test_oversized_by_content_length(vault: Vault) -> None:
    """Every route, whatever its method: a declared body over the limit is a 413 before anything runs
    (so POST /v1/sys/seal with a huge body does not seal)."""
    for op in vault.ops:
        real = vault.send(op.method, op.url(), content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
        vault.expect(f"{op} real body of {LIMIT + 1} bytes", refused(real, status=413, code="too_large"))
        lying = vault.send(
            op.method,
            op.url(),
            content=b"{}",
            headers={"content-type": "application/json", "content-length": str(10**12)},
        )
        vault.expect(f"{op} Content-Length 10^12", refused(lying, status=413, code="too_large"))
        for bad in ("abc", "-1", "1e9"):
            resp = vault.send(op.method, op.url(), content=b"{}", headers={"content-length": bad})
            vault.expect(f"{op} Content-Length {bad!r}", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


def _chunks(total: int, chunk: int = 4096, prefix: bytes = b'{"value": "') -> Iterator[bytes]:
    yield prefix
    sent = len(prefix)
    while sent < total:
        yield b"x" * chunk
        sent += chunk


# Routes whose streamed over-limit body is a 500 today (see test_streamed_oversized_body_is_413).
KNOWN_STREAM_500 = {"POST /v1/agent/enroll", "GET /v1/agent/sync"}


def test_oversized_streamed(vault: Vault) -> None:
    """A chunked body (no Content-Length) that grows past the limit is refused as it streams in."""
    for op in vault.ops:
        if (op.body_model is None and not op.raw_body) or str(op) in KNOWN_STREAM_500:
            continue
        resp = vault.send(op.method, op.url(), content=_chunks(2 * LIMIT), headers={"content-type": "application/json"})
        vault.expect(f"{op} streamed {2 * LIMIT} bytes", refused(resp))
    vault.assert_no_failures()
    # A streamed body under the limit is fine.
    resp = vault.send(
        "PUT",
        "/v1/secrets/streamed",
        content=iter([b'{"value": ', b'"ok", "regions": ["us"]}']),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    assert vault.api.call("GET", "/v1/secrets/streamed")[1]["value"] == "ok"
    assert vault.api.call("DELETE", "/v1/secrets/streamed")[0] == 200
    vault.snapshot["secrets"] = snapshot(vault.api)["secrets"]  # list hides deleted ones; keep the check exact
    assert_intact(vault)


def test_default_body_limit_is_settings_max_body_bytes(api: Api) -> None:
    """The limit in force by default is Settings().max_body_bytes (1 MiB), and the value limit below it."""
    from vault_edge.server.settings import Settings

    limit = Settings().max_body_bytes
    big = json.dumps({"value": "x" * limit}).encode()
    resp = api.client.put(
        "/v1/secrets/big",
        content=big,
        headers={"Authorization": f"Bearer {api.token}", "content-type": "application/json"},
    )
    assert refused(resp, status=413, code="too_large") is None
    # Under the body limit but over the value limit: also a clear 413.
    st, doc = api.call("PUT", "/v1/secrets/big", json={"value": "x" * (Settings().max_value_bytes + 1)})
    assert (st, doc["error"]["code"]) == (413, "too_large")
    assert api.call("GET", "/v1/secrets/big")[0] == 404


# -- names ----------------------------------------------------------------------------------------
def test_unknown_names_are_404(vault: Vault) -> None:
    for op in vault.ops:
        if not op.path_params or (op.method, op.path) in CREATES:
            continue
        body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
        resp = vault.send(op.method, op.url(1), json=body)
        vault.expect(f"{op} unknown", refused(resp, status=404, code="not_found"))
    unknown_regions = [
        ("POST", "/v1/regions/nowhere/rekey", None),
        ("POST", "/v1/nodes/tokens", {"region": "nowhere"}),
    ]
    for method, url, body in unknown_regions:
        resp = vault.send(method, url, json=body)
        vault.expect(f"{method} {url} {body}", refused(resp, status=404, code="not_found"))
    for method, url, body in [
        ("GET", "/v1/secrets/keep/me?version=99", None),
        ("GET", "/v1/secrets/keep/me?stage=pending", None),
        ("POST", "/v1/rollback/keep/me", {"to": 99}),
        ("DELETE", "/v1/tokens/ffffffffffffffff", None),
        ("GET", "/v1/nosuchroute", None),
        ("GET", "/v2/secrets/keep/me", None),
    ]:
        vault.expect(f"{method} {url} {body}", refused(vault.send(method, url, json=body), status=404))
    vault.expect(
        "PUT regions [nowhere]",
        refused(vault.send("PUT", "/v1/secrets/new", json={"value": "x", "regions": ["nowhere"]}), status=400),
    )
    vault.expect("wrong method", refused(vault.send("PATCH", "/v1/secrets/keep/me", json={}), status=405))
    vault.assert_no_failures()
    assert_intact(vault)


# Percent-encoded so that the client sends them as they are; the server decodes them into the name.
INVALID_NAMES = [
    "%2E%2E",
    "%2E",
    "a/%2E%2E/b",
    "a/%2E/b",
    "%2E%2E/keep/me",
    "keep/%2E%2E/keep/me",
    "a//b",
    "a/",
    "%2Fa",
    "x" * 257,
    "a/" * 128 + "b",
    "caf%C3%A9",
    "a%25b",
    "a%20b",
    "a%0Ab",
    "a%00b",
    "%FF%FE",
    "%ED%A0%80",
    ".env",
    "-a",
    "a%5Cb",
    "a%3Fb",
    "a%23b",
    "a%2A",
    "%E2%80%AEa",
]


def test_invalid_secret_names_are_400(vault: Vault) -> None:
    for op in vault.ops:
        if "{name:path}" not in op.path:
            continue
        body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
        for name in INVALID_NAMES:
            resp = vault.send(op.method, op.url(name=name), json=body)
            if "%0A" in name:  # the router's path pattern stops at a newline: no route matches, a 404
                vault.expect(f"{op} name={name[:30]!r}", refused(resp, status=404))
            else:
                vault.expect(f"{op} name={name[:30]!r}", refused(resp, status=400, code="bad_request"))
    vault.assert_no_failures()
    assert_intact(vault)


HOSTILE_PATH_VALUES = [
    "x" * 300,
    "%FF%FE",
    "%ED%A0%80",
    "%2E%2E",
    "..",
    "caf%C3%A9",
    "%20",
    "a%0Ab",
    "%E2%80%AE",
    "n-0123456789ABCDEF",
    "-1",
    "0" * 64,
]


def test_other_path_parameters(vault: Vault) -> None:
    for op in vault.ops:
        for param in [p for p in op.path_params if "{name:path}" not in op.path]:
            body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
            for value in HOSTILE_PATH_VALUES:
                resp = vault.send(op.method, op.url(1, **{param: value}), json=body)
                vault.expect(f"{op} {param}={value[:20]!r}", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


# -- wrong types, huge and negative numbers, unknown fields --------------------------------------------
def _types_of(annotation: Any) -> set[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation)) - {type(None)}
    return {annotation}


def bad_values(field_info: Any) -> list[Any]:
    """Values no field of this type accepts: wrong JSON types everywhere, plus out-of-range numbers,
    over-long strings and lists, unknown literals, negative or malformed durations."""
    out: list[Any] = [{"an": "object"}, [[[]]], 1.5]
    kinds = _types_of(field_info.annotation)
    bounded = any(isinstance(m, Ge | Gt | Le | Lt) for m in field_info.metadata)
    max_len = next((m.max_length for m in field_info.metadata if isinstance(m, MaxLen)), None)
    if field_info.is_required():
        out.append(None)
    if kinds == {int} and bounded:
        out += [10**30, -(10**30), -1, 0, 2**63, "many"]
    if kinds == {str, int}:  # a duration: huge integers are pinned by test_huge_integer_durations_are_refused
        out += [-1, -(10**30), "-5s", "forever", "1" * 40, "10y", []]
    if kinds == {str}:
        out += [123, True, [], ["a"]]
    if kinds == {bool}:
        out += ["maybe", 2, []]
    for kind in kinds:
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            out += ["a,b", [123], [None], [{}]]
            if typing.get_origin(item) is Literal:
                out += [["bogus"], ["READ"]]
        if typing.get_origin(kind) is Literal:
            out += ["bogus", "CURRENT"]
    if max_len is not None and max_len < LIMIT // 4:
        out.append("x" * (max_len + 1) if str in kinds else ["x"] * (max_len + 1))
    return out


def _body_cases(model: type[BaseModel]) -> Iterator[tuple[str, dict[str, Any]]]:
    example = EXAMPLES[model]
    for name, info in model.model_fields.items():
        for value in bad_values(info):
            yield f"{name}={json.dumps(value)[:30]}", {**example, name: value}
    yield "unknown field", {**example, "unexpected_field": 1}
    yield "unknown field only", {"unexpected_field": 1}
    yield "misspelt field", {k + "s": v for k, v in example.items()} or {"gracee": "1h"}


def test_wrong_types_huge_and_negative_numbers_unknown_fields(vault: Vault) -> None:
    for op in vault.ops:
        if op.body_model is None:
            continue
        for case, body in _body_cases(op.body_model):
            resp = vault.send(op.method, op.url(), json=body)
            vault.expect(f"{op} {case}", refused(resp))
    for case, body in [
        ("nested unknown field", {"groups": [{"threshold": 2, "shares": 3, "extra": 1}]}),
        ("nested wrong type", {"groups": [{"threshold": "two", "shares": 3}]}),
        ("nested huge", {"groups": [{"threshold": 2, "shares": 10**30}]}),
        ("17 groups", {"groups": [{"threshold": 1, "shares": 1}] * 17}),
        ("empty groups", {"groups": []}),
        ("bad scheme", {"shares": 3, "threshold": 5}),
        ("threshold 1 of many", {"shares": 3, "threshold": 1}),
        ("non-ASCII passphrase", {"passphrase": "pässword"}),
    ]:
        vault.expect(f"init {case}", refused(vault.send("POST", "/v1/sys/init", json=body)))
    for case, body in [
        ("value and value_b64", {"value": "a", "value_b64": "YQ"}),
        ("value and generate", {"value": "a", "generate": "8:hex"}),
        ("neither", {"regions": ["eu"]}),
        ("empty value", {"value": ""}),
        ("bad base64", {"value_b64": "a"}),
        ("empty base64", {"value_b64": ""}),
        ("bad generate", {"generate": "0:hex"}),
        ("unknown alphabet", {"generate": "8:klingon"}),
        ("schedule without generate", {"value": "a", "rotate_every": "1h"}),
        ("schedule too short", {"generate": "8:hex", "rotate_every": "10s"}),
        ("regions star and more", {"value": "a", "regions": ["*", "eu"]}),
        ("regions empty", {"value": "a", "regions": []}),
        ("regions blank", {"value": "a", "regions": [" "]}),
        ("region upper case", {"value": "a", "regions": ["EU"]}),
        ("region too long", {"value": "a", "regions": ["e" * 64]}),
        ("surrogate value", '{"value": "\\ud800"}'),
    ]:
        kw: dict[str, Any] = (
            {"json": body}
            if isinstance(body, dict)
            else {"content": body, "headers": {"content-type": "application/json"}}
        )
        vault.expect(f"put {case}", refused(vault.send("PUT", "/v1/secrets/keep/me", **kw)))
    for case, body in [
        ("stage previous", {"value": "x", "stage": "previous"}),
        ("generate without a spec", {}),
    ]:
        vault.expect(f"rotate {case}", refused(vault.send("POST", "/v1/rotate/keep/me", json=body)))
    vault.expect("promote without pending", refused(vault.send("POST", "/v1/promote/keep/me", json={}), status=409))
    vault.expect("region exists", refused(vault.send("POST", "/v1/regions", json={"name": "eu"}), status=409))
    vault.expect(
        "join token ttl short", refused(vault.send("POST", "/v1/nodes/tokens", json={"region": "eu", "ttl": 59}))
    )
    vault.expect(
        "join token ttl long", refused(vault.send("POST", "/v1/nodes/tokens", json={"region": "eu", "ttl": "8d"}))
    )
    vault.assert_no_failures()
    assert_intact(vault)


# -- query strings --------------------------------------------------------------------------------
def _query_cases(annotation: Any) -> list[tuple[str, bool]]:
    """(value, must be refused) pairs for a query parameter of this type."""
    kinds = _types_of(annotation)
    common = [("x" * 300, False), ("%FF", False), ("\u202e", False), (" ", False)]
    if kinds == {int}:
        return [
            *common,
            ("-1", True),
            ("9" * 30, True),
            ("abc", True),
            ("1.5", True),
            ("1e3", True),
            ("0x10", True),
            ("", True),
            ("4611686018427387905", True),
            ("nan", True),
        ]
    if kinds == {float}:
        return [
            *common,
            ("-1", True),
            ("nan", True),
            ("inf", True),
            ("-inf", True),
            ("1e400", True),
            ("301", True),
            ("abc", True),
        ]
    if kinds == {bool}:
        return [*common, ("maybe", True), ("2", True)]
    return common


def test_query_parameters(vault: Vault) -> None:
    for op in vault.ops:
        for param, annotation in op.query.items():
            for value, must_refuse in _query_cases(annotation):
                body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
                resp = vault.send(op.method, op.url(1), params={param: value}, json=body)
                vault.expect(f"{op} ?{param}={value[:20]!r}", refused(resp) if must_refuse else no_crash(resp))
    for url in [
        "/v1/secrets/keep/me?version=1&stage=current",
        "/v1/secrets/keep/me?stage=bogus",
        "/v1/secrets?prefix=" + "a" * 257,
        "/v1/audit?limit=0",
        "/v1/audit?limit=1001",
        "/v1/nodes?region=" + "e" * 64,
    ]:
        vault.expect(f"GET {url[:60]}", refused(vault.send("GET", url)))
    vault.assert_no_failures()
    assert_intact(vault)


# -- tokens ---------------------------------------------------------------------------------------
def test_missing_and_bad_tokens(vault: Vault) -> None:
    for op in vault.ops:
        body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
        if op.authed:
            for token in (None, "", "vet_nope", "x" * 8000, "Bearer", "vet_" + "\u00e9"):
                headers = {} if token is None else {"Authorization": f"Bearer {token}".encode()}
                resp = vault.send(op.method, op.url(), token=None, json=body, headers=headers)
                vault.expect(f"{op} token={str(token)[:12]!r}", refused(resp, status=401, code="unauthorized"))
            resp = vault.send(op.method, op.url(), token=None, json=body, headers={"Authorization": "Basic dTpw"})
            vault.expect(f"{op} basic auth", refused(resp, status=401))
        elif op.path.startswith("/v1/agent/"):
            resp = vault.send(op.method, op.url(), token=None, json=body)
            vault.expect(f"{op} unsigned", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


# -- the sealed server ----------------------------------------------------------------------------
def _sealed_barrage(client: Any, ops: list[Op], token: str | None, code: str) -> list[str]:
    failures = []
    for op in ops:
        if op.path in SEALED_EXEMPT:
            continue
        body = EXAMPLES.get(op.body_model) if op.body_model else None  # type: ignore[arg-type]
        for tok in (token, None):
            headers = {"Authorization": f"Bearer {tok}"} if tok else {}
            resp = client.request(op.method, op.url(), json=body, headers=headers)
            problem = refused_503(resp, code)
            if problem:
                failures.append(f"{op} (token: {bool(tok)}): {problem}")
    return failures


def refused_503(resp: Any, code: str) -> str | None:
    if resp.status_code != 503:
        return f"status {resp.status_code}: {resp.text[:200]}"
    problem = error_shape_problem(resp)
    if problem is None and resp.json()["error"]["code"] != code:
        problem = f"code {resp.json()['error']['code']!r}"
    return problem


def test_sealed_server_serves_only_status_unseal_init_health(make_app: Any) -> None:
    client, app = make_app(max_body_bytes=LIMIT)
    client._transport.raise_server_exceptions = False
    ops = operations(app)
    assert {o.path for o in ops} >= SEALED_EXEMPT

    # Not initialized: every other route says so.
    assert not _sealed_barrage(client, ops, None, "not_initialized")

    # Initialized and unsealed, with data; then sealed through the API.
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    _seed(api)
    before = snapshot(api)
    assert api.call("POST", "/v1/sys/seal")[0] == 200
    failures = _sealed_barrage(client, ops, token, "sealed")
    assert not failures, "\n".join(failures)

    # The exempt routes answer, and bad input to them changes nothing.
    assert client.get("/v1/sys/status").json()["sealed"] is True
    health = client.get("/v1/sys/health")
    assert health.status_code == 503 and health.json() == {"status": "sealed"}
    assert refused(client.post("/v1/sys/init", json={}), status=409, code="conflict") is None
    for bad in (
        {"share": "not a share"},
        {"share": shares[0] + " extra"},
        {"share": ""},
        {"share": "x" * 2000},
        {"share": 5},
        {"sharez": shares[0]},
    ):
        assert refused(client.post("/v1/sys/unseal", json=bad)) is None, bad
    assert client.get("/v1/sys/status").json()["progress"] == 0

    # Unsealing again brings back exactly what was stored.
    for share in shares[:2]:
        assert client.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    assert snapshot(api) == before


# -- signed agent requests ------------------------------------------------------------------------
def enroll(vault: Vault) -> tuple[str, signing.KeyPair]:
    return enroll_node(vault.api)


def post_enrolment(vault: Vault, pair: signing.KeyPair, body: bytes) -> Any:
    """``body`` posted as an enrolment, signed by ``pair`` as the agent signs it."""
    return vault.client.post(
        "/v1/agent/enroll",
        content=body,
        headers=_signed_headers(pair, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body),
    )


def test_signed_agent_requests_with_bad_headers(vault: Vault) -> None:
    node, pair = enroll(vault)
    target = "/v1/agent/sync?since=0&wait=0"
    good = _signed_headers(pair, "GET", target, node, b"")
    for case, change in [
        ("no node", {wire.H_NODE: ""}),
        ("malformed node", {wire.H_NODE: "n-XYZ"}),
        ("unknown node", {wire.H_NODE: "n-ffffffffffffffff"}),
        ("node with a control character", {wire.H_NODE: "n-0123456789abcde\x7f"}),
        ("no timestamp", {wire.H_TIMESTAMP: ""}),
        ("text timestamp", {wire.H_TIMESTAMP: "yesterday"}),
        ("float timestamp", {wire.H_TIMESTAMP: "1.5"}),
        ("old timestamp", {wire.H_TIMESTAMP: "0"}),
        ("negative timestamp", {wire.H_TIMESTAMP: "-1"}),
        ("20-digit timestamp", {wire.H_TIMESTAMP: "9" * 20}),
        ("no nonce", {wire.H_NONCE: ""}),
        ("short nonce", {wire.H_NONCE: "AAAA"}),
        ("long nonce", {wire.H_NONCE: "A" * 100}),
        ("bad nonce", {wire.H_NONCE: "!!!!"}),
        ("no signature", {wire.H_SIGNATURE: ""}),
        ("short signature", {wire.H_SIGNATURE: "AAAA"}),
        ("long signature", {wire.H_SIGNATURE: "A" * 500}),
        ("wrong signature", {wire.H_SIGNATURE: wire.b64e(bytes(64))}),
    ]:
        resp = vault.send("GET", target, token=None, headers={**good, **change})
        vault.expect(f"sync {case}", refused(resp, status=401))
    # The variants above failed before the nonce was spent: the genuine request still works, once.
    first = vault.send("GET", target, token=None, headers=good)
    assert first.status_code == 200, first.text
    vault.expect("sync replayed", refused(vault.send("GET", target, token=None, headers=good), status=401))
    vault.snapshot["nodes"] = snapshot(vault.api)["nodes"]  # the node's last contact moved on
    key = server_key(vault.api)

    def sealed(inner: Any, to: bytes = key) -> bytes:
        raw = inner if isinstance(inner, bytes) else json.dumps(inner).encode()
        return json.dumps({"sealed": wire.b64e(signing.seal_to_server(to, raw))}).encode()

    for case, body in [
        ("not an object", b"[1]"),
        ("missing fields", b"{}"),
        (
            "unsealed request",
            json.dumps(
                {
                    "token": "vej1.a.b.c",
                    "box_public": wire.b64e(pair.box_public),
                    "sign_public": wire.b64e(pair.sign_public),
                }
            ).encode(),
        ),
        ("sealed not base64", b'{"sealed": "***"}'),
        ("sealed garbage", json.dumps({"sealed": wire.b64e(bytes(100))}).encode()),
        ("sealed to another key", enroll_body(signing.KeyPair.generate().sign_public, pair, "vej1.a.b.c")),
        ("sealed, not JSON inside", sealed(b"\xff\xfe")),
        ("sealed, inner not an object", sealed([1])),
        ("sealed, inner missing fields", sealed({})),
        ("token not a string", sealed({"token": 5, "box_public": "", "sign_public": ""})),
        ("not a join token", enroll_body(key, pair, "hello")),
        ("short keys", sealed({"token": "vej1.a.b.c", "box_public": "AAAA", "sign_public": "AAAA"})),
        ("unknown join token", enroll_body(key, pair, "vej1.0123456789abcdef.secret.pin")),
        (
            "long hostname",
            sealed(
                {
                    "token": "vej1.a.b.c",
                    "box_public": wire.b64e(pair.box_public),
                    "sign_public": wire.b64e(pair.sign_public),
                    "hostname": "h" * 10000,
                }
            ),
        ),
    ]:
        resp = post_enrolment(vault, pair, body)
        vault.expect(f"enroll {case}", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


# ==================================================================================================
# Regressions: bugs this suite found, each fixed. One test per bug; each BUG_* text says what was wrong.
# ==================================================================================================
BUG_DURATIONS = (
    "BUG: integer durations skip the 10-year cap: schemas.seconds() returns any non-negative int unchecked "
    "(parse_duration's MAX_SECONDS applies to strings only), so grace/rotate_every/ttl of 2**33..10**400 are "
    "stored (SQLite INTEGER overflow past 2**63, PostgreSQL int4 overflow past 2**31 -> 500) or overflow float "
    "arithmetic (token ttl 10**400 -> OverflowError -> 500), or are accepted (token ttl 10**30, rotate grace "
    "10**30); fix: in seconds() refuse value > MAX_SECONDS (and bool) with ValueError"
)


def test_huge_integer_durations_are_refused(vault: Vault) -> None:
    for method, url, body in [
        ("PUT", "/v1/secrets/d1", {"value": "x", "grace": 10**30}),
        ("PUT", "/v1/secrets/d1", {"value": "x", "grace": 2**33}),
        ("PUT", "/v1/secrets/d2", {"generate": "8:hex", "rotate_every": 10**30}),
        ("POST", "/v1/rotate/keep/me", {"value": "x", "grace": 10**30}),
        ("POST", "/v1/rollback/keep/me", {"to": 1, "grace": 10**30}),
        ("POST", "/v1/tokens", {"name": "t", "prefixes": [""], "verbs": ["read"], "ttl": 10**30}),
        ("POST", "/v1/tokens", {"name": "t", "prefixes": [""], "verbs": ["read"], "ttl": 10**400}),
    ]:
        vault.expect(f"{method} {url} {body}"[:90], refused(vault.send(method, url, json=body), status=400))
    vault.assert_no_failures()
    assert_intact(vault)


def test_streamed_oversized_body_is_413(vault: Vault) -> None:
    for op in [o for o in vault.ops if o.body_model is not None or o.raw_body]:
        resp = vault.send(
            op.method,
            op.url(),
            token=None if op.raw_body else "root",
            content=_chunks(2 * LIMIT),
            headers={"content-type": "application/json"},
        )
        vault.expect(f"{op} streamed", refused(resp, status=413, code="too_large"))
    vault.assert_no_failures()
    assert_intact(vault)


def test_absurd_timestamps_are_401(vault: Vault) -> None:
    node, pair = enroll(vault)
    target = "/v1/agent/sync?since=0&wait=0"
    for timestamp in ("1" + "0" * 400, "-" + "9" * 400):
        resp = vault.send("GET", target, token=None, headers=_signed_headers(pair, "GET", target, node, b"", timestamp))
        vault.expect(f"sync {timestamp[:5]}...", refused(resp, status=401))
        body = enroll_body(server_key(vault.api), pair, "vej1.0123456789abcdef.secret.pin")
        resp = vault.client.post(
            "/v1/agent/enroll",
            content=body,
            headers=_signed_headers(pair, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body, timestamp),
        )
        vault.expect(f"enroll {timestamp[:5]}...", refused(resp, status=401))
    vault.snapshot["nodes"] = snapshot(vault.api)["nodes"]
    vault.assert_no_failures()
    assert_intact(vault)


def test_enroll_deeply_nested_json_is_400(vault: Vault) -> None:
    resp = vault.client.post("/v1/agent/enroll", content=DEEP, headers={"content-type": "application/json"})
    assert refused(resp, status=400) is None
    assert_intact(vault)


def test_enroll_join_token_with_hostile_characters_is_4xx(vault: Vault) -> None:
    pair = signing.KeyPair.generate()
    for token_id in ("\ud800", "a\x00b"):
        body = enroll_body(server_key(vault.api), pair, f"vej1.{token_id}.secret.pin")
        resp = post_enrolment(vault, pair, body)
        vault.expect(f"token id {token_id!r}", refused(resp))
    vault.assert_no_failures()
    assert_intact(vault)


BUG_NUL = (
    "BUG (PostgreSQL only): strings holding NUL reach SQL unvalidated and psycopg refuses them (DataError: "
    "'PostgreSQL text fields cannot contain NUL (0x00) bytes') -> 500: token name (POST /v1/tokens), "
    "?prefix= of GET /v1/secrets, ?region= of GET /v1/nodes, the id of DELETE /v1/tokens/{id}, the region of "
    "POST /v1/regions/{name}/rekey and of POST /v1/nodes/tokens; fix: validate at the edge (regions with "
    "wire.check_region -> 400 before any lookup, token ids as [0-9a-f]{16}, prefixes as name prefixes, token "
    "names without control characters) and, as a backstop, map sqlalchemy DataError to 400 in app.py"
)


def test_nul_characters_never_reach_the_database(vault: Vault, request: pytest.FixtureRequest) -> None:
    """SQLite stores NUL; PostgreSQL refused it with a 500 until the edge validated these inputs."""
    for method, url, body in [
        ("POST", "/v1/tokens", {"name": "a\x00b", "prefixes": [""], "verbs": ["read"]}),
        ("GET", "/v1/secrets?prefix=%00", None),
        ("GET", "/v1/nodes?region=%00", None),
        ("DELETE", "/v1/tokens/a%00b", None),
        ("POST", "/v1/regions/e%00u/rekey", None),
        ("POST", "/v1/nodes/tokens", {"region": "e\x00u"}),
    ]:
        vault.expect(f"{method} {url}", no_crash(vault.send(method, url, json=body)))
    vault.assert_no_failures()
    vault.snapshot["tokens"] = snapshot(vault.api)["tokens"]  # SQLite takes the NUL token name: a new token
    assert_intact(vault)


def test_lone_surrogates_in_list_items_are_refused(vault: Vault) -> None:
    headers = {"content-type": "application/json"}
    resp = vault.send("PUT", "/v1/secrets/keep/me", content=b'{"value": "x", "regions": ["\\ud800"]}', headers=headers)
    vault.expect("regions", refused(resp))
    resp = vault.send(
        "POST", "/v1/tokens", content=b'{"name": "t", "prefixes": ["\\ud800"], "verbs": ["read"]}', headers=headers
    )
    vault.expect("prefixes", refused(resp))
    vault.expect("tokens still list", no_crash(vault.send("GET", "/v1/tokens")))
    vault.assert_no_failures()
    assert_intact(vault)
