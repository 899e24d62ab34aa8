"""Who is calling the sync endpoint: a signed request from an enrolled, active node.

The node's signing key and status come from the sync hub's cached region view (kept current by
change notices), the signature is checked in memory, and the nonce is spent, with the contact and
applied revision recorded, through the group-committed contact log. A sync request thus costs no
database round trip of its own. Every refusal is audited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from vault_edge import wire
from vault_edge.server.contacts import ContactLog
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, forbidden, unauthorized
from vault_edge.server.hub import Hub, Member
from vault_edge.server.ops.nodes import check_signature, refuse


async def authenticate(
    ctx: Context, hub: Hub, contacts: ContactLog, method: str, target: str, headers: Mapping[str, str],
    body: bytes, applied: int,
) -> tuple[str, str, Member]:
    """(node id, region, membership) of the caller, or an ApiError (401/403)."""
    node_id = headers.get(wire.H_NODE, "")
    if not wire.valid_node_id(node_id):
        raise unauthorized("missing or malformed node id")
    try:
        found = await hub.member(node_id)
        if found is None:
            raise unauthorized("unknown node")
        region, member = found
        if not member.active:
            raise forbidden("node revoked")
        _, nonce = check_signature(ctx, method, target, headers, body, node_id, member.sign_public)
        if not await contacts.record(node_id, nonce, applied):
            raise unauthorized("replayed request (nonce already used)")
    except ApiError as exc:
        raise await asyncio.to_thread(refuse, ctx, "node.auth", node_id, exc) from None
    return node_id, region, member
