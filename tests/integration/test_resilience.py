"""
Failures of the upstream over real loopback sockets: what is retried, what is not, and
what the client sees.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from aiproxy.config import Config
from aiproxy.core.handler import ProxyCore
from aiproxy.rules.retry import RetryPolicy
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits
from aiproxy.testing import FakeOpenAI
from aiproxy.upstream.pool import UpstreamPool

from .conftest import Proxy, Upstream
from .support import (
    LOOPBACK,
    close_client,
    connect_raw,
    free_port,
    parse_response,
    request,
    sleep,
    wait_until,
    within,
)

JITTER_ONE = RetryPolicy(3, 0.5, jitter=lambda: 1.0)
"""Waits of exactly 0.5, 1 and 2 seconds before the three retries."""


@attrs.define
class BareProxy:
    """A proxy core with a chosen retry policy, behind aiproxy's HTTP/1.1 server on loopback."""

    resource: ProxyCore
    listening: IListeningPort

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listening.getHost().port}"


@pytest_twisted.async_yield_fixture
async def bare_proxy() -> AsyncIterator[Callable[..., BareProxy]]:
    """``bare_proxy(target_url, **resource_options)``: a proxy with a fixed-jitter policy."""
    started = []

    def start(target_url: str, **options: object) -> BareProxy:
        options.setdefault("request_timeout", 10)
        options.setdefault("retry_policy", JITTER_ONE)
        config = Config(target_url=target_url)
        pool = UpstreamPool.from_config(reactor, config)
        core = ProxyCore(config.target, pool, reactor, **options)
        factory = HTTP11Factory(core, reactor, core.activity, ClientLimits.from_config(config))
        proxy = BareProxy(core, reactor.listenTCP(0, factory, interface=LOOPBACK))
        started.append((proxy, pool))
        return proxy

    yield start
    for proxy, pool in started:
        await within(proxy.listening.stopListening(), 5)
        await within(pool.close(), 5)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_comes_up_late_is_reached_by_the_retries(
    bare_proxy: Callable[..., BareProxy],
) -> None:
    """The upstream starts listening 0.3 s after the request: the retries reach it."""
    port = free_port()
    proxy = bare_proxy(f"http://{LOOPBACK}:{port}")
    listening: list[IListeningPort] = []
    reactor.callLater(
        0.3,
        lambda: listening.append(
            reactor.listenTCP(port, Site(FakeOpenAI(reactor)), interface=LOOPBACK)
        ),
    )
    try:
        response, body = await request(b"POST", proxy.url + "/v1/chat/completions", body=b"{}")
        assert response.code == 200
        assert json.loads(body)["object"] == "chat.completion"
        assert proxy.resource.retries == 1
    finally:
        await wait_until(lambda: bool(listening), 2, "the late upstream is listening")
        await within(listening[0].stopListening(), 5)


class _Reset(Protocol):
    def connectionMade(self) -> None:
        self.transport.abortConnection()


class ResetFirst(Factory):
    """Resets its first ``count`` connections at once, then serves the fake upstream."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.connections = 0
        self.fake = FakeOpenAI(reactor)
        self.site = Site(self.fake)

    def buildProtocol(self, addr: object) -> Protocol | None:
        self.connections += 1
        if self.connections <= self.count:
            return _Reset()
        return self.site.buildProtocol(addr)


@pytest_twisted.async_yield_fixture
async def resetting_upstream() -> AsyncIterator[tuple[ResetFirst, str]]:
    """An upstream that resets its first two connections."""
    factory = ResetFirst(2)
    port = reactor.listenTCP(0, factory, interface=LOOPBACK)
    yield factory, f"http://{LOOPBACK}:{port.getHost().port}"
    await within(port.stopListening(), 5)


@pytest_twisted.ensureDeferred
async def test_a_get_survives_an_upstream_resetting_its_first_connections(
    resetting_upstream: tuple[ResetFirst, str], bare_proxy: Callable[..., BareProxy]
) -> None:
    """Two reset connections, then an answer: a GET is retried and the client gets 200."""
    factory, url = resetting_upstream
    proxy = bare_proxy(url)
    response, _ = await request(b"GET", proxy.url + "/v1/models")
    assert response.code == 200
    assert factory.connections == 3
    assert proxy.resource.retries == 2


@pytest_twisted.ensureDeferred
async def test_a_post_is_not_replayed_after_a_reset(
    resetting_upstream: tuple[ResetFirst, str], bare_proxy: Callable[..., BareProxy]
) -> None:
    """A POST whose fresh connection is reset may have started a generation: one attempt,
    then 502."""
    factory, url = resetting_upstream
    proxy = bare_proxy(url)
    response, body = await request(b"POST", proxy.url + "/v1/chat/completions", body=b"{}")
    assert response.code == 502
    assert json.loads(body)["error"]["type"] == "upstream_unreachable"
    assert factory.connections == 1


class OneRequestPerConnection(Protocol):
    """
    Answers the first request on a connection and keeps it open; a second request on the
    same connection finds it closed, as if the upstream's keep-alive had just expired.
    """

    def __init__(self, served: list[bytes]) -> None:
        self.served = served
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        response = parse_request_head(self.buffer)
        if response is None:
            return
        if getattr(self, "answered", False):
            self.transport.abortConnection()
            return
        self.answered = True
        self.served.append(self.buffer.split(b" ", 1)[0])
        self.buffer = b""
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def parse_request_head(data: bytes) -> bytes | None:
    """The request's body once it is complete (``Content-Length`` framing), else None."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and len(body) < int(value):
            return None
    return body


@pytest_twisted.ensureDeferred
async def test_a_post_on_a_kept_alive_connection_the_upstream_closed_is_retried(
    bare_proxy: Callable[..., BareProxy],
) -> None:
    """The stale keep-alive race: the second POST finds its pooled connection closed by the
    upstream before any response; it never reached the upstream, so it is sent again."""
    served: list[bytes] = []
    factory = Factory.forProtocol(lambda: OneRequestPerConnection(served))
    port = reactor.listenTCP(0, factory, interface=LOOPBACK)
    try:
        proxy = bare_proxy(f"http://{LOOPBACK}:{port.getHost().port}")
        for _ in range(2):
            response, body = await request(b"POST", proxy.url + "/v1/chat/completions", body=b"{}")
            assert (response.code, body) == (200, b"ok")
        assert served == [b"POST", b"POST"]
        assert proxy.resource.retries == 1
    finally:
        await within(port.stopListening(), 5)


@pytest_twisted.ensureDeferred
async def test_a_stalled_upstream_is_a_504_and_the_post_is_not_replayed(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """No response headers within REQUEST_TIMEOUT: 504 in time, the POST was sent once, and
    the upstream connection is released."""
    proxy = start_proxy(upstream.url, request_timeout=0.5)
    started = reactor.seconds()
    response, body = await request(b"POST", proxy.url + "/hang", body=b"{}")
    elapsed = reactor.seconds() - started
    assert response.code == 504
    assert json.loads(body)["error"]["type"] == "upstream_timeout"
    assert 0.5 <= elapsed < 1.5
    await wait_until(lambda: upstream.stats.hangs_aborted == 1, 1, "the upstream saw the close")
    assert upstream.stats.requests == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_that_stalls_is_cut_off_not_ended_cleanly(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """An SSE stream that goes quiet for STREAM_IDLE_TIMEOUT: the client's response ends
    abnormally (no final chunk, no [DONE]) and the upstream stream is closed."""
    proxy = start_proxy(upstream.url, stream_idle_timeout=0.5)
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /sse/3/5000 HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.wait_for(lambda data: b'"fake_seq": 0' in data, 5)
    await within(client.closed, 3)
    received = bytes(client.received)
    assert parse_response(received) is None, "the chunked body never got its last chunk"
    assert b"[DONE]" not in received
    await wait_until(lambda: upstream.stats.streams_aborted == 1, 1, "the upstream saw the cut")
    await close_client(client)


@pytest_twisted.ensureDeferred
async def test_a_slow_but_steady_stream_is_not_cut(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Events arriving more often than STREAM_IDLE_TIMEOUT keep a long stream alive."""
    proxy = start_proxy(upstream.url, stream_idle_timeout=0.5)
    response, body = await request(b"GET", proxy.url + "/sse/6/200")
    assert response.code == 200
    assert body.endswith(b"data: [DONE]\n\n")
    await sleep(0)
