"""Control-plane settings: flags of ``vault-edge server``, or ``VAULT_EDGE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAULT_EDGE_", extra="ignore")

    db: str | None = Field(None, description="database URL or SQLite path (default: per-user SQLite file)")
    host: str = "127.0.0.1"
    port: int = 8420
    dev: bool = False
    dev_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_value_bytes: int = 256 << 10
    default_grace_s: int = 86400  # how long `previous` stays readable after a rotation
    node_down_after_s: int = 90  # a node silent this long counts as down, not lagging
    sync_max_wait_s: int = 60
    # While sealed, agents' sync polls are held until the unseal (server/sealhold.py): at most this many
    # at once; past it, a 503 with this Retry-After (agents spread it over [N, 2N]).
    sealed_hold_max: int = Field(20000, ge=0)
    sealed_retry_after_s: int = Field(10, ge=1, le=3600)
    # An idle keep-alive connection is kept this long: every agent re-polls on its one connection right
    # after an answer, and a busy PoP (or a fleet re-polling at once) can take seconds to; closing it
    # sooner makes that re-poll fail and reconnect (uvicorn's default is 5 s).
    keep_alive_s: int = 75
    join_token_ttl_s: int = 3600
    # Enrolments in progress at once; past it, 503 with Retry-After at once (server/admission.py): an
    # admitted enrolment then waits at most this many enrolments' time, far inside the 60 s window
    # of a signed request's timestamp.
    enroll_max_in_flight: int = Field(32, ge=1)
    enroll_retry_after_s: int = Field(2, ge=1, le=3600)  # the Retry-After of that 503 (agents add jitter)
    # How long a small batch of node contacts waits for more before its commit (server/contacts.py): a
    # request that arrives alone is delayed by at most this; 0 commits each batch at once.
    contact_linger_ms: int = Field(20, ge=0, le=1000)
    scheduler_interval_s: float = 1.0
    min_rotate_every_s: int = 60  # the shortest --rotate-every accepted
    # The seal: "shamir" (operators enter shares) or "pkcs11" (auto-unseal through an HSM; the shares
    # become recovery shares). The PIN is never a setting: --pkcs11-pin-file, or VAULT_EDGE_PKCS11_PIN.
    seal: str = Field("shamir", pattern="^(shamir|pkcs11)$")
    pkcs11_lib: str | None = None
    pkcs11_slot: int | None = None
    pkcs11_key_label: str | None = None
    pkcs11_pin_file: str | None = None
    pkcs11_generate_key: bool = False  # make the AES key in the token when it is missing
    # Day-2 operations (README "Operating it"): /metrics behind a bearer token when set; audit sinks
    # beside the database (a JSON-lines file, appended and fsync'd; stdout); one line per HTTP request
    # only when asked (a long-poll per node per change is noise).
    metrics_token: str | None = None
    audit_file: str | None = None
    audit_stdout: bool = False
    access_log: bool = False
