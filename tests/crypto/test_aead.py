"""AES-256-GCM with a version byte, and canonical associated data (``vault_edge.crypto.aead``).

Every test runs with each library that computes AES-256-GCM (libsodium, the agent's, where the CPU
has hardware AES; ``cryptography`` otherwise), and the two are crossed both ways."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge.crypto import aead
from vault_edge.crypto.errors import CryptoError, DecryptionError

KEY = bytes(range(32))
AD = aead.ad("test", "name", 1)

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 96-bit IV, with AAD).
GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
GCM_IV = bytes.fromhex("cafebabefacedbaddecaf888")
GCM_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_PT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_CT = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
GCM_TAG = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")
GCM_SEALED = bytes([aead.VERSION]) + GCM_IV + GCM_CT + GCM_TAG


BACKENDS = ["sodium", "cryptography"] if aead._sodium_available() else ["cryptography"]


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(aead, "SODIUM", request.param == "sodium")
    return str(request.param)


def test_the_agents_library_is_used_where_the_cpu_allows_it() -> None:
    """On this machine's CPU (x86-64 with AES-NI, as every PoP host of the last decade) libsodium does it."""
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        assert "sodium" in BACKENDS


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_the_two_libraries_open_each_others_ciphertexts(plaintext: bytes, associated_data: bytes) -> None:
    if len(BACKENDS) < 2:
        pytest.skip("libsodium has no AES-256-GCM on this CPU: one library only")
    for seal_with, open_with in ((True, False), (False, True)):
        aead.SODIUM = seal_with
        sealed = aead.encrypt(KEY, plaintext, associated_data)
        aead.SODIUM = open_with
        assert aead.decrypt(KEY, sealed, associated_data) == plaintext
        with pytest.raises(DecryptionError):
            aead.decrypt(KEY, _flip(sealed, len(sealed) - 1), associated_data)


def _fixed(raw: bytes) -> Callable[[int], bytes]:
    """A ``random_bytes`` stand-in that returns ``raw``."""

    def random_bytes(n: int) -> bytes:
        assert n == len(raw)
        return raw

    return random_bytes


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


# -- known answers -------------------------------------------------------------------------------
def test_known_answer_vector_encrypts_to_the_published_ciphertext() -> None:
    sealed = aead.encrypt(GCM_KEY, GCM_PT, GCM_AAD, random_bytes=_fixed(GCM_IV))
    assert sealed == GCM_SEALED
    assert aead.decrypt(GCM_KEY, sealed, GCM_AAD) == GCM_PT


@pytest.mark.parametrize(
    ("case", "key", "sealed", "associated_data"),
    [
        ("wrong key", bytes(32), GCM_SEALED, GCM_AAD),
        ("wrong associated data", GCM_KEY, GCM_SEALED, GCM_AAD[:-1]),
        ("no associated data", GCM_KEY, GCM_SEALED, b""),
        ("tag bit", GCM_KEY, _flip(GCM_SEALED, len(GCM_SEALED) - 1, 7), GCM_AAD),
        ("body bit", GCM_KEY, _flip(GCM_SEALED, 1 + aead.NONCE_SIZE + 5), GCM_AAD),
        ("nonce bit", GCM_KEY, _flip(GCM_SEALED, 1), GCM_AAD),
        ("version 0", GCM_KEY, b"\x00" + GCM_SEALED[1:], GCM_AAD),
        ("version 2", GCM_KEY, b"\x02" + GCM_SEALED[1:], GCM_AAD),
        ("raw GCM without the version byte", GCM_KEY, GCM_SEALED[1:], GCM_AAD),
        ("tag dropped", GCM_KEY, GCM_SEALED[: -aead.TAG_SIZE], GCM_AAD),
    ],
)
def test_known_answer_vector_negative_cases(case: str, key: bytes, sealed: bytes, associated_data: bytes) -> None:
    with pytest.raises(DecryptionError):
        aead.decrypt(key, sealed, associated_data)


# -- layout and round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("plaintext", [b"", b"x", b"\x00" * 16, bytes(range(256)) * 40])
def test_round_trip_and_layout(plaintext: bytes) -> None:
    nonce = bytes(range(100, 112))
    sealed = aead.encrypt(KEY, plaintext, AD, random_bytes=_fixed(nonce))
    assert len(sealed) == len(plaintext) + aead.OVERHEAD
    assert sealed[0] == aead.VERSION == 1
    assert sealed[1 : 1 + aead.NONCE_SIZE] == nonce
    if len(plaintext) >= 16:
        assert plaintext not in sealed
    assert aead.decrypt(KEY, sealed, AD) == plaintext


def test_fresh_random_nonce_per_encryption() -> None:
    sealed = {aead.encrypt(KEY, b"same", AD) for _ in range(200)}
    nonces = {s[1 : 1 + aead.NONCE_SIZE] for s in sealed}
    assert len(sealed) == len(nonces) == 200


def test_new_key_is_32_random_bytes() -> None:
    keys = {aead.new_key() for _ in range(50)}
    assert len(keys) == 50 and all(len(k) == aead.KEY_SIZE for k in keys)
    assert aead.new_key(random_bytes=_fixed(b"k" * 32)) == b"k" * 32


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_encrypt_refuses_a_key_that_is_not_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        aead.encrypt(b"k" * size, b"p", AD)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_decrypt_with_a_key_of_the_wrong_size_is_a_decryption_error(size: int) -> None:
    sealed = aead.encrypt(KEY, b"p", AD)
    with pytest.raises(DecryptionError):
        aead.decrypt(b"k" * size, sealed, AD)


# -- tamper: every bit, truncation, extension ------------------------------------------------------
SEALED = aead.encrypt(KEY, b"secret!", AD, random_bytes=_fixed(bytes(12)))


@pytest.mark.parametrize(
    ("region", "indices"),
    [
        ("version byte", range(0, 1)),
        ("nonce", range(1, 1 + aead.NONCE_SIZE)),
        ("ciphertext body", range(1 + aead.NONCE_SIZE, len(SEALED) - aead.TAG_SIZE)),
        ("tag", range(len(SEALED) - aead.TAG_SIZE, len(SEALED))),
    ],
)
def test_every_single_bit_flip_is_refused(region: str, indices: range) -> None:
    for i in indices:
        for bit in range(8):
            with pytest.raises(DecryptionError):
                aead.decrypt(KEY, _flip(SEALED, i, bit), AD)


@pytest.mark.parametrize("keep", [0, 1, aead.NONCE_SIZE, aead.OVERHEAD - 1, aead.OVERHEAD, len(SEALED) - 1])
def test_truncated_ciphertext_is_refused(keep: int) -> None:
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, SEALED[:keep], AD)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 16, SEALED[-aead.TAG_SIZE :]])
def test_extended_ciphertext_is_refused(extra: bytes) -> None:
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, SEALED + extra, AD)
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, extra + SEALED, AD)


@given(st.binary(max_size=64), st.data())
@settings(deadline=None)
def test_any_modification_is_refused(plaintext: bytes, data: st.DataObject) -> None:
    sealed = aead.encrypt(KEY, plaintext, AD)
    tampered = data.draw(
        st.one_of(
            st.tuples(st.integers(0, len(sealed) - 1), st.integers(1, 255)).map(
                lambda t: sealed[: t[0]] + bytes([sealed[t[0]] ^ t[1]]) + sealed[t[0] + 1 :]
            ),
            st.integers(0, len(sealed) - 1).map(lambda n: sealed[:n]),
            st.binary(min_size=1, max_size=32).map(lambda b: sealed + b),
        )
    )
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, tampered, AD)


def test_wrong_key_and_wrong_associated_data_are_refused() -> None:
    with pytest.raises(DecryptionError):
        aead.decrypt(bytes(32), SEALED, AD)
    for other in (aead.ad("test", "name", 2), aead.ad("test", "Name", 1), aead.ad("other", "name", 1), b""):
        with pytest.raises(DecryptionError):
            aead.decrypt(KEY, SEALED, other)


def test_decryption_errors_are_opaque_and_alike() -> None:
    """Which check failed is not revealed: the same error type and message for every cause."""
    causes = [
        lambda: aead.decrypt(bytes(32), SEALED, AD),
        lambda: aead.decrypt(KEY, SEALED, b"other"),
        lambda: aead.decrypt(KEY, SEALED[:5], AD),
        lambda: aead.decrypt(KEY, b"\x07" + SEALED[1:], AD),
        lambda: aead.decrypt(b"short", SEALED, AD),
    ]
    messages = set()
    for cause in causes:
        with pytest.raises(DecryptionError) as info:
            cause()
        assert type(info.value) is DecryptionError
        assert isinstance(info.value, CryptoError)
        messages.add(str(info.value))
    assert len(messages) == 1


# -- associated data ------------------------------------------------------------------------------
def test_ad_layout_is_typed_and_length_prefixed() -> None:
    assert aead.ad("p") == b"vault-edge/v1/p\x00"
    assert aead.ad("p", "ab", 7, b"\x00") == (
        b"vault-edge/v1/p\x00" + b"s\x00\x00\x00\x02ab" + b"i\x00\x00\x00\x017" + b"b\x00\x00\x00\x01\x00"
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a/b", 1), ("a", "b/1")),
        (("ab", "c"), ("a", "bc")),
        (("a", ""), ("a",)),
        (("", "a"), ("a",)),
        (("1",), (1,)),
        (("1",), (b"1",)),
        ((1,), (b"1",)),
        ((12,), (1, 2)),
        (("-1",), (-1,)),
        (("x", 1, "eu", 1), ("x", 1, "eu1")),
        (("x", 11, "eu", 1), ("x", 1, "1eu", 1)),
        ((b"",), ("",)),
    ],
)
def test_ad_is_unambiguous_for_known_confusions(left: tuple, right: tuple) -> None:
    assert aead.ad("p", *left) != aead.ad("p", *right)


@pytest.mark.parametrize(("left", "right"), [("a", "ab"), ("data-key", "data-ke"), ("region-key", "region")])
def test_ad_purposes_are_separated(left: str, right: str) -> None:
    assert aead.ad(left, "x") != aead.ad(right, "x")
    assert aead.ad(left) != aead.ad(right, "")


FIELD = st.one_of(st.text(max_size=8), st.integers(min_value=-(10**6), max_value=10**6), st.binary(max_size=8))


@given(st.lists(FIELD, max_size=5), st.lists(FIELD, max_size=5))
@settings(deadline=None)
def test_ad_distinct_field_tuples_never_encode_equal(left: list, right: list) -> None:
    def typed(fields: list) -> tuple:
        return tuple((type(f).__name__, f) for f in fields)

    if typed(left) != typed(right):
        assert aead.ad("p", *left) != aead.ad("p", *right)
    else:
        assert aead.ad("p", *left) == aead.ad("p", *right)


@given(
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=8),
    st.lists(FIELD, max_size=3),
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=8),
    st.lists(FIELD, max_size=3),
)
@settings(deadline=None)
def test_ad_distinct_purpose_and_fields_never_encode_equal(p1: str, f1: list, p2: str, f2: list) -> None:
    def typed(purpose: str, fields: list) -> tuple:
        return (purpose, *((type(f).__name__, f) for f in fields))

    if typed(p1, f1) != typed(p2, f2):
        assert aead.ad(p1, *f1) != aead.ad(p2, *f2)


def test_ad_purpose_with_nul_cannot_collide_with_fields() -> None:
    confusing = "p\x00s\x00\x00\x00\x01"
    try:
        other = aead.ad(confusing)
    except ValueError:
        return  # refusing such a purpose is a fine fix
    assert other != aead.ad("p", "\x00")


@pytest.mark.parametrize("bad", [True, False, 1.0, None, ["a"], bytearray(b"a")])
def test_ad_refuses_other_field_types(bad: object) -> None:
    with pytest.raises(TypeError):
        aead.ad("p", bad)  # type: ignore[arg-type]
