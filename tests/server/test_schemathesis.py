"""Property-based fuzzing of the control plane's OpenAPI schema with schemathesis.

Every operation of ``app.openapi()`` is called with generated requests (valid ones, and invalid ones
in schemathesis' negative mode) under the root token of an initialized, unsealed vault (SQLite):
no answer may be a 5xx, and every 4xx carries exactly ``{"error": {"code": str, "message": str}}``.

Requests go through the app's own ``TestClient`` (so the app's lifespan, hub and scheduler are the
ones the fixture started); schemathesis only generates the cases. Examples are capped so the whole
run stays well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient

from tests.conftest import init_and_unseal
from vault_edge.server.app import create_app
from vault_edge.server.settings import Settings
from vault_edge.server.storage.engine import make_engine
from vault_edge.server.storage.repo import Store

MAX_EXAMPLES = 25
TRACEBACK_MARKERS = ("Traceback", 'File "')
# Seeded secrets; no '/' in them, since schemathesis does not substitute path values containing one.
EXISTING_SECRETS = ["dbpassword", "apikey"]


class Vault:
    def __init__(self, client: TestClient, shares: list[str], token: str) -> None:
        self.client, self.shares, self.token = client, shares, token

    def reunseal(self) -> None:
        """POST /v1/sys/seal is a legitimate operation: unseal again so the next case meets an open vault."""
        if self.client.app.state.ctx.barrier.sealed:
            for share in self.shares[:2]:
                assert self.client.post("/v1/sys/unseal", json={"share": share}).status_code == 200


@pytest.fixture
def st_vault(sqlite_url: str) -> Iterator[Vault]:
    app = create_app(Settings(db=sqlite_url, max_body_bytes=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as client:
        shares, token = init_and_unseal(client)
        auth = {"Authorization": f"Bearer {token}"}
        for region in ("eu", "us"):
            assert client.post("/v1/regions", json={"name": region}, headers=auth).status_code == 200
        for name in EXISTING_SECRETS:
            assert client.put(f"/v1/secrets/{name}", json={"value": "v"}, headers=auth).status_code == 200
        yield Vault(client, shares, token)
    app.state.ctx.store.dispose()


def _openapi() -> dict[str, Any]:
    """The app's schema, from an app on an in-memory database (the schema does not depend on storage)."""
    app = create_app(Settings(), store=Store(make_engine("sqlite://")))
    doc = app.openapi()
    app.state.ctx.store.dispose()
    return doc


# Half of the generated path parameters name things that exist, so that generated bodies reach the
# handlers (put/rotate/rollback of a real secret, rekey of a real region), not only the name checks.
# The schema is built at import (schemathesis.pytest.from_fixture relies on pytest's removed
# ``Node._nodeid``); the app it describes needs no storage.
schema = schemathesis.openapi.from_dict(
    _openapi(),
    config=schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES},
            "suppress-health-check": ["all"],
            "dictionaries": {"secrets": {"values": EXISTING_SECRETS}, "regions": {"values": ["eu", "us"]}},
            "parameters": {
                "path.name": {"dictionary": "secrets", "probability": 0.5},
            },
            "operations": [
                {
                    "include-path": "/v1/regions/{name}/rekey",
                    "parameters": {"path.name": {"dictionary": "regions", "probability": 0.5}},
                },
            ],
        }
    ),
)


def _httpx_kwargs(case: Any, token: str) -> dict[str, Any]:
    kw = case.as_transport_kwargs(base_url="http://testserver", headers={"Authorization": f"Bearer {token}"})
    kw.pop("cookies", None)
    data = kw.pop("data", None)
    if data is not None:
        kw["data" if isinstance(data, dict) else "content"] = data
    return kw


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@schema.parametrize()
def test_no_server_errors_and_errors_have_the_json_shape(case: Any, st_vault: Vault) -> None:
    resp = st_vault.client.request(**_httpx_kwargs(case, st_vault.token))
    where = f"{case.method} {case.formatted_path} -> {resp.status_code}: {resp.text[:300]}"
    assert resp.status_code < 500, where
    assert not any(marker in resp.text for marker in TRACEBACK_MARKERS), where
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith("application/json"), where
        doc = resp.json()
        assert isinstance(doc, dict) and set(doc) == {"error"}, where
        assert isinstance(doc["error"], dict) and set(doc["error"]) == {"code", "message"}, where
        assert all(isinstance(v, str) and v for v in doc["error"].values()), where
    st_vault.reunseal()
