"""Auto-unseal through an HSM over PKCS#11 (``vault-edge server --seal pkcs11``).

The HSM holds a non-extractable AES-256 key (found by its label, in the token of one slot); the root
key is stored in the database wrapped by it with CKM_AES_GCM, the associated data binding the vault's
identity and the key's label (``crypto.seal.root_ad``). The key never leaves the token: the HSM does
that AEAD, so this is the one place crypto runs outside ``cryptography``. Stored layout::

    0x01 | nonce (12 bytes) | ciphertext | tag (16 bytes)

The nonce is random (96 bits; this key wraps a handful of root keys in its life). ``python-pkcs11``
is imported only here, and only with ``--seal pkcs11``. A session is opened per operation, so an HSM
restarted meanwhile costs nothing but that operation. The PIN comes from a file or the environment,
never the command line, and is never logged, put in an error or a repr.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

VERSION = 1
NONCE_SIZE = 12
PIN_ENV = "VAULT_EDGE_PKCS11_PIN"


class SealError(Exception):
    """The HSM could not wrap or unwrap: the message says why, never the PIN or a key."""


def read_pin(pin_file: str | None) -> str:
    if pin_file:
        try:
            pin = Path(pin_file).read_text().strip("\r\n")
        except OSError as exc:
            raise SealError(f"cannot read the PKCS#11 PIN file {pin_file}: {exc.strerror}") from None
    else:
        pin = os.environ.get(PIN_ENV, "")
    if not pin:
        raise SealError(f"no PKCS#11 PIN: give --pkcs11-pin-file FILE or set {PIN_ENV}")
    return pin


class Pkcs11Seal:
    """The HSM key that wraps the root key. Repr shows where it is, never the PIN."""

    def __init__(self, lib_path: str, slot: int, key_label: str, pin: str, generate: bool = False) -> None:
        self.lib_path, self.slot, self.key_label = lib_path, slot, key_label
        self._pin = pin
        self._generate = generate
        self._lib: Any = None

    def __repr__(self) -> str:
        return f"Pkcs11Seal(lib={self.lib_path!r}, slot={self.slot}, key_label={self.key_label!r})"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("Pkcs11Seal cannot be pickled")

    def describe(self) -> str:
        return f"key {self.key_label!r} in the token of slot {self.slot} ({self.lib_path})"

    def _token(self) -> Any:
        try:
            import pkcs11
        except ImportError:
            raise SealError("--seal pkcs11 needs python-pkcs11: pip install python-pkcs11") from None
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.lib_path)
            except Exception as exc:
                raise SealError(f"cannot load the PKCS#11 library {self.lib_path}: {type(exc).__name__}") from None
        try:
            for slot in self._lib.get_slots(token_present=True):
                if slot.slot_id == self.slot:
                    return slot.get_token()
        except pkcs11.PKCS11Error as exc:
            raise SealError(f"the PKCS#11 library failed listing slots: {type(exc).__name__}") from None
        raise SealError(f"no token in PKCS#11 slot {self.slot} ({self.lib_path})")

    def _run(self, op: str, fn: Any) -> Any:
        import pkcs11
        from pkcs11 import exceptions as px

        token = self._token()
        try:
            with token.open(user_pin=self._pin, rw=self._generate) as session:
                return fn(session, self._key(session))
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange):
            raise SealError(f"the HSM refused the PIN for slot {self.slot}") from None
        except px.PinLocked:
            raise SealError(f"the PIN of the token in slot {self.slot} is locked") from None
        except SealError:
            raise
        except pkcs11.PKCS11Error as exc:
            raise SealError(f"the HSM failed to {op} ({type(exc).__name__}) with {self.describe()}") from None

    def _key(self, session: Any) -> Any:
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11 import exceptions as px

        try:
            return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=self.key_label)
        except px.NoSuchKey:
            if not self._generate:
                raise SealError(
                    f"no AES key labelled {self.key_label!r} in the token of slot {self.slot} "
                    "(make one, or start once with --pkcs11-generate-key)"
                ) from None
        except px.MultipleObjectsReturned:
            raise SealError(f"more than one AES key labelled {self.key_label!r} in slot {self.slot}") from None
        return session.generate_key(
            KeyType.AES,
            256,
            label=self.key_label,
            store=True,
            template={
                Attribute.TOKEN: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.PRIVATE: True,
            },
        )

    def check(self) -> None:
        """Reach the key (log in, find it, or make it with --pkcs11-generate-key)."""
        self._run("find the key", lambda _s, _k: None)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        nonce = secrets.token_bytes(NONCE_SIZE)

        def enc(_session: Any, key: Any) -> bytes:
            ct = key.encrypt(
                plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, associated_data, 128)
            )
            return bytes([VERSION]) + nonce + bytes(ct)

        return bytes(self._run("wrap the root key", enc))

    def decrypt(self, blob: bytes, associated_data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as px
        from pkcs11.mechanisms import GCMParams

        if len(blob) < 1 + NONCE_SIZE + 16 or blob[0] != VERSION:
            raise SealError("the stored HSM-wrapped root key is malformed")
        nonce, ct = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]

        def dec(_session: Any, key: Any) -> bytes:
            try:
                return bytes(
                    key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, associated_data, 128))
                )
            except (
                px.EncryptedDataInvalid,
                px.EncryptedDataLenRange,
                px.GeneralError,
                px.FunctionFailed,
                px.DataInvalid,
            ):
                raise SealError(
                    f"the HSM key does not open this vault's wrapped root key ({self.describe()}: "
                    "another token or key, or the wrapped key was altered)"
                ) from None

        return bytes(self._run("unwrap the root key", dec))


def from_settings(settings: Any) -> Pkcs11Seal:
    missing = [
        f
        for f, v in (
            ("--pkcs11-lib", settings.pkcs11_lib),
            ("--pkcs11-slot", settings.pkcs11_slot),
            ("--pkcs11-key-label", settings.pkcs11_key_label),
        )
        if v in (None, "")
    ]
    if missing:
        raise SealError("--seal pkcs11 needs " + ", ".join(missing))
    return Pkcs11Seal(
        settings.pkcs11_lib,
        int(settings.pkcs11_slot),
        settings.pkcs11_key_label,
        read_pin(settings.pkcs11_pin_file),
        settings.pkcs11_generate_key,
    )
