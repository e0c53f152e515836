"""
A hostile or broken upstream, end to end: aiproxy's HTTP/1.1 server in front of raw
upstreams written here byte by byte. The client gets a clean ``502`` or a response cut
off (never a malformed or foreign one), the proxy's memory and log stay bounded, and
bytes an upstream sends out of turn never reach another client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from .conftest import Proxy
from .support import close_client, connect_raw, parse_response, raw_exchange
from .test_upstream_client import RawConnection, RawServer, serve  # noqa: F401

GET = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"


def endless_header_lines(connection: RawConnection, n: int) -> None:
    """A head that never ends: 20,000 header lines (1.3 MB), then nothing."""
    connection.send(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 50 + b"\r\n")
    connection.send((b"X-Filler: " + b"a" * 50 + b"\r\n") * 20_000)


def continue_flood(connection: RawConnection, n: int) -> None:
    """A thousand ``100 Continue`` responses before any real one."""
    connection.send(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)


def reply_with(head: bytes) -> Callable[[RawConnection, int], None]:
    def respond(connection: RawConnection, n: int) -> None:
        connection.send(head + b"Content-Length: 2\r\n\r\nok")

    return respond


@pytest.mark.parametrize(
    "respond",
    [
        endless_header_lines,
        continue_flood,
        reply_with(b"HTTP/1.1 200 O\rK\r\n"),
        reply_with(b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\n"),
        reply_with(b"HTTP/1.1 200 OK\r\nX-Bad: a\x1b[31mred\r\n"),
        reply_with(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n"),
        reply_with(b"HTTP/1.1 200 OK\x7f\r\n"),
        reply_with(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"),
    ],
    ids=[
        "endless-head",
        "100-flood",
        "cr-in-reason",
        "nul-in-value",
        "esc-in-value",
        "ctl-in-value",
        "del-in-reason",
        "unasked-101",
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_invalid_response_head_is_a_clean_502(
    serve: Callable[..., RawServer],  # noqa: F811
    start_proxy: Callable[..., Proxy],
    respond: Callable[[RawConnection, int], None],
) -> None:
    """A head aiproxy will not relay becomes a JSON 502 with the request ID; nothing of
    it reaches the client, the upstream connection is closed, and the log says so in a
    bounded number of short lines."""
    upstream = serve(respond)
    proxy = start_proxy(upstream.url(), max_retries=0)
    with capturedLogs() as events:
        response = await raw_exchange(proxy.port, GET, timeout=10)
    assert response.status == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_unreachable"
    assert "invalid response" in error["message"]
    assert error["request_id"] == response.header(b"x-request-id")[0].decode()
    assert not any(name.lower() == b"x-bad" for name, _ in response.headers)
    for connection in upstream.connections:
        await connection.closed
    assert len(events) < 10
    assert all(len(str(event.get("log_format", ""))) < 1000 for event in events)


@pytest_twisted.ensureDeferred
async def test_a_body_longer_than_its_length_is_cut_at_its_length(
    serve: Callable[..., RawServer],  # noqa: F811
    start_proxy: Callable[..., Proxy],
) -> None:
    """The client gets exactly the declared bytes; the rest never reaches any client:
    the next request goes on a new upstream connection and gets its own answer."""

    def respond(connection: RawConnection, n: int) -> None:
        if n == 1:
            smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
            connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + smuggled)
        else:
            connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    upstream = serve(respond)
    proxy = start_proxy(upstream.url())
    client = await connect_raw(proxy.port)
    try:
        client.transport.write(GET)
        await client.wait_for(lambda data: parse_response(data) is not None, 5)
        first = parse_response(bytes(client.received))
        assert first is not None and first.body == b"first"
        client.received.clear()
        client.transport.write(GET)
        await client.wait_for(lambda data: parse_response(data) is not None, 5)
        second = parse_response(bytes(client.received))
        assert second is not None and second.body == b"second"
        assert b"SMUGGLED" not in bytes(client.received)
    finally:
        await close_client(client)
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_bytes_sent_by_an_idle_upstream_connection_reach_nobody(
    serve: Callable[..., RawServer],  # noqa: F811
    start_proxy: Callable[..., Proxy],
) -> None:
    """An upstream that writes on a kept-alive connection between requests has that
    connection closed; the next client gets its own answer on a new one."""
    replies: list[Any] = []

    def respond(connection: RawConnection, n: int) -> None:
        connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n%02d" % n)
        replies.append(connection)

    upstream = serve(respond)
    proxy = start_proxy(upstream.url())
    first = await raw_exchange(proxy.port, GET)
    assert first.body == b"01"
    replies[0].send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    await replies[0].closed
    second = await raw_exchange(proxy.port, GET)
    assert second.body == b"02"
    assert len(upstream.connections) == 2
