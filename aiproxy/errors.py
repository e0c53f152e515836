"""
The errors aiproxy answers for itself, and their JSON body. (Which upstream failure
becomes which of them is decided in one place: :mod:`aiproxy.core.failures`.)

Every error response has the body ``{"error": {"type", "message", "request_id"}}``.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "AccessRefused",
    "BadRequestTarget",
    "BodyTooLarge",
    "BodyUncheckable",
    "ClientTooSlow",
    "ConflictingKeys",
    "HeadTooLarge",
    "InternalError",
    "InvalidRequest",
    "KeyNotPermitted",
    "KeyRefused",
    "MethodNotAllowed",
    "ModelNotServed",
    "NoUpstreamAvailable",
    "OriginNotAllowed",
    "Overloaded",
    "ProxyError",
    "RateLimiterUnavailable",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "WebSocketNotSupported",
    "api_error_body",
    "error_body",
]


class ProxyError(Exception):
    """An error aiproxy answers itself: a status, a machine-readable type, a message."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()
    """Response headers that come with this error, such as ``Retry-After``."""

    @property
    def message(self) -> str:
        """The human-readable explanation sent to the client."""
        return str(self)


class InternalError(ProxyError):
    """A bug in aiproxy; the log has the traceback."""


class BadRequestTarget(ProxyError):
    """The request target is not a path on this server (absolute-form, ``//``, ``@``...)."""

    status = 400
    type = "invalid_request_target"


class MethodNotAllowed(ProxyError):
    """The method cannot be proxied (``CONNECT``)."""

    status = 405
    type = "method_not_allowed"


class OriginNotAllowed(ProxyError):
    """A CORS preflight from an origin that is not in ``CORS_ORIGINS``."""

    status = 403
    type = "origin_not_allowed"


class InvalidRequest(ProxyError):
    """The request is not valid HTTP/1.1, or its body's framing is ambiguous."""

    status = 400
    type = "invalid_request"


class ClientTooSlow(ProxyError):
    """The client sent its request head, or its body, too slowly."""

    status = 408
    type = "request_timeout"


class BodyTooLarge(ProxyError):
    """The request body is larger than ``MAX_BODY_SIZE``."""

    status = 413
    type = "request_too_large"


class HeadTooLarge(ProxyError):
    """The request head is over 64 KiB, or has too many header lines."""

    status = 431
    type = "request_header_too_large"


class WebSocketNotSupported(ProxyError):
    """The client asked to upgrade to WebSocket through a door that cannot tunnel."""

    status = 501
    type = "websocket_not_supported"


class Overloaded(ProxyError):
    """``MAX_CONCURRENT_REQUESTS`` proxied requests are already in flight."""

    status = 503
    type = "overloaded"
    headers = ((b"Retry-After", b"1"),)


class RateLimiterUnavailable(ProxyError):
    """The per-key limits cannot be checked (Redis does not answer) and the policy is
    ``RATE_LIMIT_ON_REDIS_ERROR=closed``."""

    status = 503
    type = "rate_limiter_unavailable"
    headers = ((b"Retry-After", b"1"),)


class UpstreamUnreachable(ProxyError):
    """The upstream could not be reached, or failed before sending response headers."""

    status = 502
    type = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream sent no response headers within ``REQUEST_TIMEOUT``."""

    status = 504
    type = "upstream_timeout"


class NoUpstreamAvailable(ProxyError):
    """Every upstream of ``UPSTREAMS_FILE`` that serves the request is cooling down,
    ejected, or has every key refused (its response says how long to wait)."""

    status = 503
    type = "upstream_unavailable"


def error_body(error: ProxyError, request_id: bytes) -> bytes:
    """The JSON body of an error response."""
    return json.dumps(
        {
            "error": {
                "type": error.type,
                "message": error.message,
                "request_id": request_id.decode("ascii", "replace"),
            }
        }
    ).encode()


class AccessRefused(ProxyError):
    """
    A request refused for its access key, answered in the API's own dialect (see
    :func:`api_error_body`), with ``x-should-retry: false`` so that SDKs do not retry.
    The message never quotes the key.

    @ivar code: the machine-readable ``code`` of an OpenAI-shaped body.
    @ivar reason: why, for metrics and the log (``unknown``, ``expired``, ``model``...).
    @ivar key_id: the id of the key presented, when it was found in the key file.
    """

    headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ((b"x-should-retry", b"false"),)

    def __init__(self, message: str, code: str, reason: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.key_id = key_id


class KeyRefused(AccessRefused):
    """No access key, or one that is unknown, disabled, expired or not yet valid."""

    status = 401
    type = "authentication_error"
    headers = ((b"WWW-Authenticate", b'Bearer realm="aiproxy"'), (b"x-should-retry", b"false"))


class KeyNotPermitted(AccessRefused):
    """A valid access key that may not be used for this path or model."""

    status = 403
    type = "permission_error"


class ConflictingKeys(AccessRefused):
    """A request that presents two different access keys."""

    status = 400
    type = "invalid_request_error"


class BodyUncheckable(AccessRefused):
    """A key limited to some models, and a body too large to read for its model."""

    status = 413
    type = "request_too_large"


class ModelNotServed(AccessRefused):
    """No upstream of ``UPSTREAMS_FILE`` serves the model the request names."""

    status = 404
    type = "invalid_request_error"


def api_error_body(error: AccessRefused, anthropic: bool) -> bytes:
    """
    The JSON body of an access refusal: Anthropic's shape
    (``{"type": "error", "error": {"type", "message"}}``) when ``anthropic``, else
    OpenAI's (``{"error": {"message", "type", "param", "code"}}``).
    """
    if anthropic:
        document: dict[str, object] = {
            "type": "error",
            "error": {"type": error.type, "message": error.message},
        }
    else:
        document = {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": None,
                "code": error.code,
            }
        }
    return json.dumps(document).encode()
