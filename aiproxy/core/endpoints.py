"""
aiproxy's own answers, made the same way whichever door a request came by: its
endpoints (``/api/health``, ``/api/ping``; metrics and docs live in :mod:`aiproxy.ops`),
and the JSON body of its errors.
"""

from __future__ import annotations

import json
import time

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.interfaces import Endpoint, Incoming, LocalResponse, RawHeaders
from aiproxy.errors import AccessRefused, ProxyError, api_error_body, error_body

__all__ = [
    "OWN_METHODS",
    "access_refusal_response",
    "error_response",
    "health_document",
    "health_endpoint",
    "http_date",
    "json_response",
    "ping_endpoint",
]

OWN_METHODS = (b"GET", b"HEAD")
"""The methods aiproxy's own endpoints answer; others get ``405``."""

JSON = b"application/json"


def json_response(document: object, status: int = 200) -> LocalResponse:
    """``document`` as a JSON response that no cache keeps."""
    return LocalResponse(
        status,
        [(b"Content-Type", JSON), (b"Cache-Control", b"no-store")],
        json.dumps(document).encode(),
    )


def error_response(error: ProxyError, request_id: bytes) -> LocalResponse:
    """The response for ``error``: its status, its headers and the JSON error body."""
    headers: RawHeaders = [*error.headers, (b"Content-Type", JSON)]
    return LocalResponse(error.status, headers, error_body(error, request_id))


def access_refusal_response(error: AccessRefused, anthropic: bool) -> LocalResponse:
    """The response for an access refusal, in Anthropic's dialect when ``anthropic``,
    else OpenAI's (see :func:`aiproxy.errors.api_error_body`)."""
    headers: RawHeaders = [*error.headers, (b"Content-Type", JSON)]
    return LocalResponse(error.status, headers, api_error_body(error, anthropic))


def health_document(config: Config, draining: bool = False) -> dict[str, object]:
    """What ``/api/health`` says: the status and the live upstream settings."""
    timeout = config.request_timeout
    return {
        "status": "draining" if draining else "healthy",
        "target_url": config.target_url,
        "timeout": int(timeout) if timeout.is_integer() else timeout,
        "ssl_verify": config.ssl_verify,
        "auth": "access_keys" if config.access_keys_file else "none",
    }


def health_endpoint(config: Config, activity: Activity) -> Endpoint:
    """
    ``GET /api/health``: the proxy is up, and where it sends requests. ``503`` with
    ``"status": "draining"`` once a graceful shutdown has begun, so that a load
    balancer that still reaches this process takes it out of rotation.
    """
    healthy = health_document(config)
    draining = health_document(config, draining=True)

    def health(request: Incoming) -> LocalResponse:
        if activity.draining:
            return json_response(draining, 503)
        return json_response(healthy)

    return health


def ping_endpoint() -> Endpoint:
    """``GET /api/ping``: the cheapest possible liveness check."""
    pong = json_response({"ping": "pong"})

    def ping(request: Incoming) -> LocalResponse:
        return pong

    return ping


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _HTTPDate:
    """Formats a time as an HTTP date, reusing the last result within the same second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def __call__(self, now: float) -> bytes:
        """``now`` as an HTTP date: ``Thu, 03 Dec 2026 09:20:19 GMT``."""
        second = int(now)
        if second != self._second:
            t = time.gmtime(second)
            self._second = second
            self._text = (
                f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year}"
                f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
            ).encode("ascii")
        return self._text


http_date = _HTTPDate()
"""``http_date(seconds)``: the ``Date`` header value for a time."""
