"""
The request class of aiproxy's site: request IDs, timing headers and the per-request
log lines, for every response the proxy sends.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request

from aiproxy._version import __version__
from aiproxy.activity import Activity
from aiproxy.cors import CorsPolicy, add_response_headers, response_headers
from aiproxy.errors import BodyTooLarge, InternalError, ProxyError, error_body
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

    A body larger than the site's ``limits.max_body_size`` is refused before it is read
    (by its ``Content-Length``) or as soon as it grows past the limit (chunked): the
    request is then answered with ``413`` instead of being rendered.

    @ivar refusal: the error this request is answered with instead of being rendered
        (its body was too large, or too slow), or L{None}.
    """

    # A proxied response has the upstream's Content-Type, or none: never twisted's default.
    defaultContentType = None
    request_id: bytes = b""
    retries = 0
    """How many times the upstream request was sent again (set by the proxy resource)."""
    received_at: float = 0.0
    clock: IReactorTime
    activity: Activity
    refusal: ProxyError | None = None
    cors: CorsPolicy | None = None
    _body_room = 0

    def gotLength(self, length: int | None) -> None:
        """Refuse a declared body over the limit before reading any of it."""
        channel: Any = self.channel
        self._body_room = channel.site.limits.max_body_size
        if length is not None and length > self._body_room:
            super().gotLength(0)
            # ProxyChannel stops reading once the head has been handled.
            self.refuse(self._too_large())
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Keep a piece of the body, or refuse the body once it grows past the limit."""
        if self.refusal is not None:
            return
        self._body_room -= len(data)
        if self._body_room >= 0:
            super().handleContentChunk(data)
            return
        self.refuse(self._too_large())
        # HTTP/1.1 stops reading at once; an HTTP/2 stream reads on, discarding.
        stop = getattr(self.channel, "stop_reading_body", None)
        if stop is not None:
            stop()

    def _too_large(self) -> BodyTooLarge:
        channel: Any = self.channel
        limit = channel.site.limits.max_body_size
        return BodyTooLarge(f"the request body is larger than the limit of {limit} bytes")

    def refuse(self, error: ProxyError) -> None:
        """
        Answer ``error`` instead of rendering this request; drop the body read so far.

        Called before the request is complete; it is answered once it is handed over.
        """
        if self.refusal is not None:
            return
        self.refusal = error
        # twisted.web invites the body with "100 Continue" after gotLength: not this one.
        self.requestHeaders.removeHeader(b"expect")
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()

    def process(self) -> None:
        """
        Assign the request ID, log the start, then find and render the resource (or
        answer with the refusal).
        """
        channel: Any = self.channel
        self.clock = channel.site.reactor
        self.cors = getattr(channel.site, "cors", None)
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
        if self.refusal is not None:
            self.setHeader(b"Date", datetimeToString(self.received_at))
            send_error(self, self.refusal)
        else:
            super().process()

    def write(self, data: bytes) -> None:
        """Add aiproxy's headers just before the response headers go out."""
        if not self.startedWriting:
            headers = self.responseHeaders
            headers.setRawHeaders(b"X-Request-ID", [self.request_id])
            elapsed = self.clock.seconds() - self.received_at
            headers.setRawHeaders(b"X-Process-Time", [b"%.4f" % elapsed])
            headers.setRawHeaders(b"X-Proxy-By", [PROXY_BY])
            if self.cors is not None:
                origin = self.requestHeaders.getRawHeaders(b"origin")
                if origin:
                    add_response_headers(headers, response_headers(self.cors, origin[0]))
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
            "retries": self.retries,
        }
        if result is None:
            log.info(
                "Request completed: {method} {path} [Status: {status}]"
                " [Time: {duration:.3f}s] [ID: {request_id}]"
                + (" [Retries: {retries}]" if self.retries else ""),
                **fields,
            )
        else:
            log.info(
                "Request aborted, connection lost before the response ended: {method} {path}"
                " [Status: {status}] [Time: {duration:.3f}s] [ID: {request_id}]"
                + (" [Retries: {retries}]" if self.retries else ""),
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
    for name, value in error.headers:
        request.responseHeaders.addRawHeader(name, value)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
