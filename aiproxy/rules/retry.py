"""
The retry policy as data: how many retries, how far apart, on which upstream statuses,
and how long an upstream asked to wait. Which failures may be retried at all is decided
with the rest of what a failure means, in :mod:`aiproxy.core.failures`.

A request is repeated only while nothing has reached the client and only where
repeating cannot duplicate work the upstream has started: a paid generation must never
run twice because of the proxy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = ["IDEMPOTENT_METHODS", "RetryPolicy", "retry_after"]

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""RFC 9110 section 9.2.2: sending these twice has the effect of sending them once."""


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


def retry_after(headers: RawHeaders, now: float) -> float | None:
    """
    The wait an upstream asked for: ``retry-after-ms``, else ``Retry-After`` in
    seconds or as an HTTP date; L{None} if it asked for none (or said it badly).
    Only the first field of each name counts.
    """
    milliseconds: bytes | None = None
    seconds: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"retry-after-ms":
            if milliseconds is None:
                milliseconds = value
        elif lower == b"retry-after" and seconds is None:
            seconds = value
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    if seconds is None:
        return None
    text = seconds.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)
