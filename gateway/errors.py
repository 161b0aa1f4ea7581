"""Client-facing errors in the OpenAI error shape (SPEC §8).

Every message here is written by us and never interpolates a key, an upstream
host or an internal model id.
"""

from __future__ import annotations

import json

from django.http import HttpResponse


class GatewayError(Exception):
    """A request that ends with a local error response.

    ``error_kind`` is the short machine name stored in ``gateway_usage``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str,
        code: str,
        error_kind: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.error_kind = error_kind or code

    def body(self) -> dict:
        return error_body(self.message, error_type=self.error_type, code=self.code)

    def response(self) -> HttpResponse:
        return json_response(self.body(), status=self.status)


def error_body(message: str, *, error_type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "code": code}}


def json_response(payload: object, *, status: int = 200) -> HttpResponse:
    return HttpResponse(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        status=status,
        content_type="application/json",
    )


def bad_request(message: str, *, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, error_type="invalid_request_error", code=code)


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Invalid or missing gateway token.",
        error_type="authentication_error",
        code="invalid_api_key",
    )


def model_not_found(public_model_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model {public_model_id!r} does not exist or is not available.",
        error_type="invalid_request_error",
        code="model_not_found",
    )


def unavailable(message: str, *, error_kind: str) -> GatewayError:
    return GatewayError(
        503, message, error_type="service_unavailable", code="unavailable", error_kind=error_kind
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500,
        "The gateway failed to handle this request.",
        error_type="server_error",
        code="internal_error",
    )


def usage_spool_full() -> GatewayError:
    """The usage spool is over its budget: a request taken now might go unrecorded."""
    return GatewayError(
        503,
        "The gateway cannot record more requests right now; retry shortly.",
        error_type="service_unavailable",
        code="usage_spool_full",
    )


def routing_unavailable() -> GatewayError:
    return unavailable(
        "Routing is temporarily unavailable; retry shortly.", error_kind="routing_unavailable"
    )


def upstream_unreachable() -> GatewayError:
    return GatewayError(
        502,
        "The model provider could not be reached.",
        error_type="upstream_error",
        code="upstream_unreachable",
    )


def upstream_malformed() -> GatewayError:
    return GatewayError(
        502,
        "The model provider returned a malformed response.",
        error_type="upstream_error",
        code="upstream_malformed",
    )


def upstream_cut() -> GatewayError:
    """The partner's response broke off after it had started."""
    return GatewayError(
        502,
        "The model provider ended the response early.",
        error_type="upstream_error",
        code="upstream_stream_cut",
    )


def upstream_too_large() -> GatewayError:
    return GatewayError(
        502,
        "The model provider returned a response larger than the gateway accepts.",
        error_type="upstream_error",
        code="upstream_too_large",
    )


def upstream_timeout() -> GatewayError:
    return GatewayError(
        504,
        "The model provider did not answer in time.",
        error_type="upstream_error",
        code="upstream_timeout",
    )


def body_too_large(limit: int) -> GatewayError:
    return bad_request(f"Request body is larger than {limit} bytes.", code="too_large")


def unknown_endpoint() -> GatewayError:
    return GatewayError(
        404,
        "Unknown endpoint. This gateway serves POST /v1/chat/completions, POST /v1/responses, "
        "POST /v1/messages, POST /v1/feedback and GET /v1/models.",
        error_type="invalid_request_error",
        code="unknown_endpoint",
    )


def method_not_allowed(allowed: tuple[str, ...]) -> GatewayError:
    return GatewayError(
        405,
        f"This endpoint accepts only {' and '.join(allowed)}.",
        error_type="invalid_request_error",
        code="method_not_allowed",
    )
