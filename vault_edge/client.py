"""The worker-side Python client: reads secrets from the local agent over its unix socket.

    from vault_edge.client import AgentClient
    with AgentClient() as agent:                 # socket from VAULT_EDGE_SOCKET
        key = agent.get("openai/api-key").text   # one round trip on the host, no network
        many = agent.get_many(["db/user", "db/password"])

Built on httpx's unix-socket transport with a keep-alive connection. Values are bytes in
``Secret.value`` (``.text`` decodes UTF-8); a ``Secret``'s repr never shows its value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from vault_edge import wire

DEFAULT_SOCKET = "/run/vault-edge/agent.sock"
TOKEN_HEADER = wire.H_TOKEN


class AgentError(Exception):
    """An error answer from the agent (``status``, ``code``), or no agent at the socket (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Secret:
    name: str
    value: bytes = field(repr=False)
    version: int
    stage: str
    revision: int
    age: int | None = None  # seconds since the agent last heard from the control plane

    @property
    def text(self) -> str:
        return self.value.decode("utf-8")


def _secret(doc: dict[str, Any], age: int | None) -> Secret:
    raw = wire.b64d(doc["value"]) if doc.get("encoding") == "base64" else str(doc["value"]).encode()
    return Secret(doc["name"], raw, int(doc["version"]), str(doc.get("stage")), int(doc["revision"]), age)


def _checked(name: str) -> str:
    """A ``.``/``..`` segment would be collapsed by the URL layer into another name: refuse it here."""
    try:
        return wire.check_name(name)
    except wire.WireError as exc:
        raise AgentError(400, "bad_request", str(exc)) from None


def socket_path(path: str | None = None) -> str:
    return path or os.environ.get("VAULT_EDGE_SOCKET") or DEFAULT_SOCKET


class AgentClient:
    def __init__(self, socket: str | None = None, token: str | None = None, timeout: float = 5.0) -> None:
        self.socket = socket_path(socket)
        headers = {TOKEN_HEADER: token} if token else {}
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), base_url="http://agent", headers=headers, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> httpx.Response:
        try:
            kw: dict[str, Any] = {"params": {k: v for k, v in (params or {}).items() if v is not None}}
            if timeout is not None:
                kw["timeout"] = timeout
            resp = self._http.get(path, **kw)
        except httpx.TransportError as exc:
            raise AgentError(0, "unreachable", f"no agent answering at {self.socket} ({type(exc).__name__})") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "error", f"HTTP {resp.status_code}"
            raise AgentError(resp.status_code, code, message)
        return resp

    @staticmethod
    def _age(resp: httpx.Response) -> int | None:
        age = resp.headers.get("age")
        return int(age) if age and age.isdigit() else None

    def get(self, name: str, version: int | None = None, stage: str | None = None, field: str | None = None) -> Secret:
        """``field``: one field of a structured value (a JSON object, e.g. a rotated credential)."""
        params = {"version": version, "stage": stage, "field": field}
        resp = self._get(f"/v1/secrets/{quote(_checked(name), safe='/')}", params)
        return _secret(resp.json(), self._age(resp))

    def get_many(self, names: list[str]) -> dict[str, Secret]:
        """All of ``names`` in one round trip, at one revision (all or nothing)."""
        resp = self._get("/v1/secrets", {"names": ",".join(_checked(n) for n in names)})
        age = self._age(resp)
        return {d["name"]: _secret(d, age) for d in resp.json()["secrets"]}

    def names(self) -> list[str]:
        return list(self._get("/v1/secrets").json()["names"])

    def health(self) -> dict[str, Any]:
        return self._get("/v1/health").json()  # type: ignore[no-any-return]

    def watch(self, since: int, wait: float = 30.0) -> dict[str, Any]:
        """Block until the agent passes revision ``since`` (or ``wait`` seconds pass)."""
        return self._get("/v1/watch", {"since": since, "wait": f"{wait:g}"}, timeout=wait + 5).json()  # type: ignore[no-any-return]
