"""
Graceful drain, as clients and the upstream see it: aiproxy's HTTP/1.1 server over fake
connections, a fake upstream and a fake clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import LogEvent, capturedLogs, formatEvent

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.run.drain import POLL_INTERVAL, DrainService
from aiproxy.run.service import PoolService, SequentialMultiService
from aiproxy.run.tap import build_service
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits

from .fakes import CLIENT_ADDRESS, FakeUpstream, ParsedResponse, parse_response
from .test_tap import idle_upstream_connection

TARGET_URL = "http://upstream.example:9000"
GRACEFUL_TIMEOUT = 30.0


class Client:
    """One client connection to a server; closing either end is seen by the other."""

    def __init__(self, site: Factory) -> None:
        self.transport = StringTransportWithDisconnection(peerAddress=CLIENT_ADDRESS)
        self.protocol = site.buildProtocol(None)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, raw: bytes) -> None:
        """Bytes from the client."""
        self.protocol.dataReceived(raw)

    def get(self, target: bytes) -> None:
        """Send an HTTP/1.1 ``GET`` of ``target``, keeping the connection alive."""
        self.send(b"GET " + target + b" HTTP/1.1\r\nHost: proxy.example\r\n\r\n")

    def response(self) -> ParsedResponse:
        """The response received so far, parsed; then forget it."""
        response = parse_response(self.transport.value())
        self.transport.clear()
        return response

    @property
    def closed(self) -> bool:
        """The proxy closed this connection (cleanly or not)."""
        return not self.transport.connected

    @property
    def aborted(self) -> bool:
        """The proxy aborted this connection."""
        return bool(self.transport.disconnected)


class Listener(Service):
    """Stands in for a listening port's service; records being stopped."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append("stopped listening")
        return succeed(None)


@attrs.define
class Proxy:
    """aiproxy's server, its activity, and a drain service with one listener."""

    clock: Clock
    agent: FakeUpstream
    activity: Activity
    site: Factory
    drain: DrainService
    events: list[str]

    def connect(self) -> Client:
        return Client(self.site)

    def stop(self) -> Deferred[None]:
        """Start the drain; the Deferred records its end in ``events``."""
        stopped = self.drain.stopService()
        stopped.addCallback(lambda _: self.events.append("drained"))
        return stopped


def start_proxy(graceful_timeout: float = GRACEFUL_TIMEOUT) -> Proxy:
    """aiproxy's server over a fake upstream and clock, under a started drain service."""
    clock, agent, activity = Clock(), FakeUpstream(), Activity()
    config = Config(target_url=TARGET_URL, request_timeout=300)
    core = build_core(config, agent, clock, activity)
    site = HTTP11Factory(core, clock, activity, ClientLimits.from_config(config))
    drain = DrainService(activity, clock, graceful_timeout)
    events: list[str] = []
    Listener(events).setServiceParent(drain)
    drain.startService()
    return Proxy(clock, agent, activity, site, drain, events)


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    """Every event logged during the test."""
    with capturedLogs() as events:
        yield events


def drain_lines(events: Sequence[LogEvent]) -> list[str]:
    """The drain's log lines, as text."""
    return [formatEvent(e) for e in events if "Drain" in e.get("log_format", "")]


def health(client: Client) -> tuple[ParsedResponse, dict[str, Any]]:
    """Ask ``/api/health`` on ``client``'s connection: the response and its JSON."""
    client.get(b"/api/health")
    response = client.response()
    return response, json.loads(response.body)


def test_health_says_draining_with_503_as_soon_as_the_drain_starts() -> None:
    """While a request is in flight and the drain waits for it, ``/api/health`` answers
    ``503`` with ``"status": "draining"`` and otherwise the same fields, and closes the
    connection after the answer."""
    proxy = start_proxy()
    before, healthy = health(proxy.connect())
    proxy.connect().get(b"/v1/models")

    proxy.stop()
    client = proxy.connect()
    response, draining = health(client)

    assert before.status == 200
    assert healthy["status"] == "healthy"
    assert response.status == 503
    assert draining == {**healthy, "status": "draining"}
    assert response.header(b"connection") == b"close"
    assert client.closed
    assert proxy.events == ["stopped listening"]


def test_drain_of_an_idle_proxy_ends_at_once(logs: Sequence[LogEvent]) -> None:
    """With nothing in flight, stopping stops listening, closes idle keep-alive
    connections, and is over at once, leaving no timer behind."""
    proxy = start_proxy()
    client = proxy.connect()
    client.get(b"/api/ping")
    assert client.response().status == 200
    assert not client.closed

    stopped = proxy.stop()

    assert stopped.called
    assert proxy.events == ["stopped listening", "drained"]
    assert client.closed and not client.aborted
    assert proxy.clock.getDelayedCalls() == []
    assert drain_lines(logs)[0] == "Draining: 0 request(s) in flight, 30.0s to finish"
    assert drain_lines(logs)[1].startswith("Drained: every request finished, in 0.000s")


def test_idle_connections_close_at_once_and_busy_ones_after_their_response() -> None:
    """An idle keep-alive connection is closed when the drain starts; a connection with
    a request in flight gets its whole response, marked ``Connection: close``, and is
    closed after it. The drain ends once both are closed."""
    proxy = start_proxy()
    idle, busy = proxy.connect(), proxy.connect()
    idle.get(b"/api/ping")
    busy.get(b"/v1/models")

    stopped = proxy.stop()
    assert idle.closed
    assert not busy.closed
    assert not stopped.called

    proxy.clock.advance(5)
    upstream = proxy.agent.last.respond(200, {b"content-type": [b"application/json"]})
    upstream.send(b'{"data": []}')
    upstream.end()
    response = busy.response()
    assert (response.status, response.body, response.complete) == (200, b'{"data": []}', True)
    assert response.header(b"connection") == b"close"
    assert busy.closed and not busy.aborted

    proxy.clock.advance(POLL_INTERVAL)
    assert stopped.called


def test_stream_in_flight_runs_to_completion_within_the_graceful_timeout(
    logs: Sequence[LogEvent],
) -> None:
    """A stream that started before the drain keeps flowing, unaborted, for as long as
    it needs within ``GRACEFUL_TIMEOUT``; the drain ends when it has ended."""
    proxy = start_proxy()
    client = proxy.connect()
    client.get(b"/v1/chat/completions")
    upstream = proxy.agent.last.respond(200, {b"content-type": [b"text/event-stream"]})
    upstream.send(b"data: 1\n\n")

    stopped = proxy.stop()
    for n in range(2, 31):
        proxy.clock.advance(1)
        assert not client.closed
        upstream.send(b"data: %d\n\n" % n)
    upstream.send(b"data: [DONE]\n\n")
    upstream.end()
    proxy.clock.advance(POLL_INTERVAL)

    response = client.response()
    assert response.complete
    assert response.body.endswith(b"data: 30\n\ndata: [DONE]\n\n")
    assert not client.aborted
    assert not proxy.agent.last.cancelled
    assert stopped.called
    assert drain_lines(logs)[0] == "Draining: 1 request(s) in flight, 30.0s to finish"
    assert drain_lines(logs)[1].startswith("Drained: every request finished, in 29.")


def test_requests_still_in_flight_after_the_graceful_timeout_are_aborted(
    logs: Sequence[LogEvent],
) -> None:
    """At ``GRACEFUL_TIMEOUT`` the client connections of the requests still in flight
    are aborted (a stream is cut short, never ended cleanly), their upstream requests
    are cancelled, and the drain ends saying how many were aborted."""
    proxy = start_proxy()
    streaming, waiting = proxy.connect(), proxy.connect()
    streaming.get(b"/v1/chat/completions")
    upstream = proxy.agent.last.respond(200, {b"content-type": [b"text/event-stream"]})
    upstream.send(b"data: 1\n\n")
    waiting.get(b"/v1/models")
    stopped = proxy.stop()

    proxy.clock.advance(GRACEFUL_TIMEOUT - POLL_INTERVAL)
    assert not streaming.closed and not waiting.closed
    proxy.clock.advance(POLL_INTERVAL)

    assert streaming.aborted and waiting.aborted
    assert not streaming.response().complete
    assert upstream.aborted  # the upstream body was dropped
    assert proxy.agent.last.cancelled  # the request still waiting for headers
    assert stopped.called
    assert proxy.activity.requests == set()
    assert drain_lines(logs)[-1] == (
        "Drain timed out after 30.0s: 2 request(s) aborted, 2 client connection(s) dropped"
    )


def test_zero_graceful_timeout_aborts_at_once() -> None:
    """``GRACEFUL_TIMEOUT=0`` aborts whatever is in flight when the drain starts."""
    proxy = start_proxy(graceful_timeout=0)
    client = proxy.connect()
    client.get(b"/v1/models")

    stopped = proxy.stop()

    assert client.aborted
    assert proxy.agent.last.cancelled
    assert stopped.called


def test_a_request_arriving_during_the_drain_closes_its_connection_after_it() -> None:
    """A request whose head was still arriving on a kept-alive connection when the
    drain started is answered, with ``Connection: close``, and the connection closes."""
    proxy = start_proxy()
    proxy.connect().get(b"/v1/models")  # keeps the drain going
    client = proxy.connect()
    client.get(b"/api/ping")
    client.response()
    client.send(b"GET /api/ping HTTP/1.1\r\nHost: proxy.example\r\n")

    proxy.stop()
    assert not client.closed
    client.send(b"\r\n")

    response = client.response()
    assert response.status == 200
    assert response.header(b"connection") == b"close"
    assert client.closed


def test_when_idle_can_be_cancelled() -> None:
    """A cancelled ``when_idle`` waiter is forgotten: the next end of the last request
    does not trip over it."""
    activity = Activity()
    request: Any = object()
    activity.requests.add(request)
    waiter = activity.when_idle()
    waiter.addErrback(lambda _: None)
    waiter.cancel()
    activity.ended(request)
    assert activity.when_idle().called


class StoppingService(Service):
    """A service whose stop takes as long as the test says."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.setName(name)
        self.events = events
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append(f"stopping {self.name}")
        self.stopping.addCallback(lambda _: self.events.append(f"stopped {self.name}"))
        return self.stopping


def test_services_stop_one_after_another_last_added_first() -> None:
    """``SequentialMultiService`` starts stopping a service only once the service added
    after it has stopped."""
    events: list[str] = []
    top = SequentialMultiService()
    first, second = StoppingService("first", events), StoppingService("second", events)
    first.setServiceParent(top)
    second.setServiceParent(top)
    top.startService()

    stopped = top.stopService()
    assert events == ["stopping second"]
    second.stopping.callback(None)
    assert events == ["stopping second", "stopped second", "stopping first"]
    first.stopping.callback(None)
    assert stopped.called
    assert not top.running


def test_twist_service_stops_listening_then_drains_then_closes_the_pool() -> None:
    """The service ``twist aiproxy`` runs stops listening at once, keeps the upstream
    pool open while a request is in flight, and closes it after the drain ends."""
    reactor = MemoryReactorClock()
    config = Config(target_url="http://192.0.2.1", listen=("tcp:8080",), graceful_timeout=10)
    service = build_service(config, reactor)
    service.startService()
    [(_, site, _, _)] = reactor.tcpServers
    [pool_service] = [s for s in service if isinstance(s, PoolService)]
    [drain] = [s for s in service if isinstance(s, DrainService)]
    idle_upstream = idle_upstream_connection(reactor, pool_service.pool)
    client = Client(site)
    client.get(b"/v1/models")  # connects upstream through the memory reactor: no answer

    stopped = service.stopService()
    assert [listener.running for listener in drain] == [False]
    reactor.advance(9)
    assert idle_upstream.connected
    assert not client.closed
    reactor.advance(1)

    assert client.aborted
    assert not idle_upstream.connected
    assert stopped.called
    assert reactor.getDelayedCalls() == []
