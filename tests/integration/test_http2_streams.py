"""
HTTP/2 from clients, end to end over a real ``ssl:`` endpoint (a trustme certificate
for 127.0.0.1, ``h2`` offered by ALPN): request bodies, SSE event by event, many
streams multiplexed on one connection, a stream reset while its neighbours go on, and
the HTTP/1.1 fallback for clients that do not speak ``h2``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IListeningPort

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.core.handler import ProxyCore
from aiproxy.run.tap import listener_factory
from aiproxy.upstream.pool import UpstreamPool

from .conftest import Upstream
from .h2client import connect_h2
from .support import (
    LOOPBACK,
    RawClient,
    close_client,
    parse_response,
    pattern_bytes,
    wait_until,
    within,
)


@attrs.define
class H2Proxy:
    """aiproxy on an ``ssl:`` endpoint, with what the tests look at."""

    listening: IListeningPort
    pool: UpstreamPool
    proxy: ProxyCore
    activity: Activity
    trust_root: ssl.Certificate
    accepted: list[object]
    """The address of every client connection the site built a protocol for."""

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)


@pytest_twisted.async_yield_fixture
async def h2_proxy(upstream: Upstream, tmp_path: Path) -> AsyncIterator[H2Proxy]:
    """aiproxy in front of the fake upstream on
    ``ssl:0:interface=127.0.0.1:privateKey=KEY:certKey=CERT``."""
    ca = trustme.CA()
    issued = ca.issue_cert(LOOPBACK)
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(certificate))

    config = Config(target_url=upstream.url)
    pool = UpstreamPool.from_config(reactor, config)
    activity = Activity()
    core = build_core(config, pool, reactor, activity)
    factory = listener_factory(core, config, reactor, tls=True)
    accepted: list[object] = []
    build_protocol = factory.buildProtocol

    def counting(addr: Any) -> Any:
        accepted.append(addr)
        return build_protocol(addr)

    factory.buildProtocol = counting  # type: ignore[method-assign]
    endpoint = serverFromString(
        reactor, f"ssl:0:interface={LOOPBACK}:privateKey={key}:certKey={certificate}"
    )
    listening = await within(endpoint.listen(factory), 5)
    yield H2Proxy(
        listening,
        pool,
        core,
        activity,
        ssl.Certificate.loadPEM(ca.cert_pem.bytes()),
        accepted,
    )
    await within(listening.stopListening(), 5)
    await within(pool.close(), 5)


@pytest_twisted.ensureDeferred
async def test_http2_request_body_reaches_upstream_intact(
    upstream: Upstream, h2_proxy: H2Proxy
) -> None:
    """A 64 KiB ``POST`` body (more than the initial HTTP/2 window, so sent as the
    proxy opens the window) reaches the upstream byte for byte, and the answer comes
    back on its stream."""
    body = pattern_bytes(65536)
    client = await connect_h2(h2_proxy.port, h2_proxy.trust_root)
    try:
        stream = client.request(
            b"POST",
            b"/echo",
            (b"content-type", b"application/octet-stream"),
            (b"content-length", b"65536"),
            body=body,
        )
        await within(stream.ended, 5)
        assert client.transport.negotiatedProtocol == b"h2"
    finally:
        await close_client(client)
    assert stream.complete and stream.status == 200
    seen = json.loads(stream.body)
    assert seen["method"] == "POST"
    assert seen["body_length"] == 65536
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert upstream.stats.last_echo == seen


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
@pytest_twisted.ensureDeferred
async def test_http2_large_body_streams_to_the_upstream_intact(
    upstream: Upstream, h2_proxy: H2Proxy, declared: bool
) -> None:
    """A 5 MiB ``POST`` body (with its length, or without) streams to the upstream as
    the proxy reopens the stream's window, and arrives byte for byte."""
    size = 5 * 1024 * 1024
    body = pattern_bytes(size)
    extra = [(b"content-length", b"%d" % size)] if declared else []
    client = await connect_h2(h2_proxy.port, h2_proxy.trust_root)
    try:
        stream = client.request(b"POST", b"/sink", *extra, body=body)
        await within(stream.ended, 20)
    finally:
        await close_client(client)
    assert stream.complete and stream.status == 200
    assert json.loads(stream.body) == {
        "received": size,
        "sha256": hashlib.sha256(body).hexdigest(),
    }


@pytest_twisted.ensureDeferred
async def test_http2_sse_events_arrive_as_emitted(upstream: Upstream, h2_proxy: H2Proxy) -> None:
    """Over HTTP/2, each SSE event of ``/sse/20/50`` reaches the client as it is
    written upstream: the delay (arrival minus the event's ``fake_ts``, one clock) stays
    under 50 ms for every event, and they do not arrive bunched together."""
    client = await connect_h2(h2_proxy.port, h2_proxy.trust_root)
    try:
        stream = client.get(b"/sse/20/50")
        await within(stream.ended, 5)
    finally:
        await close_client(client)
    assert stream.complete and stream.status == 200
    assert stream.headers[b"content-type"].startswith(b"text/event-stream")
    assert stream.events[-1][1] == b"[DONE]"
    chunks = [(arrived, json.loads(data)) for arrived, data in stream.events[:-1]]
    assert [chunk["fake_seq"] for _, chunk in chunks] == list(range(20))
    delays_ms = [(arrived - chunk["fake_ts"]) * 1000 for arrived, chunk in chunks]
    print("h2 SSE per-event delays (ms):", " ".join(f"{d:.2f}" for d in delays_ms))
    print(f"max {max(delays_ms):.2f} ms, mean {sum(delays_ms) / len(delays_ms):.2f} ms")
    assert min(delays_ms) >= 0
    assert max(delays_ms) < 50
    # One DATA frame per event or so, not the whole stream at the end.
    assert len({arrived for arrived, _ in chunks}) >= 15
    assert chunks[-1][0] - chunks[0][0] > 0.5


@pytest_twisted.ensureDeferred
async def test_http2_many_streams_multiplexed_on_one_connection(
    upstream: Upstream, h2_proxy: H2Proxy
) -> None:
    """50 requests sent at once on one HTTP/2 connection are all proxied and answered,
    and the proxy accepted one client connection for them."""
    client = await connect_h2(h2_proxy.port, h2_proxy.trust_root)
    try:
        streams = []
        for n in range(50):
            if n % 5 == 0:
                streams.append(client.get(b"/sse/3/10"))
            else:
                streams.append(client.request(b"POST", b"/echo/%d" % n, body=b"%d" % n))
        for stream in streams:
            await within(stream.ended, 10)
        assert len(h2_proxy.accepted) == 1
        assert len(h2_proxy.activity.connections()) == 1
    finally:
        await close_client(client)
    assert [s.status for s in streams] == [200] * 50
    assert all(s.complete and s.reset is None for s in streams)
    assert len({s.stream_id for s in streams}) == 50
    for n, stream in enumerate(streams):
        if n % 5 == 0:
            assert stream.body.endswith(b"data: [DONE]\n\n")
        else:
            seen = json.loads(stream.body)
            assert seen["uri"] == f"/echo/{n}"
            assert seen["body_length"] == len(b"%d" % n)
    assert upstream.stats.requests == 50
    assert upstream.stats.streams_completed == 10


@pytest_twisted.ensureDeferred
async def test_http2_reset_stream_cancels_its_upstream_others_continue(
    upstream: Upstream, h2_proxy: H2Proxy
) -> None:
    """The client resets one SSE stream (``RST_STREAM``, ``CANCEL``) mid-stream: its
    upstream request is cancelled within a second, while the other streams on the same
    connection run to their ``[DONE]``."""
    client = await connect_h2(h2_proxy.port, h2_proxy.trust_root)
    try:
        doomed = client.get(b"/sse/40/25")
        others = [client.get(b"/sse/20/25") for _ in range(3)]
        await wait_until(lambda: len(doomed.events) >= 3, 5, "three events on the doomed stream")
        assert all(not s.ended.called for s in others)
        client.reset_stream(doomed)
        took = await wait_until(
            lambda: upstream.stats.streams_aborted == 1, 1, "the upstream stream is aborted"
        )
        print(f"upstream saw the reset stream's abort after {took * 1000:.1f} ms")
        for stream in others:
            await within(stream.ended, 5)
        assert not client.closed.called
    finally:
        await close_client(client)
    assert h2_proxy.proxy.cancelled == 1
    assert b"[DONE]" not in doomed.body
    for stream in others:
        assert stream.complete and stream.reset is None and stream.status == 200
        assert stream.body.endswith(b"data: [DONE]\n\n")
        assert len(stream.events) == 21
    assert upstream.stats.streams_started == 4
    assert upstream.stats.streams_completed == 3
    assert upstream.stats.streams_aborted == 1


@pytest.mark.parametrize("protocols", [[b"http/1.1"], None], ids=["alpn-http1.1", "no-alpn"])
@pytest_twisted.ensureDeferred
async def test_http1_client_on_the_h2_endpoint_is_served(
    upstream: Upstream, h2_proxy: H2Proxy, protocols: list[bytes] | None
) -> None:
    """A TLS client that offers only ``http/1.1`` by ALPN (or no ALPN at all) on the same
    ``ssl:`` endpoint is served over HTTP/1.1."""
    options = ssl.optionsForClientTLS(LOOPBACK, h2_proxy.trust_root, acceptableProtocols=protocols)
    endpoint = wrapClientTLS(
        options, TCP4ClientEndpoint(reactor, LOOPBACK, h2_proxy.port, timeout=5)
    )
    client = RawClient()
    await within(connectProtocol(endpoint, client), 5)
    try:
        client.transport.write(
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
        )
        await client.wait_for(lambda data: parse_response(data) is not None, 5)
        negotiated = client.transport.negotiatedProtocol
    finally:
        await close_client(client)
    response = parse_response(bytes(client.received))
    assert response is not None
    assert negotiated == (b"http/1.1" if protocols else None)
    assert response.status == 200
    seen = response.json()
    assert seen["body_length"] == 5
    assert seen["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert bytes(client.received).startswith(b"HTTP/1.1 200 ")
