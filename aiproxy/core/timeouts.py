"""Timeouts on an injected clock, each ending in an error of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["with_deadline"]

T = TypeVar("T")


def with_deadline(
    d: Deferred[T], seconds: float, clock: IReactorTime, error: Callable[[], Exception]
) -> Deferred[T]:
    """
    Cancel ``d`` if it has not fired within ``seconds``, and fail it with ``error()``.

    Unlike :meth:`Deferred.addTimeout`, the failure is ``error()`` whatever the
    cancelled operation reports (twisted's HTTP client wraps a cancellation in
    ``ResponseNeverReceived``), so the caller can tell its own timeout apart.

    @return: ``d``, with the deadline attached.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    timer = clock.callLater(seconds, expire)

    def settle(result: T | Failure) -> T | Failure:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(error())
        return result

    return d.addBoth(settle)
