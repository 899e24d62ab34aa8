"""Egress routes: create, list, delete. A route lets a region's agents send a secret's value to an
upstream API on a worker's behalf (``wire/egress.py`` says what a route is; ``agent/egress.py`` serves
it), so it is as powerful as reading the secret: making or removing one needs an admin token over
every name, as regions do.

A route takes a revision and bumps the data revision of the regions it is for, in one transaction, so
their agents get it with their next sync answer (a delta carries the region's routes when they changed).
Its regions default to the secret's, and may never reach past them: the agent could not open the
secret there anyway.
"""

from __future__ import annotations

from typing import Any

from vault_edge import wire
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import bad_request, conflict, not_found
from vault_edge.server.storage.records import EgressRoute
from vault_edge.server.storage.repo import TamperedRow
from vault_edge.wire import egress as wegress
from vault_edge.wire import sync as wsync


def _doc(r: EgressRoute) -> dict[str, Any]:
    return {**r.route.to_json(), "regions": list(r.regions), "created_at": r.created_at, "revision": r.revision}


def create(ctx: Context, who: Principal, doc: dict[str, Any], regions: list[str] | None) -> dict[str, Any]:
    who.require_global_admin()
    try:
        route = wegress.route_from_json(doc).route
    except wire.WireError as exc:
        raise bad_request(str(exc)) from None
    ctx.barrier.require_unsealed()
    now = ctx.clock()
    with ctx.store.write() as tx:
        secret = tx.get_secret(route.secret)
        if secret is None or secret.deleted_at is not None:
            raise bad_request(f"no secret {route.secret!r}: put it first (`vault-edge put {route.secret} ...`)")
        if not secret.regions:
            raise bad_request(f"{route.secret!r} is in no region (a rotator's credential): no agent could inject it")
        if regions is None:
            where = secret.regions
        else:
            where = tuple(dict.fromkeys(r.strip() for r in regions if r.strip()))
            if where != ("*",) and (not where or "*" in where):
                raise bad_request("regions: a list of region names, or '*' alone for every region")
            for r in where:
                if r != "*" and (not wire.valid_region(r) or tx.get_region(r) is None):
                    raise bad_request(f"no region {r[:64]!r}: create it with `vault-edge region create {r[:64]}`")
            if not secret.every_region and (where == ("*",) or not set(where) <= set(secret.regions)):
                raise bad_request(
                    f"regions: {route.secret!r} is only in {', '.join(secret.regions)}; a route "
                    "cannot reach past its secret's regions"
                )
        if tx.get_egress(route.name) is not None:
            raise conflict(f"egress route {route.name!r} already exists (delete it first)")
        targets = [r.name for r in tx.list_regions()] if where == ("*",) else where
        routes = tx.list_egress()
        for region in targets:  # a region body carries at most MAX_ROUTES: agents refuse a larger one
            if sum(1 for r in routes if r.regions == ("*",) or region in r.regions) >= wsync.MAX_ROUTES:
                raise conflict(
                    f"region {region!r} has {wsync.MAX_ROUTES} egress routes, as many as its agents take: "
                    "delete one first"
                )
        rev = tx.next_revision()
        tx.insert_egress(route, where, now, rev)
        tx.touch_regions(targets, rev)
        ctx.auditor.record(
            tx,
            who.actor,
            "egress.create",
            route.name,
            upstream=route.upstream,
            secret=route.secret,
            regions=list(where),
        )
    return {**route.to_json(), "regions": list(where), "revision": rev}


def list_routes(ctx: Context, who: Principal) -> dict[str, Any]:
    who.require_global("list")
    with ctx.store.read() as tx:
        routes = tx.list_egress()
        tampered = [key for table, key in tx.tampered if table == "egress_routes"]
    return {"routes": [_doc(r) for r in routes], "refused": tampered}


def delete(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    who.require_global_admin()
    if not wegress.valid_route_name(name):
        raise not_found(f"no egress route {name[:64]!r}")
    ctx.barrier.require_unsealed()
    with ctx.store.write() as tx:
        try:
            route = tx.get_egress(name)
            regions = route.regions if route is not None else None
        except TamperedRow:  # removing a route is never a gain: a tampered one may go too
            regions = ("*",)
        if regions is None:
            raise not_found(f"no egress route {name[:64]!r}")
        rev = tx.next_revision()
        tx.delete_egress(name, rev)
        tx.touch_regions([r.name for r in tx.list_regions()] if regions == ("*",) else regions, rev)
        ctx.auditor.record(tx, who.actor, "egress.delete", name)
    return {"name": name, "deleted": True, "revision": rev}
