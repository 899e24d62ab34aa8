"""Request bodies of the operator API (pydantic): validated at the edge, unknown fields refused."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from vault_edge import wire
from vault_edge.durations import MAX_SECONDS, parse_duration


def seconds(value: str | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 15m")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SECONDS:
            raise ValueError(f"a duration is between 0 and {MAX_SECONDS} seconds (10 years)")
        return value
    return parse_duration(value)


def _to_seconds(value: Any) -> Any:
    if isinstance(value, (str, int)):
        return seconds(value)
    return value  # anything else fails the int check below, with pydantic's message


# A duration as operators type it ("15m", "1h30m") or a number of seconds: parsed once, at the edge,
# into seconds (handlers get an int).
Duration = Annotated[
    int,
    BeforeValidator(_to_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "examples": ["15m", "1h30m", "7d"]},
                {"type": "integer", "minimum": 0, "maximum": MAX_SECONDS},
            ]
        }
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShareGroup(Strict):
    threshold: int = Field(ge=1, le=16)
    shares: int = Field(ge=1, le=16)


class InitRequest(Strict):
    shares: int = Field(5, ge=1, le=16)
    threshold: int = Field(3, ge=1, le=16)
    groups: list[ShareGroup] | None = Field(None, min_length=1, max_length=16)
    group_threshold: int = Field(1, ge=1, le=16)
    passphrase: str = Field("", max_length=256)


class UnsealRequest(Strict):
    share: str | None = Field(None, max_length=1024)
    passphrase: str | None = Field(None, max_length=256)
    reset: bool = False


class RegionCreate(Strict):
    name: str = Field(max_length=63)


class ValueFields(Strict):
    value: str | None = Field(None, description="the value, as UTF-8 text")
    value_b64: str | None = Field(None, description="the value, base64url (for binary values)")
    generate: str | None = Field(None, max_length=64, description="LENGTH:ALPHABET, e.g. 32:base64url")
    grace: Duration | None = Field(None, description="how long `previous` stays readable (e.g. 1h)")

    def value_bytes(self) -> bytes | None:
        if self.value is not None and self.value_b64 is not None:
            raise ValueError("give value or value_b64, not both")
        if self.value_b64 is not None:
            return wire.b64d(self.value_b64)
        return self.value.encode() if self.value is not None else None


class PutSecret(ValueFields):
    regions: list[str] | None = Field(None, max_length=256)
    rotate_every: Duration | None = None
    rotator: str | None = Field(None, max_length=64, description="the rotator that keeps it at its source")

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: list[str] | None) -> list[str] | None:
        for r in v or []:
            if r != "*" and not wire.valid_region(r.strip()):
                raise ValueError("regions: region names (lowercase letters, digits, '-'), or '*' alone")
        return v


class RotateRequest(ValueFields):
    stage: Literal["current", "pending"] = "current"


class PromoteRequest(Strict):
    grace: Duration | None = None


class RollbackRequest(PromoteRequest):
    to: int = Field(ge=1, le=2**31)


class JoinTokenRequest(Strict):
    region: str = Field(max_length=63)
    ttl: Duration | None = None


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:\-]+$")
    prefixes: list[str] = Field(min_length=1, max_length=64)
    verbs: list[Literal["read", "list", "write", "delete", "admin"]] = Field(min_length=1)
    ttl: Duration | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "root":
            raise ValueError("the name 'root' is the init token's alone")
        return v

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not wire.valid_prefix(p):
                raise ValueError("a prefix is the start of a secret name: letters, digits, '_', '.', '-', '/'")
        return v


class SharesRequest(Strict):
    """A threshold of the current (recovery) shares, at once: what generate-root, rekey and
    seal-migrate take as authority."""

    shares: list[str] = Field(min_length=1, max_length=64)
    passphrase: str | None = Field(None, max_length=256)

    @field_validator("shares")
    @classmethod
    def _bounded(cls, value: list[str]) -> list[str]:
        if any(len(s) > 1024 for s in value):
            raise ValueError("a share is at most 1024 characters")
        return value


class RekeyRequest(SharesRequest):
    new_shares: int = Field(5, ge=1, le=16)
    new_threshold: int = Field(3, ge=1, le=16)
    groups: list[ShareGroup] | None = Field(None, min_length=1, max_length=16)
    group_threshold: int = Field(1, ge=1, le=16)
    new_passphrase: str = Field("", max_length=256)


class SealMigrateRequest(SharesRequest):
    to: Literal["shamir", "pkcs11"]


class RotatorCreate(Strict):
    type: Literal["postgres", "mysql", "redis", "webhook"]
    admin_secret: str = Field(max_length=256, description="the secret (in no region) holding its admin credential")
    admin_value: dict[str, Any] | None = Field(None, description="the admin credential, stored in admin_secret")
    config: dict[str, Any] = Field(default_factory=dict, description="host, port, strategy, usernames, calls...")

    @field_validator("admin_value", "config")
    @classmethod
    def _small(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(json.dumps(v)) > 16384:
            raise ValueError("at most 16 KiB")
        return v
