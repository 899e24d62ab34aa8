"""Webhook: for API providers with key-management APIs (OpenAI, Stripe, Cloudflare-style). The
operator configures three HTTP calls:

    {"create": {"method": "POST", "url": "https://api.example/keys"},
     "test":   {"method": "GET",  "url": "https://api.example/whoami", "bearer_field": "key"},
     "revoke": {"method": "DELETE", "url": "https://api.example/keys/{id}"}}

``create`` and ``revoke`` carry ``Authorization: Bearer <admin token>`` (the admin secret's
``token`` field); ``create`` answers the new credential as a JSON object (stored as is, e.g.
``{"id", "key"}``) and carries an ``Idempotency-Key`` (the rotation's), so a create resumed after a
crash gets the same key back instead of leaving an orphan at the provider. ``test`` presents the new
credential's ``bearer_field`` and must answer 2xx (401/403: refused). ``{field}`` in a URL is
replaced by the credential's field, URL-quoted. A revoke answered 404 counts as done."""

from __future__ import annotations

import string
import time
from typing import Any
from urllib.parse import quote

import httpx

from vault_edge.server.rotators import Credential, Refused, RotatorError

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CALL_S = 10.0  # a call, in all: well within the step's 15 s lease
_MAX_ANSWER = 1 << 20


def _call(config: dict[str, Any], which: str) -> dict[str, Any]:
    call = config.get(which)
    if not isinstance(call, dict) or set(call) - {"method", "url", "bearer_field"}:
        raise ValueError(f'config.{which}: {{"method", "url"[, "bearer_field"]}}')
    method, url = str(call.get("method", "POST")).upper(), call.get("url")
    if method not in _METHODS:
        raise ValueError(f"config.{which}.method: one of {', '.join(_METHODS)}")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"config.{which}.url: an http(s) URL")
    try:  # its {fields}: plain names of the credential's fields, no attribute, index or format
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(url) if f is not None]
    except ValueError:
        raise ValueError(f"config.{which}.url: a URL whose {{fields}} are balanced") from None
    if any(not f.isidentifier() or spec or conv for f, spec, conv in fields):
        raise ValueError(f"config.{which}.url: {{fields}} name a field of the credential, nothing more")
    out = {"method": method, "url": url}
    if "bearer_field" in call:
        out["bearer_field"] = str(call["bearer_field"])
    return out


def _url(template: str, cred: Credential) -> str:
    try:
        return template.format_map({k: quote(str(v), safe="") for k, v in cred.items()})
    except (KeyError, ValueError, IndexError, AttributeError):
        raise RotatorError("webhook: a URL template names a field the credential does not have") from None


def _send(what: str, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    """One call, ended within ``CALL_S`` in all (httpx's timeout is per phase: a server trickling its
    answer would hold the call past the step's lease)."""
    deadline = time.monotonic() + CALL_S
    try:
        with httpx.Client(timeout=5) as client, client.stream(method, url, headers=headers) as resp:
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if time.monotonic() > deadline or len(body) > _MAX_ANSWER:
                    raise RotatorError(f"webhook: {what}: the answer took too long or was too large")
            return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body))
    except httpx.HTTPError as exc:
        raise RotatorError(f"webhook: {what}: {type(exc).__name__}") from None


class Webhook:
    def validate(self, config: dict[str, Any]) -> dict[str, Any]:
        if set(config) - {"create", "test", "revoke"}:
            raise ValueError("config: create, test and revoke calls only")
        out = {k: _call(config, k) for k in ("create", "test", "revoke")}
        out["test"].setdefault("bearer_field", "key")
        return out

    def overlaps(self, config: dict[str, Any]) -> bool:
        return True

    def plan(self, config: dict[str, Any], current: Credential | None) -> None:
        return None  # the provider makes the key

    @staticmethod
    def _bearer(admin: Credential) -> dict[str, str]:
        token = admin.get("token")
        if not isinstance(token, str) or not token:
            raise RotatorError("webhook: the admin secret has no 'token' field")
        return {"Authorization": f"Bearer {token}"}

    def create(self, config: dict[str, Any], admin: Credential, new: Credential | None, key: str) -> Credential:
        call = config["create"]
        resp = _send("create", call["method"], call["url"], {**self._bearer(admin), "Idempotency-Key": key})
        if resp.status_code // 100 != 2:
            raise RotatorError(f"webhook: create answered HTTP {resp.status_code}")
        try:
            cred = resp.json()
        except ValueError:
            cred = None
        if not isinstance(cred, dict) or not cred:
            raise RotatorError("webhook: create did not answer a JSON object")
        return cred

    def test(self, config: dict[str, Any], new: Credential) -> None:
        call = config["test"]
        bearer = new.get(call["bearer_field"])
        if not isinstance(bearer, str):
            raise Refused(f"webhook: the new credential has no {call['bearer_field']!r} field")
        resp = _send("test", call["method"], _url(call["url"], new), {"Authorization": f"Bearer {bearer}"})
        if resp.status_code in (401, 403):
            raise Refused(f"webhook: test answered HTTP {resp.status_code}")
        if resp.status_code // 100 != 2:
            raise RotatorError(f"webhook: test answered HTTP {resp.status_code}")

    def retire(self, config: dict[str, Any], admin: Credential, old: Credential, current: Credential | None) -> None:
        if not old or (current is not None and current == old):
            return  # a first rotation has no key of ours to revoke
        call = config["revoke"]
        resp = _send("revoke", call["method"], _url(call["url"], old), self._bearer(admin))
        if resp.status_code // 100 != 2 and resp.status_code != 404:
            raise RotatorError(f"webhook: revoke answered HTTP {resp.status_code}")


DRIVER = Webhook()
