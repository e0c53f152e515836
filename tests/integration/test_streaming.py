"""
Streaming through the proxy: events arrive as they are written, a slow reader slows
the upstream, a client that leaves stops the upstream, and a body the upstream cuts
short is never passed off as complete.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from .conftest import Proxy, Upstream
from .support import (
    BodyReceiver,
    EventReceiver,
    client_agent,
    close_client,
    connect_raw,
    header,
    sleep,
    wait_until,
    within,
)

EVENTS = 20
INTERVAL_MS = 50


@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_one_by_one_as_the_upstream_writes_them(
    upstream: Upstream, proxy: Proxy
) -> None:
    """
    A streamed chat completion of 20 events 50 ms apart reaches the client event by
    event, each within a few milliseconds of the upstream writing it, with headers
    that keep a buffering proxy in front from holding events back.
    """
    body = json.dumps({"model": "fake-model", "stream": True, "messages": []}).encode()
    headers = Headers(
        {
            b"Content-Type": [b"application/json"],
            b"X-Fake-Chunks": [b"%d" % EVENTS],
            b"X-Fake-Interval-Ms": [b"%d" % INTERVAL_MS],
        }
    )
    response = await within(
        client_agent().request(
            b"POST",
            proxy.url.encode() + b"/v1/chat/completions",
            headers,
            FileBodyProducer(io.BytesIO(body)),
        ),
        5,
    )
    assert response.code == 200
    assert header(response, b"content-type") == b"text/event-stream"
    assert header(response, b"x-accel-buffering") == b"no"
    assert header(response, b"cache-control") == b"no-cache"
    receiver = EventReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, 10)
    assert receiver.reason is not None and receiver.reason.check(ResponseDone)

    assert receiver.events[-1][1] == b"[DONE]"
    chunks = [(arrived, json.loads(data)) for arrived, data in receiver.events[:-1]]
    assert [chunk["fake_seq"] for _, chunk in chunks] == list(range(EVENTS))
    delays_ms = [(arrived - chunk["fake_ts"]) * 1000 for arrived, chunk in chunks]
    arrivals = [arrived for arrived, _ in chunks]
    gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    print(
        f"\nSSE delay upstream write -> client read, ms: max {max(delays_ms):.2f},"
        f" mean {sum(delays_ms) / len(delays_ms):.2f},"
        f" all {[round(d, 2) for d in delays_ms]}"
    )
    print(f"SSE gaps between arrivals, ms: min {min(gaps_ms):.1f}, max {max(gaps_ms):.1f}")
    assert max(delays_ms) < 50
    written = [chunk["fake_ts"] for _, chunk in chunks]
    for seq, (arrived, next_written) in enumerate(zip(arrivals[:-1], written[1:], strict=True)):
        assert arrived < next_written, f"event {seq} was held back until the next one"
    assert receiver.reads >= EVENTS


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_upstream(
    upstream: Upstream, proxy: Proxy
) -> None:
    """
    While a client downloading 200 MB does not read, the upstream stops sending after
    a few MB of socket buffers; when it reads again, all 200 MB arrive.
    """
    size = 200_000_000
    response = await within(
        client_agent().request(b"GET", proxy.url.encode() + b"/bytes/%d" % size), 5
    )
    receiver = BodyReceiver(keep=False)
    response.deliverBody(receiver)
    # Not in connectionMade: deliverBody resumes the transport after calling it.
    receiver.transport.pauseProducing()
    await sleep(0.6)
    early = upstream.stats.bytes_served
    await sleep(0.5)
    paused = upstream.stats.bytes_served
    print(f"\nupstream sent {early / 1e6:.1f} MB, then {paused / 1e6:.1f} MB while paused")
    assert paused < 20_000_000
    assert paused - early < 1_000_000, "the upstream kept sending to a paused client"

    start = reactor.seconds()
    receiver.transport.resumeProducing()
    await within(receiver.finished, 30)
    print(f"the rest arrived in {reactor.seconds() - start:.2f}s")
    assert receiver.reason is not None and receiver.reason.check(ResponseDone)
    assert receiver.length == size
    assert upstream.stats.bytes_served == size


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_response_headers_cancels_the_upstream_request(
    upstream: Upstream, proxy: Proxy
) -> None:
    """A client that closes its connection while the upstream has not answered yet
    makes the proxy drop the upstream request within a second."""
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: upstream.stats.requests == 1, 5, "the upstream got the request")
    await close_client(client)
    took = await wait_until(
        lambda: upstream.stats.hangs_aborted == 1, 1, "the upstream saw the request aborted"
    )
    print(f"\nupstream saw the abort {took * 1000:.1f} ms after the client closed")
    assert proxy.resource.cancelled == 1
    assert bytes(client.received) == b""


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_stops_the_upstream_stream(
    upstream: Upstream, proxy: Proxy
) -> None:
    """A client that closes its connection after the first event of a long stream makes
    the proxy close the upstream stream within a second."""
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /sse/1000/20 HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.wait_for(lambda data: b'"fake_seq": 0' in data, 5)
    await close_client(client)
    took = await wait_until(
        lambda: upstream.stats.streams_aborted == 1, 1, "the upstream saw the stream aborted"
    )
    print(f"\nupstream saw the abort {took * 1000:.1f} ms after the client closed")
    assert proxy.resource.cancelled == 1
    assert upstream.stats.streams_completed == 0


@pytest.mark.parametrize("path", [b"/truncated/100000", b"/truncated-chunked/100000"])
@pytest_twisted.ensureDeferred
async def test_upstream_dying_mid_body_leaves_the_client_an_incomplete_response(
    path: bytes, upstream: Upstream, proxy: Proxy
) -> None:
    """When the upstream drops the connection half way through a body (with
    Content-Length, or chunked), the client's response ends in an error, never as a
    complete response."""
    response = await within(client_agent().request(b"GET", proxy.url.encode() + path), 5)
    assert response.code == 200
    receiver = BodyReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, 5)
    assert receiver.reason is not None
    assert not receiver.reason.check(ResponseDone, PotentialDataLoss), receiver.reason
    assert receiver.length < 100000


@pytest_twisted.ensureDeferred
async def test_a_stream_may_last_longer_than_the_request_timeout(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """REQUEST_TIMEOUT bounds the wait for response headers only: a 1 s stream
    through a proxy with a 0.5 s timeout arrives whole."""
    proxy = start_proxy(upstream.url, request_timeout=0.5)
    response = await within(client_agent().request(b"GET", proxy.url.encode() + b"/sse/10/100"), 5)
    receiver = EventReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, 5)
    assert receiver.reason is not None and receiver.reason.check(ResponseDone)
    assert len(receiver.events) == 11
    assert receiver.events[-1][1] == b"[DONE]"
