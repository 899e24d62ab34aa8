"""What the console's pages show, assembled from the operations (``server/ops``) with the caller's
principal, so a scoped token sees exactly what the API would show it. Plain values out; nothing here
ever reads a secret's value (no call to ``secrets.get``), so no page can carry one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.errors import ApiError, bad_request
from vault_edge.server.ops import nodes, regions, secrets, system, tokens

DAY_S = 86400
NONE = "\u2013"  # shown for no value (an en dash)
MAX_SECRETS = 200  # per page of the secrets list (and for the overview's rotation count)
AUDIT_BATCH = 1000
AUDIT_MAX_SCAN = 20_000  # entries looked at per audit page, newest first
AUDIT_PAGE = 200


def ago(at: float | None, now: float | None = None) -> str:
    if at is None:
        return "never"
    s = max(0, int((now if now is not None else time.time()) - at))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < DAY_S:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"
    return f"{s // DAY_S}d ago"


def when(at: float | None) -> str:
    if at is None:
        return NONE
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(s: int | None) -> str:
    if not s:
        return NONE
    for unit, size in (("d", DAY_S), ("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def fleet_visible(who: Principal) -> bool:
    """Regions and nodes belong to no name: listing them needs ``list`` over every name (the API's rule)."""
    return "list" in who.verbs and who.unlimited


def audit_visible(who: Principal) -> bool:
    return "admin" in who.verbs and who.unlimited


# -- fleet -------------------------------------------------------------------------------------------
def fleet(ctx: Context, who: Principal) -> dict[str, Any]:
    """Regions with their nodes, each node classed ok / lagging / down / revoked."""
    now = ctx.clock()
    region_list = regions.list_regions(ctx, who)["regions"]
    data_rev = {r["name"]: r["revision"] for r in region_list}
    by_region: dict[str, list[dict[str, Any]]] = {r["name"]: [] for r in region_list}
    counts = {"ok": 0, "lagging": 0, "down": 0, "revoked": 0}
    for n in nodes.list_nodes(ctx, who)["nodes"]:
        lag = max(0, data_rev.get(n["region"], 0) - n["revision"])
        state = n["status"] if n["status"] in ("down", "revoked") else ("lagging" if lag else "ok")
        counts[state] += 1
        by_region.setdefault(n["region"], []).append(
            {
                **n,
                "state": state,
                "lag": lag,
                "last_contact": ago(n["last_seen"], now),
            }
        )
    return {
        "regions": [{**r, "node_list": by_region.get(r["name"], [])} for r in region_list],
        "counts": counts,
    }


# -- secrets -----------------------------------------------------------------------------------------
def secret_rows(ctx: Context, who: Principal, prefix: str = "") -> list[dict[str, Any]]:
    """Each visible secret with its versions, stages, regions, schedule and which nodes serve what."""
    rows = []
    for s in secrets.list_secrets(ctx, who, prefix)["secrets"][:MAX_SECRETS]:
        rows.append(secret_detail(ctx, who, s["name"]))
    return rows


def secret_detail(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    hist = secrets.history(ctx, who, name)
    served: dict[int, list[str]] = {}
    try:
        prop = secrets.propagation(ctx, who, name)
    except ApiError:  # deleted: no propagation to show
        prop = None
    for n in (prop or {}).get("nodes", []):
        if n["serving"] is not None and n["state"] != "down":
            label = f"{n['id']} ({n['hostname']})" if n.get("hostname") else n["id"]
            served.setdefault(n["serving"], []).append(label)
    versions = []
    for v in reversed(hist["versions"]):
        live = [s["stage"] for s in v["stages"] if not s["expired"]]
        versions.append(
            {**v, "live_stages": live, "served_by": served.get(v["version"], []), "created": when(v["created_at"])}
        )
    return {
        "name": name,
        "regions": hist["regions"],
        "deleted": hist["deleted"],
        "versions": versions,
        "latest": max((v["version"] for v in hist["versions"]), default=0),
        "schedule": duration(hist["rotate_every_s"]),
        "scheduled": bool(hist["rotate_every_s"]),
        "next_rotation": when(hist["next_rotation_at"]),
        "generate": hist["generate"],
        "rotator": hist["rotator"],
    }


def rotation(ctx: Context, who: Principal, name: str) -> dict[str, Any]:
    """The live view's state: each node of the secret's regions, by region, with the version it serves."""
    prop = secrets.propagation(ctx, who, name)
    now = ctx.clock()
    grid: dict[str, list[dict[str, Any]]] = {r: [] for r in prop["regions"]}
    for n in prop["nodes"]:
        grid.setdefault(n["region"], []).append(
            {
                "id": n["id"],
                "hostname": n.get("hostname", ""),
                "serving": n["serving"],
                "state": n["state"],
                "done": n["done"],
                "last_contact": ago(n["last_seen"], now),
            }
        )
    live = [n for n in prop["nodes"] if n["state"] != "down"]
    done = sum(1 for n in live if n["done"])
    if not prop["nodes"]:
        summary = "no node in the secret's regions"
    elif prop["complete"]:
        summary = f"v{prop['current']} served by all {len(live)} live nodes"
        if prop["down"]:
            summary += f" ({len(prop['down'])} down)"
    else:
        summary = f"v{prop['current']} served by {done} of {len(live)} live nodes ({len(prop['lagging'])} lagging)"
    return {
        "name": name,
        "current": prop["current"],
        "revision": prop["revision"],
        "complete": prop["complete"],
        "summary": summary,
        "regions": [{"name": r, "nodes": grid[r]} for r in grid],
    }


def rotations_24h(ctx: Context, who: Principal) -> list[dict[str, Any]]:
    """Versions made in the last 24 h after the first (rotations, scheduled or not), newest first."""
    since = ctx.clock() - DAY_S
    out = []
    for s in secrets.list_secrets(ctx, who)["secrets"][:MAX_SECRETS]:
        if s["updated_at"] < since:
            continue
        for v in secrets.history(ctx, who, s["name"])["versions"]:
            if v["version"] > 1 and v["created_at"] >= since:
                out.append(
                    {
                        "name": s["name"],
                        "version": v["version"],
                        "origin": v["origin"],
                        "at": v["created_at"],
                        "ago": ago(v["created_at"], ctx.clock()),
                    }
                )
    return sorted(out, key=lambda r: -r["at"])


# -- overview ----------------------------------------------------------------------------------------
def overview(ctx: Context, who: Principal, failures: list[tuple[float, str, str, str]]) -> dict[str, Any]:
    now = ctx.clock()
    out: dict[str, Any] = {"seal": system.status(ctx), "fleet_data": None, "chain": None}
    if fleet_visible(who):
        out["fleet_data"] = fleet(ctx, who)
    out["rotations"] = rotations_24h(ctx, who)
    out["failures"] = [
        {"at": ago(at, now), "what": what, "name": name, "error": err}
        for at, what, name, err in reversed(failures)
        if at >= now - DAY_S and (who.covers(name) if name else who.unlimited)
    ]
    if audit_visible(who):
        out["chain"] = ctx.auditor.verify()
    return out


# -- audit -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditFilter:
    actor: str = ""
    action: str = ""
    target: str = ""
    since: float | None = None
    until: float | None = None
    before: int | None = None  # entries older than this sequence number (the next page)

    @classmethod
    def parse(cls, q: dict[str, str]) -> AuditFilter:
        def text(key: str) -> str:
            v = q.get(key, "").strip()
            if len(v) > 200:
                raise bad_request(f"{key}: at most 200 characters")
            return v

        def moment(key: str) -> float | None:
            v = text(key)
            if not v:
                return None
            try:  # what <input type=datetime-local> sends, read as UTC
                return datetime.fromisoformat(v).replace(tzinfo=UTC).timestamp()
            except ValueError:
                raise bad_request(f"{key}: a date and time, YYYY-MM-DDTHH:MM (UTC)") from None

        before = text("before")
        if before and (not before.isascii() or not before.isdigit() or len(before) > 18):  # (isdigit: '²' too)
            raise bad_request("before: an audit sequence number")
        return cls(
            text("actor"),
            text("action"),
            text("target"),
            moment("since"),
            moment("until"),
            int(before) if before else None,
        )

    def matches(self, e: Any) -> bool:
        return (
            self.actor.lower() in e.actor.lower()
            and self.action.lower() in e.action.lower()
            and self.target.lower() in e.target.lower()
            and (self.since is None or e.at >= self.since)
            and (self.until is None or e.at < self.until)
        )

    def query(self) -> dict[str, str]:
        return {k: v for k, v in (("actor", self.actor), ("action", self.action), ("target", self.target)) if v}


def audit(ctx: Context, who: Principal, f: AuditFilter) -> dict[str, Any]:
    """Entries matching ``f``, newest first, looking at most ``AUDIT_MAX_SCAN`` entries back."""
    who.require_global_admin()  # the API's rule for the audit log
    with ctx.store.read() as tx:
        last = tx.last_audit_seq()
    top = min(last, f.before - 1) if f.before is not None else last
    found: list[dict[str, Any]] = []
    scanned, hi = 0, top
    while hi > 0 and scanned < AUDIT_MAX_SCAN and len(found) < AUDIT_PAGE:
        lo = max(0, hi - AUDIT_BATCH)
        with ctx.store.read() as tx:
            batch = tx.list_audit(after=lo, limit=hi - lo)
        for e in reversed(batch):
            if e.seq > hi:
                continue
            if f.matches(e) and len(found) < AUDIT_PAGE:
                try:  # (the column is outside the chain's MAC: anything a database writer put there)
                    detail = json.loads(e.detail) if e.detail else {}
                except (ValueError, RecursionError):
                    detail = None
                if not isinstance(detail, dict):
                    detail = {"unreadable": True}
                found.append(
                    {
                        "seq": e.seq,
                        "at": when(e.at),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "outcome": e.outcome,
                        "detail": ", ".join(f"{k}={v}" for k, v in sorted(detail.items()))[:300],
                    }
                )
        scanned += hi - lo
        hi = lo
    older = found[-1]["seq"] if len(found) == AUDIT_PAGE else (hi if hi > 0 else None)
    return {"entries": found, "older": older, "scanned": scanned, "verify": ctx.auditor.verify()}


def token_list(ctx: Context, who: Principal) -> list[dict[str, Any]]:
    rows = tokens.list_tokens(ctx, who)["tokens"]
    return [{**t, "created": when(t["created_at"]), "expires": when(t["expires_at"])} for t in rows]
