"""API errors: one JSON shape, ``{"error": {"code": ..., "message": ...}}``, never a traceback.

The domain's own refusals (the barrier's :class:`~vault_edge.server.barrier.Sealed` and
:class:`~vault_edge.server.barrier.UnsealRefused`) are not HTTP types: ``answer_of`` maps them to
their answer here, at the edge (the app's exception handlers, the sync fast path)."""

from __future__ import annotations

from vault_edge.server.barrier import Sealed, UnsealRefused


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers  # sent with the error (e.g. Retry-After on a 503 ``overloaded``)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def unauthorized(message: str = "missing or invalid token") -> ApiError:
    return ApiError(401, "unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def sealed() -> ApiError:
    return ApiError(503, "sealed", "the vault is sealed: unseal it with `vault-edge unseal` (threshold shares)")


def answer_of(exc: Sealed | UnsealRefused) -> ApiError:
    """The HTTP answer to a refusal of the barrier: 503 ``sealed``, or an unseal refusal's 400."""
    if isinstance(exc, UnsealRefused):
        return ApiError(400, exc.code, exc.message)
    return sealed()


def not_initialized() -> ApiError:
    return ApiError(503, "not_initialized", "the vault is not initialized: run `vault-edge init`")


def body(status: int, code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}
