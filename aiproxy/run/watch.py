"""
Reloading a file while the proxy runs (the access keys, the upstreams): when it changes
(its modification time, size or inode, polled on the clock) and on ``SIGHUP``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["WATCH_INTERVAL", "FileWatcher", "OnHangup"]

WATCH_INTERVAL = 1.0
"""Seconds between two looks at a watched file."""

_Stamp = tuple[int, int, int] | None


def _stamp(path: str) -> _Stamp:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class OnHangup(Service):
    """
    While running, each ``SIGHUP`` runs ``action`` in the reactor's thread (in the
    main thread only: elsewhere Python cannot install signal handlers).

    @param call_from_signal: runs a function in the reactor's thread, soon, from a
        signal handler (``reactor.callFromThread``).
    """

    def __init__(
        self, action: Callable[[], None], call_from_signal: Callable[[Callable[[], None]], object]
    ) -> None:
        self.action = action
        self._call_from_signal = call_from_signal
        self._previous_handler: Any = None

    def startService(self) -> None:
        """Handle ``SIGHUP``."""
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        """Give ``SIGHUP`` back to whoever had it."""
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _hangup(self, signum: int, frame: object) -> None:
        self._call_from_signal(self.action)


class FileWatcher(Service):
    """
    Runs ``reload`` when the file at ``path`` changes (``reload`` reads it, and keeps
    what is in use if it is invalid).

    @param clock: the clock of the polling.
    """

    def __init__(
        self,
        path: str,
        reload: Callable[[], None],
        clock: IReactorTime,
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self.path = path
        self.reload = reload
        self.interval = interval
        self.loop = LoopingCall(self.check)
        self.loop.clock = clock
        self._stamp = _stamp(path)

    def startService(self) -> None:
        """Look at the file every ``interval`` seconds."""
        super().startService()
        self._stamp = _stamp(self.path)
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:
        """Stop looking."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def check(self) -> None:
        """Reload if the file changed since it was last read."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()
