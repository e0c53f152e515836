"""
aiproxy's own HTTP/1.1 server: a ``Protocol`` on llhttp (``httptools.HttpRequestParser``,
strict) that enforces the client limits as bytes arrive and hands each valid request to
the core, with its body and the :class:`HTTP11Request` that writes its response.

What a client may send, and what it gets otherwise (README, "Limits and bad input"):

  - a head over :data:`~aiproxy.rules.framing.MAX_HEAD_SIZE` bytes, or with more than
    :data:`~aiproxy.rules.framing.MAX_HEADER_LINES` header lines: ``431``; anything
    llhttp refuses, and what :func:`~aiproxy.rules.framing.request_framing` refuses:
    ``400``; a head not complete ``header_timeout`` seconds after its first byte:
    ``408``. These are answered by the connection itself, before a request exists,
    and logged as one ``Request refused`` line.
  - a body over ``max_body_size``: ``413`` (by its ``Content-Length`` before any of it
    is read, or as soon as a chunked body grows past it); a body slower than
    ``body_min_rate`` bytes per second after ``header_timeout`` seconds of grace, or
    not complete ``body_timeout`` seconds after its head: ``408``. These requests
    exist: the core answers them (``RequestHandler.refuse``).
  - after a ``408`` the connection closes at once; after the other refusals it stops
    reading requests, drops what the client still sends, half-closes, and closes when
    the client does or after :data:`LINGER` seconds.

Bodies up to :data:`BUFFERED_BODY_LIMIT` are collected and handed over whole; larger
ones stream to the upstream as a :class:`~aiproxy.server.body.StreamedBody`. Requests
on a connection are answered one at a time, in order: what arrives after a complete
request is kept unparsed, and reading paused, until that request has been answered
(after a chunked body, whose end llhttp does not report by offset, a request already
parsed waits in a queue instead). One timer per connection watches every deadline,
and is moved only when a deadline could be missed; none runs while the proxy itself
holds the client back (a response in flight, a slow upstream).

Only public Twisted names are used; the parser is never made lenient.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from aiproxy._twisted import write_now
from aiproxy.core.activity import Activity
from aiproxy.core.handler import PROXY_BY
from aiproxy.core.interfaces import (
    RequestBody,
    RequestHandler,
)
from aiproxy.core.tunnel import TransportEnd
from aiproxy.errors import (
    BodyTooLarge,
    ClientTooSlow,
    HeadTooLarge,
    InvalidRequest,
    ProxyError,
    error_body,
)
from aiproxy.ops.logger import log
from aiproxy.rules.framing import MAX_HEAD_SIZE, MAX_HEADER_LINES, request_framing
from aiproxy.rules.headers import choose_request_id
from aiproxy.rules.websocket import is_websocket_upgrade
from aiproxy.server.body import StreamedBody
from aiproxy.server.http1_request import BODY as _BODY
from aiproxy.server.http1_request import DONE as _DONE
from aiproxy.server.http1_request import HEAD as _HEAD
from aiproxy.server.http1_request import HTTP11Request
from aiproxy.server.limits import CLIENT_IDLE_TIMEOUT, CLOSE_TIMEOUT, LINGER, ClientLimits

__all__ = ["BUFFERED_BODY_LIMIT", "HTTP11Connection", "HTTP11Factory"]


BUFFERED_BODY_LIMIT = 256 * 1024
"""The largest request body collected in memory and handed over whole; larger ones stream."""

_EARLY = 0.001
"""Seconds a deadline check may run early (float rounding) and still count as due."""

# What llhttp reports as the version, and what the core is told.
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


# The connection's deadline: which one is being watched (0: none).
_IDLE_PHASE = 1
_HEAD_PHASE = 2
_BODY_PHASE = 3
_LINGER_PHASE = 4
_CLOSING_PHASE = 5

# Reasons to stop reading from the client: a bit each (see aiproxy.server.body for 1, 2).
_PIPELINE_PAUSE = 4

_OWS = b" \t"
_FIELD = b": ".join
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"Connection: close\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"


class _Transport(Protocol):
    """What the connection uses of its transport (TCP, UNIX or TLS)."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Sequence[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: the connection reads nothing more."""


class HTTP11Factory(Factory):
    """
    Builds an :class:`HTTP11Connection` for each client connection of a listener.

    @param handler: the core, which answers each request.
    @param clock: the time of every deadline.
    @param activity: told of each connection as it opens and closes; when it drains,
        every response says ``Connection: close``.
    @param limits: what a client may send, and how slowly.
    @param secure: the listener is TLS: requests have the scheme ``https``.
    """

    noisy = False  # the start-up line names the listeners; no "Starting factory" line

    def __init__(
        self,
        handler: RequestHandler,
        clock: IReactorTime,
        activity: Activity,
        limits: ClientLimits,
        *,
        secure: bool = False,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.activity = activity
        self.limits = limits
        self.secure = secure
        self.scheme = b"https" if secure else b"http"

    def buildProtocol(self, addr: IAddress | None) -> HTTP11Connection:
        """A connection for a client at ``addr``."""
        connection = HTTP11Connection(
            self.handler, self.clock, self.activity, self.limits, self.scheme
        )
        connection.factory = self
        return connection


class HTTP11Connection(TwistedProtocol):
    """
    One client's HTTP/1.1 connection: llhttp parses, the limits are checked as bytes
    arrive, and each request goes to the core in turn. It is also the drain's
    ``ClientConnection``.

    @ivar peer: the client's IP address; L{None} for a UNIX socket peer.
    """

    def __init__(
        self,
        handler: RequestHandler,
        clock: IReactorTime,
        activity: Activity,
        limits: ClientLimits,
        scheme: bytes,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.activity = activity
        self.limits = limits
        self.scheme = scheme
        self.peer: str | None = None
        self._max_body = limits.max_body_size
        self._header_timeout = limits.header_timeout
        self._min_rate = limits.body_min_rate
        self._body_timeout = limits.body_timeout
        self._transport: _Transport = cast(_Transport, None)
        self._llhttp = HttpRequestParser(self)
        self._requests: deque[HTTP11Request] = deque()
        self._parsing: HTTP11Request | None = None  # the request llhttp is inside
        self._upgrading: HTTP11Request | None = None
        self._head_size = 0  # bytes fed while a head (or a chunked body's framing) is read
        self._stash = b""  # what arrived after a complete request, kept for its turn
        self._stash_at = 0
        self._trailer_lines = 0
        self._reading = True  # parse what arrives; else drop it
        self._feeding = False
        self._advancing = False
        self._closing = False  # close once the requests in flight are answered
        self._lingering = False
        self._closed = False
        self._gone = False
        self._pauses = 0
        self._paused_at: float | None = None
        self._deadline: IDelayedCall | None = None
        self._phase = 0
        self._phase_owner: HTTP11Request | None = None
        self._phase_started = 0.0
        self._phase_base = 0
        self._body_started = 0.0  # the body phase's start, the time held back added
        self._tunnel: TransportEnd | None = None

    @property
    def closing(self) -> bool:
        """Whether the connection closes once the requests in flight are answered."""
        return self._closing

    # -- Protocol ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Note the peer, tell the activity, and watch the idle deadline."""
        self._transport = cast(_Transport, self.transport)
        peer = self._transport.getPeer()
        self.peer = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None
        self.activity.opened(self)
        self._watch(_IDLE_PHASE, None)

    def dataReceived(self, data: bytes) -> None:
        """Parse ``data`` (or drop it, once nothing more is read), then act on it."""
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.data(data)
            return
        if not self._reading:
            return
        if self._stash:  # arrived before the pause took effect (TLS delivers in records)
            self._stash = self._stash[self._stash_at :] + data
            self._stash_at = 0
            return
        if self._phase == _BODY_PHASE and not self._min_rate:
            self._phase_started = self.clock.seconds()  # no rate: a body only may not stall
        self._feeding = True
        try:
            self._feed(data)
        finally:
            self._feeding = False
        self._advance()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Tell the core of every request still in flight; fail a body still arriving."""
        if self._gone:
            return
        self._gone = self._closed = True
        if self._tunnel is not None:
            self._tunnel.lost(None if reason.check(ConnectionDone) else reason.getErrorMessage())
        self._reading = False
        self._phase = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        requests = list(self._requests)
        self._requests.clear()
        self._parsing = None
        self._stash = b""
        lost = reason.value if isinstance(reason.value, Exception) else ConnectionLost()
        for request in requests:
            if request.started and not request.ended:
                request.ended = True
                if request.exchange is not None:
                    request.exchange.client_gone()
            if request.source is not None:
                request.source.fail(lost)
        self.activity.closed(self)

    # -- ClientConnection ----------------------------------------------------------------

    def close_if_idle(self) -> None:
        """
        Close now if no request is in flight or arriving; else say ``Connection:
        close`` on the next response head and close after that response. A WebSocket
        tunnel is in flight until it ends (or the drain runs out of time).
        """
        if self._closed or self._tunnel is not None:
            return
        if not self._requests:
            self._close()
        else:
            self._closing = True

    def abort(self) -> None:
        """Drop the connection now; a response in flight ends unfinished."""
        if not self._closed:
            self.abort_now()

    # -- BodyReader, for a streamed body ---------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the client for ``reason``; its deadline is suspended meanwhile."""
        if self._closed or self._lingering:
            return
        if not self._pauses:
            self._transport.pauseProducing()
            self._paused_at = self.clock.seconds()
        self._pauses |= reason

    def resume_reading(self, reason: int) -> None:
        """``reason`` holds no more: read again if nothing else pauses the client."""
        pauses = self._pauses
        if not pauses & reason:
            return
        self._pauses = pauses = pauses & ~reason
        if pauses or self._closed or self._lingering:
            return
        self._transport.resumeProducing()
        paused_at, self._paused_at = self._paused_at, None
        if paused_at is not None and self._phase in (_HEAD_PHASE, _BODY_PHASE):
            now = self.clock.seconds()
            self._phase_started += now - paused_at  # the time held back is not the client's
            self._body_started += now - paused_at
            self._arm(self._due(), now)

    # -- llhttp's callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A request begins; if another is ahead of it, pause reading until its turn."""
        if not self._reading:  # the connection went away while llhttp was at work
            raise _Stop
        request = HTTP11Request(self)
        self._parsing = request
        self._trailer_lines = 0
        if self._phase == _IDLE_PHASE:
            self._phase = 0  # idle again after it, from its end
        requests = self._requests
        requests.append(request)
        if len(requests) > 1:
            self.pause_reading(_PIPELINE_PAUSE)

    def on_url(self, url: bytes) -> None:
        """A piece of the request target."""
        self._parsing.url.append(url)  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header field (or a trailer field of a chunked body, which is counted, not kept)."""
        request = self._parsing
        assert request is not None
        if request.state != _HEAD:
            self._trailer_lines += 1
            if self._trailer_lines > MAX_HEADER_LINES:
                too_many = f"the request has over {MAX_HEADER_LINES} trailer lines"
                self._body_error(request, HeadTooLarge(too_many))
                raise _Stop
            return
        headers = request.headers
        if len(headers) >= MAX_HEADER_LINES:
            self._refuse_head(HeadTooLarge(f"the request has over {MAX_HEADER_LINES} header lines"))
            raise _Stop
        if value and value[-1] in _OWS:
            value = value.rstrip(_OWS)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is complete: check its framing, and decide how its body is read."""
        request = self._parsing
        assert request is not None
        parser = self._llhttp
        self._head_size = 0
        request.method = parser.get_method()
        url = request.url
        request.target = url[0] if len(url) == 1 else b"".join(url)
        number = parser.get_http_version()
        version = _VERSIONS.get(number) or b"HTTP/" + number.encode("ascii", "replace")
        request.version = version
        try:
            framing = request_framing(version, request.headers)
        except InvalidRequest as error:
            self._refuse_head(error)
            framing = None
        if framing is None:
            raise _Stop
        if not parser.should_keep_alive():
            request.close_after = True
        if parser.should_upgrade():
            if request.method == b"CONNECT":
                # Answered (405) as an ordinary request; nothing after it is read.
                request.close_after = request.linger = True
                return
            if is_websocket_upgrade(request.headers):
                # The core asks the upstream. What follows the head waits, unparsed, for
                # the answer: a 101 makes it the tunnel's; anything else closes.
                request.tunnel = request.close_after = request.linger = True
                return
            # Any other upgrade is ignored: the request is ordinary, and HTTP/1.1 goes
            # on after it; llhttp ends the message here, so its body is read by the
            # next parser (see _upgraded).
            self._upgrading = request
            request.upgrade_pending = bool(framing.chunked or framing.length)
        if framing.chunked:
            request.chunked = True
        else:
            length = framing.length
            if not length:
                return
            if length > self._max_body:
                request.refusal = self._too_large()
                request.body = None
                request.state = _DONE
                request.close_after = request.linger = True
                self._parsing = None
                self._reading = False
                raise _Stop
            request.length = length
            if length > BUFFERED_BODY_LIMIT:
                request.source = StreamedBody(length, self, [], BUFFERED_BODY_LIMIT)
        request.state = _BODY
        request.expect_continue = framing.expect_continue

    def on_body(self, data: bytes) -> None:
        """A piece of the body: kept, or streamed; refused once it is too large."""
        request = self._parsing
        assert request is not None
        received = request.received + len(data)
        request.received = received
        self._head_size = 0
        if received > self._max_body:
            self._body_error(request, self._too_large())
            raise _Stop
        source = request.source
        if source is not None:
            source.data_received(data)
            return
        body = request.body
        assert body is not None
        body.append(data)
        if received > BUFFERED_BODY_LIMIT:  # a chunked body: it streams from now on
            request.source = StreamedBody(None, self, body, BUFFERED_BODY_LIMIT)
            request.body = None

    def on_message_complete(self) -> None:
        """The request is complete; after one that closes, nothing more is read."""
        request = self._parsing
        assert request is not None
        if request.upgrade_pending:  # llhttp stopped at an Upgrade: the body follows
            request.upgrade_pending = False
            return
        request.state = _DONE
        self._parsing = None
        self._head_size = 0
        source = request.source
        if source is not None:
            if request.incoming is not None:
                request.incoming.record.bytes_in = request.received
            source.finish()
        if request.tunnel:
            return  # llhttp stops at the upgrade; the rest is stashed until the answer
        if request.close_after:
            self._reading = False
            raise _Stop

    # -- reading -------------------------------------------------------------------------

    def _feed(self, data: bytes, pos: int = 0) -> None:
        """
        Feed ``data`` from ``pos`` to llhttp, counting the bytes of each head as they
        go in: a head is fed up to its end (the first empty line) or up to what the
        limit leaves, and a ``Content-Length`` body up to its end, so that the next
        head is counted from its first byte. Once a request is complete, what follows
        it is kept raw (and reading paused) until that request has been answered.
        """
        size = len(data)
        view: memoryview | None = None
        while pos < size:
            request = self._parsing
            if request is None and self._requests:
                self._stash, self._stash_at = data, pos
                self.pause_reading(_PIPELINE_PAUSE)
                return
            if request is None or request.state == _HEAD:
                limit = pos + MAX_HEAD_SIZE - self._head_size
                end = data.find(b"\r\n\r\n", pos, limit)
                cut = end + 4 if end >= 0 else min(size, limit)
                self._head_size += cut - pos
            elif request.length is None:  # a chunked body: its framing is bounded too
                cut = min(size, pos + MAX_HEAD_SIZE - self._head_size)
                self._head_size += cut - pos
            else:
                cut = min(size, pos + request.length - request.received)
            if pos == 0 and cut == size:
                piece: bytes | memoryview = data
            else:
                if view is None:
                    view = memoryview(data)
                piece = view[pos:cut]
            try:
                self._llhttp.feed_data(piece)
            except HttpParserUpgrade as upgrade:
                cut = pos + int(upgrade.args[0])
                self._upgraded()
            except HttpParserCallbackError as error:
                if not isinstance(error.__context__, _Stop):
                    raise  # a bug in a callback
                return
            except HttpParserError as error:
                self._parse_error(error)
                return
            if not self._reading:
                return
            if self._head_size >= MAX_HEAD_SIZE:
                self._too_much_framing()
                return
            pos = cut

    def _upgraded(self) -> None:
        """
        llhttp stopped at an ``Upgrade`` that is ignored: a new parser reads on. If the
        request has a body, the new parser is first fed a made-up head with the same
        framing (its callbacks dropped), so that it reads that body, then what follows.
        """
        request, self._upgrading = self._upgrading, None
        if request is None or request.state != _BODY:
            self._llhttp = HttpRequestParser(self)
            return
        after = _AfterUpgrade(self)
        self._llhttp = parser = HttpRequestParser(after)
        if request.chunked:
            parser.feed_data(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            assert request.length is not None
            parser.feed_data(b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % request.length)
        after.priming = False

    def _parse_error(self, error: HttpParserError) -> None:
        """llhttp refused what it read: the head, or a body's chunk framing."""
        if isinstance(error, HttpParserInvalidMethodError):
            message = "the request method is not valid"
        elif isinstance(error, HttpParserInvalidURLError):
            message = f"the request target is not valid: {error}"
        else:
            message = f"the request is not valid HTTP/1.1: {error}"
        request = self._parsing
        if request is not None and request.state == _BODY:
            self._body_error(request, InvalidRequest(message))
        else:
            self._refuse_head(InvalidRequest(message))

    def _too_much_framing(self) -> None:
        request = self._parsing
        if request is not None and request.state == _BODY:
            too_large = "the chunk framing or trailer section of the request body is over 64 KiB"
            self._body_error(request, HeadTooLarge(too_large))
        else:
            self._refuse_head(
                HeadTooLarge(f"the request head is larger than {MAX_HEAD_SIZE} bytes")
            )

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"the request body is larger than the limit of {self._max_body} bytes")

    def _refuse_head(self, error: ProxyError) -> None:
        """The head being read is refused by the connection: read nothing more."""
        self._reading = False
        request = self._parsing
        if request is None:
            request = HTTP11Request(self)
            self._requests.append(request)
        self._parsing = None
        request.state = _DONE
        request.door_error = error

    def _body_error(self, request: HTTP11Request, error: ProxyError) -> None:
        """
        ``request``'s body is refused (too large, too slow, malformed): the core
        answers it (or, if its body already streams, fails that body); nothing more is
        read, and the connection closes after the response.
        """
        self._reading = False
        if self._parsing is request:
            self._parsing = None
        request.state = _DONE
        request.close_after = True
        if isinstance(error, ClientTooSlow):
            request.close_now = True
        else:
            request.linger = True
        source = request.source
        if request.started:
            if request.incoming is not None:
                request.incoming.record.bytes_in = request.received
        else:
            request.refusal = error
            request.body = None
            request.source = None
        if source is not None:
            source.fail(error)

    # -- handing requests over -------------------------------------------------------------

    def _advance(self) -> None:
        """Start the request at the front if it can be, and the ones after it in turn."""
        if self._feeding or self._advancing or self._closed:
            return
        self._advancing = True
        try:
            requests = self._requests
            while not self._closed:
                if not requests:
                    if not self._stash or not self._reading:
                        break
                    data, pos = self._stash, self._stash_at
                    self._stash = b""
                    self._feeding = True
                    try:
                        self._feed(data, pos)
                    finally:
                        self._feeding = False
                    continue
                front = requests[0]
                if front.started:
                    break
                if front.door_error is not None:
                    self._answer_refusal(front, front.door_error)
                    return
                state = front.state
                if state == _BODY:
                    if front.expect_continue:
                        front.expect_continue = False
                        self._transport.write(_CONTINUE)
                    if front.source is None:
                        break
                elif state == _HEAD:
                    break
                self._start(front)
        finally:
            self._advancing = False
        if self._closed or self._lingering:
            return
        if len(self._requests) < 2 and not self._stash:
            self.resume_reading(_PIPELINE_PAUSE)
        self._update_phase()

    def _start(self, request: HTTP11Request) -> None:
        """Hand ``request`` to the core: its body whole, streaming, or its refusal."""
        request.started = True
        try:
            self._hand_over(request)
        except Exception:
            # A bug in the core: the connection cannot know what the client was told.
            log.failure("Unhandled error handling a request")
            request.ended = True
            self.abort_now()

    def _hand_over(self, request: HTTP11Request) -> None:
        handler = self.handler
        incoming = handler.incoming(
            request.method,
            request.target,
            request.headers,
            request.version,
            self.scheme,
            self.peer,
        )
        request.incoming = incoming
        if request.refusal is not None:
            incoming.record.bytes_in = request.received
            exchange = handler.refuse(incoming, request.refusal, request)
        else:
            body: RequestBody
            if request.source is not None:
                body = request.source
                incoming.record.bytes_in = request.received
            else:
                pieces = request.body or ()
                body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                request.body = None
                incoming.record.bytes_in = len(body)
            exchange = handler.handle(incoming, body, request)
        if not request.ended:
            request.exchange = exchange

    def response_ended(self, request: HTTP11Request) -> None:
        """``request``'s response is complete: on to the next request, or close."""
        request.ended = True
        if request.producing:
            request.producing = False
            self._transport.unregisterProducer()
        requests = self._requests
        if requests and requests[0] is request:
            requests.popleft()
        if self._closed:
            return
        if request.state != _DONE and request.source is not None:
            # The body is still arriving and will not be read: its upstream request,
            # if any, cannot complete.
            request.source.fail(ConnectionDone("the response ended before the request body"))
        if request.close_after or (self._closing and not requests and not self._stash):
            if request.close_now:
                self._close()
            elif request.linger or request.state != _DONE:
                self._linger()  # what the client still sends is dropped
            else:
                self._close()
            return
        self._advance()

    def become_tunnel(self, request: HTTP11Request, head: bytes) -> TransportEnd:
        """
        Send ``head`` (a ``101``) and hand the connection over: what the client sent
        after its request, and everything it sends from now on, goes to the tunnel end;
        no deadline of this connection applies any more.
        """
        held = self._stash[self._stash_at :]
        self._stash = b""
        self._requests.clear()
        self._parsing = None
        self._reading = False
        self._phase = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._pauses:
            self._pauses = 0
            self._paused_at = None
            self._transport.resumeProducing()
        self._tunnel = tunnel = TransportEnd(self._transport, held)
        write_now(self._transport, head)
        return tunnel

    def closes_after(self, request: HTTP11Request) -> None:
        """``request``'s response says ``Connection: close``: nothing after it is answered."""
        requests = self._requests
        while requests and requests[-1] is not request:
            requests.pop()  # pipelined, never handed over: dropped
        self._stash = b""
        if self._parsing is not request:
            self._parsing = None
            self._reading = False

    def _answer_refusal(self, request: HTTP11Request, error: ProxyError) -> None:
        """Answer a refused head with ``error``'s JSON, log it, and close."""
        self._requests.clear()
        request_id = choose_request_id(
            [value for name, value in request.headers if name.lower() == b"x-request-id"]
        )
        body = error_body(error, request_id)
        status = error.status
        lines = [
            b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode("ascii")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            b"Date: " + formatdate(self.clock.seconds(), usegmt=True).encode("ascii"),
            b"X-Request-ID: " + request_id,
            b"X-Proxy-By: " + PROXY_BY,
        ]
        lines += map(_FIELD, error.headers)
        lines += (b"", body)
        self._transport.write(b"\r\n".join(lines))
        log.info(
            "Request refused: {status} {message} [Client: {client}] [ID: {request_id}]",
            status=status,
            message=error.message,
            client=self.peer or "unix",
            request_id=request_id.decode("ascii"),
        )
        if isinstance(error, ClientTooSlow):
            self._close()
        else:
            self._linger()

    # -- closing ---------------------------------------------------------------------------

    def _linger(self) -> None:
        """Read nothing more, half-close, close when the client does or after LINGER."""
        self._reading = False
        self._lingering = True
        self._requests.clear()
        self._parsing = None
        self._stash = b""
        if self._pauses:
            self._pauses = 0
            self._paused_at = None
            self._transport.resumeProducing()  # drain what the client still sends
        # Over TLS the wrapper would hand this to the TCP transport underneath, which
        # would cut the TLS stream (and what it still buffers): only plain sockets.
        transport = self._transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None and not ISSLTransport.providedBy(transport):
            half_close()
        self._watch(_LINGER_PHASE, None)

    def _close(self) -> None:
        """Close once what was written is sent (abort if that takes CLOSE_TIMEOUT)."""
        if self._closed:
            return
        self._closed = True
        self._reading = False
        self._stash = b""
        self._watch(_CLOSING_PHASE, None)
        self._transport.loseConnection()

    def abort_now(self) -> None:
        """Drop the connection at once (a response cannot be completed)."""
        self._closed = True
        self._reading = False
        self._transport.abortConnection()

    # -- the deadline ----------------------------------------------------------------------

    def _update_phase(self) -> None:
        """Watch the deadline that applies now: idle, the front request's head or body."""
        requests = self._requests
        if not requests:
            if self._phase != _IDLE_PHASE and self._reading:
                self._watch(_IDLE_PHASE, None)
            return
        front = requests[0]
        state = front.state
        if state == _HEAD:
            phase = _HEAD_PHASE
        elif state == _BODY and self._reading:
            phase = _BODY_PHASE
        else:
            self._phase = 0  # being answered: the core's timeouts apply
            self._phase_owner = None
            return
        if phase != self._phase or front is not self._phase_owner:
            self._watch(phase, front)

    def _watch(self, phase: int, owner: HTTP11Request | None) -> None:
        """Start ``phase``'s deadline now; the timer is moved only if it would be late."""
        now = self.clock.seconds()
        self._phase = phase
        self._phase_owner = owner
        self._phase_started = self._body_started = now
        self._phase_base = owner.received if owner is not None else 0
        self._paused_at = now if self._pauses else None
        self._arm(self._due(), now)

    def _due(self) -> float:
        phase = self._phase
        started = self._phase_started
        if phase == _BODY_PHASE:
            rate = self._min_rate
            if rate:
                owner = self._phase_owner
                assert owner is not None
                due = started + self._header_timeout + (owner.received - self._phase_base) / rate
            else:
                due = started + CLIENT_IDLE_TIMEOUT
            if self._body_timeout:
                return min(due, self._body_started + self._body_timeout)
            return due
        if phase == _HEAD_PHASE:
            return started + self._header_timeout
        if phase == _IDLE_PHASE:
            return started + CLIENT_IDLE_TIMEOUT
        if phase == _LINGER_PHASE:
            return started + LINGER
        return started + CLOSE_TIMEOUT

    def _arm(self, due: float, now: float) -> None:
        timer = self._deadline
        if timer is None:
            self._deadline = self.clock.callLater(max(due - now, 0), self._check_deadline)
        elif timer.getTime() > due:
            timer.reset(max(due - now, 0))

    def _check_deadline(self) -> None:
        self._deadline = None
        phase = self._phase
        if not phase or self._gone:
            return
        if self._pauses and phase in (_HEAD_PHASE, _BODY_PHASE):
            return  # suspended: re-armed when reading resumes
        now = self.clock.seconds()
        due = self._due()
        if now + _EARLY < due:
            self._deadline = self.clock.callLater(due - now, self._check_deadline)
            return
        owner = self._phase_owner
        self._phase = 0
        self._phase_owner = None
        if phase == _HEAD_PHASE:
            assert owner is not None
            timeout = self._header_timeout
            self._reading = False
            self._parsing = None
            owner.state = _DONE
            owner.door_error = ClientTooSlow(
                f"the request head was not complete within {timeout:g}s"
            )
            self._advance()
        elif phase == _BODY_PHASE and (self._min_rate or self._timed_out(now)):
            assert owner is not None
            if self._timed_out(now):
                limit = f"was not complete within {self._body_timeout:g}s"
            else:
                limit = f"arrived slower than {self._min_rate} bytes/s"
            self._body_error(owner, ClientTooSlow(f"the request body {limit}"))
            self._advance()
        elif phase == _CLOSING_PHASE:
            self._transport.abortConnection()
        else:  # idle, lingering, or a body without a rate that stalled
            self._close()

    def _timed_out(self, now: float) -> bool:
        """Whether the body being read is past ``BODY_TIMEOUT``."""
        timeout = self._body_timeout
        return bool(timeout) and now + _EARLY >= self._body_started + timeout


class _AfterUpgrade:
    """
    The callbacks of a parser that reads on after an ignored ``Upgrade``: those of the
    made-up head it is first fed are dropped, the rest go to the connection.
    """

    def __init__(self, connection: HTTP11Connection) -> None:
        self.connection = connection
        self.priming = True

    def on_message_begin(self) -> None:
        if not self.priming:
            self.connection.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.connection.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.connection.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.priming:
            self.connection.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.connection.on_body(data)

    def on_message_complete(self) -> None:
        self.connection.on_message_complete()
