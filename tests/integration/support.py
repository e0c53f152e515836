"""
Clients and waits for the end-to-end tests: every wait is bounded, every client is
closed by the test that opened it, and only loopback is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

LOOPBACK = "127.0.0.1"


def within(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    """``d``, failing with a timeout if it has not fired within ``seconds``."""
    return d.addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.005
) -> float:
    """
    Poll ``predicate`` until it is true; return how long that took.

    @raise AssertionError: it stayed false for ``timeout`` seconds.
    """
    start = reactor.seconds()
    while not predicate():
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await sleep(interval)
    return reactor.seconds() - start


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --- Raw HTTP/1.1 over a socket, for exact bytes ---------------------------------


@attrs.frozen
class RawResponse:
    """A response as it came off the wire."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        """Every value of ``name``, in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> set[bytes]:
        """The lower-cased header names."""
        return {n.lower() for n, _ in self.headers}

    def json(self) -> Any:
        """The body, as JSON."""
        return json.loads(self.body)


def parse_response(data: bytes, *, head: bool = False, eof: bool = False) -> RawResponse | None:
    """
    The first complete response in ``data``, or L{None} if more bytes are needed.

    Bodies framed by ``Content-Length`` or chunked encoding are complete when all of
    their bytes are there; other bodies only at ``eof``.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = data[:head_end].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    rest = data[head_end + 4 :]
    response = RawResponse(status, headers, b"")
    if head or status in (204, 304) or 100 <= status < 200:
        return response
    if b"chunked" in b",".join(response.header(b"transfer-encoding")).lower():
        body = _dechunk(rest)
        return None if body is None else attrs.evolve(response, body=body)
    lengths = response.header(b"content-length")
    if lengths:
        length = int(lengths[0])
        return attrs.evolve(response, body=rest[:length]) if len(rest) >= length else None
    return attrs.evolve(response, body=rest) if eof else None


def _dechunk(data: bytes) -> bytes | None:
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(data[position:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            return bytes(body) if data.find(b"\r\n", start) >= 0 else None
        if len(data) < start + size + 2:
            return None
        body += data[start : start + size]
        position = start + size + 2


class RawClient(Protocol):
    """
    Writes exactly the bytes it is given and records what comes back.

    ``closed`` fires when the connection has ended, ``reason`` says why.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.reason: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        waiters, self._waiters = self._waiters, []
        for predicate, d in waiters:
            if predicate(bytes(self.received)):
                d.callback(None)
            else:
                d.errback(AssertionError(f"connection closed first: {bytes(self.received)!r}"))
        self.reason = reason
        self.closed.callback(None)

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float) -> Deferred[None]:
        """Fires once the bytes received so far satisfy ``predicate``."""
        d: Deferred[None] = Deferred()
        if predicate(bytes(self.received)):
            d.callback(None)
        else:
            self._waiters.append((predicate, d))
        return within(d, timeout)

    def _check(self) -> None:
        data = bytes(self.received)
        ready = [(p, d) for p, d in self._waiters if p(data)]
        self._waiters = [(p, d) for p, d in self._waiters if (p, d) not in ready]
        for _, d in ready:
            d.callback(None)


async def connect_raw(port: int, timeout: float = 5) -> RawClient:
    """A :class:`RawClient` connected to ``127.0.0.1:port``."""
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=timeout)
    await within(connectProtocol(endpoint, client), timeout)
    return client


async def close_client(client: Any, timeout: float = 5) -> None:
    """
    Close a test client's connection (a :class:`RawClient`, or anything with a
    ``transport`` and a ``closed`` Deferred) and wait until it is closed.
    """
    if not client.closed.called:
        client.transport.loseConnection()
    await within(client.closed, timeout)


async def raw_exchange(
    port: int, request: bytes, *, head: bool = False, timeout: float = 5
) -> RawResponse:
    """Send ``request`` as is, read one complete response, close the connection."""
    client = await connect_raw(port)
    try:
        client.transport.write(request)
        await client.wait_for(lambda data: parse_response(data, head=head) is not None, timeout)
        response = parse_response(bytes(client.received), head=head)
        assert response is not None
        return response
    finally:
        await close_client(client)


# --- twisted.web.client.Agent, for everything else ---------------------------------


def client_agent() -> Agent:
    """An Agent that opens a new connection per request and closes it afterwards."""
    return Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))


class BodyReceiver(Protocol):
    """
    Receives a response body: counts it, and keeps it unless ``keep`` is false.

    ``finished`` fires when the body has ended; ``reason`` says why (``ResponseDone``
    when it is complete).
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.body = bytearray()
        self.length = 0
        self.digest = hashlib.sha256()
        self.reason: Failure | None = None
        self.finished: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.length += len(data)
        if self.keep:
            self.body += data
        else:
            self.digest.update(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.finished.callback(None)


async def request(
    method: bytes,
    url: str,
    headers: dict[bytes, list[bytes]] | None = None,
    body: bytes | IBodyProducer | None = None,
    timeout: float = 10,
) -> tuple[IResponse, bytes]:
    """One request with a fresh connection; the response and its whole body."""
    producer = FileBodyProducer(io.BytesIO(body)) if isinstance(body, bytes) else body
    response: IResponse = await within(
        client_agent().request(method, url.encode("ascii"), Headers(headers or {}), producer),
        timeout,
    )
    receiver = BodyReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, timeout)
    assert receiver.reason is not None
    if not receiver.reason.check(ResponseDone):
        receiver.reason.raiseException()
    return response, bytes(receiver.body)


def header(response: IResponse, name: bytes) -> bytes | None:
    """The first value of a response header."""
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


# --- Bodies to upload --------------------------------------------------------------

PATTERN = bytes(range(256)) * 256
"""64 KiB of every byte value, repeated to make test bodies."""


def pattern_bytes(size: int) -> bytes:
    """``size`` bytes of :data:`PATTERN`."""
    repeats, rest = divmod(size, len(PATTERN))
    return PATTERN * repeats + PATTERN[:rest]


def pattern_sha256(size: int) -> str:
    """The SHA-256 of :func:`pattern_bytes` ``(size)``, computed piece by piece."""
    digest = hashlib.sha256()
    for piece in _pattern_pieces(size):
        digest.update(piece)
    return digest.hexdigest()


def _pattern_pieces(size: int) -> Iterable[bytes]:
    while size > 0:
        piece = PATTERN[:size]
        size -= len(piece)
        yield piece


class PatternFile(io.RawIOBase):
    """
    A read-only file of ``size`` bytes of :data:`PATTERN`, generated as it is read:
    uploading it never holds the body in memory.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.size - self.position)
        start = self.position % len(PATTERN)
        written = 0
        while written < count:
            piece = PATTERN[start : start + count - written]
            buffer[written : written + len(piece)] = piece
            written += len(piece)
            start = 0
        self.position += count
        return count


def pattern_producer(size: int) -> IBodyProducer:
    """A body producer for ``size`` pattern bytes, paused and resumed by the connection."""
    return FileBodyProducer(PatternFile(size), readSize=65536)


# --- Server-sent events ------------------------------------------------------------


class EventReceiver(Protocol):
    """
    Splits an SSE body into events and notes when each arrived (``reactor.seconds()``).

    ``events`` holds ``(arrival_time, data)`` pairs; ``finished`` fires when the body
    has ended, ``reason`` says why.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[tuple[float, bytes]] = []
        self.reads = 0
        self.reason: Failure | None = None
        self.finished: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        self.reads += 1
        self.buffer += data
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            self.events.append((now, event[6:]))

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.finished.callback(None)


__all__ = [
    "LOOPBACK",
    "BodyReceiver",
    "EventReceiver",
    "PatternFile",
    "RawClient",
    "RawResponse",
    "client_agent",
    "close_client",
    "connect_raw",
    "free_port",
    "header",
    "parse_response",
    "pattern_bytes",
    "pattern_producer",
    "pattern_sha256",
    "raw_exchange",
    "request",
    "sleep",
    "wait_until",
    "within",
]
