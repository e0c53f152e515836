"""
aiproxy's own answers, made the same way whichever door a request came by: its
endpoints (``/api/health``, ``/api/ping``; metrics and docs live in :mod:`aiproxy.ops`),
and the JSON body of its errors.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from aiproxy.access.limits import (
    CONCURRENT,
    DAILY_TOKENS,
    REQUESTS,
    TOKENS,
    Refusal,
    duration_text,
)
from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.interfaces import Endpoint, Incoming, LocalResponse, RawHeaders
from aiproxy.errors import (
    AccessRefused,
    ModelNotServed,
    NoUpstreamAvailable,
    ProxyError,
    api_error_body,
    error_body,
)

__all__ = [
    "OWN_METHODS",
    "access_refusal_response",
    "error_response",
    "health_document",
    "health_endpoint",
    "http_date",
    "json_response",
    "model_not_served_response",
    "no_upstream_response",
    "ping_endpoint",
    "rate_limit_response",
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


def rate_limit_response(refusal: Refusal, key_id: str, anthropic: bool) -> LocalResponse:
    """
    The ``429`` for a request over one of its key's limits: how long to wait
    (``Retry-After`` in whole seconds, ``retry-after-ms``) and, in the API's dialect,
    which limit, its figure, what is used and what was asked. An exhausted daily quota
    is ``insufficient_quota`` with ``x-should-retry: false``: waiting a moment is no use.
    """
    wait = max(refusal.wait, 0.001)
    daily = refusal.kind == DAILY_TOKENS
    message = (
        f"Rate limit reached for key {key_id!r} on {_LIMIT_NAMES[refusal.kind]}: limit"
        f" {refusal.limit}, used {refusal.used}, requested {refusal.requested}."
        f" Please try again in {duration_text(wait)}."
    )
    headers: RawHeaders = [
        (b"Retry-After", b"%d" % math.ceil(wait)),
        (b"retry-after-ms", b"%d" % math.ceil(wait * 1000)),
    ]
    if daily:
        headers.append((b"x-should-retry", b"false"))
    headers.append((b"Content-Type", JSON))
    if anthropic:
        document: dict[str, object] = {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": message},
        }
    else:
        code = "insufficient_quota" if daily else "rate_limit_exceeded"
        kind = "insufficient_quota" if daily else refusal.kind
        document = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return LocalResponse(429, headers, json.dumps(document).encode())


def model_not_served_response(model: str, anthropic: bool) -> LocalResponse:
    """The ``404`` for a model no upstream of ``UPSTREAMS_FILE`` serves, in the API's
    dialect (OpenAI's ``code: "model_not_found"``); a long name is cut short."""
    shown = model if len(model) <= 100 else model[:100] + "..."
    refusal = ModelNotServed(
        f"The model {shown!r} is not served by this proxy.", "model_not_found", "model"
    )
    return access_refusal_response(refusal, anthropic)


def no_upstream_response(request_id: bytes, wait: float) -> LocalResponse:
    """The ``503 upstream_unavailable`` when every upstream that serves a request is
    unavailable; ``Retry-After`` is ``wait`` rounded up (none if it is infinite: every
    key disabled until the file is reloaded)."""
    error = NoUpstreamAvailable(
        "every upstream that serves this request is unavailable for now (cooling down"
        " after 429s, failing, or its keys refused); retry later"
    )
    response = error_response(error, request_id)
    if wait != math.inf:
        response.headers.append((b"Retry-After", b"%d" % max(1, math.ceil(wait))))
    return response


_LIMIT_NAMES = {
    REQUESTS: "requests per minute (RPM)",
    TOKENS: "tokens per minute (TPM)",
    DAILY_TOKENS: "tokens per day (TPD)",
    CONCURRENT: "requests at once",
}


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


def health_endpoint(
    config: Config,
    activity: Activity,
    redis: Callable[[], str] | None = None,
    upstreams: Callable[[], list[dict[str, object]]] | None = None,
) -> Endpoint:
    """
    ``GET /api/health``: the proxy is up, and where it sends requests. ``503`` with
    ``"status": "draining"`` once a graceful shutdown has begun, so that a load
    balancer that still reaches this process takes it out of rotation. With ``redis``
    (the per-key limits are in Redis), ``"redis"`` says what it last did: ``reachable``,
    ``unreachable`` or ``unused`` (not asked yet). With ``upstreams`` (several, from
    ``UPSTREAMS_FILE``), ``"upstreams"`` gives each one's state and its keys'
    (see :meth:`aiproxy.routing.choose.Router.report`).
    """
    healthy = health_document(config)
    draining = health_document(config, draining=True)

    def health(request: Incoming) -> LocalResponse:
        document = draining if activity.draining else healthy
        if redis is not None:
            document = {**document, "redis": redis()}
        if upstreams is not None:
            document = {**document, "upstreams": upstreams()}
        return json_response(document, 503 if activity.draining else 200)

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
