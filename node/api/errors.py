"""The node API's errors: ApiError (answered in common.wire.error_body's shape by the handler in main.py), the
status of each engine refusal, and one line for a body pydantic refused."""

from __future__ import annotations

from node.engine import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterSlotsBusyError,
    AdapterStoreFullError,
)


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} (and `extra` beside it)."""

    def __init__(self, status: int, message: str, code: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def adapter_error(e: AdapterError) -> ApiError:
    """The answer to an adapter the engine could not prepare."""
    if isinstance(e, AdapterNotFoundError):
        return ApiError(404, str(e), "adapter_not_found")
    if isinstance(e, AdapterBaseMismatchError):
        return ApiError(409, str(e), "adapter_base_mismatch")
    if isinstance(e, AdapterSlotsBusyError):
        return ApiError(503, str(e), "slots_busy")
    if isinstance(e, AdapterStoreFullError):  # busy with what it holds: another node, or later, may serve it
        return ApiError(503, str(e), "store_full")
    if isinstance(e, AdapterIncompatibleError):
        return ApiError(422, str(e), "adapter_incompatible")
    return ApiError(500, str(e), "adapter_error")


def validation_message(errors: list[dict], *, located_in: tuple[str, ...] = ()) -> str:
    """One line for the first of pydantic's errors (a RequestValidationError's or a ValidationError's)."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in located_in)
    if err.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}"
    if err.get("type") == "missing" and not loc:
        return "request body is missing; expected a JSON object"
    if err.get("type") == "model_type":
        return "request body must be a JSON object"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
