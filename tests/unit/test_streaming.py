"""Request bodies replayed in pieces; response bodies forwarded chunk by chunk."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy.streaming import (
    CLIENT_GONE,
    BodyCutShort,
    BytesProducer,
    ReplayableBody,
    ResponseForwarder,
    abort_response,
)

from .fakes import ClientConnection, CollectingConsumer, clock_cooperator, produce, run_until_fired

MEGABYTE = bytes(range(256)) * 4096
IDLE_TIMEOUT = 300.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spooled() -> Iterator[IO[bytes]]:
    """A 1 MB body in a temporary file, as twisted.web buffers large uploads."""
    with tempfile.TemporaryFile() as content:
        content.write(MEGABYTE)
        content.seek(0)
        yield content


def test_body_in_memory_has_its_length() -> None:
    """A body held in memory reports its size in bytes."""
    assert ReplayableBody(io.BytesIO(b"hello"), 2).length == 5
    assert ReplayableBody(io.BytesIO(), 2).length == 0


def test_body_in_memory_is_produced_again_and_again(clock: Clock) -> None:
    """Each producer of an in-memory body delivers the whole body, with its length."""
    body = ReplayableBody(io.BytesIO(b'{"model": "m"}'), 4)
    for _ in range(2):
        producer = body.producer()
        assert producer.length == 14
        assert produce(producer, clock).data == b'{"model": "m"}'


def test_body_in_memory_does_not_move_the_original_position() -> None:
    """Producing does not consume the original buffer."""
    content = io.BytesIO(b"abc")
    body = ReplayableBody(content, 1)
    produce(body.producer(), Clock())
    assert content.read() == b"abc"


def test_body_in_a_file_has_its_length(spooled: IO[bytes]) -> None:
    """A body in a temporary file reports its size in bytes, wherever the file was read to."""
    spooled.seek(100)
    assert ReplayableBody(spooled, 65536).length == len(MEGABYTE)


def test_body_in_a_file_is_produced_twice_in_full(spooled: IO[bytes], clock: Clock) -> None:
    """Two successive producers each deliver the identical full body, with the right length."""
    body = ReplayableBody(spooled, 65536, clock_cooperator(clock))
    for _ in range(2):
        producer = body.producer()
        assert producer.length == len(MEGABYTE)
        assert produce(producer, clock).data == MEGABYTE


def test_body_in_a_file_stays_open(spooled: IO[bytes], clock: Clock) -> None:
    """After the producers finish (or are stopped), the buffered body's file is still open."""
    body = ReplayableBody(spooled, 65536, clock_cooperator(clock))
    produce(body.producer(), clock)
    stopped = body.producer()
    stopped.startProducing(CollectingConsumer())
    clock.advance(0)
    stopped.stopProducing()
    assert not spooled.closed
    os.fstat(spooled.fileno())
    assert produce(body.producer(), clock).data == MEGABYTE


@pytest.mark.parametrize("read_size", [1000, 8192, 65536])
def test_body_in_a_file_is_read_in_pieces(spooled: IO[bytes], clock: Clock, read_size: int) -> None:
    """A body in a file is written in pieces of at most read_size bytes, never whole."""
    body = ReplayableBody(spooled, read_size, clock_cooperator(clock))
    consumer = produce(body.producer(), clock)
    assert max(len(piece) for piece in consumer.writes) == read_size
    assert len(consumer.writes) == -(-len(MEGABYTE) // read_size)
    assert consumer.data == MEGABYTE


def test_body_in_a_file_produced_by_two_producers_at_once(spooled: IO[bytes], clock: Clock) -> None:
    """A producer made while another is still sending also delivers the whole body."""
    body = ReplayableBody(spooled, 65536, clock_cooperator(clock))
    first, second = CollectingConsumer(), CollectingConsumer()
    done = [body.producer().startProducing(first), body.producer().startProducing(second)]
    for d in done:
        run_until_fired(clock, d)
    assert (len(first.data), len(second.data)) == (len(MEGABYTE), len(MEGABYTE))
    assert first.data == MEGABYTE
    assert second.data == MEGABYTE


def test_bytes_producer_writes_everything_at_once() -> None:
    """The in-memory producer writes the body in one piece and is done at once."""
    consumer = CollectingConsumer()
    producer = BytesProducer(b"abc")
    d = producer.startProducing(consumer)
    assert d.called
    assert consumer.writes == [b"abc"]
    assert producer.length == 3
    producer.pauseProducing()
    producer.resumeProducing()
    producer.stopProducing()


class Held(Resource):
    """Keeps each request open for the test to answer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


@pytest.fixture
def exchange(clock: Clock) -> tuple[ClientConnection, ResponseForwarder, StringTransport]:
    """A real client request over a fake connection, a forwarder for it, and its upstream."""
    held = Held()
    client = ClientConnection(Site(held, reactor=clock))
    client.request(b"GET", b"/stream")
    [request] = held.requests
    forwarder = ResponseForwarder(request, clock, IDLE_TIMEOUT)
    upstream = StringTransport()
    forwarder.makeConnection(upstream)
    return client, forwarder, upstream


def outcome(forwarder: ResponseForwarder) -> list[object]:
    results: list[object] = []
    forwarder.finished.addBoth(results.append)
    return results


def test_forwarder_registers_the_upstream_as_producer(exchange) -> None:
    """The upstream connection is the client response's streaming producer (flow control)."""
    client, forwarder, upstream = exchange
    assert forwarder.request.producer is upstream
    assert forwarder.request.streamingProducer
    client.transport.producer.pauseProducing()
    assert upstream.producerState == "paused"
    client.transport.producer.resumeProducing()
    assert upstream.producerState == "producing"


def test_forwarder_writes_each_chunk_as_it_arrives(exchange) -> None:
    """Each upstream chunk reaches the client before the next one arrives."""
    client, forwarder, _ = exchange
    forwarder.dataReceived(b"data: 1\n\n")
    assert client.response().body == b"data: 1\n\n"
    forwarder.dataReceived(b"data: 2\n\n")
    response = client.response()
    assert response.body == b"data: 1\n\ndata: 2\n\n"
    assert not response.complete


@pytest.mark.parametrize(
    "reason", [ResponseDone(), PotentialDataLoss()], ids=["done", "potential-data-loss"]
)
def test_forwarder_finishes_the_response_when_the_body_ends(exchange, reason: Exception) -> None:
    """A body that ended (or ended at connection close) finishes the client's response."""
    client, forwarder, _ = exchange
    results = outcome(forwarder)
    forwarder.dataReceived(b"whole body")
    forwarder.connectionLost(Failure(reason))
    response = client.response()
    assert response.complete
    assert response.body == b"whole body"
    assert results == [None]
    assert forwarder.request.producer is None
    assert not client.aborted


@pytest.mark.parametrize(
    "reason",
    [ResponseFailed([Failure(ConnectionLost())]), ConnectionLost()],
    ids=["response-failed", "connection-lost"],
)
def test_forwarder_aborts_when_the_body_ends_early(exchange, reason: Exception) -> None:
    """A body cut short aborts the client connection so the client cannot take it as complete."""
    client, forwarder, _ = exchange
    results = outcome(forwarder)
    forwarder.dataReceived(b"half")
    forwarder.connectionLost(Failure(reason))
    assert client.aborted
    assert not client.response().complete
    assert not forwarder.request.finished
    [result] = results
    assert isinstance(result, Failure)
    assert result.value is reason


def test_forwarder_stop_closes_the_upstream_and_writes_no_more(exchange) -> None:
    """When the client goes away, the upstream is told to stop and nothing more is written."""
    client, forwarder, upstream = exchange
    results = outcome(forwarder)
    forwarder.dataReceived(b"first")
    sent = client.transport.value()
    forwarder.stop(CLIENT_GONE)
    assert upstream.producerState == "stopped"
    forwarder.dataReceived(b"late")
    forwarder.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert client.transport.value() == sent
    assert results == [None]


def test_forwarder_cuts_a_stream_that_goes_quiet(exchange, clock: Clock) -> None:
    """No upstream bytes for STREAM_IDLE_TIMEOUT: the client's response is aborted, never
    finished, and the upstream connection is released."""
    client, forwarder, upstream = exchange
    results = outcome(forwarder)
    forwarder.dataReceived(b"data: 1\n\n")
    clock.advance(IDLE_TIMEOUT - 1)
    forwarder.dataReceived(b"data: 2\n\n")
    clock.advance(IDLE_TIMEOUT - 1)
    assert not client.aborted, "data within the timeout keeps the stream alive"
    clock.advance(1)
    assert client.aborted
    assert upstream.producerState == "stopped"
    forwarder.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert not client.response().complete
    [result] = results
    assert isinstance(result, Failure)
    assert result.check(BodyCutShort)
    assert "STREAM_IDLE_TIMEOUT" in result.getErrorMessage()


def test_forwarder_leaves_no_timer_behind(exchange, clock: Clock) -> None:
    """A response that ends normally cancels its idle timer."""
    _, forwarder, _ = exchange

    def idle_timers() -> list[object]:
        return [c for c in clock.getDelayedCalls() if c.func.__name__ == "_check_idle"]

    assert len(idle_timers()) == 1
    forwarder.connectionLost(Failure(ResponseDone()))
    assert idle_timers() == []


class _FakeH2Stream:
    """Records what happens to an HTTP/2 stream."""

    def __init__(self) -> None:
        self.reset = False
        self.lost: list[Failure] = []

    def abortConnection(self) -> None:
        self.reset = True

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def test_aborting_an_http2_response_resets_the_stream_and_ends_the_request() -> None:
    """An HTTP/2 response cut short resets its stream, and its request learns it is over
    (twisted does not tell a request when the server resets its stream)."""
    stream = _FakeH2Stream()

    class _Request:
        channel = stream

    abort_response(_Request())  # type: ignore[arg-type]
    assert stream.reset
    assert len(stream.lost) == 1


class BrokenMeter:
    """A usage meter with a bug: it fails on its second chunk."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.fed.append(data)
        if len(self.fed) == 2:
            raise ValueError("a bug in the meter")

    def result(self) -> None:
        return None


def test_a_failing_usage_meter_never_breaks_the_response(exchange) -> None:
    """The meter sees each chunk after the client got it; if it fails, it is dropped
    and logged, and the body still reaches the client whole."""
    client, forwarder, _ = exchange
    meter = forwarder.meter = BrokenMeter()
    with capturedLogs() as events:
        for n in range(4):
            forwarder.dataReceived(b"data: %d\n\n" % n)
        forwarder.connectionLost(Failure(ResponseDone()))
    assert meter.fed == [b"data: 0\n\n", b"data: 1\n\n"]
    assert forwarder.meter is None
    assert client.response().body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert client.response().complete
    [failure] = [e for e in events if e.get("log_failure") is not None]
    assert failure["log_failure"].check(ValueError)
