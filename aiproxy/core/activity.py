"""
What a running proxy is doing right now: its requests in flight, its client
connections, and whether it drains.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from aiproxy.core.interfaces import ClientConnection

__all__ = ["Activity", "InFlight"]


class InFlight(Protocol):
    """A request being handled, as a drain sees it."""

    def abort(self) -> None:
        """End its response unfinished, and cancel its upstream request."""


class Activity:
    """
    The requests a proxy is handling and the client connections it has open.

    The core adds each request when it starts being handled and removes it when its
    response has ended (or its client is gone); each door adds its connections when
    they open and removes them when they close.

    @ivar draining: the proxy is shutting down and takes no new work: ``/api/health``
        says so, and HTTP/1.x responses from now on close their connection.
    """

    def __init__(self) -> None:
        self.requests: set[InFlight] = set()
        self.draining = False
        self._connections: set[ClientConnection] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def started(self, request: InFlight) -> None:
        """``request`` is being handled."""
        self.requests.add(request)

    def ended(self, request: InFlight) -> None:
        """``request`` is done; wake whoever waits for the proxy to be idle."""
        self.requests.discard(request)
        if not self.requests and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def opened(self, connection: ClientConnection) -> None:
        """A client connection opened."""
        self._connections.add(connection)

    def closed(self, connection: ClientConnection) -> None:
        """A client connection closed."""
        self._connections.discard(connection)

    def connections(self) -> list[ClientConnection]:
        """The client connections open now."""
        return list(self._connections)

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is); cancellable."""
        if not self.requests:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(d)
        return d
