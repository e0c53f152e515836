"""
How long a tunnel lives and what it costs: a client that stops reading holds the
upstream back instead of filling the proxy's memory; a side that vanishes takes the other
with it at once; an idle tunnel is closed; a thousand tunnels leave no descriptor behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ..conftest import Proxy
from ..support import LOOPBACK, sleep, wait_until, within
from .conftest import WebSocketUpstream, in_thread

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _handshake(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )


def _open_raw(proxy: Proxy, path: str) -> socket.socket:
    """A plain socket through which the upgrade to ``path`` succeeded (``101`` read)."""
    sock = socket.create_connection((LOOPBACK, proxy.port), timeout=10)
    sock.sendall(_handshake(path))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_holds_the_upstream_back(
    ws_proxy: Proxy, ws_upstream: WebSocketUpstream
) -> None:
    """The upstream would send 200 MB to a client that reads nothing: it is held back
    after what the socket buffers take, and memory stays flat."""
    before = _rss()
    ws_upstream.sent = 0
    sock = await in_thread(lambda: _open_raw(ws_proxy, "/firehose/200"))
    try:
        await sleep(1.5)
        held_at = ws_upstream.sent
        await sleep(0.5)
        assert ws_upstream.sent == held_at, "the upstream was not paused"
        assert held_at <= 40 * 1024 * 1024
        assert _rss() - before <= 10 * 1024 * 1024
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_vanished_client_closes_the_upstream_at_once(
    ws_proxy: Proxy, ws_upstream: WebSocketUpstream
) -> None:
    """A client whose connection is reset: the upstream's is closed within 100 ms."""
    sock = await in_thread(lambda: _open_raw(ws_proxy, "/hold"))
    count = len(ws_upstream.ended_at)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset_at = time.monotonic()
    sock.close()  # RST
    await wait_until(lambda: len(ws_upstream.ended_at) > count, 2, "the upstream side ended")
    assert ws_upstream.ended_at[count] - reset_at <= 0.1


class _Holder(Protocol):
    """A raw client or upstream side of a tunnel that keeps what it got."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class _SwitchingUpstream(_Holder):
    """An upstream that answers any upgrade ``101`` and then holds the connection."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in self.received + data and b"\r\n\r\n" not in self.received:
            key = next(
                line.split(b":", 1)[1].strip()
                for line in (self.received + data).split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
        super().dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_a_vanished_upstream_closes_the_client_at_once(
    start_proxy: Callable[..., Proxy],
) -> None:
    """An upstream whose connection is lost: the client's is closed within 100 ms."""
    upstreams: list[_SwitchingUpstream] = []

    def upstream_side() -> _SwitchingUpstream:
        upstreams.append(_SwitchingUpstream())
        return upstreams[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
        Factory.forProtocol(upstream_side)
    )
    try:
        proxy = start_proxy(f"http://{LOOPBACK}:{port.getHost().port}")
        client = _Holder()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, proxy.port), client)
        assert client.transport is not None
        client.transport.write(_handshake("/v1/realtime"))
        await wait_until(lambda: b"\r\n\r\n" in client.received, 5, "the 101")
        assert client.received.startswith(b"HTTP/1.1 101 ")
        upstream = upstreams[0]
        assert upstream.transport is not None
        lost_at = reactor.seconds()
        upstream.transport.abortConnection()
        await within(client.lost, 2)
        assert reactor.seconds() - lost_at <= 0.1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_idle_tunnel_is_closed_after_its_timeout(
    ws_upstream: WebSocketUpstream, start_proxy: Callable[..., Proxy]
) -> None:
    """With ``TUNNEL_IDLE_TIMEOUT`` of half a second, a silent tunnel is closed on both
    sides about then."""
    proxy = start_proxy(ws_upstream.url, tunnel_idle_timeout=0.5)
    count = len(ws_upstream.ended_at)
    opened = time.monotonic()
    sock = await in_thread(lambda: _open_raw(proxy, "/hold"))
    try:
        await wait_until(lambda: len(ws_upstream.ended_at) > count, 3, "the tunnel closed")
        assert 0.5 <= ws_upstream.ended_at[count] - opened <= 1.5
        assert await in_thread(lambda: sock.recv(10)) == b""
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_thousand_idle_tunnels_leave_no_descriptor_behind(
    start_proxy: Callable[..., Proxy],
) -> None:
    """1,000 tunnels open at once, all held, then all closed by their clients: the
    process's descriptors are back to what they were."""
    baseline = len(os.listdir("/proc/self/fd"))
    upstreams: list[_SwitchingUpstream] = []

    def upstream_side() -> _SwitchingUpstream:
        upstreams.append(_SwitchingUpstream())
        return upstreams[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK, backlog=1024).listen(
        Factory.forProtocol(upstream_side)
    )
    proxy = start_proxy(f"http://{LOOPBACK}:{port.getHost().port}")
    clients = [_Holder() for _ in range(1000)]
    try:
        endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, proxy.port)
        for client in clients:
            await connectProtocol(endpoint, client)
            assert client.transport is not None
            client.transport.write(_handshake("/v1/realtime"))
        await wait_until(
            lambda: all(c.received.startswith(b"HTTP/1.1 101 ") for c in clients),
            30,
            "every tunnel switched",
        )
        assert proxy.core.active_tunnels == 1000
        assert len(os.listdir("/proc/self/fd")) >= baseline + 3000
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.loseConnection()
        await wait_until(lambda: proxy.core.active_tunnels == 0, 30, "every tunnel closed")
        await wait_until(
            lambda: all(u.lost.called for u in upstreams), 30, "every upstream side closed"
        )
        await port.stopListening()
    await wait_until(
        lambda: len(os.listdir("/proc/self/fd")) <= baseline + 2, 10, "descriptors released"
    )
