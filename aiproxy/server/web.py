"""
The twisted.web door: aiproxy as a ``Resource`` that any Twisted program can mount in
its own ``Site``, onto the same core as aiproxy's own HTTP/1.1 server.

twisted.web reads each request body before the resource sees it (in memory under
100 KB, in a temporary file above); :class:`ProxyRequest` refuses one over
``MAX_BODY_SIZE`` as it arrives. :class:`ReverseProxyResource` turns the request into
the core's :class:`Incoming` and writes the core's answer back through
:class:`WebClientSide`. HTTP/2 on aiproxy's ``ssl:`` listeners goes this way too.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy._twisted import GenericHTTPChannelProtocol
from aiproxy.config import Config, ConfigError
from aiproxy.core.activity import Activity
from aiproxy.core.body import body_of
from aiproxy.core.build import build_core
from aiproxy.core.endpoints import error_response
from aiproxy.core.handler import ProxyCore
from aiproxy.core.interfaces import RawHeaders, TunnelEnd, UpstreamClient
from aiproxy.errors import BodyTooLarge, InternalError, InvalidRequest, ProxyError
from aiproxy.ops.logger import log
from aiproxy.ops.metrics import SharedMetrics
from aiproxy.routing.routes import Routes
from aiproxy.rules.headers import field_with_control_bytes
from aiproxy.rules.target import local_target
from aiproxy.server.limits import ClientLimits
from aiproxy.server.web_channel import ProxyChannel

__all__ = [
    "ProxyRequest",
    "ProxySite",
    "ReverseProxyResource",
    "WebClientSide",
    "build_resource",
    "build_site",
]

CLIENT_IDLE_TIMEOUT = 75
"""Seconds an idle client keep-alive connection stays open (nginx's default)."""


class ReverseProxyResource(Resource):
    """
    Hands every request below it to ``core``: aiproxy's own endpoints at their exact
    paths (when the core has them, see :func:`build_resource`) and the upstream for
    the rest. The part of the request target below the mount point is what is
    appended, byte for byte, to ``TARGET_URL``.

    @param read_size: the largest piece of a buffered body sent upstream at once.
    """

    isLeaf = True

    def __init__(self, core: ProxyCore, read_size: int = 65536) -> None:
        super().__init__()
        self.core = core
        self.read_size = read_size

    def render(self, request: Request) -> int:
        """Start the core's answer; it is written as it comes."""
        peer = getattr(request.getClientAddress(), "host", None)
        headers: RawHeaders = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        incoming = self.core.incoming(
            request.method,
            local_target(request.uri, len(request.prepath or ())),
            headers,
            request.clientproto,
            b"https" if request.isSecure() else b"http",
            peer if isinstance(peer, str) else None,
        )
        client = WebClientSide(request)
        refusal = getattr(request, "refusal", None)  # a ProxyRequest's body was too large
        if refusal is None:
            refusal = _control_bytes_error(headers)
        if refusal is not None:
            exchange = self.core.refuse(incoming, refusal, client)
        else:
            body = body_of(request.content, self.read_size)
            incoming.record.bytes_in = len(body) if isinstance(body, bytes) else body.length or 0
            exchange = self.core.handle(incoming, body, client)
        if not client.ended:
            request.notifyFinish().addErrback(lambda failure: exchange.client_gone())
        return NOT_DONE_YET


def _control_bytes_error(headers: RawHeaders) -> InvalidRequest | None:
    """A ``400`` for a header value twisted.web let through with a control character."""
    name = field_with_control_bytes(headers)
    if name is None:
        return None
    shown = name.decode("ascii", "replace")
    return InvalidRequest(f"the {shown} header has a control character in its value")


class WebClientSide:
    """The core's ``ClientSide`` over a twisted.web ``Request`` (HTTP/1.x or an HTTP/2 stream)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.ended = False
        self._producing = False

    def send_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, body: bool
    ) -> None:
        """Set the status and headers, and send them at once."""
        request = self.request
        request.setResponseCode(status, reason)
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            grouped.setdefault(name, []).append(value)
        response_headers: Headers = request.responseHeaders
        for name, values in grouped.items():
            response_headers.setRawHeaders(name, values)
        request.write(b"")  # a stream's first event may be a while coming

    def send_body(self, pieces: Sequence[bytes], raw_chunked: bytes | None) -> None:
        """Write each piece; twisted.web frames them."""
        if self.ended:
            return
        write = self.request.write
        for piece in pieces:
            write(piece)

    def flush(self) -> None:
        """Nothing is held: :meth:`send_head` sent the head already."""

    def finish(self) -> None:
        """End the response."""
        if self.ended:
            return
        self.ended = True
        self.request.finish()

    def abort(self) -> None:
        """Abort the connection (HTTP/1.x) or reset the stream (HTTP/2)."""
        if self.ended:
            return
        self.ended = True
        self._stop_producing()
        channel: Any = self.request.channel
        if channel is None:
            return
        abort_stream = getattr(channel, "abortConnection", None)  # an HTTP/2 stream
        if abort_stream is not None:
            abort_stream()
            # Resetting a stream ourselves does not tell its request, as a reset by the
            # client does: tell it, so that notifyFinish fires.
            channel.connectionLost(Failure(ConnectionAborted()))
        else:
            transport: Any = self.request.transport
            transport.abortConnection()

    def pause_upstream_with(self, producer: IPushProducer | None) -> None:
        """Register ``producer`` as the request's streaming producer; None unregisters it."""
        if producer is not None:
            self.request.registerProducer(producer, True)
            self._producing = True
        else:
            self._stop_producing()

    def _stop_producing(self) -> None:
        if self._producing:
            self._producing = False
            if self.request.channel is not None:
                self.request.unregisterProducer()

    tunnels = False
    """twisted.web owns the connection: no WebSocket tunnel through this door."""

    def upgrade(self, status: int, reason: bytes, headers: RawHeaders) -> TunnelEnd:
        """Never called: this door does not tunnel (:attr:`tunnels`)."""
        raise NotImplementedError("the twisted.web door does not tunnel")


class ProxyRequest(Request):
    """
    A :class:`twisted.web.server.Request` that refuses a body over the site's
    ``limits.max_body_size``: before reading it (by its ``Content-Length``) or as soon as
    it grows past the limit (chunked, HTTP/2). The request is then handed to the
    resource with its ``refusal`` set, and answered ``413``.

    @ivar refusal: the error to answer instead of handling the request, or L{None}.
    """

    # A proxied response has the upstream's Content-Type, or none: never twisted's default.
    defaultContentType = None
    refusal: ProxyError | None = None
    _body_room = 0

    def _limit(self) -> int:
        limits: ClientLimits | None = getattr(getattr(self.channel, "site", None), "limits", None)
        return limits.max_body_size if limits is not None else 2**63

    def gotLength(self, length: int | None) -> None:
        """Refuse a declared body over the limit before reading any of it."""
        self._body_room = self._limit()
        if length is not None and length > self._body_room:
            super().gotLength(0)
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
        return BodyTooLarge(f"the request body is larger than the limit of {self._limit()} bytes")

    def refuse(self, error: ProxyError) -> None:
        """
        Answer ``error`` instead of handling this request; drop the body read so far.
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

    def processingFailed(self, reason: Failure) -> None:
        """A bug while rendering: log it and answer with the JSON 500 error."""
        log.failure("Unhandled error while rendering", reason)
        if self.startedWriting:
            self.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        response = error_response(InternalError("aiproxy failed to handle this request"), b"-")
        self.setResponseCode(response.status)
        for name, value in response.headers:
            self.responseHeaders.setRawHeaders(name, [value])
        self.setHeader(b"Content-Length", b"%d" % len(response.body))
        self.write(response.body)
        self.finish()


class ProxySite(Site):
    """
    A ``Site`` of :class:`ProxyRequest`s over :class:`ProxyChannel` connections, which
    enforce ``limits`` on HTTP/1.x (HTTP/2 connections get the body-size limit only).

    twisted.web's own access log is off: the core logs each request's start and
    completion with its request ID instead.
    """

    requestFactory = ProxyRequest

    def __init__(
        self, resource: IResource, activity: Activity, limits: ClientLimits, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self.activity = activity
        self.limits = limits

    def protocol(self) -> Any:
        """A new connection: a :class:`ProxyChannel`, switched to HTTP/2 by ALPN."""
        return GenericHTTPChannelProtocol(ProxyChannel(self.limits, self.reactor, self.activity))

    def log(self, request: Any) -> None:
        """No access log line: the core logs every request."""


def build_site(
    root: IResource,
    clock: IReactorTime,
    activity: Activity | None = None,
    *,
    config: Config | None = None,
) -> ProxySite:
    """
    A :class:`ProxySite` for ``root`` on ``clock``, tracking its connections in
    ``activity`` (a new one if not given) with the client limits of ``config`` (the
    defaults if not given). Request bodies are never parsed as forms.
    """
    config = Config() if config is None else config
    return ProxySite(
        root,
        Activity() if activity is None else activity,
        ClientLimits.from_config(config),
        reactor=clock,
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,
    )


def build_resource(
    config: Config,
    upstream: UpstreamClient,
    clock: IReactorTime,
    activity: Activity | None = None,
    shared_metrics: SharedMetrics | None = None,
    routes: Routes | None = None,
) -> ReverseProxyResource:
    """
    aiproxy's whole tree as one resource: ``/api/health``, ``/api/ping``, the metrics
    and docs (unless disabled in ``config``), CORS, and the proxy for the rest, all on
    one core (see :func:`aiproxy.core.build.build_core`).

    @param routes: the upstreams of ``config``'s ``UPSTREAMS_FILE``
        (:func:`aiproxy.routing.routes.upstream_routes`), which requests then go to
        instead of ``upstream``.
    @raise ConfigError: ``UPSTREAMS_FILE`` is set and ``routes`` not given.
    """
    if config.upstreams_file and routes is None:
        raise ConfigError(
            "UPSTREAMS_FILE is set: pass routes=upstream_routes(config, reactor) to"
            " build_resource, or unset it to use TARGET_URL"
        )
    core = build_core(config, upstream, clock, activity, shared_metrics, routes)
    return ReverseProxyResource(core, config.proxy_buffer_size)
