"""
Graceful shutdown: stop listening, let the requests in flight finish, abort what is left.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from aiproxy.core.activity import Activity, IncomingConnection, close_after_response, connection_of
from aiproxy.streaming import abort_response

__all__ = ["DrainService", "abort_connection", "close_if_idle"]

log = Logger(namespace="aiproxy")

POLL_INTERVAL = 0.05
"""Seconds between looks at the requests in flight and the client connections during a
drain."""

ABORT_GRACE = 1.0
"""Seconds to wait, after aborting, for the aborted requests to end (and so cancel
their upstream requests) before the drain is over."""


class DrainService(MultiService):
    """
    The listeners of a site, and the graceful drain of its client connections when they
    stop.

    Add the site's listening services as children. ``stopService``:

      1. sets ``activity.draining``: ``/api/health`` answers ``503`` from now on;
      2. stops the listeners: new connections are refused;
      3. closes idle keep-alive connections, and makes busy HTTP/1.x ones close after
         their response (``Connection: close``);
      4. waits up to ``timeout`` seconds for every request in flight to end and every
         connection to close (idle HTTP/2 connections get a ``GOAWAY`` and close);
      5. then aborts the connections still open, cutting their requests short (the
         proxy cancels their upstream requests).

    @ivar timeout: seconds that requests in flight have to finish.
    """

    def __init__(self, activity: Activity, clock: IReactorTime, timeout: float) -> None:
        super().__init__()
        self.activity = activity
        self.clock = clock
        self.timeout = timeout

    def startService(self) -> None:
        """Start the listeners; the activity is not draining."""
        self.activity.draining = False
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Drain; fires once done, within ``timeout`` seconds and a little. Never fails."""
        Service.stopService(self)
        drained = Deferred.fromCoroutine(self._drain())
        drained.addErrback(lambda failure: log.failure("Bug while draining", failure))
        return drained

    async def _drain(self) -> None:
        activity, clock = self.activity, self.clock
        activity.draining = True
        started = clock.seconds()
        deadline = started + self.timeout
        log.info(
            "Draining: {in_flight} request(s) in flight, {timeout}s to finish",
            in_flight=len(activity.requests),
            timeout=self.timeout,
        )
        await self._stop_listening()
        for request in activity.requests:
            close_after_response(request)
        if await self._settle(deadline):
            log.info(
                "Drained: every request finished, in {duration:.3f}s",
                duration=clock.seconds() - started,
            )
            return
        aborted = len(activity.requests)
        dropped = self._abort_the_rest()
        # Let the aborted requests end, so that their upstream requests are cancelled
        # before whatever stops next (the upstream pool) does.
        await self._before(activity.when_idle(), clock.seconds() + ABORT_GRACE)
        log.warn(
            "Drain timed out after {timeout}s: {aborted} request(s) aborted,"
            " {dropped} client connection(s) dropped",
            timeout=self.timeout,
            aborted=aborted,
            dropped=dropped,
        )

    async def _stop_listening(self) -> None:
        """Stop every listener; a failure is logged and the drain goes on."""
        stopping = [maybeDeferred(listener.stopService) for listener in self]
        for succeeded, result in await DeferredList(stopping, consumeErrors=True):
            if not succeeded:
                log.failure("A listener failed to stop", result)

    async def _settle(self, deadline: float) -> bool:
        """
        Wait until no request is in flight and every known client connection has
        closed, closing each connection as soon as it is idle. L{False} at
        ``deadline``.

        A finished request is not enough: the end of its response may still sit in
        its connection's write buffer, and the reactor's shutdown drops sockets
        without flushing them. A closed connection has been flushed.
        """
        activity, clock = self.activity, self.clock
        while True:
            for connection in activity.connections():
                close_if_idle(connection)
            if not activity.requests and not activity.connections():
                return True
            now = clock.seconds()
            if now >= deadline:
                return False
            await deferLater(clock, min(POLL_INTERVAL, deadline - now))

    async def _before(self, waiting: Deferred[None], deadline: float) -> bool:
        """Whether ``waiting`` fires before ``deadline``; it is cancelled if not."""
        if waiting.called:
            await waiting
            return True
        try:
            await waiting.addTimeout(max(0.0, deadline - self.clock.seconds()), self.clock)
        except TimeoutError:
            return False
        return True

    def _abort_the_rest(self) -> int:
        """
        Abort every client connection still open, and with them their requests; the
        number of connections aborted.
        """
        connections = set(self.activity.connections())
        for request in list(self.activity.requests):
            connection = connection_of(request)
            if connection is None:
                abort_response(request)
            else:
                connections.add(connection)
        for connection in connections:
            abort_connection(connection)
        return len(connections)


def close_if_idle(connection: IncomingConnection) -> None:
    """
    Close ``connection`` if no request is on it: an HTTP/1.x channel at once, an
    HTTP/2 connection after a ``GOAWAY`` frame. An HTTP/1.x channel with a request on
    it closes once its response has been sent.

    A busy HTTP/2 connection is left alone: hyper-h2 sends nothing on any stream once
    it has sent ``GOAWAY``, so its streams would be cut short.
    """
    transport: Any = connection.transport
    if transport is None or transport.disconnecting:
        return
    if isinstance(connection, HTTPChannel):
        if connection.requests:
            connection.persistent = False
        else:
            connection.loseConnection()
    elif not connection.streams:
        connection.conn.close_connection()
        transport.write(connection.conn.data_to_send())
        # As HTTPChannel.loseConnection does: a TLS transport waits for its producer
        # (the connection) to be unregistered before it closes.
        transport.unregisterProducer()
        transport.loseConnection()


def abort_connection(connection: IncomingConnection) -> None:
    """Drop ``connection`` at once; every request on it ends as not finished."""
    transport: Any = connection.transport
    if transport is not None:
        transport.abortConnection()
