"""
aiproxy's own HTTP/1.1 server, as a client sees it: the protocol over a
``StringTransport`` and a fake clock, with a fake core that records what it is handed
and answers through the ``ClientSide`` it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy._version import __version__
from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.interfaces import ClientSide, Incoming, RawHeaders, RequestBody
from aiproxy.core.record import RequestRecord
from aiproxy.errors import BodyTooLarge, ClientTooSlow, ProxyError, error_body
from aiproxy.rules.framing import MAX_HEAD_SIZE, MAX_HEADER_LINES
from aiproxy.rules.headers import choose_request_id
from aiproxy.server import http1
from aiproxy.server.http1 import BUFFERED_BODY_LIMIT, HTTP11Connection, HTTP11Factory
from aiproxy.server.limits import CLIENT_IDLE_TIMEOUT, CLOSE_TIMEOUT, LINGER, ClientLimits

CLIENT = IPv4Address("TCP", "203.0.113.7", 40000)

# --- fakes -------------------------------------------------------------------------


class FakeActivity:
    """The activity's members the server uses: ``draining``, ``opened``, ``closed``."""

    def __init__(self) -> None:
        self.draining = False
        self.connections: set[Any] = set()
        self.ever_opened = 0

    def opened(self, connection: Any) -> None:
        self.connections.add(connection)
        self.ever_opened += 1

    def closed(self, connection: Any) -> None:
        self.connections.discard(connection)


class FakeExchange:
    """An exchange that remembers being told its client is gone."""

    def __init__(self) -> None:
        self.gone = 0

    def client_gone(self) -> None:
        self.gone += 1


@attrs.define
class Call:
    """One request the fake core was handed, and how to answer it."""

    request: Incoming
    body: RequestBody | None
    client: ClientSide
    refusal: Exception | None
    exchange: FakeExchange

    @property
    def source(self) -> Any:
        """The body as a ``BodySource`` (it must be one)."""
        assert not isinstance(self.body, bytes), self.body
        return self.body

    def respond(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        finish: bool = True,
    ) -> None:
        """Answer with a whole body, as the core does for its own responses."""
        fields = [*headers, (b"Content-Length", b"%d" % len(body))]
        self.client.send_head(status, b"OK", fields, len(body), True)
        if body:
            self.client.send_body([body], None)
        if finish:
            self.client.finish()


class FakeHandler:
    """
    A ``RequestHandler`` that records each request; ``handle`` answers ``200 ok`` at
    once when ``auto`` is set, and ``refuse`` answers the error's JSON like the core.
    """

    def __init__(self, clock: Clock, auto: bool = False) -> None:
        self.clock = clock
        self.auto = auto
        self.calls: list[Call] = []

    @property
    def handled(self) -> list[Call]:
        """The requests handed to ``handle``."""
        return [call for call in self.calls if call.refusal is None]

    @property
    def last(self) -> Call:
        return self.calls[-1]

    def incoming(
        self,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        version: bytes,
        scheme: bytes,
        peer: str | None,
    ) -> Incoming:
        ids = [value for name, value in headers if name.lower() == b"x-request-id"]
        request_id = choose_request_id(ids)
        record = RequestRecord(method=method.decode(), request_id=request_id.decode())
        return Incoming(
            method,
            target,
            headers,
            version,
            scheme,
            peer,
            request_id,
            self.clock.seconds(),
            record,
        )

    def handle(self, request: Incoming, body: RequestBody, client: ClientSide) -> FakeExchange:
        call = Call(request, body, client, None, FakeExchange())
        self.calls.append(call)
        if self.auto:
            call.respond(200, b"ok")
        return call.exchange

    def refuse(self, request: Incoming, error: Exception, client: ClientSide) -> FakeExchange:
        assert isinstance(error, ProxyError)
        call = Call(request, None, client, error, FakeExchange())
        self.calls.append(call)
        body = error_body(error, request.request_id)
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"X-Request-ID", request.request_id),
        ]
        reason = HTTPStatus(error.status).phrase.encode()
        client.send_head(error.status, reason, headers, len(body), True)
        client.send_body([body], None)
        client.finish()
        return call.exchange


class FakeSink:
    """A ``BodySink`` that keeps what it is written and the producer it is given."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.finished = False
        self.failed: Exception | None = None
        self.producer: Any = None
        self.streaming: bool | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True

    def fail(self, reason: Exception) -> None:
        self.failed = reason

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregister_producer(self) -> None:
        self.producer = None


class HalfClosingTransport(StringTransport):
    """A transport that can close its write side, as TCP can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@implementer(ISSLTransport)
class TLSTransport(HalfClosingTransport):
    """A TLS transport: Twisted's passes unknown attributes to the TCP one beneath."""


class UpstreamProducer:
    """A push producer standing for the upstream connection."""

    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


# --- reading responses ---------------------------------------------------------------


@attrs.define
class Response:
    """A response as the client read it."""

    status: int
    reason: bytes
    headers: RawHeaders
    body: bytes
    complete: bool
    framing: str

    def header(self, name: bytes) -> bytes | None:
        """The value of the field ``name`` (which must not be repeated), or None."""
        values = [value for field, value in self.headers if field.lower() == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None

    def error(self) -> dict[str, Any]:
        """The JSON error body: checks its shape and request ID."""
        assert self.header(b"content-type") == b"application/json"
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert set(error) == {"type", "message", "request_id"}
        assert error["request_id"] == (self.header(b"x-request-id") or b"").decode()
        return error


def read_responses(data: bytes, head_request: bool = False) -> list[Response]:
    """Every response in ``data``, the last one perhaps incomplete (1xx included)."""
    responses = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, data
        status_line, *lines = data[:end].split(b"\r\n")
        version, status, reason = status_line.split(b" ", 2)
        assert version == b"HTTP/1.1"
        headers = [tuple(line.split(b": ", 1)) for line in lines]
        response = Response(int(status), reason, headers, b"", True, "none")  # type: ignore[arg-type]
        data = data[end + 4 :]
        if response.status < 200 or head_request:
            responses.append(response)
            continue
        if response.header(b"transfer-encoding") == b"chunked":
            response.framing = "chunked"
            body = b""
            while True:
                line_end = data.find(b"\r\n")
                if line_end < 0:
                    response.complete = False
                    data = b""
                    break
                size = int(data[:line_end].split(b";")[0], 16)
                if size == 0:
                    assert data[line_end : line_end + 4] == b"\r\n\r\n"
                    data = data[line_end + 4 :]
                    break
                chunk = data[line_end + 2 : line_end + 2 + size]
                if len(chunk) < size:
                    response.complete = False
                    body += chunk
                    data = b""
                    break
                assert data[line_end + 2 + size : line_end + 4 + size] == b"\r\n"
                body += chunk
                data = data[line_end + 4 + size :]
            response.body = body
        elif response.header(b"content-length") is not None:
            response.framing = "length"
            length = int(response.header(b"content-length") or b"0")
            response.body, data = data[:length], data[length:]
            response.complete = len(response.body) == length
        else:
            response.framing = "close"
            response.body, data = data, b""
        responses.append(response)
    return responses


# --- the server under test -----------------------------------------------------------


@attrs.define
class Client:
    """One client connection to the server."""

    protocol: HTTP11Connection
    transport: StringTransport
    clock: Clock

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def value(self) -> bytes:
        return self.transport.value()

    def responses(self, head_request: bool = False) -> list[Response]:
        return read_responses(self.value(), head_request)

    def response(self) -> Response:
        """The only final response so far (1xx aside)."""
        final = [r for r in self.responses() if r.status >= 200]
        assert len(final) == 1, self.value()
        return final[0]

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing) the connection."""
        return bool(self.transport.disconnecting or self.transport.disconnected)

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    def closed_after_lingering(self) -> bool:
        """Whether the server closes the connection once LINGER seconds are over."""
        if self.closed:
            return False  # it closed at once: no linger
        self.clock.advance(LINGER)
        return self.closed

    def lose(self, reason: Exception | None = None) -> None:
        """The connection is lost (the client left, or the close went through)."""
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


@attrs.define
class Server:
    """The server with a fake core, clock and activity."""

    clock: Clock
    handler: FakeHandler
    activity: FakeActivity
    factory: HTTP11Factory
    clients: list[Client] = attrs.Factory(list)

    def connect(self, peer: Any = CLIENT, transport: StringTransport | None = None) -> Client:
        protocol = self.factory.buildProtocol(peer)
        transport = transport or StringTransport(peerAddress=peer)
        transport.peerAddr = peer
        protocol.makeConnection(transport)
        client = Client(protocol, transport, self.clock)
        self.clients.append(client)
        return client


def start_server(
    max_body_size: int = 1000,
    header_timeout: float = 10.0,
    body_min_rate: int = 500,
    *,
    body_timeout: float = 0.0,
    auto: bool = False,
    secure: bool = False,
) -> Server:
    clock = Clock()
    handler = FakeHandler(clock, auto=auto)
    activity = FakeActivity()
    limits = ClientLimits(max_body_size, header_timeout, body_min_rate, body_timeout)
    factory = HTTP11Factory(handler, clock, activity, limits, secure=secure)  # type: ignore[arg-type]
    return Server(clock, handler, activity, factory)


def head(*lines: bytes, target: bytes = b"/v1/files", method: bytes = b"POST") -> bytes:
    """An HTTP/1.1 request head with a Host and the given header lines, and its end."""
    return b"\r\n".join([method + b" " + target + b" HTTP/1.1", b"Host: proxy.example", *lines])


def request(
    *lines: bytes, body: bytes = b"", method: bytes = b"POST", target: bytes = b"/v1/files"
) -> bytes:
    """A whole request, with a Content-Length if it has a body."""
    if body:
        lines = (*lines, b"Content-Length: %d" % len(body))
    return head(*lines, method=method, target=target) + b"\r\n\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    """``pieces`` in chunked framing, with the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def splits(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``data`` cut in two at every index."""
    for index in range(1, len(data)):
        yield data[:index], data[index:]


# --- requests handed over --------------------------------------------------------------


def test_a_request_is_handed_over_with_its_head_as_sent() -> None:
    """The core gets the method, target, headers (order, case, repeats) and version as
    the client sent them, the scheme, the peer, and the body."""
    server = start_server()
    client = server.connect()
    client.send(
        b"POST /v1/chat/completions?x=1&y=%20 HTTP/1.1\r\nHost: proxy.example\r\n"
        b"authorization: Bearer k\r\nX-Twice: 1\r\nx-twice: 2\r\nX-Trailing:  spaced \t\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    call = server.handler.last
    request = call.request
    assert request.method == b"POST"
    assert request.target == b"/v1/chat/completions?x=1&y=%20"
    assert request.headers == [
        (b"Host", b"proxy.example"),
        (b"authorization", b"Bearer k"),
        (b"X-Twice", b"1"),
        (b"x-twice", b"2"),
        (b"X-Trailing", b"spaced"),
        (b"Content-Length", b"5"),
    ]
    assert (request.version, request.scheme, request.peer) == (b"HTTP/1.1", b"http", "203.0.113.7")
    assert call.body == b"hello"
    assert request.record.bytes_in == 5


def test_tls_listener_says_https_and_peers_are_ip_addresses_or_none() -> None:
    """On a secure listener the scheme is https; an IPv6 peer is its address, a UNIX
    socket peer is None."""
    server = start_server(auto=True, secure=True)
    server.connect(IPv6Address("TCP", "2001:db8::7", 1234)).send(request(method=b"GET"))
    server.connect(UNIXAddress(b"/run/aiproxy.sock")).send(request(method=b"GET"))
    first, second = server.handler.calls
    assert (first.request.scheme, first.request.peer) == (b"https", "2001:db8::7")
    assert (second.request.scheme, second.request.peer) == (b"https", None)


@pytest.mark.parametrize(
    ("line", "method", "target"),
    [
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*"),
        (b"GET http://evil.example/x HTTP/1.1", b"GET", b"http://evil.example/x"),
        (b"GET //evil.example/x HTTP/1.1", b"GET", b"//evil.example/x"),
        (b"PATCH /a@b HTTP/1.1", b"PATCH", b"/a@b"),
        (b"QUERY /%zz HTTP/1.1", b"QUERY", b"/%zz"),
    ],
)
def test_unusual_targets_are_handed_over_as_sent(line: bytes, method: bytes, target: bytes) -> None:
    """``*``, absolute-form and odd paths reach the core byte for byte (it answers
    them); the connection stays open."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(line + b"\r\nHost: h\r\n\r\n")
    request = server.handler.last.request
    assert (request.method, request.target) == (method, target)
    assert client.response().status == 200
    assert not client.closed


def test_connect_is_handed_over_and_the_connection_closes_after_its_answer() -> None:
    """CONNECT (which llhttp ends parsing at) reaches the core as an ordinary request
    with its authority-form target; nothing the client sends after it is read, and
    the connection closes after the answer."""
    server = start_server()
    client = server.connect()
    client.send(b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n\x16\x03\x01")
    call = server.handler.last
    assert (call.request.method, call.request.target, call.body) == (
        b"CONNECT",
        b"api.example:443",
        b"",
    )
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    call.respond(405, b"{}")
    assert client.response().header(b"connection") == b"close"
    assert len(server.handler.calls) == 1
    assert client.closed_after_lingering()


@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c, WebSocket"])
def test_websocket_upgrade_is_handed_over_and_the_connection_closes_after(upgrade: bytes) -> None:
    """A WebSocket upgrade reaches the core (which answers 501); what follows it is
    not read as HTTP, and the connection closes after the answer."""
    server = start_server()
    client = server.connect()
    client.send(
        head(b"Connection: Upgrade", b"Upgrade: " + upgrade, method=b"GET")
        + b"\r\n\r\n\x81\x85frame"
    )
    call = server.handler.last
    assert call.request.headers[-1] == (b"Upgrade", upgrade)
    call.respond(501, b"{}")
    assert client.response().header(b"connection") == b"close"
    assert client.closed_after_lingering()


@pytest.mark.parametrize("body", [b"", b"hello"])
def test_other_upgrades_are_ordinary_requests_and_http_goes_on(body: bytes) -> None:
    """``Upgrade: h2c`` is ignored: the request (and its body) is handed over as an
    ordinary one, the connection stays HTTP/1.1, and the next request is read."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(
        request(
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: h2c",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            body=body,
        )
        + request(method=b"GET", target=b"/next")
    )
    first, second = server.handler.calls
    assert first.body == body
    assert second.request.target == b"/next"
    assert [r.status for r in client.responses()] == [200, 200]
    assert not client.closed


def test_upgrade_with_a_chunked_body_is_read_as_an_ordinary_request() -> None:
    """An ``Upgrade: h2c`` request with a chunked body: the body is read (across
    pieces) and the next request after it too."""
    server = start_server(auto=True)
    client = server.connect()
    data = (
        head(b"Connection: Upgrade", b"Upgrade: h2c", b"Transfer-Encoding: chunked")
        + b"\r\n\r\n"
        + chunked(b"hel", b"lo")
        + request(method=b"GET", target=b"/next")
    )
    for index in range(0, len(data), 7):
        client.send(data[index : index + 7])
    assert [call.body for call in server.handler.calls] == [b"hello", b""]
    assert server.handler.last.request.target == b"/next"


def test_chunked_body_is_decoded_and_trailers_are_dropped() -> None:
    """A chunked body (with chunk extensions) is handed over decoded; its trailer
    fields are not kept."""
    server = start_server()
    client = server.connect()
    client.send(
        head(b"Transfer-Encoding: chunked")
        + b"\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    call = server.handler.last
    assert call.body == b"abcde"
    assert (b"X-Trailer", b"t") not in call.request.headers


def test_extra_spaces_in_the_request_line_are_taken_as_one() -> None:
    """llhttp parses the request line on whitespace boundaries, as RFC 9112 section 3
    allows: ``GET  /x`` is ``GET /x`` (unambiguous: a target has no spaces)."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(b"GET  /v1/models   HTTP/1.1\r\nHost: h\r\n\r\n")
    request = server.handler.last.request
    assert (request.method, request.target, request.version) == (
        b"GET",
        b"/v1/models",
        b"HTTP/1.1",
    )


def test_a_request_without_body_gets_an_empty_one() -> None:
    """GET without a body, and a Content-Length of 0, hand over b""."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(request(method=b"GET") + head(b"Content-Length: 0") + b"\r\n\r\n")
    assert [call.body for call in server.handler.calls] == [b"", b""]


# --- responses -------------------------------------------------------------------------


def test_response_head_is_written_as_given_with_length_framing() -> None:
    """The status line, then the headers in the given order and case, exactly; a body
    of known length is written as it is; the connection stays open."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    client_side.send_head(
        201,
        b"Created",
        [
            (b"content-type", b"text/plain"),
            (b"X-A", b"1"),
            (b"x-a", b"2"),
            (b"Content-Length", b"5"),
        ],
        5,
        True,
    )
    client_side.send_body([b"he", b"llo"], None)
    client_side.finish()
    assert client.value() == (
        b"HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    assert not client.closed


def test_response_of_unknown_length_is_chunked_for_http11() -> None:
    """A body of unknown length goes to an HTTP/1.1 client chunked: each piece a chunk
    (empty pieces skipped), then the last chunk; the connection stays open."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    client_side.send_head(200, b"OK", [(b"Content-Type", b"text/event-stream")], None, True)
    client_side.send_body([b"data: 1\n\n", b"", b"data: 2\n\n"], None)
    client_side.send_body([b"x" * 300], None)
    client_side.finish()
    assert client.value() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"
    )
    assert client.response().body == b"data: 1\n\ndata: 2\n\n" + b"x" * 300
    assert not client.closed


def test_raw_chunked_bytes_are_passed_through_as_they_are() -> None:
    """Chunk framing the upstream already sent is written as is to a chunked response."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    client_side.send_head(200, b"OK", [], None, True)
    client_side.send_body([b"abc", b"de"], b"3;x=y\r\nabc\r\n2\r\nde\r\n")
    client_side.finish()
    assert client.value().endswith(b"\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert client.response().body == b"abcde"


def test_raw_chunked_bytes_are_decoded_pieces_for_a_length_response() -> None:
    """With Content-Length framing the decoded pieces are written, not the chunks."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    client_side.send_head(200, b"OK", [(b"Content-Length", b"5")], 5, True)
    client_side.send_body([b"abc", b"de"], b"3\r\nabc\r\n2\r\nde\r\n")
    client_side.finish()
    assert client.value().endswith(b"\r\n\r\nabcde")


def test_http10_client_gets_a_close_delimited_body_of_unknown_length() -> None:
    """An HTTP/1.0 client cannot read chunks: a body of unknown length is sent as it
    is, with Connection: close, and the connection closes after it."""
    server = start_server()
    client = server.connect()
    client.send(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    call = server.handler.last
    assert call.request.version == b"HTTP/1.0"
    call.client.send_head(200, b"OK", [(b"Content-Type", b"text/plain")], None, True)
    call.client.send_body([b"a", b"b"], b"1\r\na\r\n1\r\nb\r\n")
    call.client.finish()
    assert client.value() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nab"
    )
    assert client.closed


def test_http10_keep_alive_is_kept_and_said() -> None:
    """An HTTP/1.0 client that asks for keep-alive gets ``Connection: keep-alive`` on a
    response of known length, and its next request is read; one that does not ask
    gets ``Connection: close``."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    client.send(b"GET /b HTTP/1.0\r\n\r\nGET /c HTTP/1.0\r\n\r\n")
    first, second = client.responses()
    assert first.header(b"connection") == b"keep-alive"
    assert second.header(b"connection") == b"close"
    assert [call.request.target for call in server.handler.calls] == [b"/a", b"/b"]
    assert client.closed


def test_head_response_has_no_body() -> None:
    """A response to HEAD has its headers (Content-Length included) and no body, even
    if the core writes one; the connection stays open."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"HEAD"))
    client_side = server.handler.last.client
    client_side.send_head(200, b"OK", [(b"Content-Length", b"5")], 5, True)
    client_side.send_body([b"hello"], None)
    client_side.finish()
    client_side.send_head(200, b"OK", [], None, True)  # ignored: the response ended
    assert client.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert not client.closed


def test_bodyless_response_of_unknown_length_is_not_chunked() -> None:
    """``body=False`` (a 204 or 304) gets no framing and no body."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    client_side.send_head(204, b"No Content", [], None, False)
    client_side.send_body([b"x"], None)
    client_side.finish()
    assert client.value() == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_client_connection_close_is_said_and_the_connection_closes() -> None:
    """A client's ``Connection: close`` gets ``Connection: close`` and a close after the
    response; a request pipelined after it is not read."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(request(b"Connection: close", method=b"GET") + request(method=b"GET"))
    assert len(server.handler.calls) == 1
    assert client.response().header(b"connection") == b"close"
    assert client.closed


def test_abort_cuts_the_connection() -> None:
    """``abort`` aborts the connection, so a truncated body never looks complete; later
    calls are ignored, and the core is not told the client is gone."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    call = server.handler.last
    call.client.send_head(200, b"OK", [(b"Content-Length", b"10")], 10, True)
    call.client.send_body([b"12345"], None)
    call.client.abort()
    assert client.aborted
    written = client.value()
    call.client.send_body([b"67890"], None)
    call.client.finish()
    assert client.value() == written
    client.lose(ConnectionLost())
    assert call.exchange.gone == 0


def test_finish_without_a_head_aborts() -> None:
    """A response that ends before its head was written cannot be answered: abort."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    server.handler.last.client.finish()
    assert client.aborted


def test_a_core_that_raises_aborts_the_connection() -> None:
    """A bug in the core is logged and the connection aborted; nothing is answered."""
    server = start_server()

    def broken(*args: Any) -> Any:
        raise RuntimeError("bug")

    server.handler.handle = broken  # type: ignore[method-assign]
    client = server.connect()
    with capturedLogs() as events:
        client.send(request(method=b"GET") + request(method=b"GET"))
    assert client.aborted
    assert client.value() == b""
    assert [e["log_format"] for e in events if "log_failure" in e] == [
        "Unhandled error handling a request"
    ]


def test_upstream_producer_is_registered_on_the_client_transport() -> None:
    """``pause_upstream_with`` registers the upstream as the client transport's
    streaming producer; None unregisters it, and so does the end of the response."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client_side = server.handler.last.client
    producer = UpstreamProducer()
    client_side.send_head(200, b"OK", [], None, True)
    client_side.pause_upstream_with(producer)
    assert (client.transport.producer, client.transport.streaming) == (producer, True)
    client_side.pause_upstream_with(None)
    assert client.transport.producer is None
    client_side.pause_upstream_with(producer)
    client_side.finish()
    assert client.transport.producer is None


# --- keep-alive and pipelining ------------------------------------------------------


def test_keep_alive_serves_requests_one_after_another() -> None:
    """Requests on one connection are each answered; bodies are measured one by one."""
    server = start_server(max_body_size=1000, auto=True)
    client = server.connect()
    for index in range(3):
        client.send(request(body=b"%d" % index * 800))
    assert [len(call.body or b"") for call in server.handler.calls] == [800, 800, 800]
    assert [r.status for r in client.responses()] == [200, 200, 200]
    assert not client.closed


def test_pipelined_requests_are_handled_one_at_a_time_in_order() -> None:
    """Requests sent back to back wait for the one before to be answered; reading
    pauses while they wait and resumes when none does."""
    server = start_server()
    client = server.connect()
    client.send(
        request(method=b"GET", target=b"/1")
        + request(body=b"two", target=b"/2")
        + request(method=b"GET", target=b"/3")
    )
    assert [call.request.target for call in server.handler.calls] == [b"/1"]
    assert client.paused
    server.handler.last.respond(200, b"one")
    assert [call.request.target for call in server.handler.calls] == [b"/1", b"/2"]
    assert server.handler.last.body == b"two"
    server.handler.last.respond(200, b"two")
    assert not client.paused  # only /3 is left, in flight: the next may begin
    server.handler.last.respond(200, b"three")
    assert [r.body for r in client.responses()] == [b"one", b"two", b"three"]
    assert not client.paused
    assert not client.closed


def test_pipelined_requests_answered_at_once_do_not_recurse() -> None:
    """Hundreds of pipelined requests answered synchronously are answered in order."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(request(method=b"GET") * 500)
    assert len(client.responses()) == 500
    assert not client.paused


def test_a_second_request_arriving_while_one_is_answered_pauses_reading() -> None:
    """The first byte of a request sent while another is in flight pauses reading."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    assert not client.paused
    client.send(b"G")
    assert client.paused
    server.handler.last.respond()
    assert not client.paused
    client.send(b"ET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(server.handler.calls) == 2


def test_a_pipelined_request_after_a_close_response_is_dropped() -> None:
    """When the response says Connection: close (here: a drain began), requests the
    client pipelined after it are never handed over."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET") + request(method=b"GET"))
    server.activity.draining = True
    server.handler.last.respond()
    assert client.response().header(b"connection") == b"close"
    assert len(server.handler.calls) == 1
    assert client.closed


# --- 100-continue ----------------------------------------------------------------------


def test_body_is_invited_with_100_continue_when_reading_starts() -> None:
    """A client waiting for 100 Continue gets it when its body is to be read, then the
    body is handed over."""
    server = start_server()
    client = server.connect()
    client.send(head(b"Expect: 100-continue", b"Content-Length: 5") + b"\r\n\r\n")
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    assert server.handler.last.body == b"hello"


def test_100_continue_waits_for_the_response_before() -> None:
    """A pipelined request waiting for 100 Continue gets it only after the response
    before it, never in the middle of it."""
    server = start_server()
    client = server.connect()
    client.send(
        request(method=b"GET") + head(b"Expect: 100-continue", b"Content-Length: 5") + b"\r\n\r\n"
    )
    assert b"100 Continue" not in client.value()
    server.handler.last.respond(200, b"first")
    assert client.value().endswith(b"first" + b"HTTP/1.1 100 Continue\r\n\r\n")


def test_refused_body_is_not_invited_with_100_continue() -> None:
    """A client that waits for 100 Continue before a body that is too large gets the
    413 instead, and no invitation to send it."""
    server = start_server(max_body_size=1000)
    client = server.connect()
    client.send(head(b"Expect: 100-continue", b"Content-Length: 5000") + b"\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in client.value()


def test_http10_client_is_not_sent_100_continue() -> None:
    """Expect: 100-continue from an HTTP/1.0 client is ignored (RFC 9110 10.1.1)."""
    server = start_server()
    client = server.connect()
    client.send(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert client.value() == b""


# --- MAX_BODY_SIZE -------------------------------------------------------------------


def test_declared_body_over_max_body_size_is_refused_before_any_of_it_is_read() -> None:
    """A Content-Length over the limit is refused through the core (413, the client's
    request ID) as soon as the head is in; the connection says close and lingers."""
    server = start_server(max_body_size=1000)
    client = server.connect()
    client.send(head(b"Content-Length: 1001", b"X-Request-ID: upload-1") + b"\r\n\r\n")
    call = server.handler.last
    assert isinstance(call.refusal, BodyTooLarge)
    assert "1000" in str(call.refusal)
    response = client.response()
    assert response.status == 413
    assert response.error()["request_id"] == "upload-1"
    assert response.header(b"connection") == b"close"
    assert server.handler.handled == []
    assert call.request.record.bytes_in == 0
    assert client.closed_after_lingering()


def test_body_of_exactly_max_body_size_is_handed_over() -> None:
    """A body of exactly MAX_BODY_SIZE bytes is handed over whole, by length or chunked."""
    server = start_server(max_body_size=1000, auto=True)
    client = server.connect()
    client.send(request(body=b"x" * 1000))
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n" + chunked(b"y" * 600, b"y" * 400))
    assert [call.body for call in server.handler.calls] == [b"x" * 1000, b"y" * 1000]


def test_chunked_body_growing_past_max_body_size_is_refused_and_reading_stops() -> None:
    """A chunked body is refused with 413 once it grows past the limit; what the
    client sends after that is dropped, and nothing is handled."""
    server = start_server(max_body_size=1000)
    client = server.connect()
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    chunk = b"190\r\n" + b"y" * 400 + b"\r\n"
    client.send(chunk * 2)
    assert client.value() == b""
    client.send(chunk)
    assert client.response().status == 413
    client.send(chunk + b"0\r\n\r\n" + request(method=b"GET"))
    assert client.closed_after_lingering()
    assert client.value().count(b"HTTP/1.1 ") == 1
    assert server.handler.handled == []


def test_max_body_size_zero_refuses_any_body() -> None:
    """With MAX_BODY_SIZE=0, requests without a body pass and any body is refused."""
    server = start_server(max_body_size=0, auto=True)
    client = server.connect()
    client.send(request(method=b"GET"))
    client.send(head(b"Content-Length: 1") + b"\r\n\r\nx")
    assert [r.status for r in client.responses()] == [200, 413]


def test_a_refused_client_may_finish_sending_and_read_the_error() -> None:
    """After a 413 the server drops whatever the client still sends, for up to LINGER
    seconds, having half-closed its side; then the connection closes."""
    server = start_server(max_body_size=1000)
    client = server.connect(transport=HalfClosingTransport())
    client.send(head(b"Content-Length: 100000") + b"\r\n\r\n")
    assert isinstance(client.transport, HalfClosingTransport)
    assert client.transport.write_closed
    for _ in range(10):
        client.send(b"d" * 10000)
        server.clock.advance(LINGER / 20)
    assert not client.closed
    response = client.response()
    assert (response.status, response.complete) == (413, True)
    server.clock.advance(LINGER / 2)
    assert client.closed
    assert server.handler.handled == []


def test_a_refused_tls_client_is_not_half_closed() -> None:
    """Over TLS the write side is not shut (that would cut the TLS stream): the
    connection lingers, then closes."""
    server = start_server(max_body_size=1000)
    client = server.connect(transport=TLSTransport())
    client.send(head(b"Content-Length: 100000") + b"\r\n\r\n")
    assert client.response().status == 413
    assert isinstance(client.transport, TLSTransport)
    assert not client.transport.write_closed
    assert client.closed_after_lingering()


def test_a_refused_client_that_closes_leaves_no_timer() -> None:
    """When the refused client closes first, nothing is left waiting to close it."""
    server = start_server()
    client = server.connect()
    client.send(head(b"Transfer-Encoding: identity") + b"\r\n\r\n")
    assert client.response().status == 400
    client.lose()
    assert server.clock.getDelayedCalls() == []
    assert server.activity.connections == set()


# --- bad heads ---------------------------------------------------------------------------

_BIG = b"a" * MAX_HEAD_SIZE

BAD_HEADS = [
    # Refused by llhttp.
    ("space before method", b" GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("unknown method", b"FOO /v1/models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("lower-case method", b"get /v1/models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("tab in target", b"GET /v1/\tmodels HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("NUL in target", b"GET /v1/\x00models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("control byte in target", b"GET /v1/models\x01 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("DEL in target", b"GET /v1/\x7fmodels HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("0xff in target", b"GET /v1/\xffmodels HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("HTTP/1.2 line", b"GET /v1/models HTTP/1.2\r\nHost: h\r\n\r\n", 400),
    ("lower-case version", b"GET /v1/models http/1.1\r\nHost: h\r\n\r\n", 400),
    ("LF-only lines", b"GET /v1/models HTTP/1.1\nHost: h\n\n", 400),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("no colon", head(b"Bogus") + b"\r\n\r\n", 400),
    ("space before colon", head(b"X-A : 1") + b"\r\n\r\n", 400),
    ("empty name", head(b": 1") + b"\r\n\r\n", 400),
    ("NUL in value", head(b"X-A: a\x00b") + b"\r\n\r\n", 400),
    ("CR in value", head(b"X-A: a\rb") + b"\r\n\r\n", 400),
    ("control byte in value", head(b"X-A: a\x01b") + b"\r\n\r\n", 400),
    (
        "terminal escape in Host",
        b"GET /v1/models HTTP/1.1\r\nHost: a\x01b\x1b[31m\r\n\r\n",
        400,
    ),
    ("ESC in X-Forwarded-Host", head(b"X-Forwarded-Host: h\x1b[2J") + b"\r\n\r\n", 400),
    ("obs-fold", head(b"X-A: a", b"  folded") + b"\r\n\r\n", 400),
    ("space before first header", b"POST /v1/files HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    ("negative length", head(b"Content-Length: -1") + b"\r\n\r\n", 400),
    ("signed length", head(b"Content-Length: +3") + b"\r\n\r\nabc", 400),
    ("length list", head(b"Content-Length: 5, 5") + b"\r\n\r\nhello", 400),
    ("same length twice", head(b"Content-Length: 5", b"Content-Length: 5") + b"\r\n\r\nhello", 400),
    (
        "conflicting lengths",
        head(b"Content-Length: 5", b"Content-Length: 6") + b"\r\n\r\nhello!",
        400,
    ),
    ("length overflow", head(b"Content-Length: " + b"9" * 30) + b"\r\n\r\n", 400),
    (
        "length and chunked",
        head(b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("gzip coding", head(b"Transfer-Encoding: gzip, chunked") + b"\r\n\r\n0\r\n\r\n", 400),
    (
        "chunked twice",
        head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked") + b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    # Let through by llhttp, refused by aiproxy's rules.
    ("HTTP/0.9", b"GET /v1/models\r\n\r\n", 400),
    ("HTTP/0.9 with headers", b"GET /v1/models\r\nHost: h\r\n\r\n", 400),
    ("HTTP/2.0 line", b"GET /v1/models HTTP/2.0\r\nHost: h\r\n\r\n", 400),
    ("identity", head(b"Transfer-Encoding: identity") + b"\r\n\r\nhello", 400),
    (
        "identity smuggling",
        head(b"Transfer-Encoding: identity") + b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
        400,
    ),
    (
        "identity, chunked",
        head(b"Transfer-Encoding: identity, chunked") + b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "gzip then chunked",
        head(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked") + b"\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "identity and length",
        head(b"Transfer-Encoding: identity", b"Content-Length: 5") + b"\r\n\r\nhello",
        400,
    ),
    (
        "HTTP/1.0 chunked",
        b"POST /v1/f HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("no Host", b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # Too large.
    ("long request line", b"GET /" + _BIG + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431),
    ("long header line", head(b"X-Big: " + _BIG) + b"\r\n\r\n", 431),
    (
        "head over 64 KiB",
        head(*[b"X-Part-%d: " % i + b"b" * 1000 for i in range(66)]) + b"\r\n\r\n",
        431,
    ),
    ("101 header lines", head(*[b"X-Line-%d: 1" % i for i in range(100)]) + b"\r\n\r\n", 431),
    ("64 KiB of empty lines", b"\r\n" * (MAX_HEAD_SIZE // 2 + 1), 431),
]


@pytest.mark.parametrize(
    ("raw", "status"), [case[1:] for case in BAD_HEADS], ids=[case[0] for case in BAD_HEADS]
)
def test_bad_request_heads_get_a_json_error_and_the_connection_lingers(
    raw: bytes, status: int
) -> None:
    """Malformed or ambiguously framed request heads get a JSON 400, oversized ones a
    JSON 431, from the server itself with its own headers; nothing is handed over, the
    connection says close and closes after lingering."""
    server = start_server()
    client = server.connect()
    with capturedLogs() as events:
        client.send(raw)
    response = client.response()
    assert response.status == status
    error = response.error()
    assert error["type"] == ("invalid_request" if status == 400 else "request_header_too_large")
    assert response.header(b"connection") == b"close"
    assert response.header(b"x-proxy-by") == b"aiproxy/" + __version__.encode()
    assert response.header(b"date") == b"Thu, 01 Jan 1970 00:00:00 GMT"
    assert response.header(b"x-process-time") is None
    assert server.handler.calls == []
    refused = [e for e in events if e.get("log_namespace") == "aiproxy"]
    assert len(refused) == 1
    assert refused[0]["log_format"] == (
        "Request refused: {status} {message} [Client: {client}] [ID: {request_id}]"
    )
    assert (refused[0]["status"], refused[0]["client"], refused[0]["request_id"]) == (
        status,
        "203.0.113.7",
        error["request_id"],
    )
    assert client.closed_after_lingering()


@pytest.mark.parametrize(
    "raw",
    [
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n5\nhello\r\n0\r\n\r\n",
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n" + b"f" * 30 + b"\r\n",
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n0\r\nX-T: \x00\r\n\r\n",
    ],
    ids=[
        "bad size",
        "chunk too long",
        "LF after size",
        "hex prefix",
        "size overflow",
        "bad trailer",
    ],
)
def test_malformed_chunked_body_is_a_400_through_the_core(raw: bytes) -> None:
    """A malformed chunk is found once the request exists: it is refused (400) through
    the core, nothing is handled, and the connection lingers."""
    server = start_server(max_body_size=10**9)
    client = server.connect()
    client.send(raw)
    call = server.handler.last
    assert call.refusal is not None
    assert (call.refusal.status, call.refusal.type) == (400, "invalid_request")  # type: ignore[attr-defined]
    response = client.response()
    assert (response.status, response.header(b"connection")) == (400, b"close")
    assert server.handler.handled == []
    assert client.closed_after_lingering()


def test_too_many_trailer_lines_are_a_431_through_the_core() -> None:
    """A chunked body's trailer section is bounded like a head: over 100 lines is 431."""
    server = start_server()
    client = server.connect()
    trailers = b"".join(b"X-T-%d: 1\r\n" % i for i in range(MAX_HEADER_LINES + 1))
    client.send(
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n1\r\nx\r\n0\r\n" + trailers + b"\r\n"
    )
    assert client.response().status == 431
    assert server.handler.handled == []


def test_huge_trailer_section_is_a_431_through_the_core() -> None:
    """A chunked body's trailer section is never buffered past 64 KiB."""
    server = start_server()
    client = server.connect()
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n1\r\nx\r\n0\r\nX-T: ")
    for _ in range(MAX_HEAD_SIZE // 4096 + 1):
        client.send(b"t" * 4096)
    assert client.response().status == 431


def test_request_id_of_a_refused_head_is_the_clients_if_sane() -> None:
    """A head refused after its X-Request-ID was read answers with that ID; an insane
    one is replaced by a new ID."""
    server = start_server()
    client = server.connect()
    client.send(head(b"X-Request-ID: mine-1", b"Transfer-Encoding: identity") + b"\r\n\r\n")
    assert client.response().header(b"x-request-id") == b"mine-1"
    other = server.connect()
    other.send(head(b"X-Request-ID: bad id!", b"Transfer-Encoding: identity") + b"\r\n\r\n")
    assert other.response().header(b"x-request-id") != b"bad id!"
    assert len(other.response().header(b"x-request-id") or b"") == 32


def test_a_head_of_64_kib_and_100_header_lines_is_handed_over() -> None:
    """The limits are inclusive: a head of exactly 64 KiB with 100 header lines passes,
    one byte more is a 431; wherever the head is cut into pieces."""
    lines = [b"X-Line-%02d: 1" % i for i in range(98)]
    start = head(*lines, method=b"GET") + b"\r\nX-Fill: "
    fill = MAX_HEAD_SIZE - len(start) - len(b"\r\n\r\n")
    exact = start + b"f" * fill + b"\r\n\r\n"
    assert len(exact) == MAX_HEAD_SIZE
    over = start + b"f" * (fill + 1) + b"\r\n\r\n"
    for cut in (1, 1000, MAX_HEAD_SIZE - 4, MAX_HEAD_SIZE - 3, MAX_HEAD_SIZE - 1, MAX_HEAD_SIZE):
        server = start_server(auto=True)
        client = server.connect()
        client.send(exact[:cut])
        client.send(exact[cut:] + request(method=b"GET"))
        assert [r.status for r in client.responses()] == [200, 200]
        assert server.handler.calls[0].request.headers[-1] == (b"X-Fill", b"f" * fill)
        server = start_server(auto=True)
        client = server.connect()
        client.send(over[:cut])
        client.send(over[cut:])
        assert client.response().status == 431
        assert server.handler.calls == []


def test_a_request_refused_for_its_head_leaves_other_connections_alone() -> None:
    """One client's bad request closes only its own connection."""
    server = start_server(auto=True)
    client, other = server.connect(), server.connect()
    client.send(head(b"Transfer-Encoding: identity") + b"\r\n\r\n")
    other.send(request(method=b"GET"))
    assert client.closed_after_lingering()
    assert not other.closed
    assert other.response().status == 200


def test_bad_head_pipelined_after_a_request_is_answered_after_it() -> None:
    """A bad request pipelined behind a good one gets its 400 after the good one's
    response, never in the middle of it."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET") + b"GET / HTTP/1.1\r\n\r\n")
    assert client.value() == b""
    server.handler.last.respond(200, b"first")
    assert [r.status for r in client.responses()] == [200, 400]
    assert client.closed_after_lingering()


# --- every refusal, cut anywhere ------------------------------------------------------------


def _outcome(server: Server, client: Client) -> tuple[Any, ...]:
    """What a client sees of a refusal, without what varies (IDs, dates)."""
    responses = [r for r in client.responses() if r.status >= 200]
    assert len(responses) == 1, client.value()
    response = responses[0]
    error = response.error()
    return (
        response.status,
        error["type"],
        error["message"],
        response.header(b"connection"),
        len(server.handler.handled),
        client.closed,
    )


def _refusal_cases() -> list[tuple[str, bytes, dict[str, Any]]]:
    small = {"max_head": 200, "max_lines": 5}
    cases = [(name, raw, {}) for name, raw, status in BAD_HEADS if status == 400]
    cases += [
        (
            "small: long request line",
            b"GET /" + b"a" * 250 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
            small,
        ),
        ("small: long header", head(b"X-Big: " + b"b" * 250) + b"\r\n\r\n", small),
        (
            "small: head over limit",
            head(*[b"X-%d: " % i + b"c" * 40 for i in range(4)]) + b"\r\n\r\n",
            small,
        ),
        ("small: too many lines", head(*[b"X-%d: 1" % i for i in range(5)]) + b"\r\n\r\n", small),
        (
            "413 by length",
            head(b"Content-Length: 1001", b"X-Request-ID: r") + b"\r\n\r\n" + b"x" * 20,
            {},
        ),
        (
            "413 chunked",
            head(b"Transfer-Encoding: chunked") + b"\r\n\r\n" + chunked(b"z" * 700, b"z" * 400),
            {},
        ),
        (
            "400 bad chunk",
            head(b"Transfer-Encoding: chunked") + b"\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            {},
        ),
    ]
    return cases


@pytest.mark.parametrize(
    ("raw", "settings"),
    [case[1:] for case in _refusal_cases()],
    ids=[case[0] for case in _refusal_cases()],
)
def test_every_refusal_is_the_same_wherever_the_request_is_cut(
    raw: bytes, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal, fed in two pieces cut at every byte, gives the same answer as fed
    whole. (The 431 cases run with small limits, so that every cut can be tried.)"""
    if "max_head" in settings:
        monkeypatch.setattr(http1, "MAX_HEAD_SIZE", settings["max_head"])
        monkeypatch.setattr(http1, "MAX_HEADER_LINES", settings["max_lines"])
    server = start_server(max_body_size=1000)
    client = server.connect()
    client.send(raw)
    expected = _outcome(server, client)
    assert expected[0] in (400, 413, 431)
    for first, second in splits(raw):
        server = start_server(max_body_size=1000)
        client = server.connect()
        client.send(first)
        client.send(second)
        assert _outcome(server, client) == expected, (first, second)


# --- HEADER_TIMEOUT, BODY_MIN_RATE and the idle timeout -----------------------------------


def test_request_head_not_complete_within_header_timeout_gets_a_408() -> None:
    """A head still incomplete HEADER_TIMEOUT seconds after its first byte is answered
    408 by the server, and the connection closes at once."""
    server = start_server(header_timeout=10)
    client = server.connect()
    # llhttp hands a header line over once the next one begins: the ID is known here.
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: h\r\nX-Request-ID: slow-head\r\nX-")
    server.clock.advance(9.9)
    assert client.value() == b""
    with capturedLogs() as events:
        server.clock.advance(0.1)
    response = client.response()
    assert response.status == 408
    error = response.error()
    assert (error["type"], error["request_id"]) == ("request_timeout", "slow-head")
    assert "10s" in error["message"]
    assert client.closed
    assert server.handler.calls == []
    assert [e["status"] for e in events if e.get("log_namespace") == "aiproxy"] == [408]


def test_trickling_header_bytes_does_not_extend_the_header_timeout() -> None:
    """A slowloris client sending a header byte every second is still cut off
    HEADER_TIMEOUT seconds after its first byte."""
    server = start_server(header_timeout=10)
    client = server.connect()
    for byte in b"GET /v1/models HTTP/1.1\r\nX-Slow: " + b"s" * 20:
        if client.closed:
            break
        client.send(bytes([byte]))
        server.clock.advance(1)
    assert server.clock.seconds() == 10
    assert client.response().status == 408


def test_http09_request_line_that_waits_is_cut_by_the_header_timeout() -> None:
    """``GET /`` and a line end (HTTP/0.9) leaves llhttp waiting: the header timeout
    still answers it."""
    server = start_server(header_timeout=10)
    client = server.connect()
    client.send(b"GET /\r\n")
    server.clock.advance(10)
    assert client.response().status == 408


def test_a_connection_that_sends_nothing_is_left_to_the_idle_timeout() -> None:
    """The header timeout starts with the first byte: a connection that sends nothing
    is closed by the idle timeout (75 s), without a response."""
    server = start_server(header_timeout=10)
    client = server.connect()
    server.clock.advance(CLIENT_IDLE_TIMEOUT - 1)
    assert not client.closed
    server.clock.advance(1)
    assert client.closed
    assert client.value() == b""


def test_empty_lines_between_requests_do_not_start_the_header_timeout() -> None:
    """Empty lines before a request line are skipped; they do not count as its start."""
    server = start_server(header_timeout=10, auto=True)
    client = server.connect()
    client.send(b"\r\n")
    server.clock.advance(30)
    assert not client.closed
    client.send(request(method=b"GET"))
    assert client.response().status == 200


def test_idle_keep_alive_connection_is_closed_after_75_seconds() -> None:
    """Between requests a keep-alive connection may stay idle longer than
    HEADER_TIMEOUT; after 75 s of silence it is closed without a response."""
    server = start_server(header_timeout=10, auto=True)
    client = server.connect()
    client.send(request(method=b"GET"))
    server.clock.advance(60)
    assert not client.closed
    client.send(request(method=b"GET"))
    assert len(server.handler.calls) == 2
    server.clock.advance(CLIENT_IDLE_TIMEOUT - 0.5)
    assert not client.closed
    server.clock.advance(0.5)
    assert client.closed
    assert client.value().count(b"HTTP/1.1 ") == 2


@pytest.mark.parametrize("idle", [5, 50])
def test_header_timeout_counts_from_the_first_byte_of_each_request(idle: float) -> None:
    """On a keep-alive connection each request head gets HEADER_TIMEOUT seconds from
    its own first byte, whenever that comes."""
    server = start_server(header_timeout=10, auto=True)
    client = server.connect()
    client.send(request(method=b"GET"))
    server.clock.advance(idle)
    client.send(b"GET /v1/models HTTP/1.1\r\n")
    server.clock.advance(9.5)
    assert not client.closed
    server.clock.advance(0.5)
    assert client.closed
    assert client.value().count(b"HTTP/1.1 408 ") == 1


def test_header_timeout_applies_after_a_long_upload_on_the_same_connection() -> None:
    """After a big upload (whose rate deadline lay far ahead), the connection's next
    request head still gets only HEADER_TIMEOUT seconds."""
    server = start_server(max_body_size=10**6, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: 100000") + b"\r\n\r\n" + b"u" * 99999)
    server.clock.advance(10.5)
    client.send(b"u")
    server.handler.last.respond(204)
    client.send(b"GET /v1/models HTTP/1.1\r\n")
    server.clock.advance(10)
    assert client.value().count(b"HTTP/1.1 408 ") == 1
    assert client.closed


def test_a_request_being_answered_is_not_subject_to_any_deadline() -> None:
    """A slow answer is not the client's fault: no 408 and no idle close while the
    response is in flight, however long."""
    server = start_server(header_timeout=10)
    client = server.connect()
    client.send(request(method=b"GET"))
    server.clock.advance(CLIENT_IDLE_TIMEOUT * 3)
    assert not client.closed
    server.handler.last.respond(200)
    assert client.response().status == 200
    assert not client.closed


def test_pipelined_requests_wait_without_a_408() -> None:
    """Requests sent back to back are answered in order, without a 408 for those that
    waited, even with an incomplete head waiting behind them."""
    server = start_server(header_timeout=10)
    client = server.connect()
    client.send(request(method=b"GET") + request(method=b"GET") + b"GET /third HTTP/1.1\r\n")
    server.clock.advance(30)
    server.handler.last.respond(204)
    server.clock.advance(30)
    assert len(server.handler.calls) == 2
    server.handler.last.respond(204)
    assert client.value().count(b"HTTP/1.1 204 ") == 2
    assert not client.closed
    server.clock.advance(10)
    assert client.value().count(b"HTTP/1.1 408 ") == 1


def test_no_timer_is_left_when_connections_close() -> None:
    """Connections that made many requests, or were cut off, leave no timer behind."""
    server = start_server(header_timeout=10, auto=True)
    client = server.connect()
    for _ in range(20):
        client.send(request(body=b"x" * 10))
        server.clock.advance(1)
    slow = server.connect()
    slow.send(b"GET /")
    server.clock.advance(10)
    assert slow.response().status == 408
    client.lose()
    slow.lose()
    assert server.clock.getDelayedCalls() == []


def test_one_timer_per_connection_and_not_moved_per_request() -> None:
    """The server keeps at most one timer per connection; quick keep-alive requests do
    not schedule a timer each."""
    server = start_server(header_timeout=10, auto=True)
    client = server.connect()
    scheduled = []
    original = server.clock.callLater

    def counting(*args: Any, **kwargs: Any) -> Any:
        scheduled.append(args)
        return original(*args, **kwargs)

    server.clock.callLater = counting  # type: ignore[method-assign]
    for _ in range(50):
        client.send(request(method=b"GET"))
    assert len(server.clock.getDelayedCalls()) == 1
    assert len(scheduled) == 0


def test_a_closed_connection_that_is_not_flushed_is_aborted() -> None:
    """A close waits for what was written to be sent, but not for ever."""
    server = start_server()
    client = server.connect()
    server.clock.advance(CLIENT_IDLE_TIMEOUT)
    assert client.closed and not client.aborted
    server.clock.advance(CLOSE_TIMEOUT)
    assert client.aborted


def test_stalled_body_gets_a_408_after_the_grace() -> None:
    """A body that stops arriving is refused 408 (through the core) HEADER_TIMEOUT
    seconds after the head plus one second per BODY_MIN_RATE bytes received; the
    connection closes at once, nothing is handled."""
    server = start_server(max_body_size=10**6, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: 10000", b"X-Request-ID: slow-1") + b"\r\n\r\n")
    client.send(b"b" * 1000)
    server.clock.advance(11.9)
    assert client.value() == b""
    server.clock.advance(0.1)
    call = server.handler.last
    assert isinstance(call.refusal, ClientTooSlow)
    response = client.response()
    assert response.status == 408
    error = response.error()
    assert (error["type"], error["request_id"]) == ("request_timeout", "slow-1")
    assert "500 bytes/s" in error["message"]
    assert response.header(b"connection") == b"close"
    assert client.closed
    assert server.handler.handled == []


def test_body_at_the_minimum_rate_is_handed_over() -> None:
    """A body that keeps to BODY_MIN_RATE bytes per second, however long it takes, is
    handed over whole."""
    server = start_server(max_body_size=10**6, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: 30000") + b"\r\n\r\n")
    for _ in range(60):
        server.clock.advance(1)
        client.send(b"r" * 500)
    assert not client.closed
    assert server.handler.last.body == b"r" * 30000


def test_body_slower_than_the_minimum_rate_gets_a_408() -> None:
    """A chunked body at half of BODY_MIN_RATE falls behind after twice the grace."""
    server = start_server(max_body_size=10**6, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    chunk = b"fa\r\n" + b"h" * 250 + b"\r\n"
    for _ in range(18):
        server.clock.advance(1)
        client.send(chunk)
    # 18 * 250 bytes buy 9 s after the 10 s of grace: due at 19 s.
    server.clock.advance(0.9)
    assert client.value() == b""
    server.clock.advance(0.1)
    assert client.response().status == 408
    assert server.handler.handled == []


def test_body_not_complete_within_body_timeout_gets_a_408() -> None:
    """A body sent fast at first, which buys hours under BODY_MIN_RATE, then a byte at
    a time, is refused 408 BODY_TIMEOUT seconds after its head; the connection closes."""
    server = start_server(max_body_size=10**6, body_min_rate=500, body_timeout=60)
    client = server.connect()
    client.send(head(b"Content-Length: 200000", b"X-Request-ID: trickle") + b"\r\n\r\n")
    client.send(b"f" * 100_000)
    for _ in range(5):
        server.clock.advance(10)
        client.send(b"t")
    server.clock.advance(9.9)
    assert client.value() == b""
    server.clock.advance(0.1)
    response = client.response()
    assert response.status == 408
    error = response.error()
    assert (error["type"], error["request_id"]) == ("request_timeout", "trickle")
    assert "within 60s" in error["message"]
    assert client.closed
    assert server.handler.handled == []


def test_body_timeout_applies_without_a_minimum_rate() -> None:
    """With BODY_MIN_RATE=0, BODY_TIMEOUT still ends a body that never completes."""
    server = start_server(body_min_rate=0, body_timeout=30)
    client = server.connect()
    client.send(head(b"Content-Length: 10") + b"\r\n\r\n")
    for _ in range(3):
        server.clock.advance(9.9)
        client.send(b"t")
    server.clock.advance(0.3)
    assert client.response().status == 408


def test_time_the_proxy_holds_a_body_back_does_not_count_against_body_timeout() -> None:
    """Paused while the upstream request has not started, a body gets its whole
    BODY_TIMEOUT of reading time once it may go on."""
    server = start_server(max_body_size=10**7, body_min_rate=0, body_timeout=60)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 4)) + b"\r\n\r\n")
    client.send(b"w" * (BUFFERED_BODY_LIMIT + 1))
    assert client.paused
    server.clock.advance(300)
    sink = FakeSink()
    server.handler.last.source.start(sink)
    server.clock.advance(59)
    client.send(b"w")
    assert client.value() == b""
    server.clock.advance(1)
    assert isinstance(sink.failed, ClientTooSlow)


def test_body_min_rate_zero_waits_for_a_slow_body_up_to_the_idle_timeout() -> None:
    """With BODY_MIN_RATE=0 a body may trickle in as slowly as the idle timeout allows;
    a body that stops for 75 s is cut off."""
    server = start_server(header_timeout=10, body_min_rate=0)
    client = server.connect()
    client.send(head(b"Content-Length: 10") + b"\r\n\r\n")
    for _ in range(10):
        server.clock.advance(60)
        client.send(b"t")
    assert server.handler.last.body == b"t" * 10
    server.handler.last.respond()
    client.send(head(b"Content-Length: 10") + b"\r\n\r\n")
    server.clock.advance(CLIENT_IDLE_TIMEOUT)
    assert client.closed


# --- streaming bodies ----------------------------------------------------------------------


def test_body_over_the_buffer_limit_streams_from_the_head() -> None:
    """A Content-Length over 256 KiB is handed over with the head, as a body source of
    that length: what arrived is written when it starts, then each piece; it is
    replayable only until it starts; the transport is the sink's streaming producer
    until the body ends."""
    size = BUFFERED_BODY_LIMIT + 10
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % size) + b"\r\n\r\n" + b"a" * 10)
    call = server.handler.last
    source = call.source
    assert source.length == size
    assert source.replayable()
    client.send(b"b" * 20)
    sink = FakeSink()
    source.start(sink)
    assert not source.replayable()
    assert sink.data == b"a" * 10 + b"b" * 20
    assert sink.streaming is True
    client.send(b"c" * (size - 30))
    assert len(sink.data) == size
    assert sink.finished
    assert sink.producer is None
    assert call.request.record.bytes_in == size


def test_chunked_body_streams_once_past_the_buffer_limit() -> None:
    """A chunked body is kept in memory until it passes 256 KiB, then handed over as a
    body source of unknown length that writes what was kept, then the rest."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    piece = b"p" * 65536
    for _ in range(4):
        client.send(b"10000\r\n" + piece + b"\r\n")
    assert server.handler.calls == []
    client.send(b"1\r\nq\r\n")
    source = server.handler.last.source
    assert source.length is None
    sink = FakeSink()
    source.start(sink)
    client.send(b"2\r\nrs\r\n0\r\n\r\n")
    assert sink.data == piece * 4 + b"qrs"
    assert sink.finished


def test_chunked_body_ending_below_the_buffer_limit_is_handed_over_whole() -> None:
    """A chunked body that ends before 256 KiB is handed over as bytes."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(
        head(b"Transfer-Encoding: chunked") + b"\r\n\r\n" + chunked(b"x" * BUFFERED_BODY_LIMIT)
    )
    assert server.handler.last.body == b"x" * BUFFERED_BODY_LIMIT


def test_a_slow_upstream_pauses_the_client_without_a_408() -> None:
    """While the upstream connection cannot take more, the client's reading is paused,
    and the time paused does not count against the client's body rate."""
    size = BUFFERED_BODY_LIMIT * 2
    server = start_server(max_body_size=10**7, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % size) + b"\r\n\r\n")
    sink = FakeSink()
    server.handler.last.source.start(sink)
    client.send(b"x" * 1000)
    sink.producer.pauseProducing()
    assert client.paused
    server.clock.advance(600)
    assert client.value() == b""
    sink.producer.resumeProducing()
    assert not client.paused
    server.clock.advance(11.9)
    assert client.value() == b""
    server.clock.advance(0.1)
    assert isinstance(sink.failed, ClientTooSlow)
    assert client.closed or client.value() == b""


def test_a_streaming_body_that_is_too_slow_fails_its_source() -> None:
    """A body already streaming to the upstream that falls behind fails with
    ClientTooSlow; the core's answer closes the connection at once."""
    server = start_server(max_body_size=10**7, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT + 1)) + b"\r\n\r\n")
    call = server.handler.last
    sink = FakeSink()
    call.source.start(sink)
    server.clock.advance(10)
    assert isinstance(sink.failed, ClientTooSlow)
    client.send(b"more")
    assert sink.data == b""
    call.respond(408, b"{}")
    assert client.response().header(b"connection") == b"close"
    assert client.closed


def test_a_body_waiting_for_the_upstream_pauses_the_client_without_a_408() -> None:
    """Past 256 KiB waiting for the upstream request to start, the client is paused;
    that wait does not count against it."""
    server = start_server(max_body_size=10**7, header_timeout=10, body_min_rate=500)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 4)) + b"\r\n\r\n")
    client.send(b"w" * (BUFFERED_BODY_LIMIT + 1))
    assert client.paused
    server.clock.advance(300)
    assert client.value() == b""
    sink = FakeSink()
    server.handler.last.source.start(sink)
    assert not client.paused
    assert len(sink.data) == BUFFERED_BODY_LIMIT + 1


def test_chunked_streaming_body_past_max_body_size_fails_its_source() -> None:
    """A chunked body streaming to the upstream that grows past MAX_BODY_SIZE fails
    with BodyTooLarge; nothing more is read; the connection lingers after the answer."""
    server = start_server(max_body_size=BUFFERED_BODY_LIMIT + 100)
    client = server.connect()
    client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    client.send(b"%x\r\n" % (BUFFERED_BODY_LIMIT + 1) + b"s" * (BUFFERED_BODY_LIMIT + 1) + b"\r\n")
    call = server.handler.last
    sink = FakeSink()
    call.source.start(sink)
    client.send(b"100\r\n" + b"t" * 256 + b"\r\n")
    assert isinstance(sink.failed, BodyTooLarge)
    call.respond(413, b"{}")
    assert client.response().header(b"connection") == b"close"
    assert client.closed_after_lingering()


def test_an_early_response_to_a_streaming_body_closes_after_it() -> None:
    """If the core answers before the body has all arrived, the response says close
    and the connection lingers (dropping the rest of the body) after it."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 2)) + b"\r\n\r\n")
    call = server.handler.last
    call.source.stop()
    call.respond(503, b"{}")
    assert client.response().header(b"connection") == b"close"
    client.send(b"x" * 1000)
    assert client.closed_after_lingering()


def test_a_body_source_can_be_stopped_and_sent_once_only() -> None:
    """After ``stop`` nothing more is written; a second ``start`` fails its sink."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 2)) + b"\r\n\r\n")
    source = server.handler.last.source
    sink = FakeSink()
    source.start(sink)
    client.send(b"a")
    source.stop()
    client.send(b"b")
    assert sink.data == b"a"
    again = FakeSink()
    source.start(again)
    assert again.failed is not None


# --- the client leaving -------------------------------------------------------------------


def test_client_leaving_tells_the_exchange_and_fails_a_streaming_body() -> None:
    """When the client goes while its request is in flight, the core's exchange is
    told, a streaming body fails, and later calls on the ClientSide are ignored."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 2)) + b"\r\n\r\n")
    call = server.handler.last
    sink = FakeSink()
    call.source.start(sink)
    client.lose(ConnectionLost())
    assert call.exchange.gone == 1
    assert isinstance(sink.failed, ConnectionLost)
    call.client.send_head(200, b"OK", [], None, True)
    call.client.finish()
    assert client.value() == b""
    assert server.activity.connections == set()
    assert server.clock.getDelayedCalls() == []


def test_a_body_that_failed_before_it_started_fails_its_sink_at_start() -> None:
    """A streaming body whose client left before the upstream request started fails
    the sink it is then started on."""
    server = start_server(max_body_size=10**7)
    client = server.connect()
    client.send(head(b"Content-Length: %d" % (BUFFERED_BODY_LIMIT * 2)) + b"\r\n\r\nabc")
    source = server.handler.last.source
    client.lose(ConnectionLost())
    sink = FakeSink()
    source.start(sink)
    assert isinstance(sink.failed, ConnectionLost)
    assert sink.data == b""


def test_client_leaving_after_its_response_tells_no_one() -> None:
    """A client that leaves once its responses are complete cancels nothing."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(request(method=b"GET"))
    client.lose()
    assert server.handler.last.exchange.gone == 0


def test_queued_requests_are_dropped_when_the_client_leaves() -> None:
    """Requests waiting behind the one in flight are never handed over if the client
    goes; the one in flight is told."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET") + request(method=b"GET"))
    call = server.handler.last
    client.lose()
    assert call.exchange.gone == 1
    call.respond()
    assert len(server.handler.calls) == 1


# --- drain: activity and ClientConnection --------------------------------------------------


def test_connections_are_registered_with_the_activity() -> None:
    """Each connection is added to the activity when it opens and removed when it
    closes."""
    server = start_server()
    first, second = server.connect(), server.connect()
    assert server.activity.connections == {first.protocol, second.protocol}
    first.lose()
    assert server.activity.connections == {second.protocol}


def test_works_with_the_proxys_activity() -> None:
    """The real ``Activity`` knows each open connection, and can drain it."""
    clock = Clock()
    activity = Activity()
    handler = FakeHandler(clock, auto=True)
    factory = HTTP11Factory(handler, clock, activity, ClientLimits(1000, 10, 500))
    protocol = factory.buildProtocol(CLIENT)
    transport = StringTransport(peerAddress=CLIENT)
    protocol.makeConnection(transport)
    assert activity.connections() == [protocol]
    for connection in activity.connections():
        connection.close_if_idle()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert activity.connections() == []


def test_client_limits_come_from_the_config() -> None:
    """MAX_BODY_SIZE, HEADER_TIMEOUT, BODY_MIN_RATE and BODY_TIMEOUT make the client
    limits."""
    config = Config(
        target_url="http://upstream.example",
        max_body_size=5,
        header_timeout=2.5,
        body_min_rate=7,
        body_timeout=9,
    )
    assert ClientLimits.from_config(config) == ClientLimits(5, 2.5, 7, 9)


def test_draining_makes_every_response_close() -> None:
    """While the proxy drains, every response says Connection: close and its
    connection closes after it."""
    server = start_server(auto=True)
    server.activity.draining = True
    client = server.connect()
    client.send(request(method=b"GET"))
    assert client.response().header(b"connection") == b"close"
    assert client.closed


def test_close_if_idle_closes_an_idle_connection_now() -> None:
    """An idle connection is closed at once, silently."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(request(method=b"GET"))
    client.protocol.close_if_idle()
    assert client.closed
    assert client.value().count(b"HTTP/1.1 ") == 1


def test_close_if_idle_lets_a_busy_connection_answer_then_close() -> None:
    """A connection with a request in flight gets its response, with Connection:
    close, then closes."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client.protocol.close_if_idle()
    assert not client.closed
    server.handler.last.respond()
    assert client.response().header(b"connection") == b"close"
    assert client.closed


def test_close_if_idle_after_the_head_was_written_closes_after_the_response() -> None:
    """If the response head already went out, the connection still closes after it."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    server.handler.last.client.send_head(200, b"OK", [], None, True)
    client.protocol.close_if_idle()
    server.handler.last.client.finish()
    assert client.closed


def test_close_if_idle_answers_a_pipelined_request_with_close() -> None:
    """A request pipelined behind one whose head went out before the drain is still
    answered, with Connection: close, then the connection closes."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET", target=b"/1") + request(method=b"GET", target=b"/2"))
    server.handler.last.client.send_head(200, b"OK", [(b"Content-Length", b"0")], 0, True)
    client.protocol.close_if_idle()
    server.handler.last.client.finish()
    assert server.handler.last.request.target == b"/2"
    server.handler.last.respond()
    first, second = client.responses()
    assert (first.header(b"connection"), second.header(b"connection")) == (None, b"close")
    assert client.closed


def test_bytes_arriving_while_reading_is_paused_are_kept_in_order() -> None:
    """A transport may deliver more after reading was paused (TLS hands over record by
    record): those bytes wait, in order, with the rest."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET", target=b"/1") + b"GET /2 HTTP/1.1\r\n")
    assert client.paused
    client.send(b"Host: h\r\n\r\n" + request(method=b"GET", target=b"/3"))
    for _ in range(3):
        server.handler.last.respond()
    assert [call.request.target for call in server.handler.calls] == [b"/1", b"/2", b"/3"]
    assert not client.paused


def test_close_if_idle_waits_for_a_request_arriving() -> None:
    """A request whose head is arriving is answered (with close) before the close."""
    server = start_server(auto=True)
    client = server.connect()
    client.send(b"GET / HTTP/1.1\r\n")
    client.protocol.close_if_idle()
    assert not client.closed
    client.send(b"Host: h\r\n\r\n")
    assert client.response().header(b"connection") == b"close"
    assert client.closed


def test_abort_drops_the_connection() -> None:
    """The drain's abort drops the connection now; the exchange in flight is told once
    the connection is lost."""
    server = start_server()
    client = server.connect()
    client.send(request(method=b"GET"))
    client.protocol.abort()
    assert client.aborted
    client.lose(ConnectionLost())
    assert server.handler.last.exchange.gone == 1


def test_starting_a_listener_logs_no_factory_line() -> None:
    """Starting and stopping the factory of a listener writes nothing to the log: the
    start-up line names the listeners, without a "Starting factory <...>" line."""
    server = start_server()
    with capturedLogs() as events:
        server.factory.doStart()
        server.factory.doStop()
    assert events == []
