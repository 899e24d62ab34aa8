"""The worker-side Python clients: read secrets from the local agent over its unix socket.

    from vault_edge.client import AgentClient
    with AgentClient() as agent:                 # socket from VAULT_EDGE_SOCKET
        key = agent.get("openai/api-key").value  # one round trip on the host, no network
        many = agent.get_many(["db/user", "db/password"])

    from vault_edge.client import AsyncAgentClient
    async with AsyncAgentClient() as agent:      # the same methods, awaited (asyncio)
        key = (await agent.get("openai/api-key")).value

Both are built on httpx's unix-socket transport with a keep-alive connection, and share one
implementation of the protocol: each method builds a :class:`_Call` (the request and how to read
its answer), and the client only sends it, blocking or awaited.

Values, as the agent's socket API gives them (``{"value": ...}`` is the text) and as the JavaScript
client (``agents/js``) reads them: ``Secret.value`` is the UTF-8 text, ``Secret.bytes`` the exact
bytes (a binary value has no text: ``value`` raises :class:`AgentError` ``binary_value``).
A ``Secret``'s repr never shows its value, and nothing here logs.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from vault_edge import wire

DEFAULT_SOCKET = "/run/vault-edge/agent.sock"
TOKEN_HEADER = wire.H_TOKEN
T = TypeVar("T")


class AgentError(Exception):
    """An error answer from the agent, or no usable answer.

    ``status`` is the agent's HTTP status, or 0 when it did not answer or the check is the client's
    own; ``code`` the agent's error code (``not_found``, ``forbidden``, ``not_ready``, ``too_stale``,
    ``bad_request``) or the client's (``unreachable``, ``bad_response``, ``binary_value``);
    ``message`` a sentence that never holds a secret value."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Secret:
    """One version of a secret, as the agent served it.

    ``bytes`` is the exact value; ``value`` (and its alias ``text``) the value as UTF-8 text. ``version``
    and ``stage`` name the version served, ``revision`` the agent's revision when it served it, ``age``
    the seconds since the agent last heard from the control plane (the ``Age`` header; None when the
    agent sent none). The repr leaves the value out."""

    name: str
    bytes: builtins.bytes = field(repr=False)
    version: int
    stage: str
    revision: int
    age: int | None = None

    @property
    def value(self) -> str:
        """The value as UTF-8 text; AgentError ``binary_value`` when it is not UTF-8 (read ``bytes``)."""
        try:
            return self.bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise AgentError(0, "binary_value", f"secret {self.name} is not UTF-8 text; read .bytes") from None

    @property
    def text(self) -> str:
        """The same as ``value`` (the UTF-8 text)."""
        return self.value


def socket_path(path: str | None = None) -> str:
    """The agent's socket: ``path``, else ``VAULT_EDGE_SOCKET``, else ``/run/vault-edge/agent.sock``."""
    return path or os.environ.get("VAULT_EDGE_SOCKET") or DEFAULT_SOCKET


# -- the protocol, shared by both clients (no I/O here) -----------------------------------------------
@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to the agent and how to read its (successful) answer."""

    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's


def _checked(name: str) -> str:
    """A ``.``/``..`` segment would be collapsed by the URL layer into another name: refuse it here."""
    try:
        return wire.check_name(name)
    except wire.WireError as exc:
        raise AgentError(400, "bad_request", str(exc)) from None


def _params(**given: object) -> dict[str, str]:
    return {k: str(v) for k, v in given.items() if v is not None}


def _age(resp: httpx.Response) -> int | None:
    age = resp.headers.get("age", "")
    return int(age) if age.isascii() and age.isdigit() and len(age) <= 12 else None


def _secret(doc: Any, age: int | None) -> Secret:
    value = doc["value"]
    if not isinstance(value, str):
        raise TypeError
    raw = wire.b64d(value) if doc.get("encoding") == "base64" else value.encode()
    return Secret(str(doc["name"]), raw, int(doc["version"]), str(doc.get("stage")), int(doc["revision"]), age)


def _read_secret(resp: httpx.Response) -> Secret:
    return _secret(resp.json(), _age(resp))


def _read_many(resp: httpx.Response) -> dict[str, Secret]:
    age = _age(resp)
    return {s.name: s for s in (_secret(d, age) for d in resp.json()["secrets"])}


def _read_names(resp: httpx.Response) -> list[str]:
    names = resp.json()["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError
    return names


def _read_object(resp: httpx.Response) -> dict[str, Any]:
    doc = resp.json()
    if not isinstance(doc, dict):
        raise TypeError
    return doc


def _get_call(name: str, version: int | None, stage: str | None, field: str | None) -> _Call[Secret]:
    path = f"/v1/secrets/{quote(_checked(name), safe='/')}"
    return _Call(path, _read_secret, _params(version=version, stage=stage, field=field))


def _many_call(names: list[str]) -> _Call[dict[str, Secret]]:
    return _Call("/v1/secrets", _read_many, {"names": ",".join(_checked(n) for n in names)})


def _watch_call(since: int, wait: float) -> _Call[dict[str, Any]]:
    return _Call("/v1/watch", _read_object, {"since": str(since), "wait": f"{wait:g}"}, timeout=wait + 5)


_NAMES: _Call[list[str]] = _Call("/v1/secrets", _read_names)
_HEALTH: _Call[dict[str, Any]] = _Call("/v1/health", _read_object)


def _unreachable(socket: str, exc: Exception) -> AgentError:
    return AgentError(0, "unreachable", f"no agent answering at {socket} ({type(exc).__name__})")


def _answer(call: _Call[T], resp: httpx.Response) -> T:
    """The answer read by ``call``, or the agent's error as AgentError; a malformed body is
    ``bad_response`` (the body is never quoted: it may hold a value)."""
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "error", f"HTTP {resp.status_code}"
        raise AgentError(resp.status_code, code, message)
    try:
        return call.read(resp)
    except (ValueError, KeyError, TypeError, wire.WireError):
        raise AgentError(resp.status_code, "bad_response", f"a malformed answer to {call.path}") from None


def _kw(call: _Call[Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"params": call.params}
    if call.timeout is not None:
        kw["timeout"] = call.timeout
    return kw


def _headers(token: str | None) -> dict[str, str]:
    return {TOKEN_HEADER: token} if token else {}


# -- the clients -----------------------------------------------------------------------------------------
class AgentClient:
    """A blocking client of the local agent (one keep-alive connection; use it from one thread at a
    time, or one per thread).

    ``socket``: the agent's socket (default :func:`socket_path`); ``token``: a capability token, sent
    as ``X-Vault-Edge-Token`` when the policy gives this caller its names by token; ``timeout``:
    seconds per request (``watch`` adds its wait). Every method raises :class:`AgentError` on an error
    answer or when no agent answers; close it (or use ``with``) when done."""

    def __init__(self, socket: str | None = None, token: str | None = None, timeout: float = 5.0) -> None:
        self.socket = socket_path(socket)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://agent",
            headers=_headers(token),
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the connection to the agent."""
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        try:
            resp = self._http.get(call.path, **_kw(call))
        except httpx.TransportError as exc:
            raise _unreachable(self.socket, exc) from None
        return _answer(call, resp)

    def get(self, name: str, version: int | None = None, stage: str | None = None, field: str | None = None) -> Secret:
        """The secret ``name``: its current version, or ``version`` N, or the one at ``stage``
        (``previous`` through its grace period, ``pending``); with ``field``, one field of a structured
        value (a JSON object, e.g. a rotated credential's ``password``)."""
        return self._run(_get_call(name, version, stage, field))

    def get_many(self, names: list[str]) -> dict[str, Secret]:
        """All of ``names`` in one round trip, at one revision (all or nothing), by name."""
        return self._run(_many_call(names))

    def names(self) -> list[str]:
        """The names this caller may read."""
        return self._run(_NAMES)

    def health(self) -> dict[str, Any]:
        """The agent's health: ``status`` (``ok``, ``stale``, ``starting``), ``node``, ``region``,
        ``revision``, ``last_sync_age_s``, ``secrets``."""
        return self._run(_HEALTH)

    def watch(self, since: int, wait: float = 30.0) -> dict[str, Any]:
        """Block until the agent passes revision ``since``, or ``wait`` seconds pass:
        ``{"revision", "changed"}``."""
        return self._run(_watch_call(since, wait))


class AsyncAgentClient:
    """The asyncio client of the local agent: :class:`AgentClient`'s methods, awaited (``aclose``
    and ``async with`` in place of ``close`` and ``with``). Concurrent calls on one client share its
    connection pool; the same arguments, answers and :class:`AgentError`."""

    def __init__(self, socket: str | None = None, token: str | None = None, timeout: float = 5.0) -> None:
        self.socket = socket_path(socket)
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket),
            base_url="http://agent",
            headers=_headers(token),
            timeout=timeout,
        )

    async def aclose(self) -> None:
        """Close the connections to the agent."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, call: _Call[T]) -> T:
        try:
            resp = await self._http.get(call.path, **_kw(call))
        except httpx.TransportError as exc:
            raise _unreachable(self.socket, exc) from None
        return _answer(call, resp)

    async def get(
        self, name: str, version: int | None = None, stage: str | None = None, field: str | None = None
    ) -> Secret:
        """The secret ``name`` (see :meth:`AgentClient.get`)."""
        return await self._run(_get_call(name, version, stage, field))

    async def get_many(self, names: list[str]) -> dict[str, Secret]:
        """All of ``names`` in one round trip, at one revision (all or nothing), by name."""
        return await self._run(_many_call(names))

    async def names(self) -> list[str]:
        """The names this caller may read."""
        return await self._run(_NAMES)

    async def health(self) -> dict[str, Any]:
        """The agent's health (see :meth:`AgentClient.health`)."""
        return await self._run(_HEALTH)

    async def watch(self, since: int, wait: float = 30.0) -> dict[str, Any]:
        """Wait until the agent passes revision ``since``, or ``wait`` seconds pass:
        ``{"revision", "changed"}``."""
        return await self._run(_watch_call(since, wait))
