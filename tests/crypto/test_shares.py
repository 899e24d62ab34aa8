"""SLIP-39 shares of the root key (``vault_edge.crypto.shares``): split, join, and the unseal progress
that refuses a mistyped share, a share of another vault, a duplicate, without changing anything."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shamir_mnemonic import Share
from shamir_mnemonic.wordlist import WORDLIST

from vault_edge.crypto import envelope, shares
from vault_edge.crypto.errors import CryptoError, ShareError
from vault_edge.crypto.shares import ShareScheme, UnsealProgress

# Official SLIP-39 test vectors (trezor/python-shamir-mnemonic vectors.json), passphrase "TREZOR".
# An empty secret means the set must not recover.
VECTORS = [
    (
        "1. valid mnemonic without sharing (128 bits)",
        [
            "duckling enlarge academic academic agency result length solution fridge kidney coal piece deal husband erode "
            "duke ajar critical decision keyboard"
        ],
        "bb54aac4b89dc868ba37d9cc21b2cece",
    ),
    (
        "2. invalid checksum (128 bits)",
        [
            "duckling enlarge academic academic agency result length solution fridge kidney coal piece deal husband erode "
            "duke ajar critical decision kidney"
        ],
        "",
    ),
    (
        "3. invalid padding (128 bits)",
        [
            "duckling enlarge academic academic email result length solution fridge kidney coal piece deal husband erode "
            "duke ajar music cargo fitness"
        ],
        "",
    ),
    (
        "4. basic sharing 2-of-3 (128 bits)",
        [
            "shadow pistol academic always adequate wildlife fancy gross oasis cylinder mustang wrist rescue view short "
            "owner flip making coding armed",
            "shadow pistol academic acid actress prayer class unknown daughter sweater depict flip twice unkind craft "
            "early superior advocate guest smoking",
        ],
        "b43ceb7e57a0ea8766221624d01b0864",
    ),
    (
        "5. basic sharing 2-of-3, one share only (128 bits)",
        [
            "shadow pistol academic always adequate wildlife fancy gross oasis cylinder mustang wrist rescue view short "
            "owner flip making coding armed"
        ],
        "",
    ),
    (
        "6. different identifiers (128 bits)",
        [
            "adequate smoking academic acid debut wine petition glen cluster slow rhyme slow simple epidemic rumor junk "
            "tracks treat olympic tolerate",
            "adequate stay academic agency agency formal party ting frequent learn upstairs remember smear leaf damage "
            "anatomy ladle market hush corner",
        ],
        "",
    ),
    (
        "7. different iteration exponents (128 bits)",
        [
            "peasant leaves academic acid desert exact olympic math alive axle trial tackle drug deny decent smear "
            "dominant desert bucket remind",
            "peasant leader academic agency cultural blessing percent network envelope medal junk primary human pumps "
            "jacket fragment payroll ticket evoke voice",
        ],
        "",
    ),
    (
        "11. duplicate member indices (128 bits)",
        [
            "device stay academic always dive coal antenna adult black exceed stadium herald advance soldier busy dryer "
            "daughter evaluate minister laser",
            "device stay academic always dwarf afraid robin gravity crunch adjust soul branch walnut coastal dream costume "
            "scholar mortgage mountain pumps",
        ],
        "",
    ),
    (
        "12. mismatching member thresholds (128 bits)",
        [
            "hour painting academic academic device formal evoke guitar random modern justice filter withdraw trouble "
            "identify mailman insect general cover oven",
            "hour painting academic agency artist again daisy capital beaver fiber much enjoy suitable symbolic identify "
            "photo editor romp float echo",
        ],
        "",
    ),
    (
        "13. invalid digest (128 bits)",
        [
            "guilt walnut academic acid deliver remove equip listen vampire tactics nylon rhythm failure husband fatigue "
            "alive blind enemy teaspoon rebound",
            "guilt walnut academic agency brave hamster hobo declare herd taste alpha slim criminal mild arcade formal "
            "romp branch pink ambition",
        ],
        "",
    ),
    (
        "14. insufficient number of groups (128 bits)",
        [
            "eraser senior beard romp adorn nuclear spill corner cradle style ancient family general leader ambition "
            "exchange unusual garlic promise voice"
        ],
        "",
    ),
    (
        "16. threshold groups, too few members in one (128 bits)",
        [
            "eraser senior decision shadow artist work morning estate greatest pipeline plan ting petition forget hormone "
            "flexible general goat admit surface",
            "eraser senior beard romp adorn nuclear spill corner cradle style ancient family general leader ambition "
            "exchange unusual garlic promise voice",
        ],
        "",
    ),
    (
        "17. threshold groups and members (128 bits)",
        [
            "eraser senior decision roster beard treat identify grumpy salt index fake aviation theater cubic bike cause "
            "research dragon emphasis counter",
            "eraser senior ceramic snake clay various huge numb argue hesitate auction category timber browser greatest "
            "hanger petition script leaf pickup",
            "eraser senior ceramic shaft dynamic become junior wrist silver peasant force math alto coal amazing segment "
            "yelp velvet image paces",
            "eraser senior ceramic round column hawk trust auction smug shame alive greatest sheriff living perfect corner "
            "chest sled fumes adequate",
            "eraser senior decision smug corner ruin rescue cubic angel tackle skin skunk program roster trash rumor slush "
            "angel flea amazing",
        ],
        "7c3397a292a5941682d7a4ae2d898d11",
    ),
    (
        "19. threshold groups and members, other groups (128 bits)",
        [
            "eraser senior beard romp adorn nuclear spill corner cradle style ancient family general leader ambition "
            "exchange unusual garlic promise voice",
            "eraser senior acrobat romp bishop medical gesture pumps secret alive ultimate quarter priest subject class "
            "dictate spew material endless market",
        ],
        "7c3397a292a5941682d7a4ae2d898d11",
    ),
    (
        "20. valid mnemonic without sharing (256 bits)",
        [
            "theory painting academic academic armed sweater year military elder discuss acne wildlife boring employer "
            "fused large satoshi bundle carbon diagnose anatomy hamster leaves tracks paces beyond phantom capital marvel "
            "lips brave detect luck"
        ],
        "989baf9dcaad5b10ca33dfd8cc75e42477025dce88ae83e75a230086a0e00e92",
    ),
    (
        "21. invalid checksum (256 bits)",
        [
            "theory painting academic academic armed sweater year military elder discuss acne wildlife boring employer "
            "fused large satoshi bundle carbon diagnose anatomy hamster leaves tracks paces beyond phantom capital marvel "
            "lips brave detect lunar"
        ],
        "",
    ),
    (
        "23. basic sharing 2-of-3 (256 bits)",
        [
            "humidity disease academic always aluminum jewelry energy woman receiver strategy amuse duckling lying evidence "
            "network walnut tactics forget hairy rebound impulse brother survive clothes stadium mailman rival ocean reward "
            "venture always armed unwrap",
            "humidity disease academic agency actress jacket gross physics cylinder solution fake mortgage benefit public "
            "busy prepare sharp friar change work slow purchase ruler again tricycle involve viral wireless mixture anatomy "
            "desert cargo upgrade",
        ],
        "c938b319067687e990e05e0da0ecce1278f75ff58d9853f19dcaeed5de104aae",
    ),
]

# Words of the SLIP-39 list that the module's own (fixed) messages use, e.g. "check", "again".
_MESSAGES = re.findall(r'ShareError\(\s*"([^"]*)"', inspect.getsource(shares))
_MESSAGE_WORDS = frozenset(WORDLIST) & {w for text in _MESSAGES for w in re.findall(r"[a-z]+", text)}

KEY = bytes(range(32))
SIMPLE = ShareScheme.simple(threshold=3, shares=5)
GROUPED = ShareScheme(((2, 3), (2, 3), (1, 1)), group_threshold=2)
SIMPLE_SHARES = shares.split(KEY, SIMPLE)[0]
GROUPED_SHARES = shares.split(KEY, GROUPED)


def _assert_quotes_no_share(message: str, share: str) -> None:
    """The message names none of the share's words (beyond the words of its own fixed text)."""
    words = share.lower().split()
    tokens = set(re.findall(r"[a-z]+", message.lower()))
    if not words:
        return
    assert share.lower() not in message.lower()
    assert " ".join(words[:3]) not in message.lower()  # the set prefix the reference library quotes
    leaked = (set(words) & tokens) - _MESSAGE_WORDS
    assert not leaked, f"message {message!r} quotes share words {leaked}"


def _mistype(share: str, position: int = 5) -> str:
    words = share.split()
    i = WORDLIST.index(words[position])
    words[position] = WORDLIST[(i + 1) % len(WORDLIST)]
    return " ".join(words)


def _words(share: str, replace: dict[int, str]) -> str:
    words = share.split()
    for i, w in replace.items():
        words[i] = w
    return " ".join(words)


def _swap(share: str) -> str:
    """Two neighbouring (different) words of the share's value swapped."""
    words = share.split()
    i = next(i for i in range(4, len(words) - 1) if words[i] != words[i + 1])
    return _words(share, {i: words[i + 1], i + 1: words[i]})


def _forge(share: str, **changes: int) -> str:
    """A share with valid checksum but changed header fields (what only an attacker or a bug makes)."""
    return dataclasses.replace(Share.from_mnemonic(share), **changes).mnemonic()


# -- vectors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("description", "mnemonics", "secret"), VECTORS, ids=[v[0][:3].strip(". ") for v in VECTORS])
def test_slip39_vectors(description: str, mnemonics: list[str], secret: str) -> None:
    if secret:
        assert shares.join(mnemonics, "TREZOR").hex() == secret
    else:
        with pytest.raises(ShareError) as info:
            shares.join(mnemonics, "TREZOR")
        for m in mnemonics:
            _assert_quotes_no_share(str(info.value), m)


# -- schemes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("groups", "group_threshold"),
    [
        ((), 1),
        (((2, 3),) * 17, 1),
        (((2, 3),), 0),
        (((2, 3),), 2),
        (((2, 3), (2, 3)), 3),
        (((1, 0),), 1),
        (((2, 17),), 1),
        (((0, 3),), 1),
        (((4, 3),), 1),
        (((1, 2),), 1),  # SLIP-39 forbids threshold 1 with more than one share
        (((2, 3), (1, 5)), 1),
    ],
)
def test_bad_schemes_are_refused(groups: tuple, group_threshold: int) -> None:
    with pytest.raises(ValueError):
        ShareScheme(groups, group_threshold)


@pytest.mark.parametrize(
    ("scheme", "min_shares"),
    [
        (ShareScheme.simple(3, 5), 3),
        (ShareScheme.simple(1, 1), 1),
        (ShareScheme.simple(16, 16), 16),
        (GROUPED, 3),
        (ShareScheme(((3, 5), (2, 2)), 1), 2),
        (ShareScheme(((3, 5), (2, 2)), 2), 5),
    ],
)
def test_min_shares(scheme: ShareScheme, min_shares: int) -> None:
    assert scheme.min_shares == min_shares


def test_split_shapes() -> None:
    assert len(SIMPLE_SHARES) == 5
    assert [len(g) for g in GROUPED_SHARES] == [3, 3, 1]
    everything = SIMPLE_SHARES + [m for g in GROUPED_SHARES for m in g]
    assert all(len(m.split()) == 33 and set(m.split()) <= set(WORDLIST) for m in everything)
    assert len({shares.set_identifier(m) for m in SIMPLE_SHARES}) == 1
    assert len({shares.set_identifier(m) for g in GROUPED_SHARES for m in g}) == 1
    # Fresh randomness each split: another split of the same key shares nothing.
    again = shares.split(KEY, SIMPLE)[0]
    assert not set(again) & set(SIMPLE_SHARES)


# -- join: simple and grouped ---------------------------------------------------------------------
def test_simple_join_any_threshold_subset() -> None:
    assert shares.join(SIMPLE_SHARES[:3]) == KEY
    assert shares.join(SIMPLE_SHARES[2:]) == KEY
    assert shares.join(SIMPLE_SHARES) == KEY
    with pytest.raises(ShareError, match="not enough"):
        shares.join(SIMPLE_SHARES[:2])


@pytest.mark.parametrize(
    ("picked", "complete"),
    [
        ([(0, 0), (0, 1), (2, 0)], True),
        ([(0, 0), (0, 2), (1, 1), (1, 2)], True),
        ([(1, 0), (1, 2), (2, 0)], True),
        ([(0, 0), (0, 1), (0, 2)], False),  # one whole group is not enough: no single site can unseal
        ([(0, 0), (1, 0), (2, 0)], False),
        ([(2, 0)], False),
        ([(0, 0), (2, 0)], False),
    ],
)
def test_grouped_join(picked: list[tuple[int, int]], complete: bool) -> None:
    progress = UnsealProgress()
    for g, m in picked:
        progress.add(GROUPED_SHARES[g][m])
    assert progress.complete is complete
    if complete:
        assert progress.recover() == KEY
    else:
        with pytest.raises(ShareError, match="not enough"):
            progress.recover()


@given(st.lists(st.integers(0, 4), unique=True, max_size=5))
@settings(max_examples=40, deadline=None)
def test_random_simple_subsets(picked: list[int]) -> None:
    progress = UnsealProgress(shares.set_identifier(SIMPLE_SHARES[0]))
    for n, i in enumerate(picked, start=1):
        assert progress.add(SIMPLE_SHARES[i]) is (n >= 3)
    assert progress.entered == len(picked)
    if len(picked) >= SIMPLE.min_shares:
        assert progress.recover() == KEY
    else:
        assert not progress.complete
        with pytest.raises(ShareError):
            progress.recover()


_GROUPED_IDS = [(g, m) for g, group in enumerate(GROUPED_SHARES) for m in range(len(group))]


@given(st.lists(st.sampled_from(_GROUPED_IDS), unique=True, max_size=len(_GROUPED_IDS)))
@settings(max_examples=60, deadline=None)
def test_random_grouped_subsets(picked: list[tuple[int, int]]) -> None:
    progress = UnsealProgress()
    for g, m in picked:
        progress.add(GROUPED_SHARES[g][m])
    groups_met = sum(
        1 for g, (threshold, _) in enumerate(GROUPED.groups) if sum(1 for pg, _ in picked if pg == g) >= threshold
    )
    assert progress.complete is (groups_met >= GROUPED.group_threshold)
    if progress.complete:
        assert progress.recover() == KEY
    else:
        with pytest.raises(ShareError):
            progress.recover()


# -- passphrase -----------------------------------------------------------------------------------
def test_passphrase_right_and_wrong() -> None:
    mnemonics = shares.split(KEY, SIMPLE, passphrase="correct horse")[0][:3]
    canary = envelope.make_canary(KEY)
    assert shares.join(mnemonics, "correct horse") == KEY
    for wrong in ("", "correct horse ", "Correct horse", "TREZOR"):
        key = shares.join(mnemonics, wrong)  # SLIP-39 has no passphrase check: a different key, no error
        assert key != KEY and len(key) == len(KEY)
        assert envelope.check_canary(key, canary) is False
    assert envelope.check_canary(shares.join(mnemonics, "correct horse"), canary) is True


def test_passphrase_set_without_one_at_split_gives_another_key() -> None:
    assert shares.join(SIMPLE_SHARES[:3], "anything") != KEY


@pytest.mark.parametrize("bad", ["pässword", "tab\there", "new\nline", "\x00", "emoji 🔑"])
def test_non_printable_ascii_passphrase_is_refused(bad: str) -> None:
    with pytest.raises(ShareError, match="printable ASCII"):
        shares.split(KEY, SIMPLE, passphrase=bad)
    progress = UnsealProgress()
    for m in SIMPLE_SHARES[:3]:
        progress.add(m)
    with pytest.raises(ShareError, match="printable ASCII"):
        progress.recover(bad)
    assert progress.recover() == KEY  # a refused passphrase leaves the shares in place


# -- UnsealProgress refusals ---------------------------------------------------------------------
OTHER_VAULT = shares.split(bytes(32), SIMPLE)[0]


def _refusals() -> list[tuple[str, list[str], str, str]]:
    """(case, shares accepted before, the refused share, expected message part)."""
    good = SIMPLE_SHARES
    return [
        ("mistyped word (bad checksum)", [good[0]], _mistype(good[1]), "checksum"),
        ("mistyped first share", [], _mistype(good[0], 20), "checksum"),
        ("two words swapped", [good[0]], _swap(good[1]), "checksum"),
        ("word not in the list", [good[0]], _words(good[1], {7: "qwertyuiop"}), "not a valid share"),
        ("word dropped", [good[0]], " ".join(good[1].split()[:-1]), "not a valid share"),
        ("word added", [good[0]], good[1] + " " + good[1].split()[-1], "not a valid share"),
        ("too many words", [good[0]], " ".join(good[1].split() * 2), "20 to 33 words"),
        ("empty", [good[0]], "", "not a valid share"),
        ("only spaces", [good[0]], "   \t ", "not a valid share"),
        ("another vault", [good[0]], OTHER_VAULT[1], "another vault"),
        ("another vault first", [], OTHER_VAULT[0], "another vault"),
        ("duplicate", [good[0], good[1]], good[1], "duplicate"),
        ("duplicate, other case and spacing", [good[0]], "  " + good[0].upper().replace(" ", "   "), "duplicate"),
        ("forged member threshold", [good[0]], _forge(good[1], member_threshold=2), "group parameters"),
        ("forged iteration exponent", [good[0]], _forge(good[1], iteration_exponent=2), "not part of the set"),
    ]


@pytest.mark.parametrize(("case", "before", "share", "expected"), _refusals(), ids=[r[0] for r in _refusals()])
def test_refused_share_changes_nothing(case: str, before: list[str], share: str, expected: str) -> None:
    progress = UnsealProgress(expected_identifier=shares.set_identifier(SIMPLE_SHARES[0]))
    for m in before:
        progress.add(m)
    entered, complete = progress.entered, progress.complete
    with pytest.raises(ShareError) as info:
        progress.add(share)
    message = str(info.value)
    assert expected in message
    _assert_quotes_no_share(message, share)
    for m in before:
        _assert_quotes_no_share(message, m)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CryptoError)
    assert (progress.entered, progress.complete) == (entered, complete)
    # The good shares still finish the unseal, and give the right key.
    for m in SIMPLE_SHARES:
        if progress.complete:
            break
        if m not in before:
            progress.add(m)
    assert progress.recover() == KEY


def test_another_vault_refused_without_an_expected_identifier() -> None:
    progress = UnsealProgress()
    progress.add(SIMPLE_SHARES[0])
    with pytest.raises(ShareError, match="not part of the set") as info:
        progress.add(OTHER_VAULT[1])
    _assert_quotes_no_share(str(info.value), OTHER_VAULT[1])
    assert progress.entered == 1


def test_refusal_messages_do_not_depend_on_the_share() -> None:
    """The same refusal for shares of two different vaults reads the same: nothing of the share in it."""

    def message(share: str, before: list[str]) -> str:
        progress = UnsealProgress()
        for m in before:
            progress.add(m)
        with pytest.raises(ShareError) as info:
            progress.add(share)
        return str(info.value)

    a, b = SIMPLE_SHARES, OTHER_VAULT
    assert message(_mistype(a[1]), [a[0]]) == message(_mistype(b[1]), [b[0]])
    assert message(a[1], [a[0], a[1]]) == message(b[1], [b[0], b[1]])
    assert message(b[1], [a[0]]) == message(a[1], [b[0]])


def test_shares_are_accepted_in_any_case_and_spacing() -> None:
    progress = UnsealProgress()
    progress.add(SIMPLE_SHARES[0].upper())
    progress.add("\n  " + SIMPLE_SHARES[1].replace(" ", "\t ") + "  ")
    progress.add(SIMPLE_SHARES[2].title())
    assert progress.recover() == KEY


def test_progress_repr_and_pickling() -> None:
    progress = UnsealProgress()
    progress.add(SIMPLE_SHARES[0])
    assert repr(progress) == "UnsealProgress(<1 shares entered>)"
    assert not set(re.findall(r"[a-z]+", repr(progress).lower())) & set(SIMPLE_SHARES[0].split())
    with pytest.raises(TypeError):
        pickle.dumps(progress)


# -- which share completes the set (the passphrase comes with that one only) ---------------------
def test_completes_tells_the_last_share_and_changes_nothing() -> None:
    progress = UnsealProgress()
    assert progress.completes(SIMPLE_SHARES[0]) is False and progress.entered == 0
    progress.add(SIMPLE_SHARES[0])
    progress.add(SIMPLE_SHARES[1])
    assert progress.completes(SIMPLE_SHARES[2]) is True
    assert progress.entered == 2 and not progress.complete  # asked, not added
    with pytest.raises(ShareError, match="duplicate"):
        progress.completes(SIMPLE_SHARES[0])  # refused as ``add`` refuses it
    progress.add(SIMPLE_SHARES[2])
    assert progress.recover() == KEY


def test_completes_with_groups_counts_groups_not_shares() -> None:
    groups = shares.split(KEY, ShareScheme(((2, 3), (2, 3)), 2))
    progress = UnsealProgress()
    for m in groups[0]:  # the whole first group: one share more than it needs
        progress.add(m)
    assert progress.completes(groups[1][0]) is False  # four shares, the threshold's count, one group
    progress.add(groups[1][0])
    assert progress.completes(groups[1][1]) is True
