"""
Reloading ``ACCESS_KEYS_FILE`` while the proxy runs: when the file changes (its
modification time, size or inode, polled on the clock) and on ``SIGHUP``.

A valid file replaces the key ring at once; requests in flight keep the entry they
were admitted with. An invalid one (or none: a file being replaced) keeps the ring in
use and logs one warning, until the file changes again.
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

from aiproxy.access.keys import KeyFileError
from aiproxy.access.policy import AccessKeys
from aiproxy.ops.logger import log

__all__ = ["WATCH_INTERVAL", "KeyFileWatcher", "OnHangup"]

WATCH_INTERVAL = 1.0
"""Seconds between two looks at the key file."""

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


class KeyFileWatcher(Service):
    """
    Reloads ``keys`` from their file when it changes (and when :meth:`reload` is
    called: see :class:`OnHangup`).

    @param clock: the clock of the polling.
    """

    def __init__(
        self, keys: AccessKeys, clock: IReactorTime, interval: float = WATCH_INTERVAL
    ) -> None:
        self.keys = keys
        self.interval = interval
        self.loop = LoopingCall(self.check)
        self.loop.clock = clock
        self._stamp = _stamp(keys.path)

    def startService(self) -> None:
        """Look at the file every ``interval`` seconds."""
        super().startService()
        self._stamp = _stamp(self.keys.path)
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:
        """Stop looking."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def check(self) -> None:
        """Reload if the file changed since it was last read."""
        stamp = _stamp(self.keys.path)
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()

    def reload(self) -> None:
        """Read the file and use its keys from now on; if it is invalid, warn and keep
        the keys in use."""
        try:
            ring = self.keys.read()
        except KeyFileError as e:
            log.warn(
                "Access keys not reloaded, the previous ones stay in use: {error}", error=str(e)
            )
            return
        self.keys.ring = ring
        log.info(
            "Access keys reloaded from {path}: {count} key(s)",
            path=self.keys.path,
            count=len(ring.entries),
        )
