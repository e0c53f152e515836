"""
The request class of aiproxy's site: request IDs, timing headers and the per-request
log lines, for every response the proxy sends.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request

from aiproxy._version import __version__
from aiproxy.core.activity import Activity
from aiproxy.core.record import RequestRecord
from aiproxy.errors import BodyTooLarge, InternalError, ProxyError, error_body
from aiproxy.rules.cors import CorsPolicy, add_response_headers, response_headers
from aiproxy.rules.headers import choose_request_id, original_client
from aiproxy.streaming import abort_response

if TYPE_CHECKING:
    from aiproxy.ops.metrics import ProxyMetrics

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
    request; the completion line carries the request's :class:`RequestRecord` (filled
    in by the proxy resource too), which also moves the site's metrics, if it has any.
    The client address logged is the peer's, or the one ``X-Forwarded-For`` gives when
    the peer is one of the site's ``trusted_proxies``.

    A body larger than the site's ``limits.max_body_size`` is refused before it is read
    (by its ``Content-Length``) or as soon as it grows past the limit (chunked): the
    request is then answered with ``413`` instead of being rendered.

    @ivar refusal: the error this request is answered with instead of being rendered
        (its body was too large, or too slow), or L{None}.
    """

    # A proxied response has the upstream's Content-Type, or none: never twisted's default.
    defaultContentType = None
    request_id: bytes = b""
    received_at: float = 0.0
    bytes_in = 0
    bytes_out = 0
    record: RequestRecord
    metrics: ProxyMetrics | None = None
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
        self.bytes_in += len(data)
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
        site = channel.site
        self.clock = site.reactor
        self.cors = getattr(site, "cors", None)
        self.metrics = getattr(site, "metrics", None)
        self.received_at = self.clock.seconds()
        self.request_id = choose_request_id(self.requestHeaders.getRawHeaders(b"x-request-id"))
        peer = client_ip(self)
        client = original_client(
            None if peer is None else peer.decode("ascii"),
            self.requestHeaders.getRawHeaders(b"x-forwarded-for", ()),
            getattr(site, "trusted_proxies", ()),
        )
        self.record = record = RequestRecord(
            method=self.method.decode("ascii", "replace"),
            path=self.path.decode("ascii", "replace"),
            client="unix" if client is None else client,
            request_id=self.request_id.decode("ascii"),
            bytes_in=self.bytes_in,
        )
        log.info(
            "Request started: {method} {path} [Client: {client}] [ID: {request_id}]",
            method=record.method,
            path=record.path,
            client=record.client,
            request_id=record.request_id,
        )
        self.activity = site.activity
        self.activity.started(self)
        if self.metrics is not None:
            self.metrics.started()
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
        if self.method != b"HEAD":
            self.bytes_out += len(data)
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
        record = self.record
        record.status = self.code
        record.duration = self.clock.seconds() - self.received_at
        record.bytes_out = self.bytes_out
        record.cancelled = result is not None
        if record.usage_meter is not None:
            record.usage = record.usage_meter.result()
        log.info(record.log_format(), **record.log_fields())
        if self.metrics is not None:
            self.metrics.observe(record)


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
