"""
Graceful shutdown: stop listening, let the requests in flight finish, abort what is left.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from aiproxy.core.activity import Activity
from aiproxy.ops.logger import log

__all__ = ["DrainService"]


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
                connection.close_if_idle()
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
        connections = self.activity.connections()
        for connection in connections:
            connection.abort()
        for request in list(self.activity.requests):
            request.abort()
        return len(connections)
