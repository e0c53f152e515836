"""
The errors aiproxy answers for itself, and the one mapping from a failure to a status
and JSON body.

Every error response has the body ``{"error": {"type", "message", "request_id"}}``.
"""

from __future__ import annotations

import json
from typing import ClassVar

from OpenSSL.SSL import Error as TLSError
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from aiproxy.rules.redact import redact_text
from aiproxy.rules.retry import ReusedConnectionFailed

__all__ = [
    "BadRequestTarget",
    "BodyTooLarge",
    "ClientTooSlow",
    "HeadTooLarge",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "OriginNotAllowed",
    "Overloaded",
    "ProxyError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "WebSocketNotSupported",
    "describe_exception",
    "error_body",
    "failure_kind",
    "upstream_error",
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
    """The client asked to upgrade to WebSocket, which aiproxy does not tunnel yet."""

    status = 501
    type = "websocket_not_supported"


class Overloaded(ProxyError):
    """``MAX_CONCURRENT_REQUESTS`` proxied requests are already in flight."""

    status = 503
    type = "overloaded"
    headers = ((b"Retry-After", b"1"),)


class UpstreamUnreachable(ProxyError):
    """The upstream could not be reached, or failed before sending response headers."""

    status = 502
    type = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream sent no response headers within ``REQUEST_TIMEOUT``."""

    status = 504
    type = "upstream_timeout"


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


_CONNECT_FAILURES = (
    neterror.ConnectError,
    neterror.DNSLookupError,
    neterror.TimeoutError,
    TLSError,
)
_EXCHANGE_FAILURES = (
    ReusedConnectionFailed,
    ResponseNeverReceived,
    ResponseFailed,
    _newclient.RequestTransmissionFailed,
    _newclient.RequestNotSent,
    neterror.ConnectionLost,
    neterror.ConnectionDone,
    CancelledError,
)


def upstream_error(failure: Failure) -> ProxyError:
    """
    What the client is told when the upstream request failed before response headers.

    A :class:`ProxyError` (such as our own timeout) passes through; network and TLS
    failures become ``502``; anything else is a bug, ``500``.
    """
    if isinstance(failure.value, ProxyError):
        return failure.value
    if failure.check(*_CONNECT_FAILURES):
        reason = describe_exception(failure.value)
        return UpstreamUnreachable(f"cannot connect to the upstream: {reason}")
    if failure.check(*_EXCHANGE_FAILURES):
        return UpstreamUnreachable(
            f"the upstream failed before responding: {describe_exception(failure.value)}"
        )
    return InternalError("aiproxy failed to handle this request")


def failure_kind(failure: Failure) -> str:
    """
    A short name for what went wrong with an upstream request before its response
    headers, from a small fixed set (a metrics label): ``timeout``, ``dns``, ``tls``,
    ``connect``, ``connection_lost`` or ``internal``.
    """
    if failure.check(UpstreamTimeout):
        return "timeout"
    reasons = getattr(failure.value, "reasons", None)  # twisted's wrapped failures
    if reasons and isinstance(reasons[0], Failure):
        inner = failure_kind(reasons[0])
        if inner != "internal":
            return inner
    if failure.check(neterror.DNSLookupError):
        return "dns"
    if failure.check(TLSError):
        return "tls"
    if failure.check(*_CONNECT_FAILURES):
        return "connect"
    if failure.check(*_EXCHANGE_FAILURES):
        return "connection_lost"
    return "internal"


def describe_exception(exception: BaseException | None) -> str:
    """
    A one-line description of an exception, unwrapping twisted's lists of reasons, with
    any secret in it redacted (:func:`aiproxy.rules.redact.redact_text`): it is logged, and
    sent to the client.
    """
    reasons = getattr(exception, "reasons", None)
    if reasons:
        return "; ".join(describe_exception(reason.value) for reason in reasons)
    text = str(exception).strip()
    if not text:
        return type(exception).__name__
    return f"{type(exception).__name__}: {redact_text(text)}"
