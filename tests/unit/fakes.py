"""
Fakes for the unit tests: an upstream client that records each request and answers
when the test says so, a response whose body the test sends piece by piece, and an
HTTP/1.1 client that talks to a server factory over a ``StringTransport``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from aiproxy.core.interfaces import BodySource, RawHeaders, RequestBody, ResponseSink

CLIENT_ADDRESS = IPv4Address("TCP", "203.0.113.7", 40000)


class CollectingSink:
    """A ``BodySink`` that keeps every piece and pulls a pull producer to the end."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.finished = False
        self.failed: Exception | None = None
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True

    def fail(self, reason: Exception) -> None:
        self.failed = reason

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if not streaming:
            while self.producer is producer and not self.finished:
                producer.resumeProducing()

    def unregister_producer(self) -> None:
        self.producer = None

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


def body_bytes(body: RequestBody) -> bytes:
    """The whole of a request body the proxy sent upstream."""
    if isinstance(body, bytes):
        return body
    sink = CollectingSink()
    body.start(sink)
    assert sink.finished, "the body did not finish"
    return sink.data


class FakeProducer:
    """Stands for the upstream connection's transport: records pauses and stops."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class FakeTunnelEnd:
    """The upstream's side of a tunnel: records what reaches it; the test sends and closes."""

    def __init__(self) -> None:
        self.producer = FakeProducer()
        self.written: list[bytes] = []
        self.peer: Any = None
        self.paused_by: Any = None
        self.closed = False
        self.aborted = False

    @property
    def gone(self) -> bool:
        return self.closed or self.aborted

    def join(self, peer: Any) -> None:
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_with(self, producer: Any) -> None:
        self.paused_by = producer

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def send(self, data: bytes) -> None:
        """The upstream sends ``data`` through the tunnel."""
        self.peer.received(self, data)

    def lose(self, reason: str | None = None) -> None:
        """The upstream closes (``reason`` L{None}) or is lost."""
        self.closed = True
        self.peer.closed(self, reason)


class FakeResponse:
    """An upstream response whose body the test sends piece by piece."""

    def __init__(self, status: int, reason: bytes, headers: RawHeaders, has_body: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        self.length: int | None = int(lengths[0]) if lengths else None
        self.has_body = has_body
        self.producer = FakeProducer()
        self.sink: ResponseSink | None = None
        self.aborted = False
        self.with_head = b""
        self.tunnel: FakeTunnelEnd | None = None

    def deliver(self, sink: ResponseSink) -> None:
        self.sink = sink
        if not self.has_body:
            sink.body_done()
        elif self.with_head:
            sink.body_received([self.with_head], None)

    def abort(self) -> None:
        self.aborted = True
        self.sink = None

    def send(self, data: bytes) -> None:
        """The upstream sends a piece of the body."""
        assert self.sink is not None, "nobody takes this body"
        self.sink.body_received([data], None)

    def end(self, reason: Exception | None = None) -> None:
        """The upstream body ends: completely, or with ``reason``."""
        assert self.sink is not None, "nobody takes this body"
        sink, self.sink = self.sink, None
        if reason is None:
            sink.body_done()
        else:
            sink.body_failed(reason)


@attrs.define
class UpstreamCall:
    """One request the proxy made upstream, and the Deferred it waits on."""

    method: bytes
    head: bytes
    body: RequestBody
    deferred: Deferred[Any] = attrs.field(init=False)
    cancelled: bool = False
    response: FakeResponse | None = None

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled = True

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def raw_headers(self) -> RawHeaders:
        """The head's fields, in order."""
        lines = self.head.split(b"\r\n")[1:]
        return [
            (line.partition(b":")[0], line.partition(b":")[2].strip()) for line in lines if line
        ]

    @property
    def headers(self) -> Headers:
        """The head's fields."""
        headers = Headers()
        for name, value in self.raw_headers:
            headers.addRawHeader(name, value)
        return headers

    @property
    def url(self) -> bytes:
        """The URL the request was for: ``http://`` + its ``Host`` + its target."""
        target = self.request_line.split(b" ")[1]
        host = self.headers.getRawHeaders(b"host")
        assert host, "no Host header"
        return b"http://" + host[0] + target

    @property
    def sent_body(self) -> bytes:
        return body_bytes(self.body)

    def respond(
        self,
        code: int = 200,
        headers: dict[bytes, list[bytes]] | Iterable[tuple[bytes, bytes]] | None = None,
        phrase: bytes = b"OK",
        with_head: bytes = b"",
    ) -> FakeResponse:
        """The upstream answers with response headers (and ``with_head``, body bytes
        that came in the same read); the rest of the body follows."""
        if isinstance(headers, dict):
            raw = [(name, value) for name, values in headers.items() for value in values]
        else:
            raw = list(headers or ())
        has_body = self.method != b"HEAD" and code not in (204, 304)
        self.response = FakeResponse(code, phrase, raw, has_body)
        self.response.with_head = with_head
        self.deferred.callback(self.response)
        return self.response

    def switch(self, headers: Iterable[tuple[bytes, bytes]] = ()) -> FakeTunnelEnd:
        """The upstream answers ``101 Switching Protocols``; the tunnel end it became."""
        response = FakeResponse(101, b"Switching Protocols", list(headers), False)
        response.tunnel = tunnel = FakeTunnelEnd()
        self.response = response
        self.deferred.callback(response)
        return tunnel


class FakeUpstream:
    """An ``UpstreamClient`` that records every request; each waits until the test answers."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []
        self.closed = False

    def request(self, method: bytes, head: bytes, body: RequestBody) -> Deferred[Any]:
        call = UpstreamCall(method, head, body)
        self.calls.append(call)
        return call.deferred

    def close(self) -> Deferred[None]:
        self.closed = True
        return Deferred.fromCoroutine(_nothing())

    @property
    def last(self) -> UpstreamCall:
        assert self.calls, "the proxy made no upstream request"
        return self.calls[-1]


async def _nothing() -> None:
    return None


@attrs.frozen
class ParsedResponse:
    """An HTTP/1.1 response as the client received it."""

    status: int
    headers: Headers
    body: bytes
    complete: bool
    raw_headers: RawHeaders = attrs.field(factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def parse_response(raw: bytes) -> ParsedResponse:
    """Parse the first response in ``raw``; the body is de-chunked."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw!r}"
    status_line, *lines = head.split(b"\r\n")
    headers = Headers()
    raw_headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
        raw_headers.append((name.strip(), value.strip()))
    status = int(status_line.split(b" ")[1])
    if headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body, complete = _dechunk(rest)
    else:
        length = headers.getRawHeaders(b"content-length")
        size = int(length[0]) if length else len(rest)
        body, complete = rest[:size], len(rest) >= size
    return ParsedResponse(status, headers, body, complete, raw_headers)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = []
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            return b"".join(body), False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(body), True
        body.append(data[:size])
        data = data[size + 2 :]


class WriteRecordingTransport(StringTransport):
    """A ``StringTransport`` that also keeps each write apart."""

    def __init__(self, peerAddress: IPv4Address) -> None:
        super().__init__(peerAddress=peerAddress)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class ClientConnection:
    """One client connection to a server ``factory``, over a ``StringTransport``."""

    def __init__(self, factory: Factory, peer: IPv4Address = CLIENT_ADDRESS) -> None:
        self.transport = WriteRecordingTransport(peer)
        self.protocol = factory.buildProtocol(None)
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
        """Whether the proxy aborted (or closed) the client connection."""
        return bool(self.transport.disconnected or self.transport.disconnecting)


__all__ = [
    "CLIENT_ADDRESS",
    "BodySource",
    "ClientConnection",
    "CollectingSink",
    "FakeResponse",
    "FakeUpstream",
    "ParsedResponse",
    "UpstreamCall",
    "body_bytes",
    "parse_response",
]
