"""
aiproxy's own HTTP/2 server: a ``Protocol`` driving h2's sans-IO state machine, for
clients that chose ``h2`` by ALPN on a TLS listener, onto the same core as the HTTP/1.1
door. Each stream is an :class:`~aiproxy.server.http2_stream.HTTP2Stream`, the core's
``ClientSide`` for its response and the reader of its request body.

What a client gets, whatever it sends:

  - Flow control both ways. A stream's response data is sent only as the client's
    windows allow and while the transport takes more; past ``STREAM_HIGH_WATER`` bytes
    waiting, that stream's upstream stops being read. A request body's window is
    reopened only as the upstream takes the body (a body of unknown length up to
    ``BUFFERED_BODY_LIMIT`` is collected whole first).
  - The limits of :mod:`aiproxy.server.http2_limits` (control frames per window,
    header blocks, streams at once) and the bytes written to a client that does not
    read (:data:`MAX_UNREAD`): over one, ``GOAWAY`` with ``ENHANCE_YOUR_CALM``. After
    any connection error nothing more is read, the connection closes, and it is
    aborted if the client has not let it close within :data:`CLOSE_TIMEOUT` seconds.
  - A malformed request head (:mod:`aiproxy.server.http2_head`) is answered on its
    stream by the door (``400``, ``431``); a body over ``max_body_size`` (``413``), or
    too slow (``408``, the HTTP/1.1 door's ``header_timeout`` and ``body_min_rate``),
    by the core; after those two the connection takes no new stream. (A
    ``content-length`` that is not a number, or that DATA contradicts, is refused by
    h2 itself, as a connection error: ``GOAWAY`` with ``PROTOCOL_ERROR``.)
  - A response the core aborts (a cut upstream) resets its stream with
    ``INTERNAL_ERROR``; it never ends cleanly.
  - A drain (``close_if_idle``) sends ``GOAWAY`` at once, busy or not: the streams in
    flight go on, newer ones are refused, and the connection closes after the last.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from http import HTTPStatus
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy.core.activity import Activity
from aiproxy.core.endpoints import error_response, http_date
from aiproxy.core.handler import PROXY_BY
from aiproxy.core.interfaces import RequestBody, RequestHandler
from aiproxy.errors import ClientTooSlow, ProxyError
from aiproxy.rules.framing import MAX_HEAD_SIZE
from aiproxy.rules.headers import choose_request_id, header_values
from aiproxy.server.body import StreamedBody
from aiproxy.server.http2_head import request_head
from aiproxy.server.http2_limits import MAX_CONCURRENT_STREAMS, FrameWatch
from aiproxy.server.http2_stream import (
    BUFFERED_BODY_LIMIT,
    STREAM_WINDOW,
    HTTP2Stream,
    too_large,
)
from aiproxy.server.limits import CLIENT_IDLE_TIMEOUT, ClientLimits

__all__ = ["CLOSE_TIMEOUT", "MAX_UNREAD", "HTTP2Connection", "HTTP2Factory"]

log = Logger(namespace="aiproxy")

CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
"""The connection's receive window: room for every stream's window, so that a stream
whose upstream is slow does not hold the others back."""

MAX_UNREAD = 256 * 1024
"""Bytes written while the transport said it is full (headers, resets, PING and SETTINGS
acknowledgements to a client that does not read) before the connection is closed."""

CLOSE_TIMEOUT = 3.0
"""Seconds a connection closed after an error may take before it is aborted."""

CHECK_INTERVAL = 1.0
"""Seconds between looks at the request bodies and header blocks still arriving."""


class HTTP2Factory(Factory):
    """
    Builds an :class:`HTTP2Connection` for each client connection that chose ``h2``.

    @param handler: the core, which answers each request.
    @param clock: the time of every deadline.
    @param activity: told of each connection as it opens and closes.
    @param limits: what a client may send, and how slowly (the HTTP/1.1 door's).
    """

    def __init__(
        self, handler: RequestHandler, clock: IReactorTime, activity: Activity, limits: ClientLimits
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.activity = activity
        self.limits = limits

    def buildProtocol(self, addr: IAddress | None) -> HTTP2Connection:
        """A connection for a client at ``addr``."""
        connection = HTTP2Connection(self.handler, self.clock, self.activity, self.limits)
        connection.factory = self
        return connection


@implementer(IPushProducer)
class HTTP2Connection(TwistedProtocol):
    """
    One client's HTTP/2 connection: h2 parses and frames, the limits are checked as
    bytes arrive, and each request goes to the core as its head (and, for a small body,
    its body) is complete. It is the transport's producer and the drain's
    ``ClientConnection``.

    @ivar peer: the client's IP address; L{None} for a UNIX socket peer.
    """

    def __init__(
        self, handler: RequestHandler, clock: IReactorTime, activity: Activity, limits: ClientLimits
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.activity = activity
        self.limits = limits
        self.peer: str | None = None
        self.h2 = H2Connection(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
        )
        self.streams: dict[int, HTTP2Stream] = {}
        self.sending: dict[int, HTTP2Stream] = {}
        """Streams with response bytes held back, in the order they are served."""
        self.write_paused = False
        self._watch = FrameWatch()
        self._reading = True
        self._closed = False
        self._gone = False
        self._last_stream: int | None = None  # after our GOAWAY: the last stream served
        self._unread = 0
        self._idle_since = 0.0
        self._timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._events: dict[type[Event], Callable[[Any], None]] = {
            RequestReceived: self._request_received,
            DataReceived: self._data_received,
            StreamEnded: self._stream_ended,
            StreamReset: self._stream_reset,
            WindowUpdated: self._window_updated,
            RemoteSettingsChanged: self._window_updated,
            ConnectionTerminated: self._terminated,
        }

    # -- Protocol ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Send the server preface, register as the transport's producer, tell the activity."""
        transport: Any = self.transport
        peer = transport.getPeer()
        self.peer = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None
        h2 = self.h2
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_SIZE,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - STREAM_WINDOW)
        transport.registerProducer(self, True)
        self.activity.opened(self)
        self._idle_since = self.clock.seconds()
        self.flush()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        """Check the frames' limits, let h2 parse them, and act on its events."""
        if not self._reading:
            return
        violation = self._watch.scan(data, self.clock.seconds())
        if violation is not None:
            self._connection_error(violation.error_code, violation.reason)
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as error:  # h2 has queued its GOAWAY
            self._close_after_error(f"{type(error).__name__}: {error}")
            return
        handlers = self._events
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
            if not self._reading:
                return
        self.flush()
        self.pump()
        self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Every stream still open is gone: tell the core."""
        if self._gone:
            return
        self._gone = self._closed = True
        self._reading = False
        for timer in (self._timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._close_timer = None
        for stream in list(self.streams.values()):
            stream.gone()
        self.activity.closed(self)

    # -- IPushProducer, for the transport ----------------------------------------------

    def pauseProducing(self) -> None:
        """The client does not take more: hold response data back."""
        self.write_paused = True

    def resumeProducing(self) -> None:
        """The client takes more: send what is held."""
        self.write_paused = False
        self._unread = 0
        self.pump()

    def stopProducing(self) -> None:
        """The connection is going: nothing to do until it is lost."""

    # -- ClientConnection ----------------------------------------------------------------

    def close_if_idle(self) -> None:
        """
        Send ``GOAWAY`` now (once): streams in flight go on, newer ones are refused;
        close now if none is in flight, else after the last.
        """
        self.stop_taking_streams()

    def abort(self) -> None:
        """Drop the connection now; every stream on it ends unfinished."""
        if not self._gone:
            self._closed = True
            self._reading = False
            cast(Any, self.transport).abortConnection()

    # -- what the streams call -----------------------------------------------------------

    def h2_call(self, stream: HTTP2Stream, method: Callable[..., None], *args: Any) -> bool:
        """
        Call h2 for ``stream``; whether it worked. If h2 refuses (the client reset the
        stream in what has not been processed yet, or the connection failed), the
        stream is over.
        """
        if self._closed:
            stream.ended = True
            return False
        try:
            method(*args)
        except ProtocolError:
            stream.ended = True
            return False
        return True

    def flush(self) -> None:
        """Write what h2 has to send; too much to a client that does not read: calm."""
        data = self.h2.data_to_send()
        if not data or self._gone:
            return
        cast(Any, self.transport).write(data)
        if self.write_paused and not self._closed:
            self._unread += len(data)
            if self._unread > MAX_UNREAD:
                self._connection_error(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"over {MAX_UNREAD} bytes written to a client that does not read",
                )

    def pump(self) -> None:
        """Send held response bytes, stream by stream, while the transport takes them."""
        sending = self.sending
        h2 = self.h2
        while sending and not self.write_paused and not self._closed:
            progressed = False
            for stream_id, stream in list(sending.items()):
                if self.window(stream_id) <= 0:
                    continue
                del sending[stream_id]
                if stream.pump(h2):
                    sending[stream_id] = stream  # to the back of the line
                progressed = True
                self.flush()
                if self.write_paused or self._closed:
                    return
            if not progressed:
                return

    def window(self, stream_id: int) -> int:
        """How many bytes ``stream_id`` may send now (0 if h2 has closed it)."""
        try:
            return self.h2.local_flow_control_window(stream_id)
        except ProtocolError:
            return 0

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Reopen the windows by ``size`` bytes of ``stream_id``'s body."""
        if not self._closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def hand_over(self, stream: HTTP2Stream) -> None:
        """Hand ``stream``'s request to the core: its body whole, streaming, or its refusal."""
        stream.started = True
        try:
            self._hand_over(stream)
        except Exception:
            # A bug in the core: the stream cannot know what the client was told.
            log.failure("Unhandled error handling an HTTP/2 request")
            stream.reset(ErrorCodes.INTERNAL_ERROR)

    def forget(self, stream: HTTP2Stream) -> None:
        """``stream`` is over: close the connection if it was the last one to wait for."""
        self.streams.pop(stream.stream_id, None)
        self.sending.pop(stream.stream_id, None)
        if not self.streams:
            self._idle_since = self.clock.seconds()
            if self._last_stream is not None:
                self._close()
            else:
                self._arm()

    def stop_taking_streams(self) -> None:
        """
        Send ``GOAWAY`` (no error) naming the last stream that will be served, once;
        close now if none is open, else after the last.
        """
        if self._last_stream is not None or self._closed:
            return
        self.flush()
        last = self._last_stream = self.h2.highest_inbound_stream_id
        # Written past h2, whose state machine would send nothing more after a GOAWAY.
        goaway = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=ErrorCodes.NO_ERROR)
        cast(Any, self.transport).write(goaway.serialize())
        if not self.streams:
            self._close()

    # -- h2's events -----------------------------------------------------------------------

    def _request_received(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self._last_stream is not None and stream_id > self._last_stream:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = HTTP2Stream(self, stream_id, self.clock.seconds())
        try:
            head = request_head(event.headers)
        except ProxyError as error:
            stream.complete = event.stream_ended is not None
            stream.discarding = True
            stream.body = None
            self._refuse_head(stream, event.headers, error)
            return
        stream.method, stream.target, stream.headers = head.method, head.target, head.headers
        length = head.length
        if event.stream_ended is not None:
            return  # handed over by the StreamEnded event that follows
        if length is not None and length > self.limits.max_body_size:
            stream.body_refused(too_large(self.limits.max_body_size))
        elif length is not None and length > BUFFERED_BODY_LIMIT:
            stream.source = StreamedBody(length, stream, [], 0)
            stream.body = None
            self.hand_over(stream)

    def _data_received(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self.acknowledge(event.stream_id, event.flow_controlled_length)
        else:
            stream.data(event.data, event.flow_controlled_length)

    def _stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.ended_by_client()

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.gone()

    def _window_updated(self, event: Event) -> None:
        self.pump()

    def _terminated(self, event: ConnectionTerminated) -> None:
        """The client sent ``GOAWAY``: h2 sends nothing more; close."""
        self._reading = False
        self._close()

    # -- handing requests over -------------------------------------------------------------

    def _hand_over(self, stream: HTTP2Stream) -> None:
        handler = self.handler
        incoming = handler.incoming(
            stream.method, stream.target, stream.headers, b"HTTP/2", b"https", self.peer
        )
        stream.incoming = incoming
        incoming.record.bytes_in = stream.received
        if stream.refusal is not None:
            exchange = handler.refuse(incoming, stream.refusal, stream)
        else:
            body: RequestBody
            if stream.source is not None:
                body = stream.source
            else:
                pieces = stream.body or ()
                body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                stream.body = None
            exchange = handler.handle(incoming, body, stream)
        stream.exchange = exchange

    def _refuse_head(
        self, stream: HTTP2Stream, block: list[tuple[bytes, bytes]], error: ProxyError
    ) -> None:
        """Answer a malformed request head with ``error``'s JSON, and log it."""
        request_id = choose_request_id(header_values(block, b"x-request-id"))
        response = error_response(error, request_id)
        headers = [
            (b"date", http_date(self.clock.seconds())),
            *response.headers,
            (b"content-length", b"%d" % len(response.body)),
            (b"x-request-id", request_id),
            (b"x-proxy-by", PROXY_BY),
        ]
        reason = HTTPStatus(error.status).phrase.encode("ascii")
        stream.send_head(error.status, reason, headers, len(response.body), True)
        stream.send_body((response.body,), None)
        stream.finish()
        log.info(
            "Request refused: {status} {message} [Client: {client}] [ID: {request_id}]",
            status=error.status,
            message=error.message,
            client=self.peer or "unix",
            request_id=request_id.decode("ascii"),
        )

    # -- closing ---------------------------------------------------------------------------

    def _connection_error(self, code: ErrorCodes, reason: str) -> None:
        """A limit broken: ``GOAWAY`` with ``code``, and close."""
        if self._closed:
            return
        with suppress(ProtocolError):  # the client sent GOAWAY first
            self.h2.close_connection(code)
        self._close_after_error(reason)

    def _close_after_error(self, reason: str) -> None:
        log.info(
            "HTTP/2 connection closed on a client error: {reason} [Client: {client}]",
            reason=reason,
            client=self.peer or "unix",
        )
        self._reading = False
        data = self.h2.data_to_send()
        if data and not self._gone:
            cast(Any, self.transport).write(data)
        self._close()
        for stream in list(self.streams.values()):
            stream.gone()

    def _close(self) -> None:
        """Close once what was written is sent; abort after CLOSE_TIMEOUT."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport: Any = self.transport
        # A TLS transport closes only once its producer is unregistered.
        transport.unregisterProducer()
        transport.loseConnection()
        self._close_timer = self.clock.callLater(CLOSE_TIMEOUT, transport.abortConnection)

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure a deadline check is due: soon while bodies or a header block arrive,
        at the idle deadline with no stream open, else not at all."""
        if self._closed:
            return
        now = self.clock.seconds()
        if self._watch.block_opened_at is not None or any(
            not stream.complete for stream in self.streams.values()
        ):
            due = now + CHECK_INTERVAL
        elif not self.streams:
            due = self._idle_since + CLIENT_IDLE_TIMEOUT
        else:
            return
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(max(due - now, 0.0), self._check)
        elif timer.getTime() > due:
            timer.reset(max(due - now, 0.0))

    def _check(self) -> None:
        """Close a connection idle too long; refuse a body or header block too slow."""
        self._timer = None
        if self._closed:
            return
        now = self.clock.seconds()
        limits = self.limits
        opened = self._watch.block_opened_at
        if opened is not None and now - opened >= limits.header_timeout:
            self._connection_error(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"a header block not complete within {limits.header_timeout:g}s",
            )
            return
        if not self.streams and now - self._idle_since >= CLIENT_IDLE_TIMEOUT:
            self.close_if_idle()
            return
        for stream in list(self.streams.values()):
            due = stream.deadline(limits.header_timeout, limits.body_min_rate)
            if due is not None and now >= due:
                rate = limits.body_min_rate
                slow = (
                    f"the request body arrived slower than {rate} bytes/s"
                    if rate
                    else f"the request body stalled for {CLIENT_IDLE_TIMEOUT:g}s"
                )
                stream.body_refused(ClientTooSlow(slow))
        self.flush()
        self._arm()
