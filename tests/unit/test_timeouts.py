"""Deadlines on an injected clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from aiproxy.core.timeouts import with_deadline
from aiproxy.errors import UpstreamTimeout


class Deadline(Exception):
    """The error the tests ask for when the deadline passes."""


def outcome(d: Deferred[object]) -> list[object]:
    results: list[object] = []
    d.addBoth(results.append)
    return results


def test_result_before_the_deadline_passes_and_cancels_the_timer() -> None:
    """A result in time comes through unchanged, and no timer is left on the clock."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    with_deadline(d, 10, clock, Deadline)
    clock.advance(9.9)
    d.callback("response")
    assert outcome(d) == ["response"]
    assert clock.getDelayedCalls() == []


def test_result_already_there_cancels_the_timer() -> None:
    """A Deferred that has already fired leaves no timer behind."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    d.callback("early")
    with_deadline(d, 10, clock, Deadline)
    assert outcome(d) == ["early"]
    assert clock.getDelayedCalls() == []


def test_expiry_fails_with_the_given_error() -> None:
    """When the deadline passes, the operation is cancelled and fails with the given error."""
    clock = Clock()
    cancelled: list[object] = []
    d: Deferred[str] = Deferred(cancelled.append)
    with_deadline(d, 10, clock, lambda: Deadline("too slow"))
    clock.advance(9.999)
    assert not d.called
    clock.advance(0.001)
    assert cancelled == [d]
    [result] = outcome(d)
    assert isinstance(result, Failure)
    assert result.check(Deadline)
    assert str(result.value) == "too slow"


@pytest.mark.parametrize(
    "cancellation",
    [
        CancelledError(),
        ResponseNeverReceived([Failure(CancelledError())]),
        ConnectionRefusedError(),
    ],
)
def test_expiry_error_replaces_whatever_the_cancellation_reports(
    cancellation: Exception,
) -> None:
    """Even if the cancelled operation fails with its own error, the caller sees the deadline's."""
    clock = Clock()
    d: Deferred[str] = Deferred(lambda d: d.errback(cancellation))
    with_deadline(d, 5, clock, lambda: UpstreamTimeout("no headers within 5s"))
    clock.advance(5)
    [result] = outcome(d)
    assert isinstance(result, Failure)
    assert result.check(UpstreamTimeout)


def test_failure_before_the_deadline_passes_unchanged() -> None:
    """A failure in time is not mistaken for a timeout, and the timer is cancelled."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    with_deadline(d, 10, clock, Deadline)
    clock.advance(1)
    d.errback(ConnectionRefusedError())
    [result] = outcome(d)
    assert isinstance(result, Failure)
    assert result.check(ConnectionRefusedError)
    assert clock.getDelayedCalls() == []


def test_caller_cancellation_is_not_a_timeout() -> None:
    """Cancelling before the deadline gives the CancelledError, not the deadline's error."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    with_deadline(d, 10, clock, Deadline)
    d.cancel()
    [result] = outcome(d)
    assert isinstance(result, Failure)
    assert result.check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_with_deadline_returns_the_same_deferred() -> None:
    """The deadline is attached to the Deferred given, which is returned."""
    d: Deferred[str] = Deferred()
    assert with_deadline(d, 1, Clock(), Deadline) is d
