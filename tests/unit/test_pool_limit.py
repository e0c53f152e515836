"""
The pool's connection limit (``max_connections``): at most that many connections to the
upstream at once; requests beyond it wait in line for a connection to come free or go
away, can be cancelled while they wait, and fail when the pool closes.

The pool runs on a ``MemoryReactorClock``; each connection the test accepts is a
``StringTransport``, fed by the test as the upstream (the fakes of
``test_upstream_client``).
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure

from aiproxy.upstream.errors import ConnectFailed

from .test_upstream_client import (
    GET,
    OK,
    Sink,
    accept,
    accept_at,
    error_of,
    new_pool,
    response_of,
)

CLOSING_OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
UPGRADE = (
    b"GET /v1/realtime HTTP/1.1\r\nHost: upstream\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_a_request_over_the_limit_waits_and_gets_the_first_connection_freed() -> None:
    """With a limit of 2, a third request opens nothing; it is sent on the first
    connection whose response completes, which is then kept for reuse."""
    pool, reactor = new_pool(max_connections=2)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    third = pool.request(b"GET", GET, b"")
    assert len(reactor.tcpClients) == 2
    assert (pool.open_connections, pool.waiting) == (2, 1)
    a = accept_at(reactor, 0)
    accept_at(reactor, 1)

    a.send(OK)
    response_of(first).deliver(Sink())
    assert a.received == GET * 2
    assert (pool.waiting, pool.idle_connections) == (0, 0)
    assert not third.called and not second.called

    a.send(OK)
    sink = Sink()
    response_of(third).deliver(sink)
    assert sink.done and sink.body == b"ok"
    assert not a.transport.disconnecting
    assert (pool.open_connections, pool.idle_connections) == (2, 1)
    assert len(reactor.tcpClients) == 2


def test_a_waiting_request_opens_a_new_connection_when_the_upstream_closes_one() -> None:
    """A connection the upstream closes frees its slot once it is gone: the first
    waiting request opens a new connection."""
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    a.send(CLOSING_OK)
    sink = Sink()
    response_of(first).deliver(sink)
    assert sink.done and a.transport.disconnecting
    assert len(reactor.tcpClients) == 1 and pool.waiting == 1

    a.lose()
    assert len(reactor.tcpClients) == 2
    assert (pool.open_connections, pool.waiting) == (1, 0)
    b = accept(reactor)
    assert b.received == GET
    b.send(OK)
    assert response_of(second).status == 200


def test_a_connection_reset_in_the_middle_of_a_response_frees_its_slot() -> None:
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    a.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
    sink = Sink()
    response_of(first).deliver(sink)
    a.lose(ConnectionLost())
    assert sink.failed is not None
    assert len(reactor.tcpClients) == 2
    accept(reactor).send(OK)
    assert response_of(second).status == 200


def test_cancelling_a_waiting_request_only_takes_it_out_of_the_queue() -> None:
    """The cancelled request fails with ``CancelledError``; no connection is opened or
    dropped, and the next request in line still gets the freed connection."""
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    third = pool.request(b"GET", GET, b"")
    a = accept(reactor)

    second.cancel()
    assert isinstance(error_of(second), CancelledError)
    assert (pool.open_connections, pool.waiting) == (1, 1)
    assert len(reactor.tcpClients) == 1 and not a.transport.disconnecting

    a.send(OK)
    response_of(first).deliver(Sink())
    assert a.received == GET * 2
    a.send(OK)
    assert response_of(third).status == 200


def test_cancelling_a_request_sent_on_a_handed_over_connection_drops_it() -> None:
    """Once a waiting request has its connection, cancelling it drops that connection,
    whose slot then goes to the next request in line."""
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    third = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    a.send(OK)
    response_of(first).deliver(Sink())

    second.cancel()
    assert isinstance(error_of(second), CancelledError)
    assert a.transport.disconnected
    a.lose(ConnectionLost())
    assert len(reactor.tcpClients) == 2
    accept(reactor).send(OK)
    assert response_of(third).status == 200


def test_close_fails_every_waiting_request() -> None:
    """Waiting requests fail with ``ConnectFailed`` naming the upstream; the busy
    connection is closed when its response ends, never handed over."""
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    waiting = [pool.request(b"GET", GET, b"") for _ in range(2)]
    a = accept(reactor)

    closed = pool.close()
    for d in waiting:
        error = error_of(d)
        assert isinstance(error, ConnectFailed)
        assert "192.0.2.10:8080" in str(error) and "closed" in str(error)
    assert pool.waiting == 0

    a.send(OK)
    response_of(first).deliver(Sink())
    assert a.received == GET and a.transport.disconnecting
    a.lose()
    assert pool.open_connections == 0
    assert closed.called and len(reactor.tcpClients) == 1


def test_a_failed_connect_frees_its_slot() -> None:
    """The request whose connection is refused fails; the next in line connects."""
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    second = pool.request(b"GET", GET, b"")
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert isinstance(error_of(first), ConnectFailed)
    assert len(reactor.tcpClients) == 2
    assert (pool.open_connections, pool.waiting) == (1, 0)
    b = accept(reactor)
    assert b.received == GET
    b.send(OK)
    assert response_of(second).status == 200


def test_cancelling_a_request_while_it_connects_frees_its_slot() -> None:
    pool, reactor = new_pool(max_connections=1)
    first = pool.request(b"GET", GET, b"")
    pool.request(b"GET", GET, b"")
    first.cancel()
    assert isinstance(error_of(first), CancelledError)
    assert reactor.connectors[0].stoppedConnecting
    assert len(reactor.tcpClients) == 2
    assert (pool.open_connections, pool.waiting) == (1, 0)


def test_a_tunnel_holds_its_slot_until_it_closes() -> None:
    """A connection upgraded to a WebSocket tunnel is still a connection to the
    upstream: its slot comes free only when the tunnel's connection is gone."""
    pool, reactor = new_pool(max_connections=1)
    upgrade = pool.request(b"GET", UPGRADE, b"")
    after = pool.request(b"GET", GET, b"")
    a = accept(reactor)
    a.send(SWITCHED)
    assert response_of(upgrade).status == 101
    assert (pool.open_connections, pool.waiting) == (1, 1)
    assert not after.called

    a.lose()
    assert len(reactor.tcpClients) == 2
    assert (pool.open_connections, pool.waiting) == (1, 0)


def test_without_a_limit_requests_never_wait_and_connections_are_counted() -> None:
    """The default pool opens a connection for every request that finds none idle;
    ``open_connections`` follows them through connecting, idle and gone."""
    pool, reactor = new_pool()
    requests = [pool.request(b"GET", GET, b"") for _ in range(3)]
    assert len(reactor.tcpClients) == 3
    assert (pool.open_connections, pool.waiting) == (3, 0)

    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert pool.open_connections == 2
    b = accept_at(reactor, 1)
    c = accept_at(reactor, 2)
    b.send(OK)
    response_of(requests[1]).deliver(Sink())
    assert (pool.open_connections, pool.idle_connections) == (2, 1)

    b.lose()
    assert (pool.open_connections, pool.idle_connections) == (1, 0)
    c.lose(ConnectionLost())
    assert pool.open_connections == 0
    assert isinstance(error_of(requests[0]), ConnectFailed)


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        new_pool(max_connections=limit)
