"""Request bodies of the operator API (pydantic): validated at the edge, unknown fields refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vault_edge import wire
from vault_edge.durations import parse_duration

Duration = str | int


def seconds(value: Duration | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    return parse_duration(value)


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

    @field_validator("grace")
    @classmethod
    def _grace(cls, v: Duration | None) -> Duration | None:
        seconds(v)
        return v


class PutSecret(ValueFields):
    regions: list[str] | None = Field(None, max_length=256)
    rotate_every: Duration | None = None

    @field_validator("rotate_every")
    @classmethod
    def _every(cls, v: Duration | None) -> Duration | None:
        seconds(v)
        return v


class RotateRequest(ValueFields):
    stage: Literal["current", "pending"] = "current"


class PromoteRequest(Strict):
    grace: Duration | None = None


class RollbackRequest(Strict):
    to: int = Field(ge=1, le=2**31)
    grace: Duration | None = None


class JoinTokenRequest(Strict):
    region: str = Field(max_length=63)
    ttl: Duration | None = None

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: Duration | None) -> Duration | None:
        seconds(v)
        return v


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    prefixes: list[str] = Field(min_length=1, max_length=64)
    verbs: list[Literal["read", "list", "write", "delete", "admin"]] = Field(min_length=1)
    ttl: Duration | None = None
