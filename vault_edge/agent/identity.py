"""The node's identity in its state dir: key pairs it made itself, and what enrolment told it.

state-dir/ (0700)
  node.key    X25519 private key (32 B) + Ed25519 seed (32 B), mode 0600, never leaves the node
  node.json   {"node", "region", "server", "server_key", "enrolled_at"} once enrolled
  cache.json  the last verified sync answer, as received (ciphertext), see cache.py
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vault_edge import wire
from vault_edge.agent.files import ensure_private_dir, write_atomic
from vault_edge.crypto.secret import SecretBytes
from vault_edge.crypto.signing import KeyPair


class IdentityError(Exception):
    """A state dir the agent cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class Enrolment:
    node: str
    region: str
    server: str
    server_key: bytes
    enrolled_at: float


@dataclass(frozen=True)
class Identity:
    state_dir: Path
    keys: KeyPair = field(repr=False)
    enrolment: Enrolment | None

    @property
    def enrolled(self) -> bool:
        return self.enrolment is not None


def load_or_create(state_dir: Path) -> Identity:
    state_dir = ensure_private_dir(Path(state_dir))
    key_file = state_dir / "node.key"
    if key_file.exists():
        st = key_file.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise IdentityError(
                f"{key_file} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                "chmod 600 it, or remove the state dir and enrol again"
            )
        raw = key_file.read_bytes()
        if len(raw) != 64:
            raise IdentityError(f"{key_file} is damaged; remove the state dir and enrol again")
        keys = KeyPair(SecretBytes(raw[:32]), SecretBytes(raw[32:]))
    else:
        keys = KeyPair.generate()
        write_atomic(key_file, keys.box_private.reveal() + keys.sign_seed.reveal())
    return Identity(state_dir, keys, _load_enrolment(state_dir / "node.json"))


def _load_enrolment(path: Path) -> Enrolment | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        e = Enrolment(d["node"], d["region"], d["server"], wire.b64d(d["server_key"]), float(d["enrolled_at"]))
    except (ValueError, KeyError, TypeError, wire.WireError) as exc:
        raise IdentityError(f"{path} is damaged ({type(exc).__name__}); remove the state dir and enrol again") from None
    if not wire.valid_node_id(e.node) or len(e.server_key) != 32:
        raise IdentityError(f"{path} is damaged; remove the state dir and enrol again")
    return e


def save_enrolment(identity: Identity, enrolment: Enrolment) -> Identity:
    doc = {
        "node": enrolment.node,
        "region": enrolment.region,
        "server": enrolment.server,
        "server_key": wire.b64e(enrolment.server_key),
        "enrolled_at": enrolment.enrolled_at,
    }
    write_atomic(identity.state_dir / "node.json", json.dumps(doc, indent=2).encode())
    return Identity(identity.state_dir, identity.keys, enrolment)


def forget(state_dir: Path) -> None:
    """After revocation: remove the enrolment and the cache (the keys go too: enrol afresh)."""
    for name in ("cache.json", "cache.log", "cache.contact", "node.json", "node.key"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(state_dir) / name)
