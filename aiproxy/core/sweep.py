"""
One timer for many idle deadlines: instead of a timer per stream reset on every chunk,
each watched item only sets a flag when it makes progress, and one sweep looks at all
of them a few times per timeout.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["IdleSweep", "Watched"]


class Watched(Protocol):
    """Something that may go idle: it sets ``active`` whenever it makes progress."""

    active: bool

    def expired(self) -> None:
        """No progress for the sweep's timeout: give up (the sweep forgets it first)."""


class IdleSweep:
    """
    Expires each watched item that made no progress for ``timeout`` seconds.

    The sweep runs every ``timeout / 4`` seconds (at most every second), and only
    while something is watched (one more turn after the last item is forgotten), so an
    item expires between ``timeout`` and ``timeout`` plus one interval after its last
    progress.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4)
        self._last_seen: dict[Watched, float] = {}
        self._timer: IDelayedCall | None = None

    def watch(self, item: Watched) -> None:
        """Start watching ``item``, as if it had just made progress."""
        item.active = False
        self._last_seen[item] = self.clock.seconds()
        if self._timer is None:
            self._timer = self.clock.callLater(self.interval, self._sweep)

    def forget(self, item: Watched) -> None:
        """
        Stop watching ``item``. The timer stays until its next turn (and stops there if
        nothing is watched), so that a busy proxy does not cancel and restart it for
        every request.
        """
        self._last_seen.pop(item, None)

    def stop(self) -> None:
        """Stop the timer now and forget everything (the proxy is shutting down)."""
        self._last_seen.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        last_seen = self._last_seen
        expired = []
        for item, seen in last_seen.items():
            if item.active:
                item.active = False
                last_seen[item] = now
            elif now - seen >= self.timeout:
                expired.append(item)
        for item in expired:
            del last_seen[item]
            item.expired()
        if last_seen and self._timer is None:
            self._timer = self.clock.callLater(self.interval, self._sweep)
