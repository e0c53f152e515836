"""
The request class of aiproxy's site: request IDs, timing headers and the per-request
log lines, for every response the proxy sends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from aiproxy._version import __version__
from aiproxy.activity import Activity
from aiproxy.errors import InternalError, ProxyError, error_body
from aiproxy.headers import choose_request_id
from aiproxy.streaming import abort_response

__all__ = ["ProxyRequest", "client_ip", "send_error"]

PROXY_BY = f"aiproxy/{__version__}".encode()

log = Logger(namespace="aiproxy")


def client_ip(request: Request) -> bytes | None:
    """The peer's IP address as bytes; L{None} for a peer without one (a UNIX socket)."""
    host = getattr(request.getClientAddress(), "host", None)
    return host.encode("ascii") if isinstance(host, str) else None


class ProxyRequest(Request):
    """
    A :class:`twisted.web.server.Request` that stamps and logs every response.

    Each response carries ``X-Request-ID`` (the client's if it is a sane token, else a
    new one), ``X-Process-Time`` (seconds from the request's arrival to its response
    headers) and ``X-Proxy-By``. A start line and a completion line are logged per
    request.
    """

    # A proxied response has the upstream's Content-Type, or none: never twisted's default.
    defaultContentType = None
    request_id: bytes = b""
    received_at: float = 0.0
    clock: IReactorTime
    activity: Activity

    def process(self) -> None:
        """Assign the request ID, log the start, then find and render the resource."""
        channel: Any = self.channel
        self.clock = channel.site.reactor
        self.received_at = self.clock.seconds()
        self.request_id = choose_request_id(self.requestHeaders.getRawHeaders(b"x-request-id"))
        log.info(
            "Request started: {method} {path} [Client: {client}] [ID: {request_id}]",
            method=self.method.decode("ascii", "replace"),
            path=self.path.decode("ascii", "replace"),
            client=(client_ip(self) or b"unix").decode("ascii"),
            request_id=self.request_id.decode("ascii"),
        )
        self.activity = channel.site.activity
        self.activity.started(self)
        self.notifyFinish().addBoth(self._ended)
        super().process()

    def write(self, data: bytes) -> None:
        """Add aiproxy's headers just before the response headers go out."""
        if not self.startedWriting:
            headers = self.responseHeaders
            headers.setRawHeaders(b"X-Request-ID", [self.request_id])
            elapsed = self.clock.seconds() - self.received_at
            headers.setRawHeaders(b"X-Process-Time", [b"%.4f" % elapsed])
            headers.setRawHeaders(b"X-Proxy-By", [PROXY_BY])
        super().write(data)

    def processingFailed(self, reason: Failure) -> None:
        """A bug while rendering: log it and answer with the JSON 500 error."""
        log.failure(
            "Unhandled error [ID: {request_id}]",
            reason,
            request_id=self.request_id.decode("ascii"),
        )
        send_error(self, InternalError("aiproxy failed to handle this request"))

    def _ended(self, result: Failure | None) -> None:
        """The response has ended, or the client has gone: record and log it."""
        self.activity.ended(self)
        elapsed = self.clock.seconds() - self.received_at
        fields = {
            "method": self.method.decode("ascii", "replace"),
            "path": self.path.decode("ascii", "replace"),
            "status": self.code,
            "duration": elapsed,
            "request_id": self.request_id.decode("ascii"),
        }
        if result is None:
            log.info(
                "Request completed: {method} {path} [Status: {status}]"
                " [Time: {duration:.3f}s] [ID: {request_id}]",
                **fields,
            )
        else:
            log.info(
                "Request aborted, connection lost before the response ended: {method} {path}"
                " [Status: {status}] [Time: {duration:.3f}s] [ID: {request_id}]",
                **fields,
            )


def send_error(request: Request, error: ProxyError) -> None:
    """
    Answer ``request`` with ``error``'s status and JSON body.

    If the response headers have already gone out, the response is aborted instead.
    """
    request_id = getattr(request, "request_id", b"") or b"-"
    if request.startedWriting:
        abort_response(request)
        return
    body = error_body(error, request_id)
    request.setResponseCode(error.status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
