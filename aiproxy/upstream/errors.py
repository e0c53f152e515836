"""
How an upstream request can fail: one exception class per thing the proxy must tell
apart (whether it may retry, what it answers, which metrics label it counts under).
The core maps them to statuses in one place (:mod:`aiproxy.core.failures`).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadResponse",
    "BodyIncomplete",
    "ConnectFailed",
    "LostBeforeResponse",
    "StaleConnection",
    "UpstreamFailure",
]


class UpstreamFailure(Exception):
    """An upstream request failed; the message says how, with no secret in it."""

    kind: str = "connection_lost"
    """The metrics label (``aiproxy_upstream_errors_total{kind=...}``)."""


class ConnectFailed(UpstreamFailure):
    """
    No connection could be made: refused, unreachable, ``CONNECT_TIMEOUT``, a name
    that does not resolve (``kind`` ``dns``), or a TLS handshake that failed (``kind``
    ``tls``, for instance a certificate that does not verify). Nothing was sent.
    """

    KINDS: ClassVar[frozenset[str]] = frozenset({"connect", "dns", "tls"})

    def __init__(self, message: str, kind: str = "connect") -> None:
        super().__init__(message)
        assert kind in self.KINDS, kind
        self.kind = kind


class StaleConnection(UpstreamFailure):
    """
    A kept-alive connection, reused for this request, was closed or reset by the
    upstream before any byte of the response: the keep-alive race, in which the
    upstream never saw the request.
    """


class LostBeforeResponse(UpstreamFailure):
    """
    A new connection was lost after the request was (partly) sent and before the
    whole response head arrived: the upstream may have started working on it.
    """


class BadResponse(UpstreamFailure):
    """
    The upstream's response head is not one the proxy will relay: malformed, over
    the size or line limits, a control byte in its status line or a field value, too
    many ``1xx`` responses, or a ``101`` nobody asked for.
    """

    kind = "invalid_response"


class BodyIncomplete(UpstreamFailure):
    """The response body ended before its framing said it would, or broke its framing."""

    kind = "body_incomplete"
