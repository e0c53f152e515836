"""
One HTTP/1.1 connection to the upstream: it writes a request and reads its response
with llhttp (``httptools.HttpResponseParser``), and the response object the core gets.

A connection carries one request at a time (no pipelining). Its states::

    IDLE --send--> HEAD --final head--> BODY --message complete--> IDLE (kept) or CLOSED
                     \\--HEAD request or failure-------------------------------^
                     \\--101 to a request with an Upgrade field--> TUNNEL (raw bytes)

The parser calls back into the connection (bound methods, registered once per parser);
the callbacks only record what they saw, and :meth:`UpstreamConnection.dataReceived`
acts on it once llhttp has returned: it fires the request's Deferred, passes the body
pieces of that read to the response's sink in one call, and hands the connection back
to its owner (the pool) or closes it. Calls into other code come last, so whatever that
code does (abort, pause, send another request) finds the connection in a clean state.

The upstream is trusted, but not blindly: llhttp puts no bound on a response head and
lets some control bytes through, so the head's size and line count, control bytes in the
status line and field values, ``1xx`` floods and unasked-for ``101``\\ s are checked
here as the bytes arrive (a ``101`` is only taken as the answer to a request whose head
has an ``Upgrade`` field; the connection is then a tunnel end, never reused). Any byte
beyond the response (a longer body than its ``Content-Length``, bytes after the final
chunk, a second response, anything on an idle connection) closes the connection; such
bytes never reach a sink. (The one exception: CR and LF bytes that come right after a
response in the same read are skipped by llhttp between messages, as RFC 9112 section
2.2 allows, and go unnoticed; they cannot make a response.)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from httptools import HttpParserUpgrade as _ParserUpgrade
from OpenSSL.SSL import Error as _TLSError
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IPullProducer,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy._twisted import write_now
from aiproxy.core.tunnel import TransportEnd
from aiproxy.rules.framing import MAX_HEAD_SIZE, MAX_HEADER_LINES
from aiproxy.upstream.errors import (
    BadResponse,
    BodyIncomplete,
    ConnectFailed,
    LostBeforeResponse,
    StaleConnection,
    UpstreamFailure,
)

if TYPE_CHECKING:
    from typing import Protocol as TypingProtocol

    from aiproxy.core.interfaces import (
        BodySource,
        RawHeaders,
        RequestBody,
        ResponseSink,
        TunnelEnd,
        UpstreamResponse,
    )

    class _Transport(TypingProtocol):
        """What a connection uses of its transport (TCP, or TLS over TCP)."""

        def write(self, data: bytes) -> None: ...
        def loseConnection(self) -> None: ...
        def abortConnection(self) -> None: ...
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def registerProducer(
            self, producer: IPushProducer | IPullProducer, streaming: bool
        ) -> None: ...
        def unregisterProducer(self) -> None: ...

    class ConnectionOwner(TypingProtocol):
        """Where a connection goes when its response is complete (the pool's idle set)."""

        def keep(self, connection: UpstreamConnection) -> None:
            """Keep ``connection`` for reuse (or close it)."""

        def forget(self, connection: UpstreamConnection) -> None:
            """``connection``, which was kept, has closed."""


__all__ = ["MAX_INTERIM_RESPONSES", "Response", "ResponseProducer", "UpstreamConnection"]

MAX_INTERIM_RESPONSES = 10
"""The most ``1xx`` responses accepted before the final one."""

_IDLE, _HEAD, _BODY, _DONE, _CLOSED, _TUNNEL = range(6)
"""Connection states: no request; waiting for the final head; reading the body; the
message is complete (only during one read); closing or closed."""

_BY_CONSUMER = 1
_UNTIL_DELIVER = 2
"""Why a connection's transport is paused (bits of ``_paused``)."""

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""A byte not allowed in a reason phrase or a field value (HTAB is)."""

_ASKS_UPGRADE = b"\r\nUpgrade: "
"""How a request head built by aiproxy asks to upgrade (only tunnel requests keep it)."""
_CONTROL_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""The same without CR and LF, which end lines (llhttp checks those): searched over each
read while in the head, so that the per-field checks run only once it finds one."""

_FINISHED = True
"""``Response._end`` once the body is complete."""


class _AfterResponse(Exception):
    """Raised in a parser callback to stop llhttp at a byte beyond the response."""


class _Refused(Exception):
    """Raised in a parser callback to stop llhttp at a head aiproxy refuses."""


def _framing(headers: RawHeaders) -> tuple[int | None, bool]:
    """
    A response's ``Content-Length`` and whether it is chunked, from its header fields
    (llhttp has already refused invalid and conflicting values).
    """
    length = None
    chunked = False
    for name, value in headers:
        size = len(name)
        if size == 14:
            if name.lower() == b"content-length":
                length = int(value)
        elif size == 17 and name.lower() == b"transfer-encoding":
            chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
    return (None if chunked else length), chunked


def _describe(reason: Failure) -> str:
    """A one-line description of why a connection was lost, without secrets."""
    error = reason.value
    if isinstance(error, VerificationError):
        return "the certificate is not for this host"
    if isinstance(error, _TLSError) and error.args and isinstance(error.args[0], list):
        parts = [str(part[-1]) for part in error.args[0] if part]
        text = ", ".join(parts) or "TLS error"
    else:
        text = reason.getErrorMessage()
    return " ".join(text.split())


@implementer(IPushProducer)
class ResponseProducer:
    """
    Pauses and resumes reading one response from its connection: the core registers it
    as the producer of the client's side. It does nothing once the response is over, so
    that it cannot touch the next request on the same connection.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection: UpstreamConnection | None = connection

    def pauseProducing(self) -> None:
        """Stop reading from the upstream."""
        connection = self._connection
        if connection is not None:
            connection.pause_reading(_BY_CONSUMER)

    def resumeProducing(self) -> None:
        """Read from the upstream again."""
        connection = self._connection
        if connection is not None:
            connection.resume_reading(_BY_CONSUMER)

    def stopProducing(self) -> None:
        """Drop the connection, like :meth:`Response.abort`."""
        connection = self._connection
        if connection is not None:
            connection.drop_response()


class Response:
    """
    An upstream response (``UpstreamResponse``): its head, and its body once
    :meth:`deliver` is called.

    Body pieces that arrive before :meth:`deliver` are held (and the connection stops
    reading until then); :meth:`deliver` passes them at once.

    @ivar _connection: the connection while the response is being read; L{None} once it
        is complete, failed or aborted.
    @ivar _held: body pieces received before :meth:`deliver`, as ``(pieces, raw)``.
    @ivar _end: L{None} while the body goes on, ``_FINISHED``, or the failure.
    @ivar _dropped: :meth:`abort` was called: nothing more reaches the sink.
    """

    __slots__ = (
        "_connection",
        "_dropped",
        "_end",
        "_held",
        "_sink",
        "has_body",
        "headers",
        "length",
        "producer",
        "reason",
        "status",
        "tunnel",
    )

    def __init__(
        self,
        connection: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: RawHeaders,
        length: int | None,
        has_body: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length
        self.has_body = has_body
        self.producer: IPushProducer = ResponseProducer(connection)
        self.tunnel: TunnelEnd | None = None
        self._connection: UpstreamConnection | None = connection
        self._sink: ResponseSink | None = None
        self._held: list[tuple[list[bytes], bytes | None]] = []
        self._end: bool | Exception | None = None
        self._dropped = False

    def __repr__(self) -> str:
        return f"<Response {self.status} length={self.length} has_body={self.has_body}>"

    def deliver(self, sink: ResponseSink) -> None:
        """
        Pass the body to ``sink``: what has arrived at once, the rest as it comes.

        @raise RuntimeError: the body was already delivered to a sink.
        """
        if self._sink is not None:
            raise RuntimeError("the response body is already being delivered")
        if self._dropped:
            return
        self._sink = sink
        held, self._held = self._held, []
        for pieces, raw in held:
            sink.body_received(pieces, raw)
            if self._dropped:
                return
        end = self._end
        if end is _FINISHED:
            sink.body_done()
        elif isinstance(end, Exception):
            sink.body_failed(end)
        else:
            connection = self._connection
            if connection is not None:
                connection.resume_reading(_UNTIL_DELIVER)

    def abort(self) -> None:
        """Drop the connection now, if the body is still coming; the sink gets nothing more."""
        if self._dropped:
            return
        self._dropped = True
        self._sink = None
        self._held = []
        connection = self._connection
        if connection is not None:
            connection.drop_response()

    def _detach(self) -> None:
        """The connection is done with this response."""
        self._connection = None
        cast(ResponseProducer, self.producer)._connection = None

    def _received(self, pieces: list[bytes], raw: bytes | None) -> None:
        sink = self._sink
        if sink is not None:
            sink.body_received(pieces, raw)
        elif not self._dropped:
            self._held.append((pieces, raw))

    def _finish(self, error: Exception | None) -> None:
        if self._dropped:
            return
        self._end = _FINISHED if error is None else error
        sink = self._sink
        if sink is not None:
            if error is None:
                sink.body_done()
            else:
                sink.body_failed(error)


class _BodyWriter:
    """
    The ``BodySink`` a request body source writes to: it frames the body with chunked
    encoding when its length is unknown. Detached (and then inert) once the request
    ends, so that a late write can never reach the next request on the connection.
    """

    __slots__ = ("_chunked", "_connection", "_registered")

    def __init__(self, connection: UpstreamConnection, chunked: bool) -> None:
        self._connection: UpstreamConnection | None = connection
        self._chunked = chunked
        self._registered = False

    def write(self, data: bytes) -> None:
        """Send the next piece of the body."""
        connection = self._connection
        if connection is None or not data:
            return
        if self._chunked:
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        connection.transport_write(data)

    def finish(self) -> None:
        """The whole body has been written."""
        connection = self._connection
        if connection is None:
            return
        if self._chunked:
            connection.transport_write(b"0\r\n\r\n")
        connection.body_finished()

    def fail(self, reason: Exception) -> None:
        """The body cannot be completed: abandon the request with ``reason``."""
        connection = self._connection
        if connection is not None:
            connection.body_failed(reason)

    def register_producer(self, producer: IPushProducer | IPullProducer, streaming: bool) -> None:
        """Let the connection's flow control pause ``producer``."""
        connection = self._connection
        if connection is not None:
            self._registered = True
            connection.transport_register(producer, streaming)

    def unregister_producer(self) -> None:
        """Undo :meth:`register_producer`."""
        connection = self._connection
        if connection is not None and self._registered:
            self._registered = False
            connection.transport_unregister()


@implementer(IHandshakeListener)
class UpstreamConnection(Protocol):
    """
    One HTTP/1.1 connection to the upstream, one request at a time.

    @ivar idle_since: when the connection was last kept idle, on the owner's clock.
    @ivar reused: whether the request in flight is not the connection's first.
    @ivar tls: whether the transport is TLS.
    """

    def __init__(self, owner: ConnectionOwner, where: str, tls: bool) -> None:
        """
        @param owner: takes the connection back when a response completes cleanly.
        @param where: ``host:port``, for messages.
        @param tls: the transport is TLS: a loss before its handshake completes is a
            TLS failure.
        """
        self._owner = owner
        self._where = where
        self.tls = tls
        self._handshake_done = not tls
        self._transport: _Transport | None = None
        self._llhttp: HttpResponseParser | None = HttpResponseParser(self)
        self._fresh_parser = False
        self._state = _IDLE
        self._lost = False
        self._lost_waiters: list[Deferred[None]] = []
        self.idle_since = 0.0
        self.reused = False
        # The request in flight.
        self._waiter: Deferred[UpstreamResponse] | None = None
        self._is_head = False
        self._upgrade = False
        self._tunnel: TransportEnd | None = None
        self._body: BodySource | None = None
        self._body_writer: _BodyWriter | None = None
        # Its response head.
        self._got_bytes = False
        self._head_size = 0
        self._interim = 0
        self._check_controls = False
        self._reason = b""
        self._headers: RawHeaders = []
        self._head_arrived = False
        self._error: UpstreamFailure | None = None
        # Its response body.
        self._response: Response | None = None
        self._pieces: list[bytes] = []
        self._chunked = False
        self._chunk_edge = False
        self._chunk_had_body = False
        self._edge = False
        self._quiet = 0
        self._keep_alive = False
        self._extra = False
        self._paused = 0

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self._where} state={self._state}>"

    # --- Twisted's side ---------------------------------------------------------

    def connectionMade(self) -> None:
        """Turn Nagle's algorithm off, so that small writes go at once."""
        transport = self.transport
        self._transport = cast("_Transport", transport)
        if ITCPTransport.providedBy(transport):
            cast(ITCPTransport, transport).setTcpNoDelay(True)

    def handshakeCompleted(self) -> None:
        """The TLS handshake succeeded (and the certificate was accepted)."""
        self._handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        """Parse a piece of the response; act on what it completed."""
        state = self._state
        if state == _BODY:
            self._body_data(data)
        elif state == _HEAD:
            self._head_data(data)
        elif state == _TUNNEL:
            cast(TransportEnd, self._tunnel).data(data)
        elif state == _IDLE:
            # Nobody asked: the upstream is confused (or worse). Never reuse it.
            self._state = _CLOSED
            self._owner.forget(self)
            self._abort_transport()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """End whatever was in flight: the request, or the response's body."""
        state = self._state
        self._state = _CLOSED
        self._lost = True
        self._llhttp = None
        if state == _IDLE:
            self._owner.forget(self)
        elif state == _TUNNEL:
            lost = None if reason.check(ConnectionDone) else _describe(reason)
            cast(TransportEnd, self._tunnel).lost(lost)
        elif state == _HEAD:
            waiter = self._waiter
            self._waiter = None
            self._stop_body()
            if waiter is not None:
                waiter.errback(self._lost_before_head(reason))
        elif state == _BODY:
            response = self._response
            self._response = None
            self._stop_body()
            if response is not None:
                response._detach()
                if not self._chunked and response.length is None and reason.check(ConnectionDone):
                    response._finish(None)  # a close-delimited body ends here
                else:
                    response._finish(
                        BodyIncomplete(
                            f"the upstream ({self._where}) closed the connection in the "
                            f"middle of the response body: {_describe(reason)}"
                        )
                    )
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter_lost in waiters:
            waiter_lost.callback(None)

    # --- The pool's side --------------------------------------------------------

    def send(
        self, method: bytes, head: bytes, body: RequestBody, reused: bool
    ) -> Deferred[UpstreamResponse]:
        """
        Send a request; fire with its response once the final head is parsed.

        @param method: the request's method (``HEAD`` responses have no body).
        @param head: the request head, as it goes on the wire.
        @param body: the whole body, or a source that writes it.
        @param reused: the connection carried a response before (for telling a stale
            keep-alive connection apart).
        """
        waiter: Deferred[UpstreamResponse] = Deferred(self.cancel)
        self.start(waiter, method, head, body, reused)
        return waiter

    def start(
        self,
        waiter: Deferred[UpstreamResponse],
        method: bytes,
        head: bytes,
        body: RequestBody,
        reused: bool,
    ) -> None:
        """
        Like :meth:`send`, into an existing Deferred (whose canceller calls
        :meth:`cancel`).
        """
        self._waiter = waiter
        self.reused = reused
        self._is_head = method == b"HEAD"
        self._upgrade = _ASKS_UPGRADE in head
        self._state = _HEAD
        self._got_bytes = False
        self._head_size = 0
        self._interim = 0
        self._head_arrived = False
        self._check_controls = False
        self._error = None
        self._extra = False
        if self._fresh_parser:
            # After a HEAD response llhttp still expects the body its head described.
            self._llhttp = HttpResponseParser(self)
            self._fresh_parser = False
        transport = self._transport
        assert transport is not None
        if isinstance(body, bytes):
            write_now(transport, head + body if body else head)
            return
        self._body = body
        writer = self._body_writer = _BodyWriter(self, body.length is None)
        transport.write(head)
        body.start(writer)

    def cancel(self, waiter: Deferred[UpstreamResponse]) -> None:
        """
        The request's Deferred was cancelled before its response head: drop the
        connection, so that the upstream sees the close at once.
        """
        if self._waiter is waiter:
            self._waiter = None
            self._teardown()

    def abort(self) -> None:
        """Drop the connection now, and whatever it carries."""
        waiter = self._waiter
        self._waiter = None
        self._teardown()
        if waiter is not None:
            waiter.errback(CancelledError())

    def close(self) -> Deferred[None]:
        """Close the connection (an idle one); fires once it is closed."""
        if self._lost:
            return succeed(None)
        self._state = _CLOSED
        lost: Deferred[None] = Deferred()
        self._lost_waiters.append(lost)
        transport = self._transport
        if transport is not None:
            transport.loseConnection()
        return lost

    # --- The response's and the body writer's side ------------------------------

    def pause_reading(self, why: int) -> None:
        """Stop reading from the transport, for ``why`` (a ``_BY_...`` bit)."""
        if not self._paused:
            cast("_Transport", self._transport).pauseProducing()
        self._paused |= why

    def resume_reading(self, why: int) -> None:
        """Read again, if nothing else holds the transport paused."""
        if self._paused & why:
            self._paused &= ~why
            if not self._paused:
                cast("_Transport", self._transport).resumeProducing()

    def drop_response(self) -> None:
        """The response's consumer aborts it: drop the connection."""
        response = self._response
        if response is not None:
            response._dropped = True
            self._teardown()

    def transport_write(self, data: bytes) -> None:
        """Write request body bytes."""
        cast("_Transport", self._transport).write(data)

    def transport_register(self, producer: IPushProducer | IPullProducer, streaming: bool) -> None:
        """Register the request body's producer with the transport."""
        cast("_Transport", self._transport).registerProducer(producer, streaming)

    def transport_unregister(self) -> None:
        """Unregister the request body's producer."""
        cast("_Transport", self._transport).unregisterProducer()

    def body_finished(self) -> None:
        """The request body has been sent whole."""
        writer = self._body_writer
        if writer is not None:
            self._body_writer = None
            self._body = None
            writer._connection = None
            if writer._registered:
                cast("_Transport", self._transport).unregisterProducer()

    def body_failed(self, reason: Exception) -> None:
        """
        The request body source gave up: the request fails with ``reason`` if its
        response head has not arrived yet; either way the connection is dropped.
        """
        writer = self._body_writer
        if writer is None:
            return
        self._body_writer = None
        self._body = None
        writer._connection = None
        if writer._registered:
            cast("_Transport", self._transport).unregisterProducer()
        waiter = self._waiter
        self._waiter = None
        response = self._teardown()
        if waiter is not None:
            waiter.errback(reason)
        elif response is not None:
            response._finish(
                BodyIncomplete(f"the request body was abandoned: {' '.join(str(reason).split())}")
            )

    # --- Parsing ----------------------------------------------------------------

    def _head_data(self, data: bytes) -> None:
        """A read while the final response head is not complete."""
        self._got_bytes = True
        if not self._check_controls and _CONTROL_IN_HEAD.search(data) is not None:
            # From now on until the head is complete (llhttp may pass a field value
            # to on_header only with the next read).
            self._check_controls = True
        pieces: list[bytes] = []
        self._pieces = pieces
        parser = cast(HttpResponseParser, self._llhttp)
        failed: HttpParserError | None = None
        too_large = False
        size = self._head_size + len(data)
        try:
            if size <= MAX_HEAD_SIZE:
                self._head_size = size
                parser.feed_data(data)
            else:
                # llhttp has no bound: feed only what the limit allows, then the rest
                # only if the head ended within it.
                room = MAX_HEAD_SIZE - self._head_size
                self._head_size = MAX_HEAD_SIZE
                parser.feed_data(data[:room])
                if self._state == _HEAD:
                    too_large = True
                else:
                    parser.feed_data(data[room:])
        except _ParserUpgrade as e:
            if self._state != _TUNNEL:
                failed = self._check_parser_error(e)
            else:  # bytes after the 101 head are the tunnel's
                cast(TransportEnd, self._tunnel).data(data[int(e.args[0]) :])
        except HttpParserError as e:
            failed = self._check_parser_error(e)
        if not self._head_arrived:
            if too_large:
                self._error = BadResponse(
                    f"the upstream's ({self._where}) response head is over {MAX_HEAD_SIZE} bytes"
                )
            if failed is not None or too_large:
                error = self._error or BadResponse(
                    f"the upstream ({self._where}) sent a malformed response head: "
                    f"{' '.join(str(failed).split())}"
                )
                waiter = self._waiter
                self._waiter = None
                self._teardown()
                if waiter is not None:
                    waiter.errback(error)
            return
        # The final head arrived in this read.
        self._head_arrived = False
        waiter = self._waiter
        self._waiter = None
        response = cast(Response, self._response)
        state = self._state
        if state == _TUNNEL:
            self._response = None
            response._detach()
            if waiter is not None:
                waiter.callback(response)
            return
        if pieces:
            response._held.append((pieces, None))
        if state == _DONE:
            if failed is not None:
                self._extra = True
            self._message_done()
            response._end = _FINISHED
        elif failed is not None:
            self._teardown()
            response._end = self._body_broken(failed)
        elif self._chunked:
            self._edge = self._chunk_edge and data.endswith(b"\n")
        if waiter is not None:
            waiter.callback(response)
        if response._sink is None and self._response is response and not response._dropped:
            self.pause_reading(_UNTIL_DELIVER)

    def _body_data(self, data: bytes) -> None:
        """A read while the response body goes on (the hot path)."""
        pieces: list[bytes] = []
        self._pieces = pieces
        failed: HttpParserError | None = None
        try:
            cast(HttpResponseParser, self._llhttp).feed_data(data)
        except (HttpParserError, _ParserUpgrade) as e:
            failed = self._check_parser_error(e)
        response = cast(Response, self._response)
        if self._state == _BODY:
            if failed is not None:
                self._teardown()
                if pieces:
                    response._received(pieces, None)
                response._finish(self._body_broken(failed))
                return
            raw = None
            if self._chunked:
                edge = self._chunk_edge and data.endswith(b"\n")
                if edge and self._edge:
                    raw = data
                self._edge = edge
                if pieces:
                    self._quiet = 0
                else:
                    self._quiet += len(data)
                    if self._quiet > MAX_HEAD_SIZE:
                        self._teardown()
                        response._finish(
                            BodyIncomplete(
                                f"the upstream ({self._where}) sent over {MAX_HEAD_SIZE} bytes "
                                "of chunk framing or trailers without body bytes"
                            )
                        )
                        return
            if pieces:
                response._received(pieces, raw)
            return
        # The message is complete (self._state == _DONE).
        if failed is not None:
            self._extra = True
        self._message_done()
        if pieces:
            response._received(pieces, None)
        response._finish(None)

    def _check_parser_error(self, error: Exception) -> HttpParserError:
        """
        llhttp stopped: because of a callback of ours (a refusal, or a byte beyond the
        response), or because the bytes are not HTTP. A bug in a callback is raised.
        """
        if isinstance(error, HttpParserCallbackError):
            cause = error.__context__
            if cause is not None and not isinstance(cause, (_AfterResponse, _Refused)):
                raise cause
        if isinstance(error, _ParserUpgrade):
            return HttpParserError("an upgrade nobody asked for")
        return cast(HttpParserError, error)

    def _body_broken(self, error: HttpParserError) -> BodyIncomplete:
        return BodyIncomplete(
            f"the upstream ({self._where}) broke the response body's framing: "
            f"{' '.join(str(error).split())}"
        )

    def _refuse(self, message: str) -> _Refused:
        self._error = BadResponse(f"the upstream ({self._where}) {message}")
        return _Refused()

    # llhttp's callbacks (httptools looks them up by name, once per parser).

    def on_message_begin(self) -> None:
        """A response starts: the next after a ``1xx``, or bytes nobody asked for."""
        if self._state != _HEAD:
            self._extra = True
            raise _AfterResponse()
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        """(Part of) the reason phrase."""
        if self._check_controls and _CONTROL.search(reason):
            raise self._refuse("sent a control character in its status line")
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header field (or a trailer field, which is not relayed)."""
        if self._state != _HEAD:
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_HEADER_LINES:
            raise self._refuse(f"sent more than {MAX_HEADER_LINES} header lines")
        if self._check_controls and _CONTROL.search(value):
            raise self._refuse("sent a control character in a header value")

    def on_headers_complete(self) -> None:
        """A response head is complete: skip a ``1xx``, or make the response."""
        if self._state != _HEAD:
            return
        parser = cast(HttpResponseParser, self._llhttp)
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise self._refuse("switched protocols (101), which aiproxy never asks for")
                self._switch()
                return
            if status < 100:
                raise self._refuse(f"sent status {status}, which is not between 100 and 599")
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise self._refuse(f"sent more than {MAX_INTERIM_RESPONSES} 1xx responses")
            return
        if status > 599:
            raise self._refuse(f"sent status {status}, which is not between 100 and 599")
        headers = self._headers
        length, chunked = _framing(headers)
        has_body = not (self._is_head or status == 204 or status == 304)
        self._response = Response(self, status, self._reason, headers, length, has_body)
        self._head_arrived = True
        self._chunked = chunked and has_body
        self._chunk_edge = True
        self._quiet = 0
        if self._is_head:
            # Complete now, whatever the head says about a body; llhttp would wait.
            self._keep_alive = parser.should_keep_alive()
            self._state = _DONE
            self._fresh_parser = True
        else:
            self._state = _BODY

    def _switch(self) -> None:
        """A ``101`` to an upgrade: the response, with the connection as its tunnel end."""
        response = Response(self, 101, self._reason, self._headers, None, False)
        self._tunnel = response.tunnel = TransportEnd(self._transport)
        self._response = response
        self._head_arrived = True
        self._state = _TUNNEL

    def on_body(self, body: bytes) -> None:
        """Body bytes (decoded from chunks if chunked)."""
        if self._state != _BODY:
            self._extra = True
            raise _AfterResponse()
        self._pieces.append(body)
        self._chunk_had_body = True

    def on_message_complete(self) -> None:
        """A message is complete: a ``1xx``'s, or the response's."""
        if self._state == _BODY:
            self._keep_alive = cast(HttpResponseParser, self._llhttp).should_keep_alive()
            self._state = _DONE

    def on_chunk_header(self) -> None:
        """A chunk-size line was parsed: a chunk's data (or the last chunk) follows."""
        if self._state != _BODY:
            self._extra = True
            raise _AfterResponse()
        self._chunk_edge = False
        self._chunk_had_body = False

    def on_chunk_complete(self) -> None:
        """A chunk ended (after its CRLF); the last chunk has no data."""
        self._chunk_edge = self._chunk_had_body

    # --- Endings ----------------------------------------------------------------

    def _message_done(self) -> None:
        """The response is complete: give the connection back, or close it."""
        response = self._response
        self._response = None
        if response is not None:
            response._detach()
        reusable = self._keep_alive and not self._extra
        if self._body_writer is not None:
            self._stop_body()
            reusable = False
        if reusable:
            self._state = _IDLE
            if self._paused:
                self._paused = 0
                cast("_Transport", self._transport).resumeProducing()
            self._owner.keep(self)
        else:
            self._state = _CLOSED
            cast("_Transport", self._transport).loseConnection()

    def _teardown(self) -> Response | None:
        """Drop the connection now; return the response that was being read, detached."""
        self._state = _CLOSED
        response = self._response
        self._response = None
        if response is not None:
            response._detach()
        self._stop_body()
        self._abort_transport()
        return response

    def _abort_transport(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.abortConnection()

    def _stop_body(self) -> None:
        """Stop a request body source that has not finished."""
        writer = self._body_writer
        if writer is None:
            return
        body = self._body
        self._body_writer = None
        self._body = None
        writer._connection = None
        if writer._registered and not self._lost:
            cast("_Transport", self._transport).unregisterProducer()
        if body is not None:
            body.stop()

    def _lost_before_head(self, reason: Failure) -> UpstreamFailure:
        """The failure of a request whose connection was lost before its response head."""
        why = _describe(reason)
        if not self._handshake_done:
            return ConnectFailed(f"the TLS handshake with {self._where} failed: {why}", "tls")
        if self.reused and not self._got_bytes:
            return StaleConnection(
                f"the upstream ({self._where}) closed a kept-alive connection "
                f"before answering: {why}"
            )
        return LostBeforeResponse(
            f"the upstream ({self._where}) closed the connection before its response head: {why}"
        )
