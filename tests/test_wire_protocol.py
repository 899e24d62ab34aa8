"""The protocol's messages (``vault_edge/wire/``): each encodes and decodes to itself, and decoding
anything else raises WireError and nothing else (the agent takes input from whatever is on its path)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vault_edge.wire import WireError, revoke
from vault_edge.wire import sync as wsync

NODE = "n-0123456789abcdef"
V = wsync.SealedVersion("db/main", 3, "current", 2, b"\x01" * 60, b"\x02" * 90, 1700000000.5, None)
P = wsync.SealedVersion("db/main", 2, "previous", 2, b"\x03" * 60, b"\x04" * 90, 1690000000.0, 1700003600.0)
BODY = wsync.RegionBody(wsync.DELTA, "eu", 40, 42, ("db/main", "gone"), (V, P))
ENV = wsync.Envelope(
    wsync.DELTA,
    NODE,
    "bm9uY2U",
    1700000001,
    "eu",
    41,
    42,
    wsync.digest(BODY.encode()),
    (wsync.Grant("eu", 2, b"\x05" * 80),),
)


def test_messages_round_trip() -> None:
    assert wsync.RegionBody.decode(BODY.encode(), 1 << 20) == BODY
    assert wsync.Envelope.decode(ENV.encode()) == ENV
    unchanged = wsync.Envelope(wsync.UNCHANGED, NODE, "n", 1, "", 42, 42)
    assert wsync.Envelope.decode(unchanged.encode()) == unchanged
    assert wsync.split(wsync.join(ENV.encode(), BODY.encode())) == (ENV.encode(), BODY.encode())
    r = revoke.Revocation(NODE, "bm9uY2U")
    assert revoke.Revocation.decode(r.encode()) == r
    assert json.loads(r.encode())["error"]["code"] == "revoked"  # the API's error shape, too


def test_signed_messages_are_domain_separated() -> None:
    assert wsync.signed_message(b"x") != revoke.signed_message(b"x")
    assert wsync.signed_message(b"x").startswith(b"vault-edge/v1/sync/2\n")


def _edit(doc: bytes, **changes: object) -> bytes:
    d = json.loads(doc)
    d.update(changes)
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 1},
        {"kind": "snapshot"},
        {"region": "EU"},
        {"base": 43},
        {"revision": -1},
        {"revision": True},
        {"names": ["../etc"]},
        {"names": "db/main"},
        {"secrets": {}},
        {"secrets": [{**json.loads(BODY.encode())["secrets"][0], "stage": "latest"}]},
        {"secrets": [{**json.loads(BODY.encode())["secrets"][0], "ct": "not base64!"}]},
        {"secrets": [{**json.loads(BODY.encode())["secrets"][0], "created_at": "yesterday"}]},
        {"names": ["other"]},  # a delta carrying a secret it does not name
    ],
)
def test_a_malformed_region_body_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(WireError):
        wsync.RegionBody.decode(_edit(BODY.encode(), **changes), 1 << 20)


def test_a_region_body_over_the_bound_is_refused_unparsed() -> None:
    with pytest.raises(WireError, match="over"):
        wsync.RegionBody.decode(BODY.encode(), 100)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 3},
        {"kind": "full-ish"},
        {"node": "n-XYZ"},
        {"nonce": 5},
        {"since": 43},  # since after revision
        {"body": "AAAA"},
        {"grants": [{"region": "eu", "kv": 1, "box": 7}]},
        {"grants": [{}] * 65},
        {"region": ""},  # only an UNCHANGED answer may come without its region
    ],
)
def test_a_malformed_envelope_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(WireError):
        wsync.Envelope.decode(_edit(ENV.encode(), **changes))


def test_a_revocation_for_another_node_or_request_proves_nothing() -> None:
    body = revoke.Revocation(NODE, "abc").encode()
    assert revoke.proves(body, NODE, "abc")
    assert not revoke.proves(body, "n-fedcba9876543210", "abc")
    assert not revoke.proves(body, NODE, "abd")
    assert not revoke.proves(b'{"kind":"revoked","node":"n-0123456789abcdef"}', NODE, "abc")
    assert not revoke.proves(b"[" * 100_000, NODE, "abc")


@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_decoding_anything_raises_only_wire_errors(raw: bytes) -> None:
    for decode in (wsync.Envelope.decode, lambda r: wsync.RegionBody.decode(r, 1 << 20), revoke.Revocation.decode):
        with contextlib.suppress(WireError):
            decode(raw)


def test_enrolment_messages_round_trip_and_hide_the_token() -> None:
    from vault_edge.wire import enrol

    req = enrol.Request("vej1.0123456789abcdef.c2VjcmV0.cGlu", b"\x01" * 32, b"\x02" * 32, "pop-1\x07")
    got = enrol.Request.decode(req.encode())
    assert (got.token, got.box_public, got.sign_public, got.hostname) == (
        req.token,
        req.box_public,
        req.sign_public,
        "pop-1",
    )
    assert "c2VjcmV0" not in repr(req)  # the join token's secret never in a repr
    assert enrol.open_envelope(enrol.seal_envelope(b"sealed")) == b"sealed"
    ans = enrol.Answer(NODE, "eu", b"\x03" * 32, 7, b"\x02" * 32, "bm9uY2U")
    assert enrol.Answer.decode(ans.encode()) == ans
    for bad in (b"[]", b'{"token": 5}', _edit(req.encode(), box_public="AAAA"), _edit(req.encode(), token="nope")):
        with pytest.raises(WireError):
            enrol.Request.decode(bad)
    for bad in (
        b"{}",
        _edit(ans.encode(), node="n-XYZ"),
        _edit(ans.encode(), revision=-1),
        _edit(ans.encode(), nonce=1),
    ):
        with pytest.raises(WireError):
            enrol.Answer.decode(bad)
