"""The seal: the root key in memory while unsealed, and the keys derived from it.

The root key is never written anywhere. Unseal collects SLIP-39 shares one at a time; once enough are
in, the reconstructed key must open the stored canary before anything is served. A refused share
changes nothing; a complete set that fails the canary (wrong passphrase, mixed sets) resets progress,
as Vault does, because the set as a whole is wrong and cannot tell which share.

Anyone may call unseal, so nothing an unauthenticated caller sends alone may change what the
operators have entered. The passphrase is therefore accepted only together with the share that
completes the set, and is never held between requests: a passphrase alone, or with a share that does
not complete the set, is refused and changes nothing (there is no passphrase held to replace).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from nacl.signing import SigningKey

from vault_edge.crypto import envelope, seal, shares, signing
from vault_edge.crypto.errors import DecryptionError, ShareError
from vault_edge.crypto.rowmac import RowKeys
from vault_edge.crypto.secret import SecretBytes
from vault_edge.crypto.shares import UnsealProgress


class Sealed(Exception):
    """The vault is sealed: no root key in memory, so nothing that needs one can run. The HTTP edge
    answers it with the 503 ``sealed`` error (``errors.answer_of``)."""


class UnsealRefused(ValueError):
    """A share (or a passphrase) refused by unseal; ``code`` says why (``bad_request``,
    ``passphrase_not_final``, ``passphrase_required``, ``unseal_failed``). The message never quotes the
    share or the passphrase. The HTTP edge answers it with a 400 of that code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Keys:
    """What the unsealed control plane holds. Repr never shows key material."""

    root: SecretBytes = field(repr=False)
    region_wrap: SecretBytes = field(repr=False)
    audit: SecretBytes = field(repr=False)
    signer: SigningKey = field(repr=False)
    server_public: bytes
    rows: RowKeys = field(repr=False)  # MACs of the database's authority rows, keyed token digests
    canary_format: int = envelope.CANARY_FORMAT  # 1: a vault made before row MACs, adopted at unseal

    @classmethod
    def from_root(cls, root_key: bytes, canary_format: int = envelope.CANARY_FORMAT) -> Keys:
        signer = signing.signing_key_from_seed(envelope.signing_seed(root_key))
        return cls(
            root=SecretBytes(root_key),
            region_wrap=SecretBytes(envelope.region_wrap_key(root_key)),
            audit=SecretBytes(envelope.audit_key(root_key)),
            signer=signer,
            server_public=bytes(signer.verify_key),
            rows=RowKeys(root_key),
            canary_format=canary_format,
        )

    def __reduce__(self) -> None:
        raise TypeError("Keys cannot be pickled")


@dataclass(frozen=True)
class UnsealResult:
    sealed: bool
    progress: int
    message: str


class Barrier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: Keys | None = None
        self._progress: UnsealProgress | None = None
        self._region_keys: dict[tuple[str, int], SecretBytes] = {}
        self._wraps: dict[int, SecretBytes] = {}  # root key versions ≥ 2, unwrapped
        self._unseal_listeners: list[Callable[[], None]] = []

    def add_unseal_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every unseal (shares, HSM or recovery shares), from the unsealing
        thread and under the barrier's lock: it must not block (``loop.call_soon_threadsafe`` is its use)."""
        self._unseal_listeners.append(listener)

    def _unsealed(self, keys: Keys) -> None:
        self._keys = keys
        self._progress = None
        for listener in self._unseal_listeners:
            listener()

    @property
    def sealed(self) -> bool:
        return self._keys is None

    @property
    def progress(self) -> int:
        p = self._progress
        return p.entered if p else 0

    def keys(self) -> Keys:
        """The keys; :class:`Sealed` while sealed."""
        keys = self._keys
        if keys is None:
            raise Sealed("the vault is sealed")
        return keys

    def require_unsealed(self) -> None:
        """:class:`Sealed` unless unsealed: the seal check of an operation."""
        self.keys()

    def keys_or_none(self) -> Keys | None:
        return self._keys

    def row_keys(self) -> RowKeys:
        """The row-MAC keys; :class:`Sealed` while sealed (the storage layer asks for them)."""
        return self.keys().rows

    def add_share(
        self,
        share: str | None,
        passphrase: str | None,
        *,
        identifier: int | None,
        canary: bytes,
        has_passphrase: bool,
        wrapped_root: bytes | None = None,
        vault_id: bytes = b"",
    ) -> UnsealResult:
        """Add one share; with the share that completes the set (only then), the passphrase, if the vault
        has one (``has_passphrase``, from init). Every refusal before the canary changes nothing."""
        with self._lock:
            if self._keys is not None:
                return UnsealResult(False, 0, "already unsealed")
            if not share:
                raise UnsealRefused(
                    "passphrase_not_final",
                    "the passphrase is accepted only with the share that "
                    "completes the unseal: send it with that share; progress unchanged",
                )
            progress = self._progress or UnsealProgress(identifier)
            try:
                completes = progress.completes(share)
                if passphrase:
                    shares.check_passphrase(passphrase)
            except ShareError as exc:  # never quotes the share or the passphrase
                raise UnsealRefused("bad_request", f"share refused: {exc}; progress unchanged") from None
            if passphrase and not completes:
                raise UnsealRefused(
                    "passphrase_not_final",
                    "the passphrase is accepted only with the share that "
                    "completes the unseal, and this one does not: send it without the passphrase; "
                    "progress unchanged",
                )
            if passphrase and not has_passphrase:
                raise UnsealRefused(
                    "bad_request", "this vault has no passphrase: send the share without one; progress unchanged"
                )
            if completes and has_passphrase and not passphrase:
                raise UnsealRefused(
                    "passphrase_required",
                    "this share completes the unseal and the vault has a "
                    "passphrase: send the passphrase with it; progress unchanged",
                )
            progress.add(share)
            self._progress = progress
            if not completes:
                return UnsealResult(True, progress.entered, "share accepted")
            try:
                root = seal.root_from_unseal_key(progress.recover(passphrase or ""), vault_id, wrapped_root)
            except ShareError as exc:
                self._reset()
                raise UnsealRefused("bad_request", f"unseal failed: {exc}; progress was reset") from None
            except DecryptionError:
                root = b"\0" * envelope.ROOT_KEY_SIZE  # fails the canary below: one message for both
            fmt = envelope.canary_format(root, canary)
            if fmt is None:
                self._reset()
                raise UnsealRefused(
                    "unseal_failed",
                    "the shares and passphrase do not open this vault (wrong passphrase, or shares of "
                    "another vault); progress was reset: enter the shares again",
                )
            self._unsealed(Keys.from_root(root, fmt))
            return UnsealResult(False, 0, "unsealed")

    def unseal_with_root(self, root: bytes, canary: bytes) -> bool:
        """Unseal with a root key the seal itself unwrapped (auto-unseal, recovery shares): only if it
        opens the stored canary. True when unsealed (or already)."""
        with self._lock:
            if self._keys is not None:
                return True
            fmt = envelope.canary_format(root, canary)
            if fmt is None:
                return False
            self._unsealed(Keys.from_root(root, fmt))
            return True

    # -- root key versions (the keyring of region-wrap keys; see crypto/seal.py) ------------------------
    def wrap_key(self, version: int, load: Callable[[], dict[int, bytes]]) -> bytes:
        """The region-wrap key of root key version ``version``; ``load()`` gives the stored versions
        (wrapped), read again when this one is not known yet (another replica rotated)."""
        keys = self.keys()
        if version == 1:
            return keys.region_wrap.reveal()
        got = self._wraps.get(version)
        if got is None:
            root = keys.root.reveal()
            for v, wrapped in load().items():
                if v not in self._wraps:
                    self._wraps[v] = SecretBytes(seal.unwrap_root_version(root, v, wrapped))
            got = self._wraps.get(version)
            if got is None:
                raise DecryptionError()
        return got.reveal()

    def adopted(self) -> None:
        """The legacy rows were adopted and the canary re-made in the current format."""
        with self._lock:
            if self._keys is not None:
                self._keys = replace(self._keys, canary_format=envelope.CANARY_FORMAT)

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._progress = None

    def seal(self) -> None:
        with self._lock:
            self._keys = None
            self._reset()
            self._region_keys.clear()
            self._wraps.clear()

    def region_key(
        self,
        region: str,
        version: int,
        wrapped: bytes,
        root_version: int = 1,
        load: Callable[[], dict[int, bytes]] = dict,
    ) -> bytes:
        """Unwrap a region key (cached: a (region, version) pair never changes its key, whatever root
        key version wraps it)."""
        cached = self._region_keys.get((region, version))
        if cached is not None:
            return cached.reveal()
        key = envelope.unwrap_region_key(self.wrap_key(root_version, load), region, version, wrapped)
        self._region_keys[(region, version)] = SecretBytes(key)
        return key
