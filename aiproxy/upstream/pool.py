"""
aiproxy's pooled HTTP/1.1 client for its one upstream: :class:`UpstreamPool`.

Everything that can be built once is built once: the endpoint (TCP, or TLS over TCP;
a host name is resolved for each new connection, an IP literal is used as it is), the
TLS connection creator, the protocol factory. A request takes the most recently used
idle connection, or opens a new one; a connection whose response completed cleanly
(see :mod:`aiproxy.upstream.connection`) comes back to the idle set, which closes the
connections idle for ``idle_timeout`` seconds in one sweep.

A pool may be given ``max_connections``: then a request that finds no idle connection
and no free slot waits, first come first served, for a connection to come free (it is
handed over directly) or to go away (the request opens a new one in its place).
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, cast

from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure

from aiproxy.upstream.connection import UpstreamConnection
from aiproxy.upstream.errors import ConnectFailed
from aiproxy.upstream.tls import tls_creator

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from aiproxy.config import Config
    from aiproxy.core.interfaces import RequestBody, UpstreamResponse
    from aiproxy.rules.target import Target
    from aiproxy.upstream.connection import ConnectionOwner

__all__ = ["IdleConnections", "UpstreamPool", "upstream_endpoint"]

SWEEP_INTERVAL = 1.0
"""The least time between two idle sweeps, in seconds (less if ``idle_timeout`` is)."""

TLS_CLOSE_TIMEOUT = 5.0
"""Seconds a closing idle TLS connection waits for the upstream's ``close_notify``
before it is dropped (Twisted's TLS waits for it, and an upstream may never send it)."""


class UpstreamPool:
    """
    Sends requests to the one upstream over kept-alive HTTP/1.1 connections
    (``UpstreamClient``).

    Without ``max_connections`` there is no bound on how many connections are open at
    once (the core bounds the requests in flight); at most ``max_idle`` are kept for
    reuse.

    With ``max_connections``, connections being opened, busy, idle, or carrying a
    WebSocket tunnel all hold a slot until they are closed or fail to connect. A request
    that finds no idle connection and no free slot waits in a first-in first-out queue:
    a connection whose response completed cleanly goes straight to the first waiting
    request (never to the idle set while one waits), and a slot freed by a connection
    that goes away goes to the first waiting request, which opens a new connection.
    (While a request waits no connection is idle, so none has to be closed for room.)
    """

    def __init__(
        self,
        reactor: object,
        target: Target,
        *,
        connect_timeout: float,
        ssl_verify: bool = True,
        idle_timeout: float = 30.0,
        max_idle: int = 64,
        trust_root: Certificate | None = None,
        max_connections: int | None = None,
    ) -> None:
        """
        @param reactor: provides ``IReactorTCP`` and ``IReactorTime`` (and a name
            resolver, for a target given by name).
        @param target: the upstream; its ``scheme``, ``host`` and ``port`` are used.
        @param connect_timeout: seconds to wait for a TCP connection (``CONNECT_TIMEOUT``).
        @param ssl_verify: check an https upstream's certificate (``SSL_VERIFY``).
        @param idle_timeout: seconds an idle connection is kept.
        @param max_idle: the most idle connections kept.
        @param trust_root: the certificate authority an https upstream's certificate
            must chain to; L{None}: the system's trust store. For tests, and for an
            upstream with a private CA.
        @param max_connections: the most connections to the upstream at once, whatever
            their state; L{None}: no limit.
        @raise ValueError: ``max_connections`` is below 1.
        """
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        host = f"[{target.host}]" if ":" in target.host else target.host
        where = f"{host}:{target.port}"
        self._endpoint = upstream_endpoint(
            reactor,
            target,
            connect_timeout=connect_timeout,
            ssl_verify=ssl_verify,
            trust_root=trust_root,
        )
        self._idle = idle = IdleConnections(IReactorTime(reactor), idle_timeout, max_idle)
        self._waiting: deque[_PendingRequest] = deque()
        owner: ConnectionOwner = idle if max_connections is None else _Handover(self)
        self._protocols = _ConnectionFactory(self, owner, where, target.scheme == "https")
        self._where = where
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._open = 0
        self._closed = False

    @classmethod
    def from_config(cls, reactor: object, config: Config) -> UpstreamPool:
        """The pool for ``config``'s target, ``CONNECT_TIMEOUT`` and ``SSL_VERIFY``."""
        return cls(
            reactor,
            config.target,
            connect_timeout=config.connect_timeout,
            ssl_verify=config.ssl_verify,
        )

    @property
    def idle_connections(self) -> int:
        """How many idle connections are kept right now."""
        return len(self._idle)

    @property
    def open_connections(self) -> int:
        """How many connections exist right now: connecting, busy, idle or tunnelling."""
        return self._open

    @property
    def waiting(self) -> int:
        """How many requests wait for a connection (only with ``max_connections``)."""
        return len(self._waiting)

    def request(self, method: bytes, head: bytes, body: RequestBody) -> Deferred[UpstreamResponse]:
        """
        Send one request and fire with its response once the final head is parsed.

        @param method: the request's method; a response to ``HEAD`` has no body.
        @param head: the whole request head, request line to the empty line.
        @param body: the body, whole (sent in the same write as the head), or a
            ``BodySource`` (chunked when its length is unknown).
        @return: fires with the response, or fails with an
            :mod:`aiproxy.upstream.errors` exception (or the body's failure);
            cancelling it before the response head drops the connection (and
            cancelling it while it waits for a slot only takes it out of the queue).
        """
        connection = self._idle.take()
        if connection is not None:
            return connection.send(method, head, body, True)
        if self._closed:
            return fail(self._closed_error())
        pending = _PendingRequest(self, method, head, body)
        limit = self._max_connections
        if limit is None or self._open < limit:
            pending.connect()
        else:
            self._waiting.append(pending)
        return pending.result

    def close(self) -> Deferred[None]:
        """
        Close every idle connection, fail the requests waiting for a slot with
        ``ConnectFailed``, and take no more requests; fires once the idle ones are
        closed. Connections still carrying a response close when it ends.
        """
        self._closed = True
        waiting = self._waiting
        while waiting:
            waiting.popleft().fail(self._closed_error())
        return self._idle.close()

    def _closed_error(self) -> ConnectFailed:
        return ConnectFailed(f"the client for {self._where} is closed")

    def _connect(self) -> Deferred[IProtocol]:
        """Open a new connection, which holds a slot until it fails or is lost."""
        self._open += 1
        connecting = self._endpoint.connect(self._protocols)
        connecting.addErrback(self._not_connected)
        return connecting

    def _not_connected(self, failure: Failure) -> Failure:
        self._release()
        return failure

    def _release(self) -> None:
        """A connection, or an attempt at one, is gone: the first waiting request gets its slot."""
        self._open -= 1
        waiting = self._waiting
        if waiting:
            waiting.popleft().connect()

    def _connect_failure(self, failure: Failure) -> Failure | ConnectFailed:
        return connect_failure(failure, self._where, self._connect_timeout)


class _PendingRequest:
    """
    A request without a connection yet: waiting for a slot, or for a new connection;
    its ``result`` is what the caller gets.
    """

    def __init__(self, pool: UpstreamPool, method: bytes, head: bytes, body: RequestBody) -> None:
        self.result: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self._pool = pool
        self._request: tuple[bytes, bytes, RequestBody] | None = (method, head, body)
        self._connection: UpstreamConnection | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._cancelled = False

    def connect(self) -> None:
        """Open a new connection for the request."""
        self._connecting = self._pool._connect()
        self._connecting.addCallbacks(self._connected, self._failed)

    def send_on(self, connection: UpstreamConnection) -> None:
        """Send the request on ``connection``, which has just completed a response."""
        method, head, body = cast("tuple[bytes, bytes, RequestBody]", self._request)
        self._request = None
        self._connection = connection
        connection.start(self.result, method, head, body, True)

    def fail(self, error: Exception) -> None:
        """Fail the request before it was sent."""
        self._request = None
        self.result.errback(error)

    def _connected(self, protocol: IProtocol) -> None:
        connection = cast(UpstreamConnection, protocol)
        request = self._request
        self._request = None
        if self._cancelled or request is None:  # cancelling stops the connecting first
            connection.abort()
            return
        self._connection = connection
        method, head, body = request
        connection.start(self.result, method, head, body, False)

    def _failed(self, failure: Failure) -> None:
        self._request = None
        if not self._cancelled:
            self.result.errback(self._pool._connect_failure(failure))

    def _cancel(self, result: Deferred[UpstreamResponse]) -> None:
        connection = self._connection
        connecting = self._connecting
        if connection is not None:
            connection.cancel(result)
        elif connecting is not None:
            self._cancelled = True
            connecting.cancel()
        else:
            self._request = None
            self._pool._waiting.remove(self)


class _Handover:
    """
    The owner of a limited pool's connections: a connection whose response completed
    cleanly goes to the first waiting request, or else to the idle set.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._waiting = pool._waiting
        self._idle = pool._idle

    def keep(self, connection: UpstreamConnection) -> None:
        """Send the first waiting request on ``connection``, or keep it idle."""
        waiting = self._waiting
        if waiting:
            waiting.popleft().send_on(connection)
        else:
            self._idle.keep(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """``connection``, which was idle, has closed."""
        self._idle.forget(connection)


class _PooledConnection(UpstreamConnection):
    """A connection that gives its pool's slot back once it is lost, whatever its state."""

    def __init__(self, pool: UpstreamPool, owner: ConnectionOwner, where: str, tls: bool) -> None:
        super().__init__(owner, where, tls)
        self._pool = pool

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """End whatever was in flight, then free the slot."""
        super().connectionLost(reason)
        self._pool._release()


def connect_failure(failure: Failure, where: str, timeout: float) -> Failure | ConnectFailed:
    """
    What a failure to connect becomes: a ``ConnectFailed`` of kind ``dns`` or
    ``connect`` with a one-line message; a cancellation stays what it is.
    """
    error = failure.value
    if isinstance(error, (CancelledError, neterror.ConnectingCancelledError)):
        return failure
    if isinstance(error, neterror.DNSLookupError):
        return ConnectFailed(f"the upstream's host name does not resolve ({where})", "dns")
    if isinstance(error, neterror.ConnectionRefusedError):
        return ConnectFailed(f"the upstream ({where}) refused the connection")
    if isinstance(error, neterror.TimeoutError):
        return ConnectFailed(f"no connection to the upstream ({where}) within {timeout:g}s")
    why = " ".join(failure.getErrorMessage().split())
    return ConnectFailed(f"could not connect to the upstream ({where}): {why}")


def upstream_endpoint(
    reactor: object,
    target: Target,
    *,
    connect_timeout: float,
    ssl_verify: bool = True,
    trust_root: Certificate | None = None,
) -> IStreamClientEndpoint:
    """
    The endpoint for ``target``, built once: TCP to an IP literal, or to each address
    of a host name (resolved for every new connection); TLS over it for ``https``.
    """
    host, port = target.host, target.port
    endpoint: IStreamClientEndpoint
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    if target.scheme == "https":
        creator = tls_creator(host, verify=ssl_verify, trust_root=trust_root)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


class _ConnectionFactory(Factory):
    """Builds :class:`UpstreamConnection`\\ s, without a log line each."""

    noisy = False

    def __init__(self, pool: UpstreamPool, owner: ConnectionOwner, where: str, tls: bool) -> None:
        self._pool = pool
        self._owner = owner
        self._where = where
        self._tls = tls

    def buildProtocol(self, addr: IAddress | None) -> UpstreamConnection:
        """A new connection of the pool, given to ``owner`` when it is free."""
        return _PooledConnection(self._pool, self._owner, self._where, self._tls)


class IdleConnections:
    """
    The idle keep-alive connections: the most recently used is reused first, at most
    ``max_idle`` are kept (the oldest goes), and one sweep closes those idle for
    ``idle_timeout`` seconds.

    The sweep is a single delayed call, scheduled when a connection becomes idle and
    none is pending; it reschedules itself only while connections are idle. (When the
    last idle connection is taken, a pending sweep is not cancelled, which would cost
    a cancel and a new delayed call per request: it runs once more and stops.)
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float, max_idle: int) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._connections: deque[UpstreamConnection] = deque()
        self._sweep_call: IDelayedCall | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._connections)

    def take(self) -> UpstreamConnection | None:
        """The most recently kept connection, or L{None}."""
        connections = self._connections
        return connections.pop() if connections else None

    def keep(self, connection: UpstreamConnection) -> None:
        """Keep ``connection`` for reuse, or close it if the set is closed."""
        if self._closed or self._max_idle <= 0:
            self._close(connection)
            return
        connections = self._connections
        if len(connections) >= self._max_idle:
            self._close(connections.popleft())
        connection.idle_since = self._clock.seconds()
        connections.append(connection)
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(self._idle_timeout, self._sweep)

    def forget(self, connection: UpstreamConnection) -> None:
        """``connection`` closed (the upstream closed it, or sent bytes nobody asked for)."""
        with suppress(ValueError):
            self._connections.remove(connection)

    def close(self) -> Deferred[None]:
        """Close every idle connection and keep no more; fires once they are closed."""
        self._closed = True
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        connections = list(self._connections)
        self._connections.clear()
        closing = gatherResults([self._close(connection) for connection in connections])
        return closing.addCallback(lambda _: None)

    def _close(self, connection: UpstreamConnection) -> Deferred[None]:
        """Close an idle connection; drop it if a TLS close takes too long."""
        closed = connection.close()
        if connection.tls and not closed.called:
            timer = self._clock.callLater(TLS_CLOSE_TIMEOUT, connection.abort)
            closed.addBoth(_cancel_timer, timer)
        return closed

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self._clock.seconds()
        deadline = now - self._idle_timeout
        connections = self._connections
        while connections and connections[0].idle_since <= deadline:
            self._close(connections.popleft())
        if connections:
            delay = connections[0].idle_since + self._idle_timeout - now
            least = min(SWEEP_INTERVAL, self._idle_timeout)
            self._sweep_call = self._clock.callLater(max(delay, least), self._sweep)


def _cancel_timer(result: object, timer: IDelayedCall) -> object:
    if timer.active():
        timer.cancel()
    return result
