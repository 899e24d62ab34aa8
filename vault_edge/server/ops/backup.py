"""Backup, restore and migration of the whole database.

Backup file (``crypto/seal.py`` for the chunk sealing)::

    b"VEBACKUP1\\n"
    header: one line of JSON, then b"\\n": format, backup id, time, revision, row counts per table, the
            chunk count, and the seal's public facts (canary, server key, the wrapped root keys, the
            share scheme): what restore needs to get the root key from the shares or the HSM
    chunks: each a 4-byte big-endian length, then the chunk sealed (AES-256-GCM) under a key derived
            from the root key and the backup id, with associated data binding the header's SHA-256,
            the chunk's index and whether it is the last

The plaintext of the chunks, joined, is the snapshot (``storage/snapshot.py``): every table, rows as
stored, so ciphertexts stay ciphertexts. The file is useless without the shares or the HSM (its key
derives from the root key), and a byte changed anywhere, a chunk dropped, reordered or cut off, or
a header edited makes restore refuse the whole file before it writes anything.

Restore writes into an empty database in one transaction, then moves revisions far forward (see
``restore``) so that agents, which refuse to go back, take the restored control plane's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vault_edge import wire
from vault_edge.crypto import envelope, seal
from vault_edge.crypto.errors import DecryptionError
from vault_edge.server.audit import chain_head
from vault_edge.server.auth import Principal
from vault_edge.server.context import Context
from vault_edge.server.storage import snapshot

log = logging.getLogger("vault_edge.backup")
FORMAT = 1
MAX_HEADER = 1 << 20
SEAL_META = (
    "canary",
    "server_key",
    "root_shamir",
    "root_pkcs11",
    "pkcs11_key_label",
    "share_identifier",
    "scheme",
    "passphrase",
    "seal",
)
# After a restore, revisions go on from the backup's plus this, plus this per second since the backup:
# more than the lost control plane can have taken meanwhile (one writer at a time, far below 100,000
# changes a second), so every agent's revision is below the restored control plane's.
REVISION_JUMP = 10**9
REVISIONS_PER_SECOND = 10**5


class BackupError(Exception):
    """The file is not a backup, is damaged or truncated, or does not belong to these keys."""


# -- backup ---------------------------------------------------------------------------------------------
def make_backup(ctx: Context, who: Principal) -> bytes:
    """A consistent, encrypted, integrity-checked snapshot of the whole database (global admin)."""
    who.require_global_admin()
    keys = ctx.barrier.keys()
    data = snapshot.dump(ctx.store.engine)
    meta = {r[0]: r[1] for r in next(d for d in data if d["table"] == "meta")["rows"]}
    revision = next(r[1] for r in next(d for d in data if d["table"] == "counter")["rows"] if r[0] == 1)
    body = "\n".join(json.dumps(d, separators=(",", ":")) for d in data).encode()
    out = encode(
        keys.root.reveal(),
        body,
        {
            "created_at": ctx.clock(),
            "revision": revision,
            "rows": {d["table"]: len(d["rows"]) for d in data},
            "meta": {k: meta[k] for k in SEAL_META if k in meta},
        },
    )
    with ctx.store.write(serialize=False) as tx:
        ctx.auditor.record(tx, who.actor, "sys.backup", outcome="ok", revision=revision, bytes=len(out))
    return out


def encode(root: bytes, body: bytes, fields: dict[str, Any], chunk_size: int = seal.CHUNK_SIZE) -> bytes:
    backup_id = secrets.token_bytes(16)
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)] or [b""]
    header = json.dumps(
        {"format": FORMAT, "backup_id": backup_id.hex(), "chunks": len(chunks), **fields},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256(header).digest()
    key = seal.backup_key(root, backup_id)
    parts = [seal.BACKUP_MAGIC, header, b"\n"]
    for i, chunk in enumerate(chunks):
        sealed = seal.seal_chunk(key, digest, i, i == len(chunks) - 1, chunk)
        parts += [struct.pack(">I", len(sealed)), sealed]
    return b"".join(parts)


def read_header_unverified(raw: bytes) -> tuple[dict[str, Any], bytes, int]:
    """(header, its SHA-256, where the chunks start): not yet authenticated (the chunks do that)."""
    if not raw.startswith(seal.BACKUP_MAGIC):
        raise BackupError("not a vault-edge backup (no VEBACKUP1 header)")
    start = len(seal.BACKUP_MAGIC)
    end = raw.find(b"\n", start, start + MAX_HEADER)
    if end < 0:
        raise BackupError("damaged backup: no complete header")
    line = raw[start:end]
    try:
        header = json.loads(line)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError
        bytes.fromhex(header["backup_id"])
        int(header["chunks"])
        dict(header["meta"])
    except (ValueError, KeyError, TypeError):
        raise BackupError("damaged backup: the header is not one this version reads") from None
    return header, hashlib.sha256(line).digest(), end + 1


def decode(raw: bytes, root: bytes) -> tuple[dict[str, Any], list[snapshot.Table]]:
    """Verify and open the whole file; BackupError (nothing written anywhere) on any damage."""
    header, digest, pos = read_header_unverified(raw)
    key = seal.backup_key(root, bytes.fromhex(header["backup_id"]))
    n, body = int(header["chunks"]), []
    for i in range(n):
        if pos + 4 > len(raw):
            raise BackupError(f"truncated backup: chunk {i + 1} of {n} is missing")
        (size,) = struct.unpack(">I", raw[pos : pos + 4])
        sealed = raw[pos + 4 : pos + 4 + size]
        if len(sealed) != size:
            raise BackupError(f"truncated backup: chunk {i + 1} of {n} is cut short")
        try:
            body.append(seal.open_chunk(key, digest, i, i == n - 1, sealed))
        except DecryptionError:
            raise BackupError(
                f"damaged backup: chunk {i + 1} of {n} fails its integrity check (altered, "
                "moved, or a header edited); nothing was restored"
            ) from None
        pos += 4 + size
    if pos != len(raw):
        raise BackupError("damaged backup: bytes after the last chunk")
    try:
        tables = [json.loads(line) for line in b"".join(body).split(b"\n") if line]
    except ValueError:
        raise BackupError("damaged backup: the snapshot does not parse") from None
    if {d["table"]: len(d["rows"]) for d in tables} != header["rows"]:
        raise BackupError("damaged backup: row counts differ from its header")
    return header, tables


# -- restore --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Restored:
    rows: dict[str, int]
    from_revision: int
    revision: int
    audit_entries: int


def restore(raw: bytes, db: str, get_root: Callable[[dict[str, str]], bytes], now: float) -> Restored:
    """Restore a backup into the empty database ``db``, offline (no control plane on it yet).

    ``get_root(meta)`` gives the root key from the shares or the HSM (``meta``: the header's seal facts).
    Revisions then go on from far past the backup's (``REVISION_JUMP``): every agent enrolled before,
    whatever revision it reached after the backup, is behind the restored control plane and takes
    its next answer (a full view: the new process has no history to make a delta from), while each
    secret an agent holds newer than the backup stays as it holds it (agents never move a secret
    backwards) until a newer version comes. Every region is touched at that revision, so their nodes
    are answered at once. The change log stays whole: its base moves to the jump."""
    from vault_edge.server.barrier import Barrier
    from vault_edge.server.settings import Settings
    from vault_edge.server.storage.engine import make_engine, migrate
    from vault_edge.server.storage.repo import Store

    header, _, _ = read_header_unverified(raw)
    meta = {k: str(v) for k, v in header["meta"].items()}
    root = get_root(meta)
    if not envelope.check_canary(root, wire.b64d(meta["canary"])):
        raise BackupError("the key given does not open this backup's vault")
    header, tables = decode(raw, root)
    engine = make_engine(db)
    try:
        migrate(engine)
        barrier = Barrier()
        barrier.unseal_with_root(root, wire.b64d(meta["canary"]))
        ctx = Context(Store(engine), barrier, Settings(db=db))
        from_rev = int(header["revision"])
        jump = from_rev + REVISION_JUMP + REVISIONS_PER_SECOND * int(max(0.0, now - float(header["created_at"])))
        with ctx.store.write() as tx:
            if not snapshot.is_empty(tx.conn):
                raise BackupError("the target database is not empty: restore only into an empty one")
            rows = snapshot.load(tx.conn, tables)
            tx.restart_revisions(jump)
            rev = tx.next_revision()
            tx.touch_regions([r.name for r in tx.list_regions()], rev)
            ctx.auditor.record(
                tx,
                "operator",
                "sys.restore",
                outcome="ok",
                backup_id=header["backup_id"],
                from_revision=from_rev,
                revision=rev,
            )
        verification = ctx.auditor.verify()
        if not verification.ok:
            raise BackupError(f"restored, but the audit chain does not verify: {verification.reason}")
        with ctx.store.read() as tx:
            gap = tx.change_log_gap()
        if gap:
            raise BackupError(f"restored, but the change log is not whole: {gap}")
        return Restored(rows, from_rev, rev, verification.entries)
    finally:
        engine.dispose()


# -- migrate --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migrated:
    rows: dict[str, int]
    audit_entries: int


def migrate_db(source: str, target: str) -> Migrated:
    """Copy every row of ``source`` into the empty ``target`` (offline: stop the control planes first),
    then verify the copy: the same row count in every table, and the same audit chain (every link
    re-hashed on the target, ending at the source's head)."""
    from vault_edge.server.storage.engine import make_engine, migrate, normalize_url

    if normalize_url(source) == normalize_url(target):
        raise BackupError("--from and --to are the same database")
    src, dst = make_engine(source), make_engine(target)
    try:
        migrate(src)
        migrate(dst)
        data = snapshot.dump(src)
        with src.connect() as conn:
            want_counts = snapshot.counts(conn)
            want_chain = chain_head(snapshot.iter_audit(conn))
        if want_chain[2] is not None:
            raise BackupError(f"the source's audit chain is broken ({want_chain[2]}): nothing copied")
        with dst.connect().execution_options(vault_edge_write=True) as conn, conn.begin():
            if not snapshot.is_empty(conn):
                raise BackupError("the target database is not empty: migrate only into an empty one")
            snapshot.load(conn, data)
        with dst.connect() as conn:
            got_counts = snapshot.counts(conn)
            got_chain = chain_head(snapshot.iter_audit(conn))
        if got_counts != want_counts:
            bad = sorted(k for k in want_counts if want_counts[k] != got_counts.get(k))
            raise BackupError(f"the copy's row counts differ in {', '.join(bad)}")
        if got_chain != want_chain:
            raise BackupError("the copy's audit chain differs from the source's")
        return Migrated(got_counts, got_chain[0])
    finally:
        src.dispose()
        dst.dispose()
