"""The database is untrusted: attacks by someone who can write to it but does not hold the root key.

Each test plays the red-team review's attack against a running control plane (SQLite and PostgreSQL):
the "writer" issues SQL straight to the database, as a stolen backup restored with edits, a
compromised DBA account or an injection in a neighbour app would. What must hold: the writer can
make the control plane refuse (an ``integrity_error``, audited), never gain a token, enrol a node,
receive a region key, roll a secret back or hide an audit entry.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, insert, select, update

from tests.conftest import Api, enroll_body, enroll_node, server_key, signed_headers
from vault_edge import wire
from vault_edge.crypto import signing
from vault_edge.server.audit import _entry_bytes
from vault_edge.server.storage import schema as t


def _db(api: Api) -> Engine:
    """The writer's handle: the same database, no keys."""
    return api.client.app.state.ctx.store.engine  # type: ignore[no-any-return]


def _row(engine: Engine, table: Any, *where: Any) -> dict[str, Any]:
    with engine.connect() as c:
        return dict(c.execute(select(table).where(*where)).one()._mapping)


def _exec(engine: Engine, stmt: Any) -> None:
    with engine.begin() as c:
        c.execute(stmt)


def _audit(api: Api, action: str) -> list[dict[str, Any]]:
    st, doc = api.call("GET", "/v1/audit", params={"limit": 1000})
    assert st == 200, doc
    return [e for e in doc["entries"] if e["action"] == action]


def _integrity_refusal(api: Api, resp: tuple[int, Any], table: str) -> None:
    st, doc = resp
    assert st == 500, doc
    assert doc["error"]["code"] == "integrity_error", doc
    assert any(e["target"].startswith(table + ":") for e in _audit(api, "integrity")), "the refusal is audited"


# -- 1. operator tokens --------------------------------------------------------------------------
def test_an_inserted_token_row_grants_nothing(api: Api) -> None:
    """The writer inserts a root-equivalent row holding the digest of a token of its choosing."""
    engine = _db(api)
    forged = "vet_" + secrets.token_urlsafe(32)
    for legacy in (0, 1):
        _exec(engine, delete(t.operator_tokens).where(t.operator_tokens.c.name == "evil"))
        _exec(
            engine,
            insert(t.operator_tokens).values(
                id=secrets.token_hex(8),
                digest=hashlib.sha256(forged.encode()).digest(),
                name="evil",
                prefixes=json.dumps([""]),
                verbs=json.dumps(["read", "list", "write", "delete", "admin"]),
                created_at=0.0,
                expires_at=None,
                revoked_at=None,
                parent_id=None,
                legacy_digest=legacy,
                mac=secrets.token_bytes(32),
            ),
        )
        st, _ = Api(api.client, forged).call("GET", "/v1/secrets")
        assert st in (401, 500)  # 401: its digest is not keyed; 500: found as "legacy", its MAC fails
        assert Api(api.client, forged).call("POST", "/v1/regions", json={"name": f"evil{legacy}"})[0] in (401, 500)
    assert [r["name"] for r in api.call("GET", "/v1/regions")[1]["regions"]] == ["eu", "us"]


def test_a_token_row_widened_by_the_writer_is_refused_and_audited(api: Api) -> None:
    st, doc = api.call("POST", "/v1/tokens", json={"name": "ci", "prefixes": ["ci/"], "verbs": ["read"]})
    assert st == 200, doc
    scoped = Api(api.client, doc["token"])
    api.call("PUT", "/v1/secrets/prod/db", json={"value": "prod-password", "regions": ["eu"]})
    assert scoped.call("GET", "/v1/secrets/prod/db")[0] == 403
    _exec(
        _db(api),
        update(t.operator_tokens)
        .where(t.operator_tokens.c.id == doc["id"])
        .values(prefixes=json.dumps([""]), verbs=json.dumps(["read", "list", "write", "delete", "admin"])),
    )
    resp = scoped.call("GET", "/v1/secrets/prod/db")
    assert "prod-password" not in json.dumps(resp[1])
    _integrity_refusal(api, resp, "operator_tokens")


def test_a_revoked_token_stays_revoked_when_its_old_row_is_copied_back(api: Api) -> None:
    st, doc = api.call("POST", "/v1/tokens", json={"name": "ops", "prefixes": [""], "verbs": ["list"]})
    assert st == 200
    engine, tok = _db(api), Api(api.client, doc["token"])
    assert tok.call("GET", "/v1/secrets")[0] == 200
    before = _row(engine, t.operator_tokens, t.operator_tokens.c.id == doc["id"])  # the writer's old copy
    assert api.call("DELETE", f"/v1/tokens/{doc['id']}")[0] == 200
    assert tok.call("GET", "/v1/secrets")[0] == 401
    _exec(engine, delete(t.operator_tokens).where(t.operator_tokens.c.id == doc["id"]))
    _exec(engine, insert(t.operator_tokens).values(**before))  # revoked_at NULL again, its old valid MAC
    assert tok.call("GET", "/v1/secrets")[0] == 401


def test_a_shortened_revocation_chain_is_refused_while_the_server_runs(api: Api) -> None:
    """Deleting the revocation record (and lowering the chain's length) to revive a token: the process
    has seen the longer chain and refuses to go back."""
    st, doc = api.call("POST", "/v1/tokens", json={"name": "ops", "prefixes": [""], "verbs": ["list"]})
    engine, tok = _db(api), Api(api.client, doc["token"])
    assert api.call("DELETE", f"/v1/tokens/{doc['id']}")[0] == 200
    assert tok.call("GET", "/v1/secrets")[0] == 401
    with engine.begin() as c:
        last = c.execute(select(t.revocations.c.seq).order_by(t.revocations.c.seq.desc())).scalars().first()
        c.execute(delete(t.revocations).where(t.revocations.c.seq == last))
        c.execute(update(t.counter).where(t.counter.c.id == 3).values(revision=last - 1))
        c.execute(update(t.operator_tokens).where(t.operator_tokens.c.id == doc["id"]).values(revoked_at=None))
    st, out = tok.call("GET", "/v1/secrets")
    assert st == 500 and out["error"]["code"] == "integrity_error"


def test_an_older_snapshot_is_not_taken_for_a_shortened_chain(api: Api) -> None:
    """A transaction that began before another appended to the chain (and a third verified the longer
    chain) sees the shorter chain in its snapshot: that is no tampering (it was a false alarm, under
    concurrent enrolments)."""
    store = api.client.app.state.ctx.store
    _, doc = api.call("POST", "/v1/tokens", json={"name": "ops", "prefixes": [""], "verbs": ["list"]})
    with store.read() as older:
        older.current_revision()  # its snapshot starts here
        assert api.call("DELETE", f"/v1/tokens/{doc['id']}")[0] == 200  # appended, committed
        assert Api(api.client, doc["token"]).call("GET", "/v1/secrets")[0] == 401  # the longer chain verified
        assert ("token", doc["id"]) in older.revoked()  # no TamperedRow; what was revoked since counts


def test_an_older_snapshot_is_not_taken_for_a_rolled_back_secret(api: Api) -> None:
    """A transaction that began before a change to a secret (which another then read in the change
    log) sees the secret's older record: its snapshot, not a rollback (a false integrity alarm that
    concurrent rotations met)."""
    store = api.client.app.state.ctx.store
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    api.call("GET", "/v1/secrets/app/key")  # the change log read this far
    for _ in range(6):  # more changes than the change index keeps per name: the log is asked, too
        with store.read() as older:
            before = older.get_secret("app/key")
            assert api.call("POST", "/v1/rotate/app/key", json={"value": "v2"})[0] == 200
            assert api.call("GET", "/v1/secrets/app/key")[0] == 200  # a read that sees the change
            again = older.get_secret("app/key")  # no TamperedRow
            assert before is not None and again is not None and again.revision >= before.revision  # as the snapshot
    with store.read() as older:
        older.current_revision()
        for _ in range(6):
            assert api.call("POST", "/v1/rotate/app/key", json={"value": "v3"})[0] == 200
            assert api.call("GET", "/v1/secrets/app/key")[0] == 200
        assert older.get_secret("app/key") is not None


def test_a_change_committed_after_a_secret_row_was_read_is_not_taken_for_a_rollback(api: Api) -> None:
    """On PostgreSQL each statement of a transaction sees what was committed when it began: a change
    committed between a reader's read of a secret's row and its first read of the change log is newer
    than that row, not a rollback of it (concurrent rotations met this as a false integrity alarm, a
    500). The log is read before the rows it judges."""
    store = api.client.app.state.ctx.store
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    api.call("GET", "/v1/secrets/app/key")
    reader: list[Any] = []
    rotated: list[int] = []

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if reader and conn is reader[0] and not rotated and "FROM secrets" in statement:
            rotated.append(api.call("POST", "/v1/rotate/app/key", json={"value": "v2"})[0])

    event.listen(store.engine, "after_cursor_execute", after)
    try:
        with store.read() as tx:
            reader.append(tx.conn)
            secret = tx.get_secret("app/key")  # no TamperedRow
    finally:
        event.remove(store.engine, "after_cursor_execute", after)
    assert rotated == [200] and secret is not None
    assert api.call("GET", "/v1/secrets/app/key")[1]["value"] == "v2"


@pytest.mark.parametrize("regions", ["not json", "[1]", '{"eu": 1}'])
def test_a_secret_row_with_a_malformed_regions_column_is_an_integrity_refusal(api: Api, regions: str) -> None:
    """Parsed before its MAC can be checked: a writer's garbage there is a tampered row (audited), not
    an internal error."""
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    _exec(_db(api), update(t.secrets).where(t.secrets.c.name == "app/key").values(regions=regions))
    _integrity_refusal(api, api.call("GET", "/v1/secrets/app/key"), "secrets")


# -- 2. join tokens and nodes --------------------------------------------------------------------
def _enrol(api: Api, token: str) -> Any:
    pair = signing.KeyPair.generate()
    body = enroll_body(server_key(api), pair, token)
    return api.client.post(
        "/v1/agent/enroll",
        content=body,
        headers=signed_headers(pair, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body),
    )


def _node_ids(api: Api) -> set[str]:
    with _db(api).connect() as c:
        return set(c.execute(select(t.nodes.c.id)).scalars())


def test_an_inserted_join_token_row_enrols_nothing(api: Api) -> None:
    engine = _db(api)
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    for digest in (hashlib.sha256(secret.encode()).digest(), secrets.token_bytes(32)):
        _exec(engine, delete(t.join_tokens).where(t.join_tokens.c.id == token_id))
        _exec(
            engine,
            insert(t.join_tokens).values(
                id=token_id,
                digest=digest,
                region="eu",
                created_at=0.0,
                expires_at=4e9,
                used_at=None,
                used_by=None,
                mac=None,
            ),
        )
        pin = wire.server_pin(server_key(api))
        resp = _enrol(api, wire.make_join_token(token_id, secret, pin))
        assert resp.status_code in (401, 500), resp.text
        assert "region" not in resp.text or resp.json().get("error")
    assert _node_ids(api) == set()


def test_a_used_join_token_row_copied_back_enrols_nothing(api: Api) -> None:
    engine = _db(api)
    _st, doc = api.call("POST", "/v1/nodes/tokens", json={"region": "eu"})
    token_id = wire.parse_join_token(doc["token"])[0]
    before = _row(engine, t.join_tokens, t.join_tokens.c.id == token_id)
    assert _enrol(api, doc["token"]).status_code == 200
    _exec(engine, delete(t.join_tokens).where(t.join_tokens.c.id == token_id))
    _exec(engine, insert(t.join_tokens).values(**before))  # unused again, its old valid MAC
    resp = _enrol(api, doc["token"])
    assert resp.status_code == 401, resp.text
    assert "already used" in resp.json()["error"]["message"]
    assert len(_node_ids(api)) == 1


def _enrol_with(api: Api, token: str, pair: Any) -> Any:
    body = enroll_body(server_key(api), pair, token)
    return api.client.post(
        "/v1/agent/enroll",
        content=body,
        headers=signed_headers(pair, "POST", "/v1/agent/enroll", wire.ENROLL_NODE, body),
    )


def test_a_writer_cannot_tie_a_used_join_token_to_another_node(api: Api) -> None:
    """A retry of an enrolment is answered from the node row that names the token, under its MAC. The
    writer re-points token A at node B, whose keys it holds with A's secret: no answer, no node."""
    engine = _db(api)
    tokens = [api.call("POST", "/v1/nodes/tokens", json={"region": r})[1]["token"] for r in ("eu", "us")]
    pairs = [signing.KeyPair.generate(), signing.KeyPair.generate()]
    nodes = [_enrol_with(api, tok, pair).json()["node"] for tok, pair in zip(tokens, pairs, strict=True)]
    token_a = wire.parse_join_token(tokens[0])[0]
    _exec(engine, update(t.nodes).where(t.nodes.c.id == nodes[0]).values(join_token_id=None))
    _exec(engine, update(t.nodes).where(t.nodes.c.id == nodes[1]).values(join_token_id=token_a))
    for pair in pairs:  # node B's holder with A's token, and A's own retry: neither answered
        resp = _enrol_with(api, tokens[0], pair)
        _integrity_refusal(api, (resp.status_code, resp.json()), "nodes")
    assert _node_ids(api) == set(nodes)


def test_a_node_row_forged_for_a_used_join_token_enrols_nothing(api: Api) -> None:
    """The writer, holding a used token's secret, replaces the node it enrolled with a row of its own
    keys naming that token (no MAC, or the real row's MAC): the retry finds it and refuses it."""
    engine = _db(api)
    _st, doc = api.call("POST", "/v1/nodes/tokens", json={"region": "eu"})
    owner, attacker = signing.KeyPair.generate(), signing.KeyPair.generate()
    node = _enrol_with(api, doc["token"], owner).json()["node"]
    real = _row(engine, t.nodes, t.nodes.c.id == node)
    _exec(engine, delete(t.grants).where(t.grants.c.node_id == node))
    _exec(engine, delete(t.nodes).where(t.nodes.c.id == node))
    fake = "n-" + secrets.token_hex(8)
    for mac in (None, real["mac"]):
        _exec(engine, delete(t.nodes).where(t.nodes.c.id == fake))
        _exec(
            engine,
            insert(t.nodes).values(
                **{
                    **real,
                    "id": fake,
                    "box_public": attacker.box_public,
                    "sign_public": attacker.sign_public,
                    "mac": mac,
                }
            ),
        )
        resp = _enrol_with(api, doc["token"], attacker)
        _integrity_refusal(api, (resp.status_code, resp.json()), "nodes")
        assert _grants(api, fake) == []
    # With the node's row gone, the token is simply used: refused, nothing made.
    _exec(engine, delete(t.nodes).where(t.nodes.c.id == fake))
    resp = _enrol_with(api, doc["token"], owner)
    assert resp.status_code == 401 and "already used" in resp.json()["error"]["message"]
    assert _node_ids(api) == set()


def _grants(api: Api, node: str) -> list[dict[str, Any]]:
    with _db(api).connect() as c:
        return [dict(r._mapping) for r in c.execute(select(t.grants).where(t.grants.c.node_id == node))]


def test_a_node_row_inserted_or_edited_by_the_writer_gets_no_region_key(api: Api) -> None:
    engine = _db(api)
    node, _ = enroll_node(api, "eu")
    attacker = signing.KeyPair.generate()
    # Edited: the writer swaps in its own keys on the enrolled node. Inserted: a node of its own.
    _exec(
        engine,
        update(t.nodes)
        .where(t.nodes.c.id == node)
        .values(box_public=attacker.box_public, sign_public=attacker.sign_public),
    )
    fake = "n-" + secrets.token_hex(8)
    _exec(
        engine,
        insert(t.nodes).values(
            id=fake,
            region="eu",
            box_public=attacker.box_public,
            sign_public=attacker.sign_public,
            hostname="evil",
            status="active",
            enrolled_at=0.0,
            last_seen=None,
            applied_revision=0,
            node_rev=0,
            mac=None,
        ),
    )
    st, doc = api.call("POST", "/v1/regions/eu/rekey")
    assert st == 200, doc
    assert _grants(api, fake) == []
    assert all(g["key_version"] < doc["key_version"] for g in _grants(api, node))  # nothing new for it
    # The writer's node cannot sync either: no member of the region's view.
    target = "/v1/agent/sync?since=0&wait=0"
    resp = api.client.get(target, headers=signed_headers(attacker, "GET", target, fake, b""))
    assert resp.status_code == 401
    _integrity_refusal(api, api.call("GET", "/v1/nodes"), "nodes")


def test_a_revoked_node_row_copied_back_stays_revoked(api: Api) -> None:
    engine = _db(api)
    node, pair = enroll_node(api, "eu")
    before = _row(engine, t.nodes, t.nodes.c.id == node)
    assert api.call("POST", f"/v1/nodes/{node}/revoke")[0] == 200
    _exec(engine, delete(t.grants).where(t.grants.c.node_id == node))
    _exec(engine, delete(t.nodes).where(t.nodes.c.id == node))
    _exec(engine, insert(t.nodes).values(**before))  # "active" again, its old valid MAC
    st, _doc = api.call("POST", "/v1/regions/eu/rekey")
    assert st == 200
    assert _grants(api, node) == []
    listed = {n["id"]: n["status"] for n in api.call("GET", "/v1/nodes")[1]["nodes"]}
    assert listed[node] == "revoked"
    target = "/v1/agent/sync?since=0&wait=0"
    resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "revoked"


@pytest.mark.parametrize("copied_rev", ["old", "new"])
def test_a_revoked_node_row_copied_back_under_either_node_rev_stays_revoked(api: Api, copied_rev: str) -> None:
    """The sync hub reads again only the node rows whose node_rev moved since its last view. A writer
    who copies a revoked node's old row ("active", its valid MAC) back at once, under the node_rev
    the hub last saw ("old": the row looks unchanged, the member the hub kept is from before the
    revocation) or under its new one: the revocation chain applies to every kept member."""
    engine = _db(api)
    node, pair = enroll_node(api, "eu")
    target = "/v1/agent/sync?since=0&wait=0&proto=2"
    assert api.client.get(target, headers=signed_headers(pair, "GET", target, node, b"")).status_code == 200
    before = _row(engine, t.nodes, t.nodes.c.id == node)
    assert api.call("POST", f"/v1/nodes/{node}/revoke")[0] == 200
    after = _row(engine, t.nodes, t.nodes.c.id == node)
    assert after["node_rev"] > before["node_rev"]
    rev = before["node_rev"] if copied_rev == "old" else after["node_rev"]
    _exec(engine, delete(t.nodes).where(t.nodes.c.id == node))
    _exec(engine, insert(t.nodes).values(**{**before, "node_rev": rev}))
    # A change in the region: its view is loaded again, this node's row looking unchanged.
    assert api.call("PUT", "/v1/secrets/app/k", json={"value": "v", "regions": ["eu"]})[0] in (200, 201)
    for since in (0, after["node_rev"]):
        target = f"/v1/agent/sync?since={since}&wait=0&proto=2"
        resp = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "revoked"


# -- 3. the audit log ----------------------------------------------------------------------------
def test_an_audit_entry_cut_from_the_middle_and_the_chain_rehashed_is_found(api: Api) -> None:
    for i in range(4):
        api.call("PUT", f"/v1/secrets/app/k{i}", json={"value": f"v{i}", "regions": ["eu"]})
    engine = _db(api)
    with engine.connect() as c:
        entries = [dict(r._mapping) for r in c.execute(select(t.audit).order_by(t.audit.c.seq))]
    victim = next(e for e in entries if e["action"] == "secret.put" and e["target"] == "app/k1")
    # The writer removes the entry, renumbers and re-hashes everything after it, blanks the MACs.
    with engine.begin() as c:
        c.execute(delete(t.audit).where(t.audit.c.seq >= victim["seq"]))
        prev = next(e["hash"] for e in entries if e["seq"] == victim["seq"] - 1)
        seq = victim["seq"]
        for e in entries:
            if e["seq"] <= victim["seq"]:
                continue
            digest = hashlib.sha256(
                prev + _entry_bytes(seq, e["at"], e["actor"], e["action"], e["target"], e["outcome"], e["detail"])
            ).digest()
            c.execute(insert(t.audit).values(**{**e, "seq": seq, "hash": digest, "mac": None}))
            prev, seq = digest, seq + 1
        c.execute(update(t.counter).where(t.counter.c.id == 2).values(revision=seq - 1))
    st, v = api.call("GET", "/v1/audit/verify")
    assert st == 200 and v["ok"] is False and v["first_bad"] == victim["seq"], v
    # And nothing is chained (with a valid MAC) onto the forged head: the next change is refused.
    resp = api.call("PUT", "/v1/secrets/app/k9", json={"value": "v9", "regions": ["eu"]})
    assert resp[0] == 500 and resp[1]["error"]["code"] == "integrity_error"
    assert api.call("GET", "/v1/secrets/app/k9")[0] == 404  # the change rolled back whole


def test_refused_unseal_attempts_stay_outside_the_macd_chain(make_app: Any) -> None:
    from tests.conftest import init_and_unseal

    client, _ = make_app()
    shares, token = init_and_unseal(client)
    api = Api(client, token)
    assert api.call("POST", "/v1/sys/seal")[0] == 200
    assert client.post("/v1/sys/unseal", json={"share": "not a share"}).status_code == 400
    client.post("/v1/sys/unseal", json={"share": shares[0]})
    client.post("/v1/sys/unseal", json={"share": shares[1]})
    st, v = api.call("GET", "/v1/audit/verify")
    assert st == 200 and v["ok"] is True and v["sealed_events"] >= 1, v
    assert all(e["mac"] for e in api.call("GET", "/v1/audit")[1]["entries"])


# -- 4. stage pointers ---------------------------------------------------------------------------
def test_a_stage_pointer_moved_by_the_writer_is_refused_and_left_out_of_sync(api: Api) -> None:
    api.call("PUT", "/v1/secrets/app/key", json={"value": "old-value", "regions": ["eu"]})
    api.call("POST", "/v1/rotate/app/key", json={"value": "new-value"})
    api.call("PUT", "/v1/secrets/app/other", json={"value": "other-value", "regions": ["eu"]})
    node, pair = enroll_node(api, "eu")
    other_node, other_pair = enroll_node(api, "eu")
    target = "/v1/agent/sync?since=0&wait=0"
    first = api.client.get(target, headers=signed_headers(other_pair, "GET", target, other_node, b""))
    assert {(s["name"], s["stage"]) for s in first.json()["secrets"]} >= {("app/key", "current")}
    engine = _db(api)
    with engine.begin() as c:
        sid = c.execute(select(t.secrets.c.id).where(t.secrets.c.name == "app/key")).scalar_one()
        c.execute(update(t.stages).where(t.stages.c.secret_id == sid, t.stages.c.stage == "current").values(version=1))
    resp = api.call("GET", "/v1/secrets/app/key")
    assert "old-value" not in json.dumps(resp[1])
    _integrity_refusal(api, resp, "stages")
    assert api.call("GET", "/v1/secrets/app/other")[1]["value"] == "other-value"  # the rest is served
    api.call("POST", "/v1/rotate/app/other", json={"value": "other-2"})  # a change: the hub reloads eu
    target = "/v1/agent/sync?since=0&wait=0"
    resp2 = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    assert resp2.status_code == 200
    served = {(s["name"], s["stage"]): s["version"] for s in resp2.json()["secrets"]}
    assert served[("app/other", "current")] == 2  # the rest of the region still syncs
    # The region's last good state of the tampered secret is kept (the hub had served it): v2, never v1.
    assert served[("app/key", "current")] == 2
    assert any(e["target"].startswith("stages:app/key") for e in _audit(api, "integrity"))


def test_a_deleted_secret_revived_by_the_writer_is_not_served(api: Api) -> None:
    api.call("PUT", "/v1/secrets/app/gone", json={"value": "gone-value", "regions": ["eu"]})
    assert api.call("DELETE", "/v1/secrets/app/gone")[0] == 200
    _exec(_db(api), update(t.secrets).where(t.secrets.c.name == "app/gone").values(deleted_at=None))
    resp = api.call("GET", "/v1/secrets/app/gone")
    assert "gone-value" not in json.dumps(resp[1])
    _integrity_refusal(api, resp, "secrets")


# -- a vault made before row MACs ----------------------------------------------------------------
def test_a_vault_from_before_row_macs_is_adopted_once_at_unseal(make_app: Any) -> None:
    """Make a vault look as one made before migration 0003 did (no row MACs, plain token digests, an
    old-format canary), then unseal it: its rows are adopted, its tokens keep working, and a row the
    writer adds afterwards is refused. The writer cannot ask for a second adoption: only the root key
    makes an old-format canary."""
    from tests.conftest import init_and_unseal
    from vault_edge.crypto import envelope, seal
    from vault_edge.crypto import shares as sh

    client, _app = make_app()
    all_shares, token = init_and_unseal(client)
    api = Api(client, token)
    assert api.call("POST", "/v1/regions", json={"name": "eu"})[0] == 200
    api.call("PUT", "/v1/secrets/app/key", json={"value": "v1", "regions": ["eu"]})
    engine = _db(api)
    with engine.connect() as c:
        meta = {r.key: r.value for r in c.execute(select(t.meta))}
    root = seal.unwrap_root(sh.join(all_shares[:2]), wire.b64d(meta["server_key"]), wire.b64d(meta["root_shamir"]))
    with engine.begin() as c:  # what a 0002 database held
        for table in (t.secrets, t.stages, t.nodes, t.join_tokens, t.operator_tokens, t.audit):
            c.execute(update(table).values(mac=None))
        c.execute(update(t.operator_tokens).values(digest=hashlib.sha256(token.encode()).digest()))
        c.execute(delete(t.changes))
        c.execute(delete(t.revocations))
        c.execute(
            update(t.meta).where(t.meta.c.key == "canary").values(value=wire.b64e(envelope.make_canary(root, fmt=1)))
        )
    client2, _ = make_app()  # a restart onto the upgraded database
    for share in all_shares[:2]:
        assert client2.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    api2 = Api(client2, token)
    assert api2.call("GET", "/v1/secrets/app/key")[1]["value"] == "v1"
    assert [e["action"] for e in _audit(api2, "sys.adopt_rows")] == ["sys.adopt_rows"]
    assert api2.call("GET", "/v1/audit/verify")[1]["ok"] is True
    with engine.connect() as c:
        canary = c.execute(select(t.meta.c.value).where(t.meta.c.key == "canary")).scalar_one()
    assert envelope.canary_format(root, wire.b64d(canary)) == envelope.CANARY_FORMAT
    _exec(engine, update(t.stages).values(mac=None))  # a writer "un-MACing" rows after the adoption
    _integrity_refusal(api2, api2.call("GET", "/v1/secrets/app/key"), "stages")


def _secret_rows(engine: Engine, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with engine.connect() as c:
        record = dict(c.execute(select(t.secrets).where(t.secrets.c.name == name)).one()._mapping)
        pointers = [dict(r._mapping) for r in c.execute(select(t.stages).where(t.stages.c.secret_id == record["id"]))]
    return record, pointers


def _copy_back(engine: Engine, record: dict[str, Any], pointers: list[dict[str, Any]]) -> None:
    with engine.begin() as c:
        c.execute(delete(t.stages).where(t.stages.c.secret_id == record["id"]))
        c.execute(update(t.secrets).where(t.secrets.c.id == record["id"]).values(**record))
        for p in pointers:
            c.execute(insert(t.stages).values(**p))


def test_one_secret_rolled_back_by_copying_back_its_old_rows_is_refused(api: Api) -> None:
    """Selective rollback with rows that were once valid: the writer kept a copy of app/key's record and
    stage pointers from v1 and copies them back after the rotation to v2. Each row carries a valid MAC,
    but the secret's record is older than its last change in the change log."""
    api.call("PUT", "/v1/secrets/app/key", json={"value": "old-value", "regions": ["eu"]})
    api.call("PUT", "/v1/secrets/app/other", json={"value": "other-value", "regions": ["eu"]})
    engine = _db(api)
    old = _secret_rows(engine, "app/key")
    api.call("POST", "/v1/rotate/app/key", json={"value": "new-value"})
    node, pair = enroll_node(api, "eu")
    _copy_back(engine, *old)
    resp = api.call("GET", "/v1/secrets/app/key")
    assert "old-value" not in json.dumps(resp[1])
    _integrity_refusal(api, resp, "secrets")
    api.call("POST", "/v1/rotate/app/other", json={"value": "other-2"})  # the hub reloads eu
    target = "/v1/agent/sync?since=0&wait=0"
    resp2 = api.client.get(target, headers=signed_headers(pair, "GET", target, node, b""))
    served = {(s["name"], s["stage"]): s["version"] for s in resp2.json()["secrets"]}
    assert served[("app/other", "current")] == 2
    assert not any(name == "app/key" for name, _ in served)  # never the rolled-back v1
    # Only the pointers copied back (the record left as it is): they no longer match its digest.
    api.call("PUT", "/v1/secrets/app/third", json={"value": "third-1", "regions": ["eu"]})
    old3 = _secret_rows(engine, "app/third")
    api.call("POST", "/v1/rotate/app/third", json={"value": "third-2"})
    record_now, _ = _secret_rows(engine, "app/third")
    _copy_back(engine, record_now, old3[1])
    _integrity_refusal(api, api.call("GET", "/v1/secrets/app/third"), "stages")


def test_removing_a_secrets_changes_from_the_log_is_a_gap_that_stops_serving(api: Api) -> None:
    """To hide the rollback the writer also deletes app/key's later rows from the change log. The log
    is dense, so that is a gap: at the next check (every minute, and at unseal) the control plane
    stops serving secrets, audited, rather than serve what may be a rollback."""
    from vault_edge.server.ops.system import check_change_log

    api.call("PUT", "/v1/secrets/app/key", json={"value": "old-value", "regions": ["eu"]})
    engine = _db(api)
    old = _secret_rows(engine, "app/key")
    api.call("POST", "/v1/rotate/app/key", json={"value": "new-value"})
    _copy_back(engine, *old)
    with engine.begin() as c:
        c.execute(delete(t.changes).where(t.changes.c.target == "app/key", t.changes.c.revision > old[0]["revision"]))
    ctx = api.client.app.state.ctx
    assert check_change_log(ctx) is False
    resp = api.call("GET", "/v1/secrets/app/key")
    assert "old-value" not in json.dumps(resp[1])
    assert resp[0] == 500 and resp[1]["error"]["code"] == "integrity_error"
    assert any(e["target"] == "changes:log" for e in _audit(api, "integrity"))


def test_a_restarted_control_plane_finds_the_gap_at_unseal(make_app: Any) -> None:
    """The same attack, then a restart (a fresh process remembers nothing): the check at unseal finds
    the gap before any secret is served."""
    from tests.conftest import init_and_unseal

    client, _ = make_app()
    all_shares, token = init_and_unseal(client)
    api = Api(client, token)
    api.call("POST", "/v1/regions", json={"name": "eu"})
    api.call("PUT", "/v1/secrets/app/key", json={"value": "old-value", "regions": ["eu"]})
    engine = _db(api)
    old = _secret_rows(engine, "app/key")
    api.call("POST", "/v1/rotate/app/key", json={"value": "new-value"})
    _copy_back(engine, *old)
    with engine.begin() as c:
        c.execute(delete(t.changes).where(t.changes.c.target == "app/key", t.changes.c.revision > old[0]["revision"]))
    client2, _ = make_app()
    for share in all_shares[:2]:
        assert client2.post("/v1/sys/unseal", json={"share": share}).status_code == 200
    resp = Api(client2, token).call("GET", "/v1/secrets/app/key")
    assert "old-value" not in json.dumps(resp[1])
    assert resp[0] == 500 and resp[1]["error"]["code"] == "integrity_error", resp
