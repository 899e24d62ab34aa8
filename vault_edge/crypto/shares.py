"""The root key as SLIP-39 mnemonic shares, with ``shamir-mnemonic`` (the reference implementation).

We do not implement any GF(256) arithmetic ourselves. The reference implementation is not hardened
against side channels (its README says so); it runs only at ``init`` and ``unseal``, in-process.

Shares come one at a time at unseal, so :class:`UnsealProgress` keeps the running set and refuses,
with a message that never quotes the share, anything that would not help: a mistyped share, a share
of another vault, a share from a different group configuration, a share already entered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shamir_mnemonic import MnemonicError, Share
from shamir_mnemonic.recovery import RecoveryState
from shamir_mnemonic.shamir import generate_mnemonics

from vault_edge.crypto.errors import ShareError

MAX_SHARE_WORDS = 59  # a 256-bit secret takes 33 words; SLIP-39 caps a share far below this


@dataclass(frozen=True)
class ShareScheme:
    """How the root key is split: ``groups`` of (member_threshold, member_count), ``group_threshold``
    of them needed. The common case is one group: ``ShareScheme.simple(threshold=3, shares=5)``."""

    groups: tuple[tuple[int, int], ...]
    group_threshold: int = 1

    @classmethod
    def simple(cls, threshold: int, shares: int) -> ShareScheme:
        return cls(((threshold, shares),), 1)

    def __post_init__(self) -> None:
        if not self.groups or len(self.groups) > 16:
            raise ValueError("between 1 and 16 share groups")
        if not 1 <= self.group_threshold <= len(self.groups):
            raise ValueError("the group threshold must be between 1 and the number of groups")
        for threshold, count in self.groups:
            if not 1 <= count <= 16:
                raise ValueError("each group has between 1 and 16 shares")
            if not 1 <= threshold <= count:
                raise ValueError("a threshold must be between 1 and the number of shares")
            if threshold == 1 and count > 1:
                raise ValueError("SLIP-39 does not allow a threshold of 1 with more than one share")

    @property
    def min_shares(self) -> int:
        """The fewest shares that can unseal: the smallest ``group_threshold`` group thresholds."""
        return sum(sorted(t for t, _ in self.groups)[: self.group_threshold])


def split(root_key: bytes, scheme: ShareScheme, passphrase: str = "") -> list[list[str]]:
    """Split ``root_key`` into mnemonic shares, one list per group."""
    check_passphrase(passphrase)
    mnemonics: list[list[str]] = generate_mnemonics(
        group_threshold=scheme.group_threshold,
        groups=list(scheme.groups),
        master_secret=root_key,
        passphrase=passphrase.encode(),
    )
    return mnemonics


def set_identifier(mnemonic: str) -> int:
    """The SLIP-39 identifier shared by every share of one split (public, not secret)."""
    return int(_parse(mnemonic).identifier)


def check_passphrase(passphrase: str) -> None:
    if not all(32 <= ord(c) <= 126 for c in passphrase):
        raise ShareError("the passphrase must be printable ASCII")


def _parse(mnemonic: str) -> Share:
    words = mnemonic.split()
    if not words or len(words) > MAX_SHARE_WORDS:
        raise ShareError("not a valid share: a share is 20 to 33 words")
    try:
        return Share.from_mnemonic(" ".join(w.lower() for w in words))
    except (MnemonicError, ValueError, KeyError, IndexError) as exc:
        raise ShareError("not a valid share: check the words (a word or the checksum is wrong)") from exc


class UnsealProgress:
    """Shares entered so far for one unseal. Pure: no clock, no I/O, no logging."""

    def __init__(self, expected_identifier: int | None = None) -> None:
        self._expected = expected_identifier
        self._state = RecoveryState()
        self._seen: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        return f"UnsealProgress(<{self.entered} shares entered>)"

    def __reduce__(self) -> str:
        raise TypeError("UnsealProgress cannot be pickled")

    @property
    def entered(self) -> int:
        return len(self._seen)

    @property
    def complete(self) -> bool:
        return bool(self._state.is_complete())

    def _check(self, mnemonic: str) -> Share:
        share = _parse(mnemonic)
        if self._expected is not None and share.identifier != self._expected:
            raise ShareError("this share belongs to another vault (its set identifier differs)")
        if (share.group_index, share.index) in self._seen:
            raise ShareError("duplicate share: this share was already entered")
        if not self._state.matches(share):
            raise ShareError("this share is not part of the set being entered")
        group = self._state.groups.get(share.group_index)
        if group and group.group_parameters() != share.group_parameters():
            raise ShareError("this share's group parameters differ from the shares already entered")
        return share

    def completes(self, mnemonic: str) -> bool:
        """Whether adding this share would complete the set. Checked as ``add`` checks it (a refused
        share raises); nothing changes. With groups, the count of shares alone cannot tell."""
        share = self._check(mnemonic)
        trial = RecoveryState()
        for group in self._state.groups.values():
            for s in group:
                trial.add_share(s)
        trial.add_share(share)
        return bool(trial.is_complete())

    def add(self, mnemonic: str) -> bool:
        """Add one share; True once enough shares are in. A refused share changes nothing."""
        share = self._check(mnemonic)
        self._state.add_share(share)
        self._seen.add((share.group_index, share.index))
        return self.complete

    def recover(self, passphrase: str = "") -> bytes:
        """The key the shares and passphrase give. A wrong passphrase gives a wrong key, not an
        error (SLIP-39 has no passphrase check): the caller must check it against the canary."""
        if not self.complete:
            raise ShareError("not enough shares yet")
        check_passphrase(passphrase)
        try:
            return bytes(self._state.recover(passphrase.encode()))
        except (MnemonicError, ValueError) as exc:
            raise ShareError("the shares entered do not combine: enter the shares again") from exc


def join(mnemonics: Sequence[str], passphrase: str = "") -> bytes:
    """Combine shares at once (for tools and tests); same checks as :class:`UnsealProgress`."""
    progress = UnsealProgress()
    for m in mnemonics:
        progress.add(m)
    return progress.recover(passphrase)
