"""Ed25519 signatures and X25519 SealedBox grants (``vault_edge.crypto.signing``)."""

from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey, SealedBox

from vault_edge.crypto import aead, signing
from vault_edge.crypto.errors import DecryptionError

# RFC 8032, section 7.1, TEST 1 (empty message) and TEST 2 (one byte).
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(seed: str, public: str, message: str, signature: str) -> None:
    sk = signing.signing_key_from_seed(bytes.fromhex(seed))
    assert signing.public_of(bytes.fromhex(seed)) == bytes.fromhex(public)
    assert signing.sign(sk, bytes.fromhex(message)) == bytes.fromhex(signature)
    assert signing.verify(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)) is True


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


_PUB, _MSG, _SIG = (bytes.fromhex(x) for x in RFC8032[1][1:])


@pytest.mark.parametrize(
    ("case", "public", "message", "signature"),
    [
        ("message changed", _PUB, b"s", _SIG),
        ("message extended", _PUB, _MSG + b"\x00", _SIG),
        ("empty message", _PUB, b"", _SIG),
        ("signature R bit", _PUB, _MSG, _flip(_SIG, 0)),
        ("signature S bit", _PUB, _MSG, _flip(_SIG, 40)),
        ("signature last byte", _PUB, _MSG, _flip(_SIG, 63)),
        ("signature truncated", _PUB, _MSG, _SIG[:-1]),
        ("signature extended", _PUB, _MSG, _SIG + b"\x00"),
        ("signature empty", _PUB, _MSG, b""),
        ("signature all zero", _PUB, _MSG, bytes(64)),
        ("other public key", bytes.fromhex(RFC8032[0][1]), _MSG, _SIG),
        ("public key bit", _flip(_PUB, 0), _MSG, _SIG),
        ("public key short", _PUB[:-1], _MSG, _SIG),
        ("public key long", _PUB + b"\x00", _MSG, _SIG),
        ("public key empty", b"", _MSG, _SIG),
        ("public key all ones (not a point)", b"\xff" * 32, _MSG, _SIG),
        ("public key all zero (small order)", bytes(32), _MSG, _SIG),
    ],
)
def test_verify_is_false_never_an_exception(case: str, public: bytes, message: bytes, signature: bytes) -> None:
    assert signing.verify(public, message, signature) is False


@given(st.binary(max_size=256))
@settings(deadline=None, max_examples=30)
def test_sign_verify_round_trip(message: bytes) -> None:
    pair = signing.KeyPair.generate()
    sig = signing.sign(pair.signer(), message)
    assert len(sig) == signing.SIGNATURE_SIZE
    assert signing.verify(pair.sign_public, message, sig)
    assert not signing.verify(pair.sign_public, message + b"!", sig)


# -- key pairs ------------------------------------------------------------------------------------
def _encodings(raw: bytes) -> list[str]:
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw)[2:-1],
    ]


def test_key_pair_halves_and_sizes() -> None:
    pair = signing.KeyPair.generate()
    assert len(pair.box_public) == len(pair.sign_public) == signing.PUBLIC_KEY_SIZE
    assert pair.box_public == bytes(PrivateKey(pair.box_private.reveal()).public_key)
    assert pair.sign_public == signing.public_of(pair.sign_seed.reveal())
    other = signing.KeyPair.generate()
    assert other.box_public != pair.box_public and other.sign_public != pair.sign_public


def test_key_pair_repr_and_str_hold_no_private_key_material() -> None:
    pair = signing.KeyPair.generate()
    for text in (repr(pair), str(pair), f"{pair}", repr([pair])):
        for secret in (pair.box_private.reveal(), pair.sign_seed.reveal()):
            for enc in _encodings(secret):
                assert enc not in text


def test_key_pair_refuses_pickling() -> None:
    pair = signing.KeyPair.generate()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(pair, protocol=protocol)


# -- grants ---------------------------------------------------------------------------------------
NODE = signing.KeyPair.generate()
REGION_KEY = bytes(range(32))


def _grant(node: str = "n-0123456789abcdef", region: str = "eu", key_version: int = 2) -> bytes:
    return signing.seal_grant(NODE.box_public, node, region, key_version, REGION_KEY)


def test_grant_round_trip() -> None:
    sealed = _grant()
    opened = signing.open_grant(NODE.box_private.reveal(), sealed, "n-0123456789abcdef", "eu", 2)
    assert opened == REGION_KEY
    assert REGION_KEY not in sealed


@pytest.mark.parametrize(
    ("case", "node", "region", "key_version"),
    [
        ("another node", "n-0123456789abcdee", "eu", 2),
        ("another region", "n-0123456789abcdef", "us", 2),
        ("an older key version", "n-0123456789abcdef", "eu", 1),
        ("a newer key version", "n-0123456789abcdef", "eu", 3),
        ("node and region shifted", "n-0123456789abcde", "feu", 2),
        ("region and version shifted", "n-0123456789abcdef", "eu2", 2),
    ],
)
def test_grant_opened_for_another_binding_is_refused(case: str, node: str, region: str, key_version: int) -> None:
    with pytest.raises(DecryptionError):
        signing.open_grant(NODE.box_private.reveal(), _grant(), node, region, key_version)


def test_grant_opened_by_another_node_key_is_refused() -> None:
    other = signing.KeyPair.generate()
    with pytest.raises(DecryptionError):
        signing.open_grant(other.box_private.reveal(), _grant(), "n-0123456789abcdef", "eu", 2)


SEALED_GRANT = _grant()


@pytest.mark.parametrize(
    ("case", "sealed"),
    [
        ("ephemeral key bit", _flip(SEALED_GRANT, 0)),
        ("ephemeral key end", _flip(SEALED_GRANT, 31)),
        ("tag bit", _flip(SEALED_GRANT, 32)),
        ("body bit", _flip(SEALED_GRANT, 60)),
        ("last byte", _flip(SEALED_GRANT, len(SEALED_GRANT) - 1)),
        ("truncated by one", SEALED_GRANT[:-1]),
        ("truncated to the overhead", SEALED_GRANT[:48]),
        ("truncated short", SEALED_GRANT[:10]),
        ("empty", b""),
        ("extended", SEALED_GRANT + b"\x00"),
        ("random bytes", bytes(range(120))),
    ],
)
def test_tampered_grant_is_refused(case: str, sealed: bytes) -> None:
    with pytest.raises(DecryptionError):
        signing.open_grant(NODE.box_private.reveal(), sealed, "n-0123456789abcdef", "eu", 2)


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"k" * 31, REGION_KEY, b"x" + REGION_KEY, aead.ad("region-grant", "n-0123456789abcdef", "eu", 2)],
    ids=["empty", "short", "key only", "key with junk", "binding only"],
)
def test_sealed_box_without_the_exact_binding_is_refused(plaintext: bytes) -> None:
    """Someone who knows the node's public key can seal anything to it: only a box carrying the
    exact binding followed by a 32-byte key opens."""
    sealed = SealedBox(PrivateKey(NODE.box_private.reveal()).public_key).encrypt(plaintext)
    with pytest.raises(DecryptionError):
        signing.open_grant(NODE.box_private.reveal(), sealed, "n-0123456789abcdef", "eu", 2)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_seal_grant_refuses_a_bad_public_key(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        signing.seal_grant(b"p" * size, "n-0123456789abcdef", "eu", 1, REGION_KEY)


def test_open_grant_with_a_malformed_private_key_is_a_decryption_error() -> None:
    with pytest.raises(DecryptionError):
        signing.open_grant(b"short", _grant(), "n-0123456789abcdef", "eu", 2)


TRIPLE = st.tuples(
    st.from_regex(r"n-[0-9a-f]{1,4}", fullmatch=True),
    st.from_regex(r"[a-z0-9][a-z0-9\-]{0,3}", fullmatch=True),
    st.integers(1, 2**31),
)


@given(TRIPLE, TRIPLE)
@settings(deadline=None, max_examples=50)
def test_grant_binds_node_region_and_key_version(here: tuple[str, str, int], there: tuple[str, str, int]) -> None:
    sealed = signing.seal_grant(NODE.box_public, *here, REGION_KEY)
    if here == there:
        assert signing.open_grant(NODE.box_private.reveal(), sealed, *there) == REGION_KEY
    else:
        with pytest.raises(DecryptionError):
            signing.open_grant(NODE.box_private.reveal(), sealed, *there)


# -- enrolment requests sealed to the control plane's key ------------------------------------------
SERVER = signing.signing_key_from_seed(bytes(range(32)))


def test_sealed_enrolment_round_trip_opens_only_for_the_server() -> None:
    sealed = signing.seal_to_server(bytes(SERVER.verify_key), b'{"token": "vej1.x"}')
    assert b"vej1" not in sealed
    assert signing.open_for_server(SERVER, sealed) == b'{"token": "vej1.x"}'
    other = signing.signing_key_from_seed(bytes(32))
    with pytest.raises(DecryptionError):
        signing.open_for_server(other, sealed)


@pytest.mark.parametrize("i", [0, 31, 32, 60, -1])
def test_tampered_sealed_enrolment_is_refused(i: int) -> None:
    sealed = bytearray(signing.seal_to_server(bytes(SERVER.verify_key), b"request"))
    sealed[i] ^= 0x01
    with pytest.raises(DecryptionError):
        signing.open_for_server(SERVER, bytes(sealed))


def test_a_sealed_box_to_the_server_without_the_enrolment_label_is_refused() -> None:
    """A box sealed to the same key for any other purpose (no label) is not an enrolment request."""
    plain = SealedBox(SERVER.verify_key.to_curve25519_public_key()).encrypt(b'{"token": "vej1.x"}')
    with pytest.raises(DecryptionError):
        signing.open_for_server(SERVER, plain)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_seal_to_server_refuses_a_bad_public_key(size: int) -> None:
    with pytest.raises(ValueError):
        signing.seal_to_server(bytes(size), b"x")
