"""
Fakes for the unit tests: an ``IAgent`` that records each request and answers when the
test says so, an ``IResponse`` whose body the test writes, and an HTTP/1.1 client that
talks to a ``Site`` over a ``StringTransport``.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer

CLIENT_ADDRESS = IPv4Address("TCP", "203.0.113.7", 40000)


def clock_cooperator(clock: Clock) -> Cooperator:
    """A cooperator that runs one step per ``clock.advance(0)``."""
    return Cooperator(
        terminationPredicateFactory=lambda: lambda: True,
        scheduler=lambda step: clock.callLater(0, step),
    )


def run_until_fired(clock: Clock, d: Deferred[object], limit: int = 10_000) -> None:
    """Advance ``clock`` by zero seconds until ``d`` has fired."""
    for _ in range(limit):
        if d.called:
            return
        clock.advance(0)
    raise AssertionError(f"{d!r} did not fire after {limit} clock turns")


class CollectingConsumer:
    """An ``IConsumer`` that keeps every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


def produce(producer: IBodyProducer, clock: Clock) -> CollectingConsumer:
    """Run ``producer`` to the end and return what it wrote."""
    consumer = CollectingConsumer()
    run_until_fired(clock, producer.startProducing(consumer))
    return consumer


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test sends piece by piece."""

    version = (b"HTTP", 1, 1)
    length = UNKNOWN_LENGTH
    request = None
    previousResponse = None

    def __init__(self, code: int, phrase: bytes, headers: Headers) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.protocol = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: object) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: object) -> None:
        self.previousResponse = response

    def send(self, data: bytes) -> None:
        """The upstream sends a piece of the body."""
        self.protocol.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        """The upstream body ends: completely, or with ``reason``."""
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


@attrs.define
class AgentCall:
    """One request the proxy made upstream, and the Deferred it waits on."""

    method: bytes
    url: bytes
    headers: Headers
    body: IBodyProducer | None
    deferred: Deferred[IResponse] = attrs.field(init=False)
    cancelled: bool = False

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred[IResponse]) -> None:
        self.cancelled = True

    def respond(
        self,
        code: int = 200,
        headers: dict[bytes, list[bytes]] | None = None,
        phrase: bytes = b"OK",
    ) -> FakeResponse:
        """The upstream answers with response headers; the body follows."""
        response = FakeResponse(code, phrase, Headers(headers or {}))
        self.deferred.callback(response)
        return response


@implementer(IAgent)
class FakeAgent:
    """Records every request; each one waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: list[AgentCall] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        call = AgentCall(method, uri, headers if headers is not None else Headers(), bodyProducer)
        self.calls.append(call)
        return call.deferred

    @property
    def last(self) -> AgentCall:
        assert self.calls, "the proxy made no upstream request"
        return self.calls[-1]


@attrs.frozen
class ParsedResponse:
    """An HTTP/1.1 response as the client received it."""

    status: int
    headers: Headers
    body: bytes
    complete: bool

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def parse_response(raw: bytes) -> ParsedResponse:
    """Parse the first response in ``raw``; the body is de-chunked."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw!r}"
    status_line, *lines = head.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    status = int(status_line.split(b" ")[1])
    if headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body, complete = _dechunk(rest)
    else:
        length = headers.getRawHeaders(b"content-length")
        size = int(length[0]) if length else len(rest)
        body, complete = rest[:size], len(rest) >= size
    return ParsedResponse(status, headers, body, complete)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = []
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            return b"".join(body), False
        size = int(size_line, 16)
        if size == 0:
            return b"".join(body), True
        body.append(data[:size])
        data = data[size + 2 :]


class ClientConnection:
    """One client connection to ``site``, over a ``StringTransport``."""

    def __init__(self, site: Site, peer: IPv4Address = CLIENT_ADDRESS) -> None:
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, raw: bytes) -> None:
        """Bytes from the client."""
        self.protocol.dataReceived(raw)

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
    ) -> None:
        """Send one HTTP/1.1 request; a body gets a ``Content-Length``."""
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: proxy.example"]
        lines += [name + b": " + value for name, value in headers]
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        self.send(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))

    def response(self) -> ParsedResponse:
        """What the client has received so far, parsed."""
        return parse_response(self.transport.value())

    def disconnect(self) -> None:
        """The client closes the connection."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def aborted(self) -> bool:
        """Whether the proxy aborted the client connection."""
        return bool(self.transport.disconnected)
