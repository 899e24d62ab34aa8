"""Generated secret values (``vault_edge.server.generate``): ``LENGTH:ALPHABET`` specs."""

from __future__ import annotations

import string
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault_edge.server import generate


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("32:base64url", (32, "base64url")),
        ("40:hex", (40, "hex")),
        ("24:alnum", (24, "alnum")),
        ("1:digits", (1, "digits")),
        ("4096:ascii", (4096, "ascii")),
        ("8:alpha", (8, "alpha")),
        ("8:base64", (8, "base64")),
        ("16", (16, "base64url")),
        ("16:", (16, "base64url")),
        ("0016:hex", (16, "hex")),
    ],
)
def test_good_specs(spec: str, parsed: tuple[int, str]) -> None:
    assert generate.parse_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ":",
        ":hex",
        "0",
        "0:hex",
        "4097:hex",
        "-1:hex",
        "+8:hex",
        "1e3:hex",
        "8.0:hex",
        "abc",
        "32:nope",
        "32:HEX",
        "32:Hex",
        " 32:hex",
        "32:hex ",
        "32 :hex",
        "32:hex:extra",
        "32::hex",
        "hex:32",
        "99999999999:hex",
        "32:__class__",
        "32:ALPHABETS",
    ],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid --generate spec") as info:
        generate.parse_spec(spec)
    for name in generate.ALPHABETS:
        assert name in str(info.value)  # the message lists what is allowed


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("\u0663\u0662:hex", id="arabic-indic digits"),
        pytest.param("\uff18:hex", id="fullwidth digit"),
        pytest.param("\u00b2:hex", id="superscript two"),
    ],
)
def test_non_ascii_lengths_are_refused_clearly(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid --generate spec"):
        generate.parse_spec(spec)


def test_alphabets() -> None:
    assert all(len(set(chars)) == len(chars) for chars in generate.ALPHABETS.values())
    assert generate.ALPHABETS["hex"] == "0123456789abcdef"
    assert len(generate.ALPHABETS["base64url"]) == len(generate.ALPHABETS["base64"]) == 64
    assert set(generate.ALPHABETS["base64url"]) - set(string.ascii_letters + string.digits) == {"-", "_"}
    ascii_ = generate.ALPHABETS["ascii"]
    assert len(ascii_) == 94 and " " not in ascii_ and all(c.isprintable() for c in ascii_)


@given(st.integers(1, 512), st.sampled_from(sorted(generate.ALPHABETS)))
@settings(deadline=None, max_examples=60)
def test_output_length_and_alphabet(length: int, alphabet: str) -> None:
    value = generate.generate(f"{length}:{alphabet}")
    assert isinstance(value, bytes) and len(value) == length
    assert set(value.decode("ascii")) <= set(generate.ALPHABETS[alphabet])


def test_default_alphabet_and_maximum_length() -> None:
    value = generate.generate("4096")
    assert len(value) == generate.MAX_LENGTH
    assert set(value.decode()) <= set(generate.ALPHABETS["base64url"])


def test_every_character_is_reachable() -> None:
    """4096 draws from 16 characters miss one with probability ~16 * (15/16)^4096 (about 1e-113)."""
    assert set(generate.generate("4096:hex").decode()) == set(generate.ALPHABETS["hex"])


def test_draws_each_character_independently_from_the_alphabet() -> None:
    seen: list[Sequence[str]] = []

    def choice(chars: Sequence[str]) -> str:
        seen.append(chars)
        return chars[len(seen) % len(chars)]

    assert generate.generate("5:digits", choice=choice) == b"12345"
    assert seen == [generate.ALPHABETS["digits"]] * 5


def test_two_values_differ() -> None:
    assert generate.generate("32:base64url") != generate.generate("32:base64url")


@pytest.mark.parametrize("spec", ["0:hex", "nope", "32:nope"])
def test_generate_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        generate.generate(spec)
