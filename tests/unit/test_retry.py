"""When aiproxy sends an upstream request again, and how long it waits first."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from OpenSSL.SSL import Error as TLSError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from aiproxy.errors import UpstreamTimeout
from aiproxy.rules.retry import (
    RetryPolicy,
    ReusedConnectionFailed,
    retry_after,
    retry_reason,
    was_cancelled,
    with_retries,
)


@pytest.mark.parametrize(("retry", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)])
def test_backoff_is_full_jitter_doubling_per_retry(retry: int, ceiling: float) -> None:
    """Retry n waits uniformly in [0, RETRY_BACKOFF_FACTOR * 2**(n-1)]."""
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.0).backoff(retry) == 0.0
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.5).backoff(retry) == ceiling / 2
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.999).backoff(retry) < ceiling


def _wrapped(exception: Exception, wrapper: type = ResponseNeverReceived) -> Failure:
    return Failure(wrapper([Failure(exception)]))


@pytest.mark.parametrize(
    ("failure", "method", "retried"),
    [
        (Failure(ConnectionRefusedError()), b"POST", True),
        (Failure(DNSLookupError("no such host")), b"POST", True),
        (Failure(TimeoutError()), b"POST", True),
        (Failure(ReusedConnectionFailed(_wrapped(ConnectionRefusedError()))), b"POST", True),
        (_wrapped(ConnectionRefusedError()), b"GET", True),
        (_wrapped(ConnectionRefusedError()), b"PUT", True),
        (_wrapped(ConnectionRefusedError()), b"DELETE", True),
        (_wrapped(ConnectionRefusedError(), ResponseFailed), b"GET", True),
        (_wrapped(ConnectionRefusedError(), RequestTransmissionFailed), b"HEAD", True),
        (_wrapped(ConnectionRefusedError()), b"POST", False),
        (_wrapped(ConnectionRefusedError()), b"PATCH", False),
        (_wrapped(ConnectionRefusedError(), ResponseFailed), b"POST", False),
        (_wrapped(CancelledError()), b"GET", False),
        (Failure(CancelledError()), b"GET", False),
        (Failure(UpstreamTimeout("ours")), b"GET", False),
        (Failure(TLSError("certificate verify failed")), b"GET", False),
        (Failure(ValueError("a bug")), b"GET", False),
    ],
)
def test_only_failures_safe_to_repeat_are_retried(
    failure: Failure, method: bytes, retried: bool
) -> None:
    """Connect failures always; no response yet: idempotent methods only; never a cancel."""
    assert (retry_reason(failure, method) is not None) is retried


def test_cancellation_is_seen_through_twisteds_wrappers() -> None:
    """A cancelled request wrapped in ResponseNeverReceived still counts as cancelled."""
    assert was_cancelled(_wrapped(CancelledError()))
    assert not was_cancelled(_wrapped(ConnectionRefusedError()))


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({b"Retry-After": [b"7"]}, 7.0),
        ({b"Retry-After": [formatdate(NOW + 30, usegmt=True).encode()]}, 30.0),
        ({b"Retry-After": [formatdate(NOW - 30, usegmt=True).encode()]}, 0.0),
        ({b"retry-after-ms": [b"1500"]}, 1.5),
        ({b"retry-after-ms": [b"250"], b"Retry-After": [b"9"]}, 0.25),
        ({b"retry-after-ms": [b"soon"], b"Retry-After": [b"9"]}, 9.0),
        ({b"Retry-After": [b"whenever"]}, None),
    ],
)
def test_retry_after_reads_seconds_dates_and_milliseconds(
    headers: dict[bytes, list[bytes]], expected: float | None
) -> None:
    """Retry-After in seconds or as an HTTP date, retry-after-ms first; nonsense is ignored."""
    assert retry_after(Headers(headers), NOW) == expected


def test_with_retries_waits_between_attempts_and_returns_the_first_success() -> None:
    """Each failed attempt is followed by the wait the decision asks for, on the clock."""
    clock = Clock()
    attempts: list[int] = []
    outcomes = [fail(ConnectionRefusedError()), fail(ConnectionRefusedError()), succeed("ok")]

    def send(attempt: int) -> Deferred[str]:
        attempts.append(attempt)
        return outcomes[attempt]

    def wait(attempt: int, outcome: object) -> float | None:
        return 2.0 if isinstance(outcome, Failure) else None

    d = Deferred.fromCoroutine(with_retries(send, wait, clock))
    assert attempts == [0]
    clock.advance(1.9)
    assert attempts == [0]
    clock.advance(0.1)
    assert attempts == [0, 1]
    clock.advance(2)
    assert attempts == [0, 1, 2]
    results: list[str] = []
    d.addCallback(results.append)
    assert results == ["ok"]


def test_with_retries_stops_with_the_last_outcome() -> None:
    """When the decision says stop, that attempt's failure is the result."""
    clock = Clock()
    d = Deferred.fromCoroutine(
        with_retries(lambda attempt: fail(ConnectionRefusedError()), lambda a, o: None, clock)
    )
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(ConnectionRefusedError)


def test_cancelling_during_the_wait_sends_nothing_more() -> None:
    """A cancelled exchange (client gone, timeout) makes no further attempt."""
    clock = Clock()
    attempts: list[int] = []

    def send(attempt: int) -> Deferred[str]:
        attempts.append(attempt)
        return fail(ConnectionRefusedError())

    d = Deferred.fromCoroutine(with_retries(send, lambda a, o: 1.0, clock))
    d.addErrback(lambda f: None)
    d.cancel()
    clock.advance(10)
    assert attempts == [0]
    assert clock.getDelayedCalls() == []
