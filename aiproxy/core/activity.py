"""
What a running proxy is doing right now: its requests in flight, the client connections
they came on, and whether it drains.

One private corner of twisted.web is used here: an HTTP/2 stream's ``_conn``, the only
way from a request to the HTTP/2 connection that carries it.
"""

from __future__ import annotations

from weakref import WeakSet

from twisted.internet.defer import Deferred, succeed
from twisted.web._http2 import H2Connection
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

__all__ = ["Activity", "IncomingConnection", "close_after_response", "connection_of"]

IncomingConnection = HTTPChannel | H2Connection
"""An HTTP/1.x channel, or an HTTP/2 connection with its streams."""


class Activity:
    """
    The requests a site is handling, and the client connections they came on.

    :class:`aiproxy.request.ProxyRequest` adds each request when it starts being
    processed and removes it when its response has ended (or its client is gone).

    @ivar draining: the proxy is shutting down and takes no new work: ``/api/health``
        says so, and every request that starts from now on closes its HTTP/1.x
        connection after its response.
    """

    def __init__(self) -> None:
        self.requests: set[Request] = set()
        self.draining = False
        self._connections: WeakSet[IncomingConnection] = WeakSet()
        self._idle_waiters: list[Deferred[None]] = []

    def started(self, request: Request) -> None:
        """``request`` is being handled."""
        self.requests.add(request)
        connection = connection_of(request)
        if connection is not None:
            self.receiving(connection)
        if self.draining:
            close_after_response(request)

    def receiving(self, connection: IncomingConnection) -> None:
        """
        A request is arriving on ``connection``: remember it (weakly), so that a drain
        can close it. :meth:`started` does this for every request it is told of.
        """
        self._connections.add(connection)

    def ended(self, request: Request) -> None:
        """``request`` is done; wake whoever waits for the proxy to be idle."""
        self.requests.discard(request)
        if not self.requests:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is); cancellable."""
        if not self.requests:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(d)
        return d

    def connections(self) -> list[IncomingConnection]:
        """
        The client connections still open that have carried at least one request.

        A connection is known from its first request that :meth:`started` (or from
        :meth:`receiving`): one that was opened but has sent no complete request yet is
        not among them.
        """
        return [c for c in self._connections if _is_open(c)]


def connection_of(request: Request) -> IncomingConnection | None:
    """The client connection ``request`` came on; L{None} for a channel of another kind."""
    channel = request.channel
    if isinstance(channel, HTTPChannel):
        return channel
    connection = getattr(channel, "_conn", None)  # an HTTP/2 stream's connection
    if isinstance(connection, H2Connection):
        return connection
    return None


def close_after_response(request: Request) -> None:
    """
    Make ``request``'s HTTP/1.x connection close once its response has been sent,
    saying so with ``Connection: close`` if the response has not started yet.

    HTTP/2 has no such thing for one response (and forbids the header): nothing is
    done for a request on an HTTP/2 stream.
    """
    channel = request.channel
    if isinstance(channel, HTTPChannel):
        channel.persistent = False
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])


def _is_open(connection: IncomingConnection) -> bool:
    return bool(getattr(connection.transport, "connected", False))
