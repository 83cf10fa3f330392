"""Typed gateway errors and their OpenAI-shaped bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from common.wire import error_body


class GatewayError(RuntimeError):
    """An error the client sees; `status`, `type` and `code` follow the OpenAI API."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self):
        """The error as a JSON answer (starlette is imported here: the errors are raised by modules that stay
        free of the web stack, gateway.router's import included)."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# the statuses the gateway answers with, each declared in the OpenAPI schema in the error shape
# (common.http.ERROR_JSON)
ERROR_STATUSES = {
    400: "a malformed request",
    401: "no or a wrong API key",
    403: "a model the key may not use",
    404: "an unknown model or route, or a stored response (none are stored)",
    405: "a method the route does not take",
    413: "a body over the limit",
    429: "over the key's rate limit",
    500: "a bug (no details)",
    502: "the node failed",
    503: "no node, no outbox, no valid price, or a base this gateway cannot tokenize",
}


class BadRequest(GatewayError, ValueError):
    status, type, code = 400, "invalid_request_error", None


class GrammarFailed(BadRequest):
    """The request's own grammar failed it after its first token (the node's word, believed of a guided request):
    a stream's tokens, sent, are billed; a whole answer's, never sent, are not (gateway.request)."""

    code = "grammar_failed"


class AuthError(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "forbidden"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class ResponseNotStored(GatewayError):
    status, type, code = 404, "invalid_request_error", "response_not_found"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class NoNodeAvailable(GatewayError):
    status, type, code = 503, "service_unavailable", "no_node_available"


class UpstreamError(GatewayError):
    """A node failed in a way another node cannot fix (or after the first token)."""

    status, type, code = 502, "upstream_error", "node_error"


class PriceExceedsLimit(GatewayError):
    """The adapter's price per 1,000 tokens is above the key's maximum."""

    status, type, code = 403, "permission_error", "price_exceeds_key_limit"


class PriceUnavailable(GatewayError):
    """The model's price is no price a chain holds (below 0 or from 2**256), or one a gateway with a chain has
    not read yet: nothing to check the key's limit against, nor to bound its usage records by."""

    status, type, code = 503, "service_unavailable", "price_unavailable"


class RateLimitsUnavailable(GatewayError):
    """The shared rate-limit buckets cannot be read or written: a limited key is not let through unchecked."""

    status, type, code = 503, "service_unavailable", "rate_limits_unavailable"


class OutboxUnavailable(GatewayError):
    """The usage outbox cannot be written: nothing is served that could not be recorded."""

    status, type, code = 503, "service_unavailable", "outbox_unavailable"


class BaseNotConfigured(GatewayError):
    """The gateway cannot count tokens for this base model (it lacks the base's tokenizer)."""

    status, type, code = 503, "service_unavailable", "base_not_configured"
