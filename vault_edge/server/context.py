"""What every operation needs: storage, the seal, the audit log, settings and a clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vault_edge.server.audit import Auditor
from vault_edge.server.barrier import Barrier
from vault_edge.server.settings import Settings
from vault_edge.server.storage.repo import Store


@dataclass
class Context:
    store: Store
    barrier: Barrier
    settings: Settings
    clock: Callable[[], float] = field(default=time.time)
    auditor: Auditor = field(init=False)
    hsm: Any = None  # server.hsm.Pkcs11Seal with --seal pkcs11
    seal_error: str | None = None  # why auto-unseal failed (shown by status)

    def __post_init__(self) -> None:
        self.store.bind_keys(self.barrier.row_keys)  # the repository MACs and checks rows with them
        self.auditor = Auditor(self.store, self.barrier, self.clock)
