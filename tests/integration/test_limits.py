"""
Limits and bad input over real loopback sockets: each bad request gets its JSON error
and reaches nothing upstream, and slow or greedy clients do not hold up anyone else.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from .conftest import Proxy, Upstream
from .support import (
    LOOPBACK,
    RawClient,
    close_client,
    connect_raw,
    parse_response,
    pattern_bytes,
    raw_exchange,
    request,
    wait_until,
    within,
)


async def send_and_read_until_closed(port: int, data: bytes, timeout: float = 5) -> RawClient:
    """Send ``data`` on a new connection and wait until the proxy closes it."""
    client = await connect_raw(port)
    client.transport.write(data)
    await within(client.closed, timeout)
    return client


def response_of(client: RawClient) -> Any:
    """The first response the client received (there must be one)."""
    response = parse_response(bytes(client.received), eof=True)
    assert response is not None, bytes(client.received)
    return response


@pytest_twisted.ensureDeferred
async def test_upload_over_max_body_size_is_a_413_while_it_is_being_sent(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A client streaming a 4 MB body to a proxy with MAX_BODY_SIZE=1 MB gets the JSON
    413 (sent as soon as the head arrived) and the upstream never hears of it."""
    proxy = start_proxy(upstream.url, max_body_size=1_000_000)
    size = 4_000_000
    client = await send_and_read_until_closed(
        proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
        + pattern_bytes(size),
    )
    response = response_of(client)
    assert response.status == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert upstream.stats.requests == 0


def _send_all_then_read(port: int, head: bytes, size: int) -> bytes:
    """A blocking client that sends its whole body before it reads (like http.client)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as client:
        client.sendall(head)
        piece = pattern_bytes(1 << 20)
        for _ in range(size >> 20):
            client.sendall(piece)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        return received


@pytest_twisted.ensureDeferred
async def test_client_sending_its_whole_body_before_reading_gets_the_413(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A client that reads only after sending all of its 32 MiB body still gets the
    413, not a broken pipe: the proxy drops the rest of the body before it closes."""
    proxy = start_proxy(upstream.url, max_body_size=1_000_000)
    size = 32 << 20
    head = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
    received = await within(deferToThread(_send_all_then_read, proxy.port, head, size), 10)
    assert received.startswith(b"HTTP/1.1 413 ")
    assert upstream.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_chunked_upload_growing_past_max_body_size_is_a_413(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A chunked upload is cut off with the JSON 413 once it passes MAX_BODY_SIZE."""
    proxy = start_proxy(upstream.url, max_body_size=100_000)
    chunk = b"4000\r\n" + pattern_bytes(0x4000) + b"\r\n"
    client = await send_and_read_until_closed(
        proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 40,
    )
    assert response_of(client).status == 413
    assert upstream.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_upload_within_max_body_size_is_forwarded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A body just within MAX_BODY_SIZE arrives upstream whole."""
    proxy = start_proxy(upstream.url, max_body_size=100_000)
    response, body = await request(b"POST", proxy.url + "/echo", body=pattern_bytes(100_000))
    assert response.code == 200
    assert json.loads(body)["body_length"] == 100_000


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /echo HTTP/1.1\r\nHost: h\r\nX-A: a\r\n  folded\r\n\r\n", 400),
        (
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n"
            b"GET /echo/smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
            400,
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GET /echo\x01 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
        (
            b"GET /echo HTTP/1.1\r\nHost: h\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
    ],
    ids=[
        "obs-fold",
        "identity smuggling",
        "length and chunked",
        "two lengths",
        "negative length",
        "control character in target",
        "no Host",
        "header over 64 KiB",
        "102 header lines",
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_a_json_error_and_nothing_reaches_the_upstream(
    raw: bytes, status: int, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Malformed or ambiguously framed requests get a JSON 400, oversized heads a JSON
    431; the proxy closes the connection and forwards nothing, not even a request
    hidden in the body."""
    proxy = start_proxy(upstream.url)
    response = response_of(await send_and_read_until_closed(proxy.port, raw))
    assert response.status == status
    assert response.header(b"content-type") == [b"application/json"]
    assert response.json()["error"]["request_id"] == response.header(b"x-request-id")[0].decode()
    assert upstream.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_slowloris_connections_are_cut_off_and_do_not_delay_a_normal_request(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """
    200 connections that send a header byte every 0.1 s get a 408 and are closed
    HEADER_TIMEOUT (here 1 s) after their first byte; meanwhile ordinary requests are
    answered as fast as ever.
    """
    proxy = start_proxy(upstream.url, header_timeout=1.0)
    slow = [await connect_raw(proxy.port) for _ in range(200)]
    start = reactor.seconds()

    def trickle() -> None:
        for client in slow:
            if not client.closed.called:
                client.transport.write(b"X")

    for client in slow:
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Slow: ")
    dripping = LoopingCall(trickle)
    dripping.clock = reactor
    dripping.start(0.1)
    try:
        latencies = []
        for _ in range(5):
            sent = reactor.seconds()
            response, _ = await request(b"GET", proxy.url + "/v1/models")
            assert response.code == 200
            latencies.append(reactor.seconds() - sent)
        assert max(latencies) < 0.25, latencies
        await wait_until(lambda: all(c.closed.called for c in slow), 3, "slowloris closed")
    finally:
        dripping.stop()
    assert reactor.seconds() - start < 2.5
    statuses = {bytes(c.received).split(b"\r\n", 1)[0] for c in slow}
    assert statuses == {b"HTTP/1.1 408 Request Timeout"}
    assert upstream.stats.requests == 5


@pytest_twisted.ensureDeferred
async def test_stalled_upload_gets_a_408(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """An upload that stops arriving gets a JSON 408 after the grace of HEADER_TIMEOUT
    seconds (here 0.5 s) and is not forwarded."""
    proxy = start_proxy(upstream.url, header_timeout=0.5, body_min_rate=1000)
    sent = reactor.seconds()
    client = await send_and_read_until_closed(
        proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 10000\r\n\r\n" + b"s" * 100,
    )
    assert 0.5 <= reactor.seconds() - sent < 1.5
    response = response_of(client)
    assert response.status == 408
    assert response.json()["error"]["type"] == "request_timeout"
    assert upstream.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_requests_over_max_concurrent_requests_get_a_503_until_a_place_is_free(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """With MAX_CONCURRENT_REQUESTS=1 and one request in flight, another proxied request
    gets a JSON 503 with Retry-After: 1, the health check still answers, and once the
    first client has gone the next request is proxied."""
    proxy = start_proxy(upstream.url, max_concurrent_requests=1)
    hanging = await connect_raw(proxy.port)
    hanging.transport.write(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: upstream.stats.requests == 1, 5, "the first request is upstream")
    refused = await raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n")
    assert refused.status == 503
    assert refused.header(b"retry-after") == [b"1"]
    assert refused.json()["error"]["type"] == "overloaded"
    health = await raw_exchange(proxy.port, b"GET /api/health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert health.status == 200
    await close_client(hanging)
    await wait_until(lambda: upstream.stats.hangs_aborted == 1, 5, "the first request ended")
    response, _ = await request(b"GET", proxy.url + "/v1/models")
    assert response.code == 200
    assert upstream.stats.requests == 2


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_is_asked_and_h2c_upgrade_is_forwarded_without_it(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """``Upgrade: websocket`` is asked of the upstream (which answers without switching,
    so its answer is relayed and the connection closes); ``Upgrade: h2c`` is dropped and
    the request is forwarded as an ordinary HTTP/1.1 request."""
    proxy = start_proxy(upstream.url)
    websocket = await raw_exchange(
        proxy.port,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert websocket.status == 200
    assert websocket.header(b"connection") == [b"close"]
    asked = {name.lower(): value for name, value in websocket.json()["headers"]}
    assert (asked["upgrade"], asked["connection"]) == ("websocket", "Upgrade")
    assert upstream.stats.requests == 1
    h2c = await raw_exchange(
        proxy.port,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    assert h2c.status == 200
    names = {name.lower() for name, _ in h2c.json()["headers"]}
    assert not names & {"upgrade", "http2-settings"}
    assert upstream.stats.requests == 2
