"""
aiproxy's upstream client over real loopback sockets, against raw upstreams written
here byte by byte: keep-alive reuse, connect and TLS failures, TLS with a test CA, and
hostile upstreams (endless heads, ``1xx`` floods, bytes beyond the response).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest_twisted
import trustme
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure

from aiproxy.core.interfaces import UpstreamResponse
from aiproxy.rules.target import parse_target
from aiproxy.upstream.errors import BadResponse, ConnectFailed
from aiproxy.upstream.pool import UpstreamPool

from .support import LOOPBACK, free_port, sleep, wait_until, within

GET = b"GET /v1/models HTTP/1.1\r\nHost: upstream\r\n\r\n"


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + extra


# --- Raw upstreams -----------------------------------------------------------------


class RawConnection(Protocol):
    """One connection to a raw upstream: reads requests, lets the test answer them."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.server.requests.append(head)
            self.server.respond(self, len(self.server.requests))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


@attrs.define(eq=False)
class RawServer:
    """A raw upstream: ``respond(connection, n)`` answers the n-th request."""

    respond: Callable[[RawConnection, int], None]
    connections: list[RawConnection] = attrs.Factory(list)
    requests: list[bytes] = attrs.Factory(list)
    port: IListeningPort | None = None

    def url(self, scheme: str = "http", host: str = LOOPBACK) -> str:
        assert self.port is not None
        return f"{scheme}://{host}:{self.port.getHost().port}"  # type: ignore[attr-defined]


class RawFactory(ServerFactory):
    noisy = False

    def __init__(self, server: RawServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> RawConnection:
        return RawConnection(self.server)


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., RawServer]]:
    """``serve(respond, tls=None)``: a raw upstream on a loopback port, closed afterwards."""
    servers: list[RawServer] = []

    def start(
        respond: Callable[[RawConnection, int], None],
        tls: ssl.CertificateOptions | None = None,
    ) -> RawServer:
        server = RawServer(respond)
        factory = RawFactory(server)
        if tls is None:
            server.port = reactor.listenTCP(0, factory, interface=LOOPBACK)
        else:
            server.port = reactor.listenSSL(  # type: ignore[attr-defined]
                0, factory, tls, interface=LOOPBACK
            )
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.port is not None
        await within(server.port.stopListening(), 5)  # type: ignore[arg-type]
        for connection in server.connections:
            if not connection.closed.called:
                connection.transport.abortConnection()  # type: ignore[union-attr]
            await within(connection.closed, 5)


@pytest_twisted.async_yield_fixture
async def pools(serve: Any) -> AsyncIterator[Callable[..., UpstreamPool]]:
    """``pools(url, **settings)``: an ``UpstreamPool``, closed before the upstreams are."""
    made: list[UpstreamPool] = []

    def make(url: str, **settings: Any) -> UpstreamPool:
        settings.setdefault("connect_timeout", 5)
        pool = UpstreamPool(reactor, parse_target(url), **settings)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await within(pool.close(), 5)


class Collect:
    """A ``ResponseSink`` whose ``done`` fires with the whole body."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.raw: list[bytes | None] = []
        self.done: Deferred[bytes] = Deferred()

    def body_received(self, pieces: list[bytes], raw_chunked: bytes | None) -> None:
        self.pieces.extend(pieces)
        self.raw.append(raw_chunked)

    def body_done(self) -> None:
        self.done.callback(b"".join(self.pieces))

    def body_failed(self, reason: Exception) -> None:
        self.done.errback(reason)

    @property
    def received(self) -> int:
        return sum(len(piece) for piece in self.pieces)


async def fetch(pool: UpstreamPool, head: bytes = GET) -> tuple[UpstreamResponse, bytes]:
    """One GET through ``pool``: the response and its whole body."""
    response: UpstreamResponse = await within(pool.request(b"GET", head, b""), 5)
    sink = Collect()
    response.deliver(sink)
    body = await within(sink.done, 5)
    return response, body


async def failure_of(d: Deferred[Any]) -> Exception:
    try:
        await within(d, 5)
    except Exception as e:
        return e
    raise AssertionError("the request did not fail")


# --- Keep-alive --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sequential_requests_share_one_connection(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """Requests one after another go over the same kept-alive connection."""
    server = serve(lambda conn, n: conn.send(reply(b"reply-%d" % n)))
    pool = pools(server.url())
    bodies = [(await fetch(pool))[1] for _ in range(3)]
    assert bodies == [b"reply-1", b"reply-2", b"reply-3"]
    assert len(server.connections) == 1
    assert server.requests == [GET.rstrip(b"\r\n")] * 3


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_the_upstream_closed_is_not_used_again(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """When the upstream closes an idle connection, the next request opens a new one."""

    def respond(conn: RawConnection, n: int) -> None:
        conn.send(reply(b"reply-%d" % n))
        assert conn.transport is not None
        conn.transport.loseConnection()

    server = serve(respond)
    pool = pools(server.url())
    await fetch(pool)
    await wait_until(lambda: pool.idle_connections == 0, 2, "the closed connection is dropped")
    _, body = await fetch(pool)
    assert body == b"reply-2"
    assert len(server.connections) == 2


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_connect_failure(
    pools: Callable[..., UpstreamPool],
) -> None:
    pool = pools(f"http://{LOOPBACK}:{free_port()}")
    error = await failure_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, ConnectFailed) and error.kind == "connect"
    assert "refused" in str(error)


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_head_closes_the_upstream_connection_at_once(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """A client that leaves before the response head: the upstream sees the close."""
    server = serve(lambda conn, n: None)
    pool = pools(server.url())
    d = pool.request(b"GET", GET, b"")
    await wait_until(lambda: bool(server.requests), 2, "the request arrived")
    d.cancel()
    assert isinstance(await failure_of(d), CancelledError)
    await within(server.connections[0].closed, 1)


@pytest_twisted.ensureDeferred
async def test_a_paused_response_stops_reading_from_the_upstream(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """While the producer is paused nothing more is read; resumed, the whole body comes."""
    size = 4 * 1024 * 1024
    server = serve(lambda conn, n: conn.send(reply(b"x" * size)))
    pool = pools(server.url())
    response = await within(pool.request(b"GET", GET, b""), 5)
    response.producer.pauseProducing()
    sink = Collect()
    response.deliver(sink)
    held = sink.received
    await sleep(0.2)
    assert sink.received == held < size
    response.producer.resumeProducing()
    body = await within(sink.done, 5)
    assert len(body) == size


@pytest_twisted.ensureDeferred
async def test_chunked_events_are_relayed_raw_as_they_arrive(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """Each chunk the upstream writes on its own arrives as one raw, whole-chunk piece."""
    events = [b"data: %d\n\n" % i for i in range(3)]
    writers: list[RawConnection] = []

    def respond(conn: RawConnection, n: int) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writers.append(conn)

    server = serve(respond)
    pool = pools(server.url())
    response = await within(pool.request(b"GET", GET, b""), 5)
    sink = Collect()
    response.deliver(sink)
    for event in events:
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        writers[0].send(chunk)
        await wait_until(lambda c=chunk: c in sink.raw, 2, "the chunk arrived raw")  # type: ignore[misc]
    writers[0].send(b"0\r\n\r\n")
    assert await within(sink.done, 5) == b"".join(events)
    assert len(server.connections) == 1


# --- TLS ---------------------------------------------------------------------------


@attrs.frozen
class TrustedCA:
    ca: trustme.CA

    @property
    def trust_root(self) -> ssl.Certificate:
        return ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())

    def server_options(self, *names: str, sni: list[bytes] | None = None) -> ssl.CertificateOptions:
        certificate = self.ca.issue_cert(*names)
        key_and_chain = certificate.private_key_and_cert_chain_pem.bytes()
        options = ssl.PrivateCertificate.loadPEM(key_and_chain).options()
        if sni is not None:

            def record(connection: SSL.Connection) -> None:
                sni.append(connection.get_servername() or b"")

            options.getContext().set_tlsext_servername_callback(record)
        return options


def ok(conn: RawConnection, n: int) -> None:
    conn.send(reply(b"secret-free"))


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_a_trusted_ca_is_accepted(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    ca = TrustedCA(trustme.CA())
    server = serve(ok, tls=ca.server_options(LOOPBACK))
    pool = pools(server.url("https"), trust_root=ca.trust_root)
    _, body = await fetch(pool)
    assert body == b"secret-free"
    await fetch(pool)
    assert len(server.connections) == 1


@pytest_twisted.ensureDeferred
async def test_a_host_name_is_verified_and_sent_as_sni(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    ca = TrustedCA(trustme.CA())
    sni: list[bytes] = []
    server = serve(ok, tls=ca.server_options("localhost", sni=sni))
    pool = pools(server.url("https", "localhost"), trust_root=ca.trust_root)
    _, body = await fetch(pool)
    assert body == b"secret-free"
    assert sni == [b"localhost"]


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_is_a_tls_failure(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """With the system's trust store, a certificate from an unknown CA is refused."""
    server = serve(ok, tls=TrustedCA(trustme.CA()).server_options(LOOPBACK))
    pool = pools(server.url("https"))
    error = await failure_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, ConnectFailed) and error.kind == "tls"
    assert "\n" not in str(error)
    assert server.requests == []


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_a_tls_failure(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    ca = TrustedCA(trustme.CA())
    server = serve(ok, tls=ca.server_options("example.org"))
    pool = pools(server.url("https"), trust_root=ca.trust_root)
    error = await failure_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, ConnectFailed) and error.kind == "tls"
    assert server.requests == []


@pytest_twisted.ensureDeferred
async def test_ssl_verify_false_accepts_any_certificate_and_still_sends_sni(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    sni: list[bytes] = []
    server = serve(ok, tls=TrustedCA(trustme.CA()).server_options("example.org", sni=sni))
    pool = pools(server.url("https", "localhost"), ssl_verify=False)
    _, body = await fetch(pool)
    assert body == b"secret-free"
    assert sni == [b"localhost"]


# --- Hostile upstreams -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_upstream_sending_header_lines_forever_is_cut_off(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """An endless head is refused with a 502's error, and the connection is closed."""
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"

    def flood(conn: RawConnection) -> None:
        if not conn.closed.called:
            conn.send(line * 8)
            reactor.callLater(0, flood, conn)

    def respond(conn: RawConnection, n: int) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\n")
        flood(conn)

    server = serve(respond)
    pool = pools(server.url())
    error = await failure_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, BadResponse) and "65536" in str(error)
    await within(server.connections[0].closed, 2)
    await sleep(0.01)  # the last flood call runs and stops


@pytest_twisted.ensureDeferred
async def test_a_flood_of_100_continue_is_a_bad_response(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    server = serve(lambda conn, n: conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000))
    pool = pools(server.url())
    error = await failure_of(pool.request(b"GET", GET, b""))
    assert isinstance(error, BadResponse) and "1xx" in str(error)
    await within(server.connections[0].closed, 2)


@pytest_twisted.ensureDeferred
async def test_an_extra_response_is_never_taken_for_the_next_requests_answer(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """A second response sent with the first closes the connection; the next request
    gets its own answer over a new one."""
    evil = reply(b"evil")

    def respond(conn: RawConnection, n: int) -> None:
        conn.send(reply(b"reply-%d" % n, extra=evil if n == 1 else b""))

    server = serve(respond)
    pool = pools(server.url())
    assert (await fetch(pool))[1] == b"reply-1"
    assert (await fetch(pool))[1] == b"reply-2"
    assert len(server.connections) == 2
    await within(server.connections[0].closed, 2)


@pytest_twisted.ensureDeferred
async def test_bytes_on_an_idle_connection_close_it(
    serve: Callable[..., RawServer], pools: Callable[..., UpstreamPool]
) -> None:
    """An answer nobody asked for, sent later on an idle connection, closes it."""

    def respond(conn: RawConnection, n: int) -> None:
        conn.send(reply(b"reply-%d" % n))
        if n == 1:
            reactor.callLater(0.05, conn.send, reply(b"evil"))

    server = serve(respond)
    pool = pools(server.url())
    assert (await fetch(pool))[1] == b"reply-1"
    await within(server.connections[0].closed, 2)
    assert pool.idle_connections == 0
    assert (await fetch(pool))[1] == b"reply-2"
    assert len(server.connections) == 2
