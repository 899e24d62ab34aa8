"""What the control plane and agents say to each other (``vault_edge.wire``): names, regions, node
ids, join tokens, base64url, and the signed-message layouts."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge import wire

# -- secret names ---------------------------------------------------------------------------------
GOOD_NAMES = [
    "a",
    "A",
    "0",
    "_",
    "db",
    "db/password",
    "openai/api_key",
    "A_b-c.d",
    "a..b",
    "a.",
    "a-",
    "_x/_y",
    "a/b/c/d/e",
    "v1.2.3",
    "x" * 256,
    "/".join(["abc"] * 64)[:255] + "z",
    "9/8/7",
]
BAD_NAMES = [
    ("empty", ""),
    ("dot", "."),
    ("dot dot", ".."),
    ("dot dot segment", "a/../b"),
    ("leading dot dot", "../a"),
    ("trailing dot dot", "a/.."),
    ("dot segment", "a/./b"),
    ("hidden segment", "a/.b"),
    ("leading dot", ".env"),
    ("leading dash", "-a"),
    ("empty segment", "a//b"),
    ("leading slash", "/a"),
    ("trailing slash", "a/"),
    ("only slash", "/"),
    ("257 characters", "x" * 257),
    ("257 with segments", "a/" * 128 + "b"),
    ("unicode letter", "café"),
    ("unicode digit", "a٣"),
    ("fullwidth letter", "\uff41"),
    ("zero width space", "a\u200bb"),
    ("right-to-left override", "a\u202eb"),
    ("percent", "a%b"),
    ("percent-encoded slash", "a%2Fb"),
    ("percent-encoded dots", "%2e%2e"),
    ("space", "a b"),
    ("tab", "a\tb"),
    ("newline", "a\n"),
    ("nul", "a\x00b"),
    ("backslash", "a\\b"),
    ("colon", "a:b"),
    ("star", "a*"),
    ("question mark", "a?b"),
    ("hash", "a#b"),
    ("comma", "a,b"),
    ("quote", "a'b"),
]


@pytest.mark.parametrize("name", GOOD_NAMES, ids=lambda n: n[:20])
def test_valid_names(name: str) -> None:
    assert wire.valid_name(name)
    assert wire.check_name(name) == name


@pytest.mark.parametrize(("case", "name"), BAD_NAMES, ids=[c for c, _ in BAD_NAMES])
def test_invalid_names(case: str, name: str) -> None:
    assert not wire.valid_name(name)
    with pytest.raises(wire.WireError, match="invalid secret name") as info:
        wire.check_name(name)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, 1, b"abc", ["a"]])
def test_non_string_names_are_invalid(value: object) -> None:
    assert not wire.valid_name(value)  # type: ignore[arg-type]
    with pytest.raises(wire.WireError):
        wire.check_name(value)  # type: ignore[arg-type]


SEGMENT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,10}", fullmatch=True)


@given(st.lists(SEGMENT, min_size=1, max_size=6))
@settings(deadline=None)
def test_generated_names_are_valid(segments: list[str]) -> None:
    assert wire.valid_name("/".join(segments))


@given(st.text(min_size=1, max_size=40))
@settings(deadline=None)
def test_names_with_any_character_outside_the_set_are_invalid(name: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/")
    if not set(name) <= allowed:
        assert not wire.valid_name(name)
    elif wire.valid_name(name):
        segments = name.split("/")
        assert all(s and s[0] not in ".-" for s in segments)


# -- regions and node ids -------------------------------------------------------------------------
@pytest.mark.parametrize("region", ["eu", "us", "us-east-1", "a", "0", "ap-southeast-2", "a" * 63, "x-"])
def test_valid_regions(region: str) -> None:
    assert wire.valid_region(region) and wire.check_region(region) == region


@pytest.mark.parametrize(
    "region",
    ["", "EU", "Eu", "-eu", "a" * 64, "eu_west", "eu.west", "eu/west", "eu west", "eu\n", "é", "eu*", "*", None, 5],
)
def test_invalid_regions(region: object) -> None:
    assert not wire.valid_region(region)  # type: ignore[arg-type]
    with pytest.raises(wire.WireError, match="invalid region name"):
        wire.check_region(region)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("node_id", "valid"),
    [
        ("n-0123456789abcdef", True),
        ("n-0123456789ABCDEF", False),
        ("n-0123456789abcde", False),
        ("n-0123456789abcdef0", False),
        ("x-0123456789abcdef", False),
        ("-", False),
        ("", False),
        ("n-0123456789abcdeg", False),
        ("n-0123456789abcdef\n", False),
        (None, False),
    ],
)
def test_node_ids(node_id: object, valid: bool) -> None:
    assert wire.valid_node_id(node_id) is valid  # type: ignore[arg-type]


# -- join tokens ----------------------------------------------------------------------------------
def test_join_token_round_trip() -> None:
    pin = wire.server_pin(b"k" * 32)
    token = wire.make_join_token("0123456789abcdef", "s3cr3t-_", pin)
    assert token == f"vej1.0123456789abcdef.s3cr3t-_.{pin}"
    assert wire.parse_join_token(token) == ("0123456789abcdef", "s3cr3t-_", pin)
    assert wire.parse_join_token(f"  {token}\n") == ("0123456789abcdef", "s3cr3t-_", pin)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "vej1",
        "vej1.",
        "vej1.a.b",
        "vej1.a.b.c.d",
        "vej2.a.b.c",
        "VEJ1.a.b.c",
        "vej1..b.c",
        "vej1.a..c",
        "vej1.a.b.",
        ".vej1.a.b.c",
        "vej1.a.b.c" + "c" * 200,
        "vej1 .a.b.c",
        None,
        5,
        b"vej1.a.b.c",
    ],
    ids=repr,
)
def test_join_token_parse_refuses_anything_else(token: object) -> None:
    with pytest.raises(wire.WireError, match="not a join token"):
        wire.parse_join_token(token)  # type: ignore[arg-type]


def test_server_pin_is_a_short_digest_of_the_key() -> None:
    a, b = wire.server_pin(b"a" * 32), wire.server_pin(b"b" * 32)
    assert a != b and len(a) == 22 and wire.server_pin(b"a" * 32) == a
    assert "=" not in a and wire.b64d(a) == hashlib.sha256(b"vault-edge/v1/server-key\n" + b"a" * 32).digest()[:16]


def test_token_digest() -> None:
    assert wire.token_digest("vet_x") == hashlib.sha256(b"vet_x").digest()


# -- base64url ------------------------------------------------------------------------------------
@given(st.binary(max_size=200))
@settings(deadline=None)
def test_b64_round_trip_and_alphabet(raw: bytes) -> None:
    text = wire.b64e(raw)
    assert "=" not in text
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert wire.b64d(text) == raw
    assert text == base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("text", ["a", "abcde", "é", "ab\x00c", "a=b=", None, 5, b"YWJj"], ids=repr)
def test_b64d_refuses_malformed(text: object) -> None:
    with pytest.raises(wire.WireError, match="invalid base64url"):
        wire.b64d(text)  # type: ignore[arg-type]


def test_b64d_max_len() -> None:
    assert wire.b64d("A" * 64, max_len=64) == bytes(48)
    with pytest.raises(wire.WireError):
        wire.b64d("A" * 68, max_len=64)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("YWJj", id="canonical"),
        pytest.param("YWI=", id="padded"),
        pytest.param("YQ==", id="double padded"),
        pytest.param("=", id="lone padding"),
        pytest.param("AAAA====", id="extra padding"),
        pytest.param("a+b/", id="standard alphabet"),
        pytest.param("YW Jj", id="space"),
        pytest.param("YWJj\n", id="newline"),
        pytest.param("Y!W@J#j", id="junk characters"),
        pytest.param("AR", id="non-canonical trailing bits"),
    ],
)
def test_b64d_is_strict(text: str) -> None:
    """ "Strict unpadded base64url; WireError on anything else": only what b64e could have made."""
    try:
        raw = wire.b64d(text)
    except wire.WireError:
        assert text != "YWJj", "a canonical encoding was refused"
        return
    assert wire.b64e(raw) == text, f"{text!r} was accepted as {raw!r}"


# -- signed messages ------------------------------------------------------------------------------
def test_request_message_layout() -> None:
    msg = wire.request_message("get", "/v1/agent/sync?since=3", "n-0123456789abcdef", 1700000000, "bm9uY2U", b"{}")
    assert msg == (
        b"vault-edge/v1/node-request\nGET\n/v1/agent/sync?since=3\nn-0123456789abcdef\n1700000000\nbm9uY2U\n"
        + hashlib.sha256(b"{}").hexdigest().encode()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"method": "POST"},
        {"target": "/v1/agent/sync?since=4"},
        {"node": "n-0123456789abcdee"},
        {"timestamp": 1700000001},
        {"nonce": "bm9uY2V"},
        {"body": b"{ }"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_request_message_binds_every_field(change: dict) -> None:
    base = {"method": "GET", "target": "/t", "node": "n-0123456789abcdef", "timestamp": 1, "nonce": "n", "body": b""}
    assert wire.request_message(**base) != wire.request_message(**{**base, **change})


def test_response_message_is_kind_separated() -> None:
    assert wire.response_message("sync", b"{}") == b"vault-edge/v1/sync\n{}"
    assert wire.response_message("sync", b"{}") != wire.response_message("enroll", b"{}")


@given(st.binary(max_size=64))
@settings(deadline=None)
def test_value_fields(value: bytes) -> None:
    fields = wire.value_fields(value)
    if fields["encoding"] == "utf-8":
        assert fields["value"].encode() == value
    else:
        assert fields["encoding"] == "base64" and wire.b64d(fields["value"]) == value
        with pytest.raises(UnicodeDecodeError):
            value.decode("utf-8")


def test_an_egress_route_without_retry_previous_keeps_its_canonical_text() -> None:
    from vault_edge.wire.egress import route_from_json

    doc = {"name": "a", "upstream": "https://x.example", "secret": "a/b", "inject": ["header:X={value}"]}
    plain = route_from_json(doc).route
    assert "retry_previous_on_401" not in plain.canonical() and plain.retry_previous_on_401 is False
    on = route_from_json({**doc, "retry_previous_on_401": True}).route
    assert on.retry_previous_on_401 and route_from_json(on.to_json()).route == on
    with pytest.raises(wire.WireError):
        route_from_json({**doc, "retry_previous_on_401": "yes"})


# -- egress reports (the agent's counters in its sync query) --------------------------------------
BAD_REPORTS = [
    "",
    "/",  # no since
    "x/",
    "-1/",
    "01/",
    "1/A:1:1:1:1:1:1:1:1",  # route names are lowercase
    "1/a:1:1:1:1:1:1:1",  # a count missing
    "1/a:1:1:1:1:1:1:1:1:1",  # one too many
    "1/a:01:0:0:0:0:0:0:0",  # not canonical
    "1/a:+1:0:0:0:0:0:0:0",
    "1/a:9007199254740992:0:0:0:0:0:0:0",  # 2^53
    "1/b:0:0:0:0:0:0:0:0,a:0:0:0:0:0:0:0:0",  # not sorted
    "1/a:0:0:0:0:0:0:0:0,a:0:0:0:0:0:0:0:0",  # twice
    "1/a:0:0:0:0:0:0:0:0,",
    "1/a%3A0:0:0:0:0:0:0:0",
    "1/" + ",".join(f"r{i:03d}:0:0:0:0:0:0:0:0" for i in range(65)),  # 65 routes
]


@pytest.mark.parametrize("text", BAD_REPORTS)
def test_malformed_egress_reports_are_refused(text: str) -> None:
    from vault_edge.wire.egress import Report

    with pytest.raises(wire.WireError, match="egress report"):
        Report.decode(text)


@given(
    st.integers(0, 2**40),
    st.dictionaries(
        st.from_regex(r"[a-z0-9][a-z0-9_\-]{0,62}", fullmatch=True),
        st.tuples(*[st.integers(0, 2**60)] * 8),
        max_size=80,
    ),
)
@settings(max_examples=60)
def test_egress_reports_round_trip_within_their_bounds(since: int, counts: dict[str, tuple[int, ...]]) -> None:
    from vault_edge.wire.egress import REPORT_MAX, REPORT_ROUTES, Report

    report = Report.of(since, counts)
    text = report.encode()
    assert Report.decode(text) == report and len(text) <= REPORT_MAX and len(report.routes) <= REPORT_ROUTES
    assert all(c <= 2**53 - 1 for _, cs in report.routes for c in cs)
    if len(report.routes) < len(counts):  # the busiest routes are the ones kept
        kept = {n for n, _ in report.routes}
        least_kept = min(min(counts[n][0], 2**53 - 1) for n in kept)
        assert all(min(c[0], 2**53 - 1) <= least_kept for n, c in counts.items() if n not in kept)
