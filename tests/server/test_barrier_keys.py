"""The control plane's ``Keys`` (server/barrier.py) never print or pickle their key material."""

from __future__ import annotations

import pickle

import pytest

from tests.crypto.test_secret import _assert_hidden
from vault_edge.crypto import envelope, signing
from vault_edge.server.barrier import Keys


def test_control_plane_keys_print_no_key_material() -> None:
    root = bytes(range(32))
    keys = Keys.from_root(root)
    hidden = [root, envelope.region_wrap_key(root), envelope.audit_key(root), envelope.signing_seed(root)]
    for text in (repr(keys), str(keys), f"{keys}", repr([keys])):
        _assert_hidden(text, *hidden)
    assert keys.server_public == signing.public_of(envelope.signing_seed(root))


def test_control_plane_keys_refuse_pickling() -> None:
    keys = Keys.from_root(bytes(range(32)))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(keys, protocol=protocol)
