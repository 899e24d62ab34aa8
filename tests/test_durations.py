"""Durations as operators type them (``vault_edge.durations``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge.durations import MAX_SECONDS, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90", 90),
        ("0s", 0),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("7d", 604800),
        ("2w", 1209600),
        ("1d2h3m4s", 93784),
        (" 1H ", 3600),
        ("1H30M", 5400),
        ("\t10s\n", 10),
        ("007", 7),
        ("3650d", MAX_SECONDS),
        (str(MAX_SECONDS), MAX_SECONDS),
        (90, 90),
    ],
)
def test_good_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "s",
        "h1",
        "-5",
        "-5s",
        "+5",
        "1.5h",
        "1,5h",
        "1e3",
        "0x10",
        "1 h",
        "1h 30m",
        "1hh",
        "1h-30m",
        "1y",
        "1ms",
        "abc",
        "5 s",
        "1h30",
        "h30m",
        "30m!",
        "1h\x00",
        "∞",
        "NaN",
        "3651d",
        str(MAX_SECONDS + 1),
        "522w",
        "1" + "0" * 30,
    ],
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*(use e\.g\.|at most 10 years)"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("\u0661\u0662", id="arabic-indic digits"),
        pytest.param("\u0663m", id="arabic-indic digit with unit"),
        pytest.param("\uff11\uff10s", id="fullwidth digits"),
        pytest.param("\u00b2", id="superscript two"),
        pytest.param("9" * 5000, id="5000 digits"),
    ],
)
def test_non_ascii_or_absurd_digits_are_refused_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(st.integers(0, MAX_SECONDS))
@settings(deadline=None)
def test_plain_seconds_round_trip(seconds: int) -> None:
    assert parse_duration(str(seconds)) == seconds
    assert parse_duration(f"{seconds}s") == seconds


@given(st.integers(0, 52), st.integers(0, 6), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
@settings(deadline=None)
def test_unit_sums(w: int, d: int, h: int, m: int, s: int) -> None:
    assert parse_duration(f"{w}w{d}d{h}h{m}m{s}s") == (((w * 7 + d) * 24 + h) * 60 + m) * 60 + s


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (59.9, "59s"),
        (60, "1m"),
        (61, "1m1s"),
        (3600, "1h"),
        (3661, "1h1m"),
        (90061, "1d1h"),
        (604800, "7d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(0, MAX_SECONDS))
@settings(deadline=None)
def test_format_then_parse_never_overstates(seconds: int) -> None:
    """The formatted text keeps the two largest units: it parses back to at most the input, exactly
    when under an hour."""
    back = parse_duration(format_duration(seconds))
    assert back <= seconds
    if seconds < 3600:
        assert back == seconds
