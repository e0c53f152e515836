"""
When an upstream request may be sent again, after how long, and the loop that does it.

The decisions are pure functions; :func:`with_retries` is the only part that waits.
A request is repeated only while nothing has reached the client and only where
repeating cannot duplicate work the upstream has started: a paid generation must never
run twice because of the proxy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from typing import TypeVar

import attrs
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

__all__ = [
    "IDEMPOTENT_METHODS",
    "RetryPolicy",
    "ReusedConnectionFailed",
    "retry_after",
    "retry_reason",
    "was_cancelled",
    "with_retries",
]

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""RFC 9110 section 9.2.2: sending these twice has the effect of sending them once."""


class ReusedConnectionFailed(Exception):
    """
    A request failed on a kept-alive connection before any response byte arrived.

    This is the stale keep-alive race: the upstream closed an idle connection just as
    the proxy sent a request on it, so the upstream never saw the request.

    @ivar reason: the failure twisted's client reported.
    """

    def __init__(self, reason: Failure) -> None:
        super().__init__(reason.getErrorMessage())
        self.reason = reason


_CONNECT_FAILURES = (neterror.ConnectError, neterror.DNSLookupError, neterror.TimeoutError)
_NO_RESPONSE_FAILURES = (
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestNotSent,
    ResponseFailed,
)


def _status_set(statuses: Iterable[int]) -> frozenset[int]:
    return frozenset(statuses)


@attrs.frozen
class RetryPolicy:
    """
    How many times, and how far apart, a failed upstream request is repeated.

    @ivar max_retries: extra attempts after the first (``MAX_RETRIES``).
    @ivar backoff_factor: seconds; retry ``n`` waits a uniformly random time in
        ``[0, backoff_factor * 2 ** (n - 1)]`` ("full jitter").
    @ivar retry_on_status: upstream statuses that are retried too (``RETRY_ON_STATUS``).
    @ivar jitter: the source of randomness, a uniform number in ``[0, 1)``; tests
        pass a fixed one.
    """

    max_retries: int
    backoff_factor: float
    retry_on_status: frozenset[int] = attrs.field(default=frozenset(), converter=_status_set)
    jitter: Callable[[], float] = attrs.field(default=random.random, eq=False, repr=False)

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the first retry)."""
        return self.jitter() * self.backoff_factor * 2 ** (retry - 1)


def _causes(failure: Failure) -> Iterable[BaseException | None]:
    """The exception and, for twisted's wrapper exceptions, the ones it wraps."""
    yield failure.value
    for reason in getattr(failure.value, "reasons", None) or ():
        yield from _causes(reason)


def was_cancelled(failure: Failure) -> bool:
    """Whether ``failure`` comes from a cancellation (possibly wrapped by twisted's client)."""
    return any(isinstance(cause, CancelledError) for cause in _causes(failure))


def retry_reason(failure: Failure, method: bytes) -> str | None:
    """
    Why ``failure`` may be retried for a request with ``method``, or L{None}.

    - Connecting failed (refused, DNS, connect timeout): the upstream saw nothing, so
      any request may be sent again.
    - A kept-alive connection failed before any response byte: likewise.
    - Any other failure before the response headers: only idempotent methods; a
      ``POST`` may already be generating.
    - Never after a cancellation (the client left, or our own timeout fired).
    """
    if was_cancelled(failure):
        return None
    if isinstance(failure.value, _CONNECT_FAILURES):
        return "cannot connect"
    if isinstance(failure.value, ReusedConnectionFailed):
        return "kept-alive connection closed by the upstream"
    if isinstance(failure.value, _NO_RESPONSE_FAILURES) and method in IDEMPOTENT_METHODS:
        return "connection failed before the response"
    return None


def retry_after(headers: Headers, now: float) -> float | None:
    """
    The wait an upstream asked for: ``retry-after-ms``, else ``Retry-After`` in
    seconds or as an HTTP date; L{None} if it asked for none (or said it badly).
    """
    milliseconds = headers.getRawHeaders(b"retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds[0]) / 1000)
        except ValueError:
            pass
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


async def with_retries(
    send: Callable[[int], Deferred[T]],
    wait_before_next: Callable[[int, T | Failure], float | None],
    clock: IReactorTime,
) -> T:
    """
    ``send(attempt)`` until ``wait_before_next`` says to stop; the last outcome wins.

    @param send: starts attempt number ``attempt`` (0 for the first).
    @param wait_before_next: given the attempt number and its outcome (a result or a
        failure), the seconds to wait before the next attempt, or L{None} to stop and
        return (or raise) this outcome.
    @param clock: where the waits happen. Cancelling the returned coroutine's
        Deferred cancels the attempt or the wait in progress.
    """
    attempt = 0
    while True:
        outcome: T | Failure
        try:
            outcome = await send(attempt)
        except Exception:
            outcome = Failure()
        delay = wait_before_next(attempt, outcome)
        if delay is None:
            if isinstance(outcome, Failure):
                outcome.raiseException()
            return outcome
        await deferLater(clock, delay, lambda: None)
        attempt += 1
