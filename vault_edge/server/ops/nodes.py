"""Nodes: join tokens, enrolment, signed-request checks, listing, revocation."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from vault_edge import wire
from vault_edge.crypto import signing
from vault_edge.crypto.errors import DecryptionError
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request, not_found, unauthorized
from vault_edge.server.ops import keyring, regions
from vault_edge.server.storage.records import JoinToken, Node
from vault_edge.server.storage.repo import TamperedRow, Tx
from vault_edge.wire import egress as wegress
from vault_edge.wire import enrol as wenrol

MAX_TTL_S = 7 * 86400
TOKEN_USED = "join token already used: make a new one with `vault-edge node token`"


def create_join_token(ctx: Context, who: Principal, region: str, ttl_s: int | None = None) -> dict[str, Any]:
    who.require_global_admin()
    ttl = ttl_s if ttl_s is not None else ctx.settings.join_token_ttl_s
    if not 60 <= ttl <= MAX_TTL_S:
        raise bad_request("ttl: between 1 minute and 7 days")
    keys = ctx.barrier.keys()
    now = ctx.clock()
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    with ctx.store.write() as tx:
        if tx.get_region(region) is None:
            raise not_found(f"no region {region!r}")
        tx.insert_join_token(JoinToken(token_id, tx.keys().token_digest(secret), region, now, now + ttl, None, None))
        ctx.auditor.record(tx, who.actor, "node.token", region, token_id=token_id, ttl_s=ttl)
    token = wire.make_join_token(token_id, secret, wire.server_pin(keys.server_public))
    return {"token": token, "region": region, "expires_at": now + ttl}


def refuse(ctx: Context, action: str, target: str, exc: ApiError, known: bool = False) -> ApiError:
    """Audit a refusal (throttled: per target when ``target`` is a known node, else per kind)."""
    ctx.auditor.record_alone(
        "node", action, target, outcome="refused", reason=exc.message, throttle="target" if known else "kind"
    )
    return exc


def check_signature(
    ctx: Context,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    node_id: str,
    public_key: bytes,
) -> tuple[int, str]:
    """Check the signed-request headers against ``public_key``; (timestamp, nonce) on success."""
    try:
        ts = wire.parse_timestamp(headers.get(wire.H_TIMESTAMP, ""))
        nonce = headers.get(wire.H_NONCE, "")
        if len(wire.b64d(nonce, max_len=64)) != wire.NONCE_BYTES:
            raise ValueError
        signature = wire.b64d(headers.get(wire.H_SIGNATURE, ""), max_len=128)
    except (ValueError, wire.WireError):
        raise unauthorized("missing or malformed request signature headers") from None
    if abs(ctx.clock() - ts) > wire.CLOCK_SKEW_S:
        raise unauthorized(f"request timestamp outside the {wire.CLOCK_SKEW_S}s clock-skew window")
    if not signing.verify(public_key, wire.request_message(method, target, node_id, ts, nonce, body), signature):
        raise unauthorized("bad request signature")
    return ts, nonce


def enroll(ctx: Context, target: str, headers: Mapping[str, str], body: bytes) -> tuple[bytes, bytes]:
    """Enrol a node with a join token. The body is ``{"sealed": ...}``: the request
    ``{token, box_public, sign_public, hostname}`` sealed to the control plane's key, so nobody on
    the path can read the token or swap the keys. Returns (signed JSON body, signature); the body
    echoes the node's signing key and the request's nonce, binding the answer to this request.

    Idempotent for its own retries: a token already used is answered again, freshly signed for the
    new request's nonce, when the request carries the keys of the node that token enrolled (see
    :func:`_repeat`); so an answer lost on the way (a timeout, a dropped connection, an agent killed
    mid-enrolment) leaves no orphan node: the agent's retry learns that node. The enrolment itself is
    one write transaction: the token's use, the node, its grant and the audit entry commit together
    or not at all."""
    keys = ctx.barrier.keys()
    try:
        sealed = wenrol.open_envelope(body)
    except wire.WireError as exc:
        raise bad_request(str(exc)) from None
    try:
        inner = signing.open_for_server(keys.signer, sealed)
    except DecryptionError:
        raise bad_request("the enrolment request is not sealed to this control plane's key") from None
    try:
        req = wenrol.Request.decode(inner)
    except wire.WireError as exc:
        raise bad_request(str(exc)) from None
    token_id, token_secret, _pin = wire.parse_join_token(req.token)
    box_public, sign_public, hostname = req.box_public, req.sign_public, req.hostname
    if headers.get(wire.H_NODE) != wire.ENROLL_NODE:
        raise bad_request("enrolment is signed with node id '-'")
    try:
        check_signature(ctx, "POST", target, headers, body, wire.ENROLL_NODE, sign_public)
    except ApiError as exc:
        raise refuse(ctx, "node.enroll", token_id, exc) from None
    now = ctx.clock()
    node_id = "n-" + secrets.token_hex(8)
    repeated: Node | None = None
    try:
        with ctx.store.write() as tx:
            token = tx.get_join_token(token_id)
            if token is None or not secrets.compare_digest(token.digest, tx.keys().token_digest(token_secret)):
                raise unauthorized("invalid join token")
            if token.used_at is not None:
                repeated = _repeat(tx, token, box_public, sign_public)
            else:
                if token.expires_at <= now:
                    raise unauthorized("join token expired: make a new one with `vault-edge node token`")
                if not tx.use_join_token(token_id, now, node_id):
                    raise unauthorized(TOKEN_USED)
                rev = tx.next_revision()
                tx.insert_node(
                    Node(
                        node_id,
                        token.region,
                        box_public,
                        sign_public,
                        hostname,
                        "active",
                        now,
                        now,
                        0,
                        rev,
                        join_token_id=token_id,
                        enrolled_rev=rev,
                    )
                )
                kv, region_key = keyring.current_region_key(tx, ctx.barrier, token.region)
                tx.put_grant(
                    node_id,
                    token.region,
                    kv,
                    signing.seal_grant(box_public, node_id, token.region, kv, region_key),
                    rev,
                )
                tx.changed([token.region])
                ctx.auditor.record(
                    tx, "node:" + node_id, "node.enroll", token.region, hostname=hostname, token_id=token_id
                )
    except ApiError as exc:
        raise refuse(ctx, "node.enroll", token_id, exc) from None
    if repeated is not None:
        node_id, rev = repeated.id, repeated.enrolled_rev or 0
        # Audited per node and throttled (only the holder of the node's key can ask, but it can ask often).
        ctx.auditor.record_alone(
            "node:" + node_id,
            "node.enroll",
            node_id,
            outcome="repeated",
            throttle="target",
            region=token.region,
            token_id=token_id,
        )
    out = wenrol.Answer(
        node_id, token.region, keys.server_public, rev, sign_public, headers.get(wire.H_NONCE, "")
    ).encode()
    return out, signing.sign(keys.signer, wire.response_message(wenrol.KIND, out))


def _repeat(tx: Tx, token: JoinToken, box_public: bytes, sign_public: bytes) -> Node:
    """A used join token presented again: a retry of the enrolment that used it when the request
    carries the keys of the node it enrolled and that node is live; that node, answered again. Anything
    else is a second enrolment with a used token, refused.

    Safe on untrusted storage: the token's row and its use are checked as on a first enrolment (its
    MAC, the caller's secret against its keyed digest, the revocation chain marking it used), and the
    node is the one whose MAC'd row names this token (``Tx.node_enrolled_by``), so a database writer
    cannot tie the token to a node of its choosing, nor make a node at all. The caller proved it holds
    the node's signing key (the request's signature is checked against ``sign_public``) and names its
    box key too: it learns only the id of a node that is already its own, and nothing is written.
    The token's expiry is not checked again: the answer grants nothing that was not granted while
    the token was live, and an agent whose answer was lost while the control plane then stayed away
    past the token's lifetime still learns its node instead of leaving it orphaned."""
    node = tx.node_enrolled_by(token.id)
    if (
        node is None
        or node.status != "active"
        or node.region != token.region
        or node.box_public != box_public
        or node.sign_public != sign_public
    ):
        raise unauthorized(TOKEN_USED)
    return node


def enrolment_refusal(ctx: Context, exc: ApiError, nonce: str, request_body: bytes) -> tuple[bytes, bytes]:
    """The signed refusal of an enrolment: the plain JSON error shape, signed over the request's nonce
    and body digest as well (``wire.refusal_message``), so it proves the control plane refused *this*
    request; a relay that altered the request, or answers on its own, cannot produce it."""
    body = wenrol.refusal(exc.code, exc.message)
    return body, signing.sign(ctx.barrier.keys().signer, wire.refusal_message(nonce, request_body, body))


def list_nodes(ctx: Context, who: Principal, region: str | None = None) -> dict[str, Any]:
    who.require_global("list")  # the whole fleet with its hostnames: no name's business
    now = ctx.clock()
    with ctx.store.read() as tx:
        nodes = tx.list_nodes(region=region)
        if tx.tampered:  # a node row written without the root key: refuse, do not hide it
            raise TamperedRow(*tx.tampered[0])
    return {"nodes": [node_json(ctx, n, now) for n in nodes]}


def get_node(ctx: Context, who: Principal, node_id: str) -> dict[str, Any]:
    """One node's status: ``node_json``, its egress counters per route among it."""
    who.require_global("list")
    with ctx.store.read() as tx:
        node = tx.get_node(node_id) if wire.valid_node_id(node_id) else None
    if node is None:
        raise not_found(f"no node {node_id!r}")
    return node_json(ctx, node, ctx.clock())


def egress_json(raw: str | None) -> dict[str, Any] | None:
    """The node's last egress report as JSON (``wire.egress.Report.to_json`` with the total of
    ``requests``), or None when it sent none. The column is a report, outside the row's MAC: what
    does not decode (a database writer's) is shown as none rather than trusted."""
    if raw is None:
        return None
    try:
        report = wegress.Report.decode(raw)
    except wire.WireError:
        return None
    return {**report.to_json(), "requests": report.requests}


def node_json(ctx: Context, n: Node, now: float) -> dict[str, Any]:
    status = n.status
    if status == "active" and (n.last_seen is None or now - n.last_seen > ctx.settings.node_down_after_s):
        status = "down"
    return {
        "id": n.id,
        "region": n.region,
        "status": status,
        "revision": n.applied_revision,
        "last_seen": n.last_seen,
        "hostname": n.hostname,
        "enrolled_at": n.enrolled_at,
        "egress": egress_json(n.egress),
    }


def revoke(ctx: Context, who: Principal, node_id: str) -> dict[str, Any]:
    """Refuse the node from now on, and re-key its region so its region key opens nothing new."""
    who.require_global_admin()
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        node = tx.get_node(node_id) if wire.valid_node_id(node_id) else None
        if node is None:
            raise not_found(f"no node {node_id!r}")
        if node.status == "revoked":
            raise ApiError(409, "conflict", f"node {node_id} is already revoked")
        rev = tx.next_revision()
        tx.set_node_status(node_id, "revoked", rev)
        tx.append_revocation("node", node_id, ctx.clock())
        tx.delete_grants(node.region, node_id=node_id)
        _, key_version = regions.rekey_in(ctx, tx, node.region)
        ctx.auditor.record(tx, who.actor, "node.revoke", node_id, region=node.region, key_version=key_version)
    return {"id": node_id, "status": "revoked", "region": node.region, "key_version": key_version, "revision": rev}
