"""The operator API client (httpx): what the CLI, scripts and tests use to drive the control plane."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from vault_edge import wire

DEFAULT_ADDR = "http://127.0.0.1:8420"


class ClientError(Exception):
    """An error answer (``status``, ``code``) or an unreachable control plane (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class OperatorClient:
    def __init__(
        self, addr: str | None = None, token: str | None = None, timeout: float = 30.0, verify: bool | str = True
    ) -> None:
        self.addr = (addr or os.environ.get("VAULT_EDGE_ADDR") or DEFAULT_ADDR).rstrip("/")
        self.token = token if token is not None else os.environ.get("VAULT_EDGE_TOKEN")
        if verify is True:
            verify = os.environ.get("VAULT_EDGE_CACERT") or True
        self.cacert = verify if isinstance(verify, str) else None
        if self.cacert is not None and not os.path.isfile(self.cacert):
            raise ClientError(
                0, "bad_ca", f"CA certificate file {self.cacert!r} does not exist (--ca-cert / VAULT_EDGE_CACERT)"
            )
        tls: Any = verify
        if self.cacert is not None:
            import ssl

            try:
                tls = ssl.create_default_context(cafile=self.cacert)
            except (ssl.SSLError, OSError) as exc:
                raise ClientError(
                    0,
                    "bad_ca",
                    f"CA certificate file {self.cacert!r} cannot be used: {getattr(exc, 'reason', None) or exc}",
                ) from None
        try:
            url = httpx.URL(self.addr)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError
            self._http = httpx.Client(base_url=url, timeout=timeout, verify=tls)
        except (httpx.InvalidURL, ValueError):
            raise ClientError(
                0, "bad_address", f"not a control-plane address: {self.addr!r} (e.g. http://127.0.0.1:8420)"
            ) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        try:
            data = resp.json()
        except (ValueError, RecursionError):
            data = None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            err = err if isinstance(err, dict) else {}
            raise ClientError(
                resp.status_code, str(err.get("code", "error")), str(err.get("message", f"HTTP {resp.status_code}"))
            )
        if not isinstance(data, dict):
            raise ClientError(
                resp.status_code,
                "bad_answer",
                f"{self.addr} answered HTTP {resp.status_code} without a JSON object: "
                "is it a vault-edge control plane?",
            )
        return data

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        """A transport failure, said truthfully: a TLS failure names the certificate problem and what
        would fix it (the CA option only when the chain is the problem); anything else, the address and
        the exception's class."""
        tls = tls_problem(exc)
        if tls is None and self.addr.startswith("http://") and isinstance(exc, httpx.RemoteProtocolError):
            return ClientError(  # what a TLS listener does with a plain-HTTP request: hang up
                0,
                "unreachable",
                f"the control plane at {self.addr} hung up without an answer ({type(exc).__name__}): "
                f"does it serve https ({self.addr.replace('http://', 'https://', 1)})?",
            )
        if tls is None:
            return ClientError(
                0,
                "unreachable",
                f"cannot reach the control plane at {self.addr} ({type(exc).__name__}); "
                "is `vault-edge server` running?",
            )
        problem, kind = tls
        if kind == "chain":
            hint = (
                f"the CA in {self.cacert} does not vouch for it"
                if self.cacert
                else "give the CA that signed it with --ca-cert FILE or VAULT_EDGE_CACERT"
            )
        elif kind == "hostname":
            hint = "use an address the certificate names (--addr / VAULT_EDGE_ADDR), or a certificate naming this one"
        elif kind == "not_tls":
            hint = f"nothing speaks TLS there: is it {self.addr.replace('https://', 'http://', 1)}?"
        else:
            hint = (
                "renew or replace the control plane's certificate"
                if kind == "validity"
                else "no certificate was checked"
            )
        return ClientError(0, "tls", f"TLS with the control plane at {self.addr} failed: {problem}; {hint}")

    # -- sys -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/sys/status")

    def init(self, **body: Any) -> dict[str, Any]:
        return self.request("POST", "/v1/sys/init", json=body)

    def unseal(self, share: str | None = None, passphrase: str | None = None, reset: bool = False) -> dict[str, Any]:
        body = {"share": share, "passphrase": passphrase, "reset": reset}
        return self.request("POST", "/v1/sys/unseal", json=body)

    def seal(self) -> dict[str, Any]:
        return self.request("POST", "/v1/sys/seal")

    # -- regions -------------------------------------------------------------------------------
    def create_region(self, name: str) -> dict[str, Any]:
        return self.request("POST", "/v1/regions", json={"name": name})

    def regions(self) -> dict[str, Any]:
        return self.request("GET", "/v1/regions")

    def rekey(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/regions/{_id('region', name, wire.valid_region)}/rekey")

    # -- secrets -------------------------------------------------------------------------------
    def put(self, name: str, **body: Any) -> dict[str, Any]:
        return self.request("PUT", f"/v1/secrets/{_p(name)}", json=_clean(body))

    def get(self, name: str, version: int | None = None, stage: str | None = None) -> dict[str, Any]:
        params = {"version": version, "stage": stage}
        return self.request("GET", f"/v1/secrets/{_p(name)}", params=params)

    def list(self, prefix: str = "") -> dict[str, Any]:
        return self.request("GET", "/v1/secrets", params={"prefix": prefix or None})

    def history(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/history/{_p(name)}")

    def rotate(self, name: str, **body: Any) -> dict[str, Any]:
        return self.request("POST", f"/v1/rotate/{_p(name)}", json=_clean(body))

    def promote(self, name: str, grace: str | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/promote/{_p(name)}", json=_clean({"grace": grace}))

    def rollback(self, name: str, to: int, grace: str | None = None) -> dict[str, Any]:
        body = _clean({"to": to, "grace": grace})
        return self.request("POST", f"/v1/rollback/{_p(name)}", json=body)

    def delete(self, name: str, destroy: bool = False) -> dict[str, Any]:
        params = {"destroy": "true" if destroy else None}
        return self.request("DELETE", f"/v1/secrets/{_p(name)}", params=params)

    def propagation(self, name: str, revision: int | None = None) -> dict[str, Any]:
        return self.request("GET", f"/v1/propagation/{_p(name)}", params={"revision": revision})

    # -- rotation at the source ------------------------------------------------------------------
    def create_rotator(self, name: str, **body: Any) -> dict[str, Any]:
        return self.request("PUT", f"/v1/rotators/{_id('rotator', name, _valid_rotator)}", json=_clean(body))

    def rotators(self) -> dict[str, Any]:
        return self.request("GET", "/v1/rotators")

    def delete_rotator(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/rotators/{_id('rotator', name, _valid_rotator)}")

    def rotation_status(self, name: str, limit: int | None = None) -> dict[str, Any]:
        return self.request("GET", f"/v1/rotations/{_p(name)}", params={"limit": limit})

    # -- nodes, tokens, audit ------------------------------------------------------------------
    def join_token(self, region: str, ttl: str | None = None) -> dict[str, Any]:
        body = _clean({"region": region, "ttl": ttl})
        return self.request("POST", "/v1/nodes/tokens", json=body)

    def nodes(self, region: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/nodes", params={"region": region})

    def node(self, node_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/nodes/{_id('node', node_id, wire.valid_node_id)}")

    def revoke_node(self, node_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/nodes/{_id('node', node_id, wire.valid_node_id)}/revoke")

    def create_token(self, **body: Any) -> dict[str, Any]:
        return self.request("POST", "/v1/tokens", json=_clean(body))

    def tokens(self) -> dict[str, Any]:
        return self.request("GET", "/v1/tokens")

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/tokens/{_id('active token', token_id, wire.valid_token_id)}")

    def lookup_self(self) -> dict[str, Any]:
        """The token in use: id, name, prefixes, verbs, expiry (GET /v1/tokens/self)."""
        return self.request("GET", "/v1/tokens/self")

    def audit(self, after: int = 0, limit: int = 100) -> dict[str, Any]:
        return self.request("GET", "/v1/audit", params={"after": after, "limit": limit})

    def audit_verify(self) -> dict[str, Any]:
        return self.request("GET", "/v1/audit/verify")

    # -- the seal: recovery shares, root key rotation, backup ------------------------------------------
    def generate_root(self, shares: list[str], passphrase: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/sys/generate-root", json=_clean({"shares": shares, "passphrase": passphrase}))

    def rekey_shares(self, shares: list[str], passphrase: str | None = None, **new: Any) -> dict[str, Any]:
        return self.request("POST", "/v1/sys/rekey", json=_clean({"shares": shares, "passphrase": passphrase, **new}))

    def seal_migrate(self, shares: list[str], to: str, passphrase: str | None = None) -> dict[str, Any]:
        body = _clean({"shares": shares, "to": to, "passphrase": passphrase})
        return self.request("POST", "/v1/sys/seal-migrate", json=body)

    def rotate_root(self) -> dict[str, Any]:
        return self.request("POST", "/v1/sys/rotate")

    def backup(self) -> bytes:
        """The backup file's bytes (GET /v1/sys/backup)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = self._http.get("/v1/sys/backup", headers=headers, timeout=600)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400 or resp.headers.get("content-type") != "application/octet-stream":
            try:
                err = resp.json().get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            raise ClientError(
                resp.status_code, str(err.get("code", "error")), str(err.get("message", f"HTTP {resp.status_code}"))
            )
        return resp.content


# OpenSSL's reasons when the peer's first bytes are no TLS record (a plain-HTTP server, say).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")
# X509_V_ERR_* codes of the validity period and of the name; any other verify failure is the chain's
# (self-signed, unknown issuer, ...), which a CA option fixes.
_VALIDITY = {9, 10}  # not yet valid, expired
_HOSTNAME = {62, 64}  # hostname, IP address mismatch


def tls_problem(exc: BaseException) -> tuple[str, str] | None:
    """The TLS problem behind a transport error and its kind, or None when it is no TLS failure:
    ("certificate verify failed: self-signed certificate", "chain"), ("... Hostname mismatch, ...",
    "hostname"), ("... certificate has expired", "validity"), ("TLS error: WRONG_VERSION_NUMBER",
    "not_tls"), or another handshake failure ("handshake")."""
    import ssl

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            code = seen.verify_code
            kind = "validity" if code in _VALIDITY else "hostname" if code in _HOSTNAME else "chain"
            return f"certificate verify failed: {str(seen.verify_message or seen.reason).rstrip('.')}", kind
        if isinstance(seen, ssl.SSLError):
            reason = str(seen.reason or seen)
            return f"TLS error: {reason}", "not_tls" if any(r in reason for r in _NOT_TLS) else "handshake"
        seen = seen.__cause__ or seen.__context__
    return None


def _clean(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _p(name: str) -> str:
    """A secret name for a URL path, checked first: a ``.``/``..`` segment would be collapsed by the
    URL layer into another name, so it is refused here as the server would refuse it."""
    try:
        return quote(wire.check_name(name), safe="/")
    except wire.WireError as exc:
        raise ClientError(400, "bad_request", str(exc)) from None


def _id(kind: str, value: str, valid: Callable[[str], bool]) -> str:
    if not valid(value):
        raise ClientError(404, "not_found", f"no {kind} {value!r}")
    return value


def _valid_rotator(name: str) -> bool:
    import re

    return re.fullmatch(r"[a-z][a-z0-9_\-]{0,62}", name) is not None
