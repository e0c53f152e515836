"""The idle sweep: one timer for every stream's STREAM_IDLE_TIMEOUT."""

from __future__ import annotations

from twisted.internet.task import Clock

from aiproxy.core.sweep import IdleSweep


class Stream:
    def __init__(self) -> None:
        self.active = False
        self.expired_at: float | None = None
        self.clock: Clock | None = None

    def expired(self) -> None:
        assert self.clock is not None
        self.expired_at = self.clock.seconds()


def watched(sweep: IdleSweep, clock: Clock) -> Stream:
    stream = Stream()
    stream.clock = clock
    sweep.watch(stream)
    return stream


def test_a_quiet_stream_expires_within_one_interval_of_its_timeout() -> None:
    """A stream with no data expires between the timeout and the timeout plus an interval."""
    clock = Clock()
    sweep = IdleSweep(clock, 8.0)
    stream = watched(sweep, clock)
    clock.advance(7.9)
    assert stream.expired_at is None
    clock.advance(2.1)
    assert stream.expired_at is not None and 8.0 <= stream.expired_at <= 10.0


def test_progress_keeps_a_stream_alive() -> None:
    """A stream that makes progress now and then never expires."""
    clock = Clock()
    sweep = IdleSweep(clock, 4.0)
    stream = watched(sweep, clock)
    for _ in range(20):
        clock.advance(1.0)
        stream.active = True
    assert stream.expired_at is None


def test_one_timer_for_many_streams() -> None:
    """However many streams are watched, the sweep keeps one timer."""
    clock = Clock()
    sweep = IdleSweep(clock, 300.0)
    for _ in range(1000):
        watched(sweep, clock)
    assert len(clock.getDelayedCalls()) == 1


def test_no_timer_once_nothing_is_watched() -> None:
    """When the last stream is forgotten, the sweep stops at its next turn; ``stop``
    stops it at once."""
    clock = Clock()
    sweep = IdleSweep(clock, 300.0)
    stream = watched(sweep, clock)
    sweep.forget(stream)
    clock.advance(1.0)
    assert clock.getDelayedCalls() == []
    watched(sweep, clock)
    sweep.stop()
    assert clock.getDelayedCalls() == []


def test_a_busy_proxy_keeps_one_timer() -> None:
    """Streams that come and go one after another do not restart the timer each time."""
    clock = Clock()
    sweep = IdleSweep(clock, 300.0)
    first = watched(sweep, clock)
    [timer] = clock.getDelayedCalls()
    sweep.forget(first)
    watched(sweep, clock)
    assert clock.getDelayedCalls() == [timer]


def test_the_interval_is_at_most_a_second() -> None:
    """Long timeouts are checked every second, short ones four times per timeout."""
    assert IdleSweep(Clock(), 300.0).interval == 1.0
    assert IdleSweep(Clock(), 0.4).interval == 0.1
