"""What a running proxy is doing right now: its requests in flight, and whether it drains."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request

__all__ = ["Activity"]


class Activity:
    """
    The requests a site is handling, shared by the parts that need to know.

    :class:`aiproxy.request.ProxyRequest` adds each request when it starts being
    processed and removes it when its response has ended (or its client is gone).

    @ivar draining: the proxy is shutting down and takes no new work.
    """

    def __init__(self) -> None:
        self.requests: set[Request] = set()
        self.draining = False
        self._idle_waiters: list[Deferred[None]] = []

    def started(self, request: Request) -> None:
        """``request`` is being handled."""
        self.requests.add(request)

    def ended(self, request: Request) -> None:
        """``request`` is done; wake whoever waits for the proxy to be idle."""
        self.requests.discard(request)
        if not self.requests:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is)."""
        if not self.requests:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d
