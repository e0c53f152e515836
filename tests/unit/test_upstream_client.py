"""
aiproxy's upstream client on fakes: requests go out as written, responses are parsed
by llhttp and relayed piece by piece, connections are reused only when that is safe,
and a hostile upstream is refused with bounded memory.

The pool runs on a ``MemoryReactorClock``; each connection the test accepts is a
``StringTransport``, fed by the test as the upstream.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy.core.interfaces import BodySink, UpstreamResponse
from aiproxy.rules.framing import MAX_HEAD_SIZE, MAX_HEADER_LINES
from aiproxy.rules.target import parse_target
from aiproxy.upstream.connection import MAX_INTERIM_RESPONSES, UpstreamConnection
from aiproxy.upstream.errors import (
    BadResponse,
    BodyIncomplete,
    ConnectFailed,
    LostBeforeResponse,
    StaleConnection,
)
from aiproxy.upstream.pool import (
    TLS_CLOSE_TIMEOUT,
    IdleConnections,
    UpstreamPool,
    connect_failure,
)
from aiproxy.upstream.tls import UncheckedTLS

GET = b"GET /v1/models HTTP/1.1\r\nHost: upstream\r\n\r\n"
POST = b"POST /v1/chat HTTP/1.1\r\nHost: upstream\r\nContent-Length: 2\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


# --- Fakes -------------------------------------------------------------------------


class RecordingTransport(StringTransport):
    """A ``StringTransport`` that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(ITCPTransport)
class TCPTransport(RecordingTransport):
    """A transport that says it is TCP, and records ``TCP_NODELAY``."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        pass


class Sink:
    """A ``ResponseSink`` that records what it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], bytes | None]] = []
        self.done = False
        self.failed: Exception | None = None

    def body_received(self, pieces: list[bytes], raw_chunked: bytes | None) -> None:
        assert not self.done and self.failed is None
        self.calls.append((list(pieces), raw_chunked))

    def body_done(self) -> None:
        assert not self.done and self.failed is None
        self.done = True

    def body_failed(self, reason: Exception) -> None:
        assert not self.done and self.failed is None
        self.failed = reason

    @property
    def body(self) -> bytes:
        return b"".join(b"".join(pieces) for pieces, _ in self.calls)


class Source:
    """A ``BodySource`` the test writes through."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.sink: BodySink | None = None
        self.stopped = False

    def replayable(self) -> bool:
        return False

    def start(self, sink: BodySink) -> None:
        self.sink = sink

    def stop(self) -> None:
        self.stopped = True


@implementer(IPushProducer)
class Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Owner:
    """Stands for the pool's idle set."""

    def __init__(self) -> None:
        self.kept: list[UpstreamConnection] = []
        self.forgotten: list[UpstreamConnection] = []

    def keep(self, connection: UpstreamConnection) -> None:
        self.kept.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        self.forgotten.append(connection)


def connection(tls: bool = False) -> tuple[UpstreamConnection, RecordingTransport, Owner]:
    """A connection over a fresh transport."""
    owner = Owner()
    conn = UpstreamConnection(owner, "upstream:80", tls)
    transport = RecordingTransport()
    conn.makeConnection(transport)
    return conn, transport, owner


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a ``Failure`` if it failed); it must have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def response_of(d: Deferred[UpstreamResponse]) -> UpstreamResponse:
    result = outcome(d)
    assert not isinstance(result, Failure), result
    return cast(UpstreamResponse, result)


def error_of(d: Deferred[Any]) -> Exception:
    result = outcome(d)
    assert isinstance(result, Failure), result
    assert isinstance(result.value, Exception)
    return result.value


def exchange(
    *pieces: bytes, method: bytes = b"GET", request: bytes = GET
) -> tuple[UpstreamResponse, Sink, RecordingTransport, Owner]:
    """Send a request on a new connection, feed the response pieces, deliver to a sink."""
    conn, transport, owner = connection()
    d = conn.send(method, request, b"", False)
    first, *rest = pieces
    conn.dataReceived(first)
    response = response_of(d)
    sink = Sink()
    response.deliver(sink)
    for piece in rest:
        conn.dataReceived(piece)
    return response, sink, transport, owner


def refused(*pieces: bytes) -> tuple[Exception, RecordingTransport]:
    """Feed a response that must be refused; return the request's failure."""
    conn, transport, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    for piece in pieces:
        conn.dataReceived(piece)
    return error_of(d), transport


class Upstream:
    """One connection the pool opened on the memory reactor, accepted by the test."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        host, port, factory, _, _ = reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        self.protocol = protocol
        self.transport = TCPTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def received(self) -> bytes:
        return bytes(self.transport.value())


def new_pool(**settings: Any) -> tuple[UpstreamPool, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(
        reactor, parse_target("http://192.0.2.10:8080/base"), connect_timeout=5, **settings
    )
    return pool, reactor


def accept(reactor: MemoryReactorClock) -> Upstream:
    """Accept the most recent connection attempt."""
    return Upstream(reactor, len(reactor.tcpClients) - 1)


def dechunk(data: bytes) -> bytes:
    """The body of a complete chunked stream (``0\\r\\n\\r\\n`` included)."""
    body = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert data == b"\r\n", data
            return body
        body += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


# --- Requests ----------------------------------------------------------------------


def test_a_small_body_goes_out_in_the_same_write_as_the_head() -> None:
    """A request with its body in memory is one write: head and body together."""
    conn, transport, _ = connection()
    conn.send(b"POST", POST, b"{}", False)
    assert transport.writes == [POST + b"{}"]


def test_a_request_without_body_is_the_head_alone() -> None:
    conn, transport, _ = connection()
    conn.send(b"GET", GET, b"", False)
    assert transport.writes == [GET]


def test_a_body_of_unknown_length_is_sent_with_chunked_framing() -> None:
    """A streamed body without a length goes out in chunks, empty writes skipped."""
    conn, transport, _ = connection()
    source = Source(None)
    conn.send(b"POST", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", source, False)
    assert source.sink is not None
    source.sink.write(b"abc")
    source.sink.write(b"")
    source.sink.write(b"0123456789abcdefg")
    source.sink.finish()
    body = transport.value().split(b"\r\n\r\n", 1)[1]
    assert body == b"3\r\nabc\r\n11\r\n0123456789abcdefg\r\n0\r\n\r\n"
    assert dechunk(body) == b"abc0123456789abcdefg"


def test_a_body_of_known_length_is_sent_as_is() -> None:
    conn, transport, _ = connection()
    source = Source(5)
    conn.send(b"POST", POST, source, False)
    assert source.sink is not None
    source.sink.write(b"ab")
    source.sink.write(b"cde")
    source.sink.finish()
    assert transport.writes == [POST, b"ab", b"cde"]


def test_the_body_source_producer_is_registered_with_the_transport() -> None:
    """A streamed body's producer is paused by the upstream connection's flow control."""
    conn, transport, _ = connection()
    source = Source(None)
    conn.send(b"POST", POST, source, False)
    assert source.sink is not None
    producer = Producer()
    source.sink.register_producer(producer, True)
    assert transport.producer is producer
    source.sink.unregister_producer()
    assert transport.producer is None


def test_a_body_that_fails_before_the_response_fails_the_request() -> None:
    """The request fails with the body's reason and the connection is dropped."""
    conn, transport, owner = connection()
    source = Source(None)
    d = conn.send(b"POST", POST, source, False)
    assert source.sink is not None
    reason = ValueError("client went away")
    source.sink.fail(reason)
    assert error_of(d) is reason
    assert transport.disconnected
    assert owner.kept == []


def test_a_body_that_fails_after_the_response_head_drops_the_connection() -> None:
    """The response head already arrived: the connection is dropped, its body ends early."""
    conn, transport, owner = connection()
    source = Source(None)
    d = conn.send(b"POST", POST, source, False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    sink = Sink()
    response_of(d).deliver(sink)
    assert source.sink is not None
    source.sink.fail(ValueError("too slow"))
    assert transport.disconnected
    assert isinstance(sink.failed, BodyIncomplete)
    assert owner.kept == []


def test_a_response_that_ends_before_the_body_is_sent_stops_the_body() -> None:
    """An early answer (a 413, say) stops the body source; the connection is not reused."""
    conn, transport, owner = connection()
    source = Source(None)
    d = conn.send(b"POST", POST, source, False)
    assert source.sink is not None
    source.sink.write(b"partial")
    conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    response = response_of(d)
    sink = Sink()
    response.deliver(sink)
    assert response.status == 413 and sink.done
    assert source.stopped
    assert owner.kept == [] and transport.disconnecting
    written = transport.value()
    source.sink.write(b"more")
    source.sink.finish()
    assert transport.value() == written


def test_new_connections_turn_nagle_off() -> None:
    """Each new upstream connection has TCP_NODELAY, so that small writes go at once."""
    pool, reactor = new_pool()
    pool.request(b"GET", GET, b"")
    upstream = accept(reactor)
    assert upstream.transport.no_delay
    assert reactor.tcpClients[0][:2] == ("192.0.2.10", 8080)
    assert reactor.tcpClients[0][3] == 5


# --- Responses ---------------------------------------------------------------------


def test_a_content_length_response_is_relayed_with_every_header() -> None:
    """Status, reason, every header in wire order and case (hop-by-hop ones too), body."""
    head = (
        b"HTTP/1.1 201 Created Here\r\nX-B: 2\r\nconnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nX-B: 3\r\nContent-Length: 11\r\n\r\n"
    )
    response, sink, _, owner = exchange(head + b"hello", b" world")
    assert (response.status, response.reason) == (201, b"Created Here")
    assert response.headers == [
        (b"X-B", b"2"),
        (b"connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-B", b"3"),
        (b"Content-Length", b"11"),
    ]
    assert response.length == 11 and response.has_body
    assert sink.calls == [([b"hello"], None), ([b" world"], None)]
    assert sink.done
    assert len(owner.kept) == 1


def test_each_read_is_passed_on_at_once_in_one_call() -> None:
    """Every read of body bytes is one ``body_received`` call, nothing waits for more."""
    _response, sink, _, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n", b"a", b"bc")
    assert sink.calls == [([b"a"], None), ([b"bc"], None)]
    assert not sink.done


def test_a_chunked_response_passes_whole_chunks_as_they_came() -> None:
    """
    A read holding whole chunks is passed on raw as well as decoded; a read that
    starts or ends inside a chunk is passed decoded only, so the raw form is always
    whole chunks.
    """
    response, sink, _, owner = exchange(
        CHUNKED_HEAD,
        b"5\r\nhello\r\n",
        b"1;ext=1\r\n \r\n5\r\nworld\r\n",
        b"3\r\nab",
        b"c\r\n",
        b"2\r\nde\r\n",
        b"0\r\n",
        b"\r\n",
    )
    assert response.length is None and response.has_body
    assert sink.calls == [
        ([b"hello"], b"5\r\nhello\r\n"),
        ([b" ", b"world"], b"1;ext=1\r\n \r\n5\r\nworld\r\n"),
        ([b"ab"], None),
        ([b"c"], None),
        ([b"de"], b"2\r\nde\r\n"),
    ]
    assert sink.done
    assert len(owner.kept) == 1


def test_the_read_with_the_head_and_the_read_with_the_end_are_decoded() -> None:
    """Body bytes that came with the head, or with the last chunk, have no raw form."""
    _response, sink, _, _ = exchange(CHUNKED_HEAD + b"2\r\nhi\r\n", b"2\r\nyo\r\n0\r\n\r\n")
    assert sink.calls == [([b"hi"], None), ([b"yo"], None)]
    assert sink.done


def test_trailers_are_read_but_not_relayed() -> None:
    response, sink, _, owner = exchange(CHUNKED_HEAD, b"2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n")
    assert sink.body == b"hi" and sink.done
    assert (b"X-T", b"1") not in response.headers
    assert len(owner.kept) == 1


def test_endless_trailers_are_cut_off() -> None:
    """Trailers (or chunk framing) without body bytes are bounded like a head."""
    conn, transport, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(CHUNKED_HEAD)
    sink = Sink()
    response_of(d).deliver(sink)
    conn.dataReceived(b"2\r\nhi\r\n0\r\n")
    sent = 0
    line = b"X-Trailer: " + b"t" * 1000 + b"\r\n"
    while sink.failed is None:
        conn.dataReceived(line)
        sent += len(line)
        assert sent < 2 * MAX_HEAD_SIZE, "the trailers were never cut off"
    assert isinstance(sink.failed, BodyIncomplete)
    assert sent <= MAX_HEAD_SIZE + len(line)
    assert transport.disconnected


def test_a_close_delimited_body_ends_when_the_upstream_closes() -> None:
    """No length and not chunked: the body runs until the connection closes cleanly."""
    conn, _transport, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    response = response_of(d)
    assert response.length is None and response.has_body
    sink = Sink()
    response.deliver(sink)
    conn.dataReceived(b" more")
    assert not sink.done
    conn.connectionLost(Failure(ConnectionDone()))
    assert sink.body == b"some more" and sink.done
    assert owner.kept == [] and owner.forgotten == []


def test_a_close_delimited_body_cut_by_a_reset_is_incomplete() -> None:
    conn, _, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    sink = Sink()
    response_of(d).deliver(sink)
    conn.connectionLost(Failure(ConnectionLost()))
    assert isinstance(sink.failed, BodyIncomplete)


def test_a_body_cut_short_is_incomplete() -> None:
    """The connection closing before ``Content-Length`` bytes came fails the body."""
    conn, _, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    sink = Sink()
    response_of(d).deliver(sink)
    conn.connectionLost(Failure(ConnectionDone()))
    assert sink.body == b"abc"
    assert isinstance(sink.failed, BodyIncomplete)
    assert "middle of the response body" in str(sink.failed)


def test_broken_chunk_framing_fails_the_body() -> None:
    _response, sink, transport, owner = exchange(CHUNKED_HEAD, b"2\r\nhi\r\n", b"zz\r\n")
    assert sink.body == b"hi"
    assert isinstance(sink.failed, BodyIncomplete)
    assert transport.disconnected and owner.kept == []


def test_a_response_to_head_has_no_body_whatever_its_length() -> None:
    """A HEAD response is complete with its head; its Content-Length describes a GET."""
    response, sink, _, owner = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD"
    )
    assert response.length == 1234 and not response.has_body
    assert sink.calls == [] and sink.done
    assert len(owner.kept) == 1


def test_after_a_head_response_the_next_response_parses_right() -> None:
    """A kept connection that answered a HEAD reads the next response from its start."""
    conn, _, owner = connection()
    d = conn.send(b"HEAD", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    response_of(d).deliver(Sink())
    assert owner.kept == [conn]
    d = conn.send(b"GET", GET, b"", True)
    conn.dataReceived(OK)
    sink = Sink()
    response_of(d).deliver(sink)
    assert sink.body == b"ok" and sink.done


def test_bytes_after_a_head_response_close_the_connection() -> None:
    """A body after a HEAD response (an upstream bug) is never relayed nor reused."""
    _response, sink, transport, owner = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody", method=b"HEAD"
    )
    assert sink.calls == [] and sink.done
    assert owner.kept == [] and transport.disconnecting


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    response, sink, _, owner = exchange(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert response.status == status and not response.has_body
    assert response.length == 10
    assert sink.done and sink.calls == []
    assert len(owner.kept) == 1


def test_1xx_responses_are_skipped() -> None:
    """``100 Continue`` and ``103 Early Hints`` are skipped; the final response is relayed."""
    conn, _, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n")
    conn.dataReceived(b"Link: </a>\r\n\r\n")
    assert not d.called
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok")
    response = response_of(d)
    sink = Sink()
    response.deliver(sink)
    assert response.status == 200
    assert response.headers == [(b"X-Final", b"1"), (b"Content-Length", b"2")]
    assert sink.body == b"ok" and sink.done
    assert len(owner.kept) == 1


def test_up_to_ten_1xx_responses_are_accepted() -> None:
    response, sink, _, _ = exchange(b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM_RESPONSES + OK)
    assert response.status == 200 and sink.body == b"ok"


def test_a_1xx_flood_is_a_bad_response() -> None:
    error, transport = refused(b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM_RESPONSES + 1))
    assert isinstance(error, BadResponse)
    assert "1xx" in str(error)
    assert transport.disconnected


def test_101_is_a_bad_response() -> None:
    """aiproxy never asks for an upgrade: a ``101`` is refused."""
    error, _ = refused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nxyz")
    assert isinstance(error, BadResponse) and "101" in str(error)


@pytest.mark.parametrize("status", [b"099", b"600", b"999"])
def test_a_status_out_of_range_is_a_bad_response(status: bytes) -> None:
    error, _ = refused(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(error, BadResponse)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 O\rK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 O\x1bK\r\n\r\n",
        b"HTTP/1.1 200 O\x7fK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x1bb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x0bb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n",
    ],
)
def test_a_control_byte_in_the_status_line_or_a_header_value_is_refused(head: bytes) -> None:
    """CR, NUL, ESC, DEL and the other control bytes are refused; the connection closes."""
    error, transport = refused(head)
    assert isinstance(error, BadResponse)
    assert "\n" not in str(error)
    assert transport.disconnected


def test_a_tab_in_a_header_value_is_fine() -> None:
    response, _, _, _ = exchange(b"HTTP/1.1 200 OK\r\nX: a\tb\r\nContent-Length: 0\r\n\r\n")
    assert (b"X", b"a\tb") in response.headers


def test_control_bytes_in_the_body_are_fine() -> None:
    """Only the head is checked: a body is relayed byte for byte."""
    body = bytes(range(32)) + b"\x7f"
    _response, sink, _, _ = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    assert sink.body == body and sink.done


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", b"junk\r\n"],
)
def test_a_malformed_head_is_a_bad_response(head: bytes) -> None:
    error, transport = refused(head)
    assert isinstance(error, BadResponse)
    assert transport.disconnected


def test_an_endless_head_is_cut_off_at_64_kib() -> None:
    """Header lines sent forever: refused once the head passes 64 KiB, reading stops."""
    conn, transport, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    fed = 0
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    while not d.called:
        conn.dataReceived(line)
        fed += len(line)
        assert fed < 2 * MAX_HEAD_SIZE, "the head was never refused"
    error = error_of(d)
    assert isinstance(error, BadResponse)
    assert transport.disconnected
    assert fed <= MAX_HEAD_SIZE + len(line)
    conn.dataReceived(line)  # bytes still in flight are ignored


def test_one_endless_header_value_is_cut_off_too() -> None:
    conn, _, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Long: ")
    fed = 0
    while not d.called:
        conn.dataReceived(b"v" * 4096)
        fed += 4096
        assert fed < 2 * MAX_HEAD_SIZE
    assert isinstance(error_of(d), BadResponse)


def test_a_head_of_exactly_64_kib_with_body_in_the_same_read_is_accepted() -> None:
    """The limit is on the head: body bytes in the same read do not count."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    filler = MAX_HEAD_SIZE - len(start) - len(b"X: \r\n\r\n")
    head = start + b"X: " + b"f" * filler + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE
    _response, sink, _, _ = exchange(head + b"hello")
    assert sink.body == b"hello" and sink.done
    error, _ = refused(start + b"X: " + b"f" * (filler + 1) + b"\r\n\r\nhello")
    assert isinstance(error, BadResponse)


def test_more_than_100_header_lines_are_refused() -> None:
    """A head of 100 header lines is fine, one more is refused."""
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_LINES - 1))
    response, _, _, _ = exchange(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 0\r\n\r\n")
    assert len(response.headers) == MAX_HEADER_LINES
    error, _ = refused(b"HTTP/1.1 200 OK\r\n" + lines + b"X-Last: 1\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(error, BadResponse) and "header lines" in str(error)


def test_a_body_longer_than_its_length_is_cut_and_the_connection_closed() -> None:
    """Exactly ``Content-Length`` bytes are relayed; the rest is dropped with the connection."""
    _response, sink, transport, owner = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"helloEXTRA"
    )
    assert sink.body == b"hello" and sink.done
    assert owner.kept == [] and transport.disconnecting


def test_a_second_response_in_the_same_read_is_never_taken() -> None:
    """A well-formed extra response after the real one closes the connection."""
    _response, sink, transport, owner = exchange(
        OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )
    assert sink.body == b"ok" and sink.done
    assert owner.kept == [] and transport.disconnecting


def test_bytes_after_the_final_chunk_close_the_connection() -> None:
    _response, sink, transport, owner = exchange(CHUNKED_HEAD, b"2\r\nhi\r\n0\r\n\r\nHTTP/1.1")
    assert sink.body == b"hi" and sink.done
    assert owner.kept == [] and transport.disconnecting


def test_connection_close_from_the_upstream_is_honoured() -> None:
    _response, sink, transport, owner = exchange(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    )
    assert sink.done and owner.kept == [] and transport.disconnecting


def test_an_http_1_0_response_is_not_kept() -> None:
    _response, sink, _transport, owner = exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert sink.done and owner.kept == []


def test_bytes_on_an_idle_connection_close_it() -> None:
    """Anything an idle connection receives (nobody asked) closes it, unread."""
    conn, transport, owner = connection()
    conn.send(b"GET", GET, b"", False)
    conn.dataReceived(OK)
    assert owner.kept == [conn]
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert owner.forgotten == [conn]
    assert transport.disconnected


# --- Delivery and flow control ------------------------------------------------------


def test_body_bytes_that_came_with_the_head_wait_for_deliver() -> None:
    """Until ``deliver``, body bytes are held and reading is paused; then passed at once."""
    conn, transport, _owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    response = response_of(d)
    assert transport.producerState == "paused"
    conn.dataReceived(b"de")  # a TLS transport may still deliver a few bytes
    sink = Sink()
    response.deliver(sink)
    assert sink.calls == [([b"abc"], None), ([b"de"], None)]
    assert transport.producerState == "producing"
    conn.dataReceived(b"f")
    assert sink.body == b"abcdef" and sink.done


def test_a_whole_response_before_deliver_is_delivered_whole() -> None:
    conn, transport, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(OK)
    response = response_of(d)
    assert owner.kept == [conn] and transport.producerState == "producing"
    sink = Sink()
    response.deliver(sink)
    assert sink.body == b"ok" and sink.done


def test_the_response_producer_pauses_and_resumes_reading() -> None:
    """A slow client pauses the upstream connection's transport, and resumes it."""
    response, _sink, transport, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert IPushProducer.providedBy(response.producer)
    response.producer.pauseProducing()
    assert transport.producerState == "paused"
    response.producer.resumeProducing()
    assert transport.producerState == "producing"


def test_a_connection_paused_by_a_client_is_resumed_before_it_is_kept() -> None:
    conn, transport, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    response = response_of(d)
    response.deliver(Sink())
    response.producer.pauseProducing()
    conn.dataReceived(b"cd")
    assert owner.kept == [conn]
    assert transport.producerState == "producing"
    response.producer.pauseProducing()  # late: no effect on the kept connection
    assert transport.producerState == "producing"


def test_abort_drops_the_connection_and_silences_the_sink() -> None:
    conn, transport, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response = response_of(d)
    sink = Sink()
    response.deliver(sink)
    response.abort()
    assert transport.disconnected
    conn.dataReceived(b"def")
    conn.connectionLost(Failure(ConnectionLost()))
    assert sink.calls == [([b"abc"], None)] and not sink.done and sink.failed is None
    assert owner.kept == []


def test_stop_producing_aborts_like_abort() -> None:
    response, _sink, transport, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response.producer.stopProducing()
    assert transport.disconnected


def test_abort_after_the_response_ended_does_not_touch_the_connection() -> None:
    response, _sink, transport, owner = exchange(OK)
    response.abort()
    assert not transport.disconnecting and owner.kept != []


# --- Failures before the response ----------------------------------------------------


def test_a_reused_connection_closed_before_any_byte_is_stale() -> None:
    """The keep-alive race: the upstream closed a kept connection as it was reused."""
    pool, reactor = new_pool()
    pool.request(b"GET", GET, b"").addCallback(lambda response: response.deliver(Sink()))
    upstream = accept(reactor)
    upstream.send(OK)
    d = pool.request(b"POST", POST, b"{}")
    assert len(reactor.tcpClients) == 1
    upstream.lose(ConnectionLost())
    error = error_of(d)
    assert isinstance(error, StaleConnection)
    assert "\n" not in str(error)


def test_a_reused_connection_lost_in_the_middle_of_a_head_is_not_stale() -> None:
    pool, reactor = new_pool()
    pool.request(b"GET", GET, b"").addCallback(lambda response: response.deliver(Sink()))
    upstream = accept(reactor)
    upstream.send(OK)
    d = pool.request(b"GET", GET, b"")
    upstream.send(b"HTTP/1.1 200 OK\r\nX-")
    upstream.lose(ConnectionLost())
    assert isinstance(error_of(d), LostBeforeResponse)


def test_a_new_connection_lost_before_the_head_is_lost_before_response() -> None:
    pool, reactor = new_pool()
    d = pool.request(b"POST", POST, b"{}")
    upstream = accept(reactor)
    assert upstream.received == POST + b"{}"
    upstream.lose(ConnectionDone())
    assert isinstance(error_of(d), LostBeforeResponse)


def test_a_tls_connection_lost_before_its_handshake_is_a_tls_failure() -> None:
    conn, _, _ = connection(tls=True)
    d = conn.send(b"GET", GET, b"", False)
    conn.connectionLost(Failure(ConnectionLost("certificate verify failed")))
    error = error_of(d)
    assert isinstance(error, ConnectFailed) and error.kind == "tls"


def test_a_tls_connection_lost_after_its_handshake_is_not_a_tls_failure() -> None:
    conn, _, _ = connection(tls=True)
    d = conn.send(b"GET", GET, b"", False)
    conn.handshakeCompleted()
    conn.connectionLost(Failure(ConnectionLost()))
    assert isinstance(error_of(d), LostBeforeResponse)


def test_connection_refused_is_a_connect_failure() -> None:
    pool, reactor = new_pool()
    d = pool.request(b"GET", GET, b"")
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    error = error_of(d)
    assert isinstance(error, ConnectFailed) and error.kind == "connect"
    assert "192.0.2.10:8080" in str(error)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (DNSLookupError("no such host"), "dns"),
        (ConnectionRefusedError(), "connect"),
        (TimeoutError(), "connect"),
        (ConnectionLost("unreachable"), "connect"),
    ],
)
def test_connect_failures_are_told_apart(error: Exception, kind: str) -> None:
    failure = connect_failure(Failure(error), "upstream:443", 5)
    assert isinstance(failure, ConnectFailed)
    assert failure.kind == kind
    assert "upstream:443" in str(failure) and "\n" not in str(failure)


def test_cancelling_while_connecting_stops_connecting() -> None:
    pool, reactor = new_pool()
    d = pool.request(b"GET", GET, b"")
    d.cancel()
    assert isinstance(error_of(d), CancelledError)
    assert reactor.connectors[0].stoppedConnecting


def test_cancelling_before_the_head_aborts_the_connection() -> None:
    """The upstream sees the connection close at once; the request fails cancelled."""
    pool, reactor = new_pool()
    d = pool.request(b"GET", GET, b"")
    upstream = accept(reactor)
    upstream.send(b"HTTP/1.1 200 O")
    d.cancel()
    assert isinstance(error_of(d), CancelledError)
    assert upstream.transport.disconnected
    upstream.send(b"K\r\nContent-Length: 0\r\n\r\n")
    upstream.lose(ConnectionLost())
    assert pool.idle_connections == 0


def test_cancelling_a_request_with_a_body_stops_the_body() -> None:
    pool, reactor = new_pool()
    source = Source(None)
    d = pool.request(b"POST", POST, source)
    accept(reactor)
    d.cancel()
    assert source.stopped
    assert isinstance(error_of(d), CancelledError)


# --- The pool ----------------------------------------------------------------------


def complete(
    pool: UpstreamPool, reactor: MemoryReactorClock, upstream: Upstream | None = None
) -> Upstream:
    """One GET through the pool, answered by ``upstream`` (or a new connection)."""
    d = pool.request(b"GET", GET, b"")
    if upstream is None:
        upstream = accept(reactor)
    upstream.send(OK)
    sink = Sink()
    response_of(d).deliver(sink)
    assert sink.done
    return upstream


def test_a_connection_is_reused_for_the_next_request() -> None:
    pool, reactor = new_pool()
    upstream = complete(pool, reactor)
    complete(pool, reactor, upstream)
    assert len(reactor.tcpClients) == 1
    assert upstream.received == GET * 2


def test_the_most_recently_used_connection_is_reused_first() -> None:
    pool, reactor = new_pool()
    first = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    second = pool.request(b"GET", GET, b"")
    b = accept(reactor)
    a.send(OK)
    b.send(OK)
    response_of(first).deliver(Sink())
    response_of(second).deliver(Sink())
    complete(pool, reactor, b)
    assert b.received == GET * 2 and a.received == GET


def test_after_bytes_on_an_idle_connection_the_next_request_uses_a_new_one() -> None:
    pool, reactor = new_pool()
    upstream = complete(pool, reactor)
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert upstream.transport.disconnected
    assert pool.idle_connections == 0
    fresh = complete(pool, reactor)
    assert len(reactor.tcpClients) == 2 and fresh is not upstream


def test_an_idle_connection_the_upstream_closes_is_forgotten() -> None:
    pool, reactor = new_pool()
    upstream = complete(pool, reactor)
    upstream.lose(ConnectionDone())
    assert pool.idle_connections == 0
    complete(pool, reactor)
    assert len(reactor.tcpClients) == 2


def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    """One sweep closes connections idle for ``idle_timeout``; then no timer is left."""
    pool, reactor = new_pool(idle_timeout=30)
    first = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    second = pool.request(b"GET", GET, b"")
    b = accept(reactor)
    a.send(OK)
    response_of(first).deliver(Sink())
    reactor.advance(10)
    b.send(OK)
    response_of(second).deliver(Sink())
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(19.9)
    assert not a.transport.disconnecting
    reactor.advance(0.1)
    assert a.transport.disconnecting and not b.transport.disconnecting
    assert pool.idle_connections == 1
    reactor.advance(10)
    assert b.transport.disconnecting
    assert pool.idle_connections == 0
    a.lose()
    b.lose()
    assert reactor.getDelayedCalls() == []


def test_an_empty_pool_has_no_timer() -> None:
    pool, reactor = new_pool()
    assert reactor.getDelayedCalls() == []
    upstream = complete(pool, reactor)
    reactor.advance(30)
    upstream.lose()
    assert reactor.getDelayedCalls() == []


def test_at_most_max_idle_connections_are_kept() -> None:
    """The oldest idle connection goes when a new one would exceed ``max_idle``."""
    pool, reactor = new_pool(max_idle=2)
    requests = [pool.request(b"GET", GET, b"") for _ in range(3)]
    upstreams = [accept_at(reactor, i) for i in range(3)]
    for upstream, d in zip(upstreams, requests, strict=True):
        upstream.send(OK)
        response_of(d).deliver(Sink())
    assert pool.idle_connections == 2
    assert [u.transport.disconnecting for u in upstreams] == [True, False, False]


def accept_at(reactor: MemoryReactorClock, index: int) -> Upstream:
    return Upstream(reactor, index)


def test_max_idle_zero_keeps_nothing() -> None:
    pool, reactor = new_pool(max_idle=0)
    upstream = complete(pool, reactor)
    assert upstream.transport.disconnecting and pool.idle_connections == 0


def test_close_closes_idle_connections_and_refuses_requests() -> None:
    """``close`` fires once the idle connections are closed; later requests fail."""
    pool, reactor = new_pool()
    upstream = complete(pool, reactor)
    closed = pool.close()
    assert upstream.transport.disconnecting
    assert not closed.called
    upstream.lose()
    assert outcome(closed) is None
    assert reactor.getDelayedCalls() == []
    error = error_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, ConnectFailed)
    assert len(reactor.tcpClients) == 1


def test_a_connection_busy_at_close_is_closed_when_its_response_ends() -> None:
    pool, reactor = new_pool()
    d = pool.request(b"GET", GET, b"")
    upstream = accept(reactor)
    closed = pool.close()
    assert outcome(closed) is None
    upstream.send(OK)
    sink = Sink()
    response_of(d).deliver(sink)
    assert sink.done and upstream.transport.disconnecting


def test_the_pool_is_built_from_a_config() -> None:
    from aiproxy.config import Config

    reactor = MemoryReactorClock()
    config = Config(target_url="http://192.0.2.10:8080", connect_timeout=7)
    pool = UpstreamPool.from_config(reactor, config)
    pool.request(b"GET", GET, b"")
    assert reactor.tcpClients[0][:2] == ("192.0.2.10", 8080)
    assert reactor.tcpClients[0][3] == 7


def test_an_idle_tls_connection_that_does_not_close_is_dropped() -> None:
    """Closing waits for the upstream's TLS close_notify only so long, then drops."""
    clock = MemoryReactorClock()
    idle = IdleConnections(clock, 30, 8)
    conn = UpstreamConnection(idle, "upstream:443", True)
    transport = RecordingTransport()
    conn.makeConnection(transport)
    idle.keep(conn)
    closed = idle.close()
    assert transport.disconnecting and not transport.disconnected
    clock.advance(TLS_CLOSE_TIMEOUT)
    assert transport.disconnected
    conn.connectionLost(Failure(ConnectionLost()))
    assert outcome(closed) is None
    assert clock.getDelayedCalls() == []


def test_unchecked_tls_sends_the_host_name_but_not_an_ip_as_sni() -> None:
    """SNI carries a host name even without verification; an IP literal is not a name."""
    assert UncheckedTLS("api.example.com").clientConnectionForTLS(None).get_servername() == (
        b"api.example.com"
    )
    assert UncheckedTLS("192.0.2.1").clientConnectionForTLS(None).get_servername() is None
    assert UncheckedTLS("2001:db8::1").clientConnectionForTLS(None).get_servername() is None


def test_a_control_byte_in_a_value_split_across_reads_is_refused() -> None:
    """A field value whose control byte came in an earlier read is still checked."""
    error, _ = refused(b"HTTP/1.1 200 OK\r\nX: a\x01", b"b\r\nY: 1\r\n\r\n")
    assert isinstance(error, BadResponse)


# --- Property-based: any split, any garbage ----------------------------------------


def body_relay(sink: Sink) -> bytes:
    """What a door with chunked client framing writes: raw pieces as they are, the rest
    re-encoded, then the final chunk."""
    out = b""
    for pieces, raw in sink.calls:
        if raw is not None:
            assert b"".join(pieces), "a raw piece always carries body bytes"
            out += raw
        else:
            out += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return out + b"0\r\n\r\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points) if b > a]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    chunked=st.booleans(),
)
def test_any_split_of_a_valid_response_gives_the_same_body(
    chunks: list[bytes], cuts: list[int], chunked: bool
) -> None:
    """However the upstream's bytes are split into reads, the body comes out the same,
    the raw chunked form relays to a valid chunked stream, and the connection is kept."""
    body = b"".join(chunks)
    if chunked:
        data = CHUNKED_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    conn, _, owner = connection()
    d = conn.send(b"GET", GET, b"", False)
    sink = Sink()
    response: list[UpstreamResponse] = []
    for piece in split(data, cuts):
        conn.dataReceived(piece)
        if d.called and not response:
            response.append(response_of(d))
            response[0].deliver(sink)
    assert d.called
    assert sink.body == body and sink.done
    assert dechunk(body_relay(sink)) == body
    assert owner.kept == [conn]


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.binary(max_size=200),
    prefix=st.sampled_from(
        [b"", b"HTTP/1.1 200 OK\r\n", CHUNKED_HEAD, OK, b"HTTP/1.1 100 C\r\n\r\n"]
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_garbage_never_breaks_the_connection_state(
    garbage: bytes, prefix: bytes, cuts: list[int]
) -> None:
    """Random bytes from the upstream end in a response, a ``BadResponse`` or an
    incomplete body, never in an exception out of the protocol."""
    conn, _, _ = connection()
    d = conn.send(b"GET", GET, b"", False)
    results: list[Any] = []
    d.addBoth(results.append)
    sink = Sink()
    delivered = False
    for piece in split(prefix + garbage, cuts):
        conn.dataReceived(piece)
        if results and not delivered and not isinstance(results[0], Failure):
            delivered = True
            results[0].deliver(sink)
    conn.connectionLost(Failure(ConnectionLost()))
    assert results
    if isinstance(results[0], Failure):
        assert results[0].check(BadResponse, LostBeforeResponse)
    else:
        assert sink.done or isinstance(sink.failed, BodyIncomplete)
