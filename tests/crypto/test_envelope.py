"""The key hierarchy (``vault_edge.crypto.envelope``): HKDF subkeys, canary, and the three bindings of
DESIGN.md: region key ↔ (region, key version), value ↔ (name, version), data key ↔ (name, version,
region, key version). A ciphertext or wrapped key moved anywhere else does not open."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge.crypto import aead, envelope
from vault_edge.crypto.errors import DecryptionError

ROOT = bytes(range(32))
OTHER_ROOT = bytes(range(1, 33))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _tampered(sealed: bytes) -> list[tuple[str, bytes]]:
    """The tamper set every decrypt path is checked against."""
    return [
        ("version byte", _flip(sealed, 0)),
        ("nonce", _flip(sealed, 1)),
        ("nonce end", _flip(sealed, aead.NONCE_SIZE)),
        ("ciphertext body", _flip(sealed, 1 + aead.NONCE_SIZE)),
        ("tag", _flip(sealed, len(sealed) - 1)),
        ("truncated by one", sealed[:-1]),
        ("truncated to the header", sealed[: 1 + aead.NONCE_SIZE]),
        ("empty", b""),
        ("extended by one", sealed + b"\x00"),
        ("extended by a block", sealed + bytes(16)),
    ]


# -- HKDF subkeys ---------------------------------------------------------------------------------
def test_derive_is_deterministic_and_separates_purposes() -> None:
    subkeys = {
        "region_wrap": envelope.region_wrap_key(ROOT),
        "audit": envelope.audit_key(ROOT),
        "signing": envelope.signing_seed(ROOT),
        "canary": envelope.derive(ROOT, "canary"),
    }
    assert envelope.region_wrap_key(ROOT) == subkeys["region_wrap"]
    assert len(set(subkeys.values()) | {ROOT}) == len(subkeys) + 1
    assert all(len(k) == 32 for k in subkeys.values())
    assert envelope.region_wrap_key(OTHER_ROOT) != subkeys["region_wrap"]
    assert len(envelope.derive(ROOT, "x", length=64)) == 64
    assert envelope.derive(ROOT, "x", length=64)[:32] == envelope.derive(ROOT, "x")  # HKDF-Expand prefix


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_derive_refuses_a_root_key_that_is_not_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        envelope.derive(b"r" * size, "canary")


# -- canary ---------------------------------------------------------------------------------------
def test_canary_opens_only_with_its_root_key() -> None:
    canary = envelope.make_canary(ROOT)
    assert envelope.check_canary(ROOT, canary) is True
    assert envelope.check_canary(OTHER_ROOT, canary) is False
    assert envelope.make_canary(ROOT) != canary  # fresh nonce each time


@pytest.mark.parametrize("case", [c for c, _ in _tampered(envelope.make_canary(ROOT))])
def test_tampered_canary_is_false_not_an_exception(case: str) -> None:
    canary = envelope.make_canary(ROOT)
    tampered = dict(_tampered(canary))[case]
    assert envelope.check_canary(ROOT, tampered) is False


def test_canary_of_another_purpose_key_does_not_check() -> None:
    """A blob encrypted under a different subkey (or different associated data) is not a canary."""
    fake = aead.encrypt(envelope.derive(ROOT, "canary"), b"vault-edge canary: the root key is right", b"")
    assert envelope.check_canary(ROOT, fake) is False
    fake = aead.encrypt(envelope.audit_key(ROOT), b"vault-edge canary: the root key is right", aead.ad("canary"))
    assert envelope.check_canary(ROOT, fake) is False


def test_canary_with_other_plaintext_does_not_check() -> None:
    fake = aead.encrypt(envelope.derive(ROOT, "canary"), b"something else", aead.ad("canary"))
    assert envelope.check_canary(ROOT, fake) is False


# -- the three bindings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    name: str = "db/password"
    version: int = 3
    region: str = "eu"
    key_version: int = 2


HERE = Where()
MOVES = {
    "another name": replace(HERE, name="db/passwords"),
    "a name differing in case": replace(HERE, name="DB/password"),
    "another version": replace(HERE, version=4),
    "an earlier version": replace(HERE, version=2),
    "another region": replace(HERE, region="us"),
    "another region-key version": replace(HERE, key_version=1),
    "the next region-key version": replace(HERE, key_version=3),
}

Wrap = Callable[[bytes, Where, bytes], bytes]
Unwrap = Callable[[bytes, Where, bytes], bytes]

PATHS: dict[str, tuple[Wrap, Unwrap, tuple[str, ...]]] = {
    "value": (
        lambda k, w, p: envelope.encrypt_value(k, w.name, w.version, p),
        lambda k, w, c: envelope.decrypt_value(k, w.name, w.version, c),
        ("name", "version"),
    ),
    "data key wrap": (
        lambda k, w, p: envelope.wrap_data_key(k, w.name, w.version, w.region, w.key_version, p),
        lambda k, w, c: envelope.unwrap_data_key(k, w.name, w.version, w.region, w.key_version, c),
        ("name", "version", "region", "key_version"),
    ),
    "region key wrap": (
        lambda k, w, p: envelope.wrap_region_key(k, w.region, w.key_version, p),
        lambda k, w, c: envelope.unwrap_region_key(k, w.region, w.key_version, c),
        ("region", "key_version"),
    ),
}


def _bound_moves(path: str) -> list[tuple[str, str, Where]]:
    bound = PATHS[path][2]
    out = []
    for move, there in MOVES.items():
        changed = {f for f in ("name", "version", "region", "key_version") if getattr(there, f) != getattr(HERE, f)}
        if changed & set(bound):
            out.append((path, move, there))
    return out


@pytest.mark.parametrize("path", PATHS)
def test_round_trip(path: str) -> None:
    wrap, unwrap, _ = PATHS[path]
    key, payload = aead.new_key(), aead.new_key()
    assert unwrap(key, HERE, wrap(key, HERE, payload)) == payload


@pytest.mark.parametrize(
    ("path", "move", "there"), [m for p in PATHS for m in _bound_moves(p)], ids=lambda v: str(v)[:40]
)
def test_moved_ciphertext_does_not_open(path: str, move: str, there: Where) -> None:
    wrap, unwrap, _ = PATHS[path]
    key = aead.new_key()
    sealed = wrap(key, HERE, b"p" * 32)
    with pytest.raises(DecryptionError):
        unwrap(key, there, sealed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [c for c, _ in _tampered(b"x" * 61)])
def test_tampered_ciphertext_does_not_open(path: str, case: str) -> None:
    wrap, unwrap, _ = PATHS[path]
    key = aead.new_key()
    tampered = dict(_tampered(wrap(key, HERE, b"p" * 32)))[case]
    with pytest.raises(DecryptionError):
        unwrap(key, HERE, tampered)


@pytest.mark.parametrize("path", PATHS)
def test_wrong_key_does_not_open(path: str) -> None:
    wrap, unwrap, _ = PATHS[path]
    sealed = wrap(aead.new_key(), HERE, b"p" * 32)
    with pytest.raises(DecryptionError):
        unwrap(aead.new_key(), HERE, sealed)


@pytest.mark.parametrize(("made_as", "opened_as"), [(a, b) for a in PATHS for b in PATHS if a != b])
def test_one_kind_of_ciphertext_never_opens_as_another(made_as: str, opened_as: str) -> None:
    """Same key, same coordinates: the purpose label in the associated data keeps the kinds apart."""
    key = aead.new_key()
    sealed = PATHS[made_as][0](key, HERE, b"p" * 32)
    with pytest.raises(DecryptionError):
        PATHS[opened_as][1](key, HERE, sealed)


NAMES = st.from_regex(r"[a-z0-9_]{1,6}(/[a-z0-9_.\-]{1,6}){0,2}", fullmatch=True)
WHERE = st.builds(
    Where,
    name=NAMES,
    version=st.integers(1, 2**31),
    region=st.from_regex(r"[a-z0-9][a-z0-9\-]{0,5}", fullmatch=True),
    key_version=st.integers(1, 2**31),
)


@given(WHERE, WHERE)
@settings(deadline=None)
def test_data_key_wrap_binds_all_four_coordinates(here: Where, there: Where) -> None:
    key, dek = bytes(range(32)), bytes(32)
    sealed = envelope.wrap_data_key(key, here.name, here.version, here.region, here.key_version, dek)
    if here == there:
        assert envelope.unwrap_data_key(key, there.name, there.version, there.region, there.key_version, sealed) == dek
    else:
        with pytest.raises(DecryptionError):
            envelope.unwrap_data_key(key, there.name, there.version, there.region, there.key_version, sealed)


@given(WHERE, WHERE)
@settings(deadline=None)
def test_value_binds_name_and_version(here: Where, there: Where) -> None:
    key = bytes(range(32))
    sealed = envelope.encrypt_value(key, here.name, here.version, b"value")
    if (here.name, here.version) == (there.name, there.version):
        assert envelope.decrypt_value(key, there.name, there.version, sealed) == b"value"
    else:
        with pytest.raises(DecryptionError):
            envelope.decrypt_value(key, there.name, there.version, sealed)


@given(WHERE, WHERE)
@settings(deadline=None)
def test_region_key_wrap_binds_region_and_key_version(here: Where, there: Where) -> None:
    key = bytes(range(32))
    sealed = envelope.wrap_region_key(key, here.region, here.key_version, b"k" * 32)
    if (here.region, here.key_version) == (there.region, there.key_version):
        assert envelope.unwrap_region_key(key, there.region, there.key_version, sealed) == b"k" * 32
    else:
        with pytest.raises(DecryptionError):
            envelope.unwrap_region_key(key, there.region, there.key_version, sealed)


# -- the whole hierarchy, as the control plane stores it --------------------------------------------
def test_hierarchy_rows_swapped_between_secrets_and_regions_do_not_open() -> None:
    """Simulate database rows: two secrets in two regions, then swap rows as an attacker with write
    access to the database would; every swapped row fails, the untouched ones still open."""
    wrap_key = envelope.region_wrap_key(ROOT)
    region_keys = {r: aead.new_key() for r in ("eu", "us")}
    region_rows = {(r, 1): envelope.wrap_region_key(wrap_key, r, 1, k) for r, k in region_keys.items()}
    secrets = {"a": b"value-a", "b": b"value-b"}
    value_rows, dek_rows = {}, {}
    for name, value in secrets.items():
        dek = aead.new_key()
        value_rows[(name, 1)] = envelope.encrypt_value(dek, name, 1, value)
        for region, rk in region_keys.items():
            dek_rows[(name, 1, region, 1)] = envelope.wrap_data_key(rk, name, 1, region, 1, dek)

    def read(name: str, region: str) -> bytes:
        rk = envelope.unwrap_region_key(envelope.region_wrap_key(ROOT), region, 1, region_rows[(region, 1)])
        dek = envelope.unwrap_data_key(rk, name, 1, region, 1, dek_rows[(name, 1, region, 1)])
        return envelope.decrypt_value(dek, name, 1, value_rows[(name, 1)])

    for name, value in secrets.items():
        for region in region_keys:
            assert read(name, region) == value

    # b's value ciphertext put in a's row: a's data key does not open it (and would not bind anyway).
    value_rows[("a", 1)], saved = value_rows[("b", 1)], value_rows[("a", 1)]
    with pytest.raises(DecryptionError):
        read("a", "eu")
    value_rows[("a", 1)] = saved

    # b's wrapped data key put in a's row (same region, same region key): refused by the binding.
    dek_rows[("a", 1, "eu", 1)], saved = dek_rows[("b", 1, "eu", 1)], dek_rows[("a", 1, "eu", 1)]
    with pytest.raises(DecryptionError):
        read("a", "eu")
    dek_rows[("a", 1, "eu", 1)] = saved

    # us's wrapped data key put in eu's row.
    dek_rows[("a", 1, "eu", 1)], saved = dek_rows[("a", 1, "us", 1)], dek_rows[("a", 1, "eu", 1)]
    with pytest.raises(DecryptionError):
        read("a", "eu")
    dek_rows[("a", 1, "eu", 1)] = saved

    # us's wrapped region key put in eu's row: same wrap key, but bound to ("us", 1).
    region_rows[("eu", 1)], saved = region_rows[("us", 1)], region_rows[("eu", 1)]
    with pytest.raises(DecryptionError):
        read("a", "eu")
    region_rows[("eu", 1)] = saved

    # Another vault's root key opens nothing.
    with pytest.raises(DecryptionError):
        envelope.unwrap_region_key(envelope.region_wrap_key(OTHER_ROOT), "eu", 1, region_rows[("eu", 1)])

    for name, value in secrets.items():
        for region in region_keys:
            assert read(name, region) == value
