"""Secret holders never leak through repr, str, logs, pickling or timing: ``SecretBytes`` and a node's
``KeyPair`` (the control plane's ``Keys``: tests/server/test_barrier_keys.py)."""

from __future__ import annotations

import base64
import copy
import logging
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge.crypto import secret, signing
from vault_edge.crypto.secret import SecretBytes

RAW = bytes(range(200, 232))


def _encodings(raw: bytes) -> list[str]:
    """Every way a key commonly ends up printed."""
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw),
        repr(raw)[2:-1],
        str(list(raw)),
    ]


def _assert_hidden(text: str, *secrets: bytes) -> None:
    for raw in secrets:
        for enc in _encodings(raw):
            assert enc not in text, f"{enc!r} printed in {text!r}"


# -- SecretBytes ----------------------------------------------------------------------------------
def test_repr_and_str_are_redacted() -> None:
    s = SecretBytes(RAW)
    assert repr(s) == str(s) == "SecretBytes(<redacted, 32 bytes>)"
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, "%r" % (s,), repr([s]), repr({"k": s}), str((s,))):  # noqa: UP031
        _assert_hidden(text, RAW)


def test_redacted_in_logs_and_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    s = SecretBytes(RAW)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("key is %s / %r", s, s)
    _assert_hidden(caplog.text, RAW)
    _assert_hidden(str(ValueError(s)), RAW)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_is_refused(protocol: int) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(SecretBytes(RAW), protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [SecretBytes(RAW)]}, protocol=protocol)


def test_copy_goes_through_reduce_and_is_refused() -> None:
    with pytest.raises(TypeError):
        copy.deepcopy(SecretBytes(RAW))


def test_equality_semantics() -> None:
    a, b, c = SecretBytes(RAW), SecretBytes(bytes(RAW)), SecretBytes(RAW[:-1] + b"\x00")
    assert a == b
    assert (a != b) is False
    assert a != c
    assert (a == c) is False
    assert SecretBytes(b"") == SecretBytes(b"")
    assert SecretBytes(RAW) != SecretBytes(RAW[:-1])
    # Never equal to plain bytes: comparing a secret against bytes is a mistake, not a match.
    assert (SecretBytes(RAW) == RAW) is False
    assert SecretBytes(RAW).__eq__(RAW) is NotImplemented
    assert (SecretBytes(RAW) == "x") is False


def test_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``==`` goes through ``hmac.compare_digest`` on the raw bytes, never a short-circuiting compare."""
    calls: list[tuple[bytes, bytes]] = []
    real = secret.hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(secret.hmac, "compare_digest", spy)
    assert SecretBytes(RAW) == SecretBytes(RAW)
    assert SecretBytes(RAW) != SecretBytes(bytes(32))
    assert calls == [(RAW, RAW), (RAW, bytes(32))]


@given(st.binary(max_size=64), st.binary(max_size=64))
@settings(deadline=None)
def test_equality_matches_bytes_equality(x: bytes, y: bytes) -> None:
    assert (SecretBytes(x) == SecretBytes(y)) is (x == y)


def test_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(SecretBytes(RAW))
    with pytest.raises(TypeError):
        {SecretBytes(RAW)}


@pytest.mark.parametrize("value", [RAW, bytearray(RAW), memoryview(RAW)])
def test_accepts_bytes_like_and_copies(value: bytes | bytearray | memoryview) -> None:
    s = SecretBytes(value)
    assert s.reveal() == RAW and type(s.reveal()) is bytes and len(s) == 32
    if isinstance(value, bytearray):
        value[0] ^= 0xFF
        assert s.reveal() == RAW  # later changes to the caller's buffer do not reach the secret


@pytest.mark.parametrize("value", ["text", 42, None, [1, 2], SecretBytes(b"x")])
def test_refuses_non_bytes(value: object) -> None:
    with pytest.raises(TypeError):
        SecretBytes(value)  # type: ignore[arg-type]


def test_no_instance_dict() -> None:
    s = SecretBytes(RAW)
    assert not hasattr(s, "__dict__")
    with pytest.raises(AttributeError):
        s.extra = 1  # type: ignore[attr-defined]


# -- KeyPair (node) ------------------------------------------------------------------------------------
def test_node_key_pair_prints_no_key_material() -> None:
    pair = signing.KeyPair.generate()
    for text in (repr(pair), str(pair), f"{pair!r}", repr({"pair": pair})):
        _assert_hidden(text, pair.box_private.reveal(), pair.sign_seed.reveal())
    with pytest.raises(TypeError):
        pickle.dumps(pair)
