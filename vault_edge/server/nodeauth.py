"""Who is calling the sync endpoint: a signed request from an enrolled, active node.

The node's signing key and status come from the sync hub's cached region view (kept current by
change notices), the signature is checked in memory, and the nonce is spent, with the contact and
applied revision recorded, through the group-committed contact log. A sync request thus costs no
database round trip of its own. Every refusal is audited.

A revoked node that signs its request correctly gets a *signed* refusal naming it and echoing its
nonce: the agent wipes its state only on that proof, never on a bare 403 that anyone on the path
could forge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from vault_edge import wire
from vault_edge.crypto import signing
from vault_edge.server.contacts import ContactLog
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, unauthorized
from vault_edge.server.hub import Hub, Member
from vault_edge.server.ops.nodes import check_signature, refuse
from vault_edge.wire import egress as wegress
from vault_edge.wire import revoke


class Revoked(ApiError):
    """The caller proved it is ``node`` (a good signature), and ``node`` is revoked."""

    def __init__(self, node: str, nonce: str) -> None:
        super().__init__(403, "revoked", "node revoked")
        self.node, self.nonce = node, nonce


def revocation(ctx: Context, node_id: str, nonce: str) -> tuple[bytes, bytes]:
    """The signed refusal for a revoked node: JSON error shape plus the node and its request's nonce."""
    body = revoke.Revocation(node_id, nonce).encode()
    return body, signing.sign(ctx.barrier.keys().signer, revoke.signed_message(body))


async def authenticate(
    ctx: Context,
    hub: Hub,
    contacts: ContactLog,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    applied: int,
    report: wegress.Report | None = None,
) -> tuple[str, str, Member]:
    """(node id, region, membership) of the caller, or an ApiError (401/403). ``applied`` and
    ``report`` (its egress counters) are recorded with its contact, once the signature holds."""
    node_id = headers.get(wire.H_NODE, "")
    if not wire.valid_node_id(node_id):
        raise unauthorized("missing or malformed node id")
    found = None
    try:
        found = await hub.member(node_id)
        if found is None:
            raise unauthorized("unknown node")
        region, member = found
        _, nonce = check_signature(ctx, method, target, headers, body, node_id, member.sign_public)
        if not await contacts.record(node_id, nonce, applied, report):  # spent first: a replay earns nothing
            raise unauthorized("replayed request (nonce already used)")
        if not member.active:
            raise Revoked(node_id, nonce)
    except ApiError as exc:
        raise await asyncio.to_thread(refuse, ctx, "node.auth", node_id, exc, found is not None) from None
    return node_id, region, member
