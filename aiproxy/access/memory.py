"""
The per-key limits of one process, in memory: one GCRA cell per limit and key, and a
count of requests in flight, on the injected clock.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from aiproxy.access.limits import (
    DAY,
    MINUTE,
    Cell,
    KeyLimits,
    Rate,
    duration_text,
    settled_tat,
)
from aiproxy.core.interfaces import RawHeaders

__all__ = ["Admission", "MemoryLimiter", "Refusal"]

REQUESTS = "requests"
TOKENS = "tokens"
DAILY_TOKENS = "daily_tokens"
CONCURRENT = "concurrent"


@attrs.frozen
class Refusal:
    """
    Why a request is over one of its key's limits.

    @ivar kind: ``requests`` (per minute), ``tokens`` (per minute), ``daily_tokens``
        or ``concurrent``.
    @ivar limit: the limit's figure.
    @ivar used: how much of it is in use now.
    @ivar requested: what the request asked for (1 request, or its tokens).
    @ivar wait: seconds until it would fit (for ``concurrent``, unknown: 1).
    """

    kind: str
    limit: int
    used: int
    requested: int
    wait: float


@attrs.define(eq=False)
class _KeyState:
    tats: dict[str, float] = attrs.Factory(dict)
    in_flight: int = 0


@attrs.define(eq=False)
class Admission:
    """
    A request admitted under its key's limits: what it reserved, what to tell the
    client, and how to give back what it did not use.
    """

    _state: _KeyState
    _reserved: dict[str, tuple[Rate, int]]
    headers: RawHeaders
    """OpenAI's ``x-ratelimit-*`` fields for the limits that apply."""
    _counted: bool
    _open: bool = True

    def settle(self, used_tokens: int | None) -> None:
        """
        The response ended having used ``used_tokens`` (L{None}: unknown, so the
        reservation stands); the request no longer counts as in flight.
        """
        self._end(used_tokens)

    def release(self) -> None:
        """The upstream was never reached: give back the tokens reserved."""
        self._end(0)

    def _end(self, used_tokens: int | None) -> None:
        if not self._open:
            return
        self._open = False
        tats = self._state.tats
        for kind, (rate, reserved) in self._reserved.items():
            used = reserved if used_tokens is None else used_tokens
            tats[kind] = settled_tat(rate, tats[kind], reserved, used)
        if self._counted:
            self._state.in_flight -= 1


class MemoryLimiter:
    """Every key's limits in this process."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key_id: str, limits: KeyLimits, tokens: int) -> Admission | Refusal:
        """
        Admit one request of key ``key_id`` that may use ``tokens`` tokens, or say
        which limit it is over. A refused request reserves nothing.
        """
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        concurrent = limits.concurrent
        if concurrent and state.in_flight >= concurrent:
            return Refusal(CONCURRENT, concurrent, state.in_flight, 1, 1.0)
        now = self.clock.seconds()
        tats = state.tats
        cells: dict[str, tuple[Rate, int, Cell]] = {}
        for kind, limit, period, cost in (
            (REQUESTS, limits.rpm, MINUTE, 1),
            (TOKENS, limits.tpm, MINUTE, tokens),
            (DAILY_TOKENS, limits.tpd, DAY, tokens),
        ):
            if not limit:
                continue
            rate = Rate(limit, period)
            cost = min(cost, limit)  # never refused forever
            cell = Cell.check(rate, tats.get(kind, now), now, cost)
            if not cell.allowed:
                return Refusal(kind, limit, limit - cell.remaining, cost, cell.wait)
            cells[kind] = (rate, cost, cell)
        for kind, (_, _, cell) in cells.items():
            tats[kind] = cell.tat
        if concurrent:
            state.in_flight += 1
        reserved = {
            kind: (rate, cost) for kind, (rate, cost, _) in cells.items() if kind != REQUESTS
        }
        return Admission(state, reserved, _headers(cells), bool(concurrent))


def _headers(cells: dict[str, tuple[Rate, int, Cell]]) -> RawHeaders:
    headers: RawHeaders = []
    for kind, suffix in ((REQUESTS, b"requests"), (TOKENS, b"tokens")):
        entry = cells.get(kind)
        if entry is None:
            continue
        rate, _, cell = entry
        headers += [
            (b"x-ratelimit-limit-" + suffix, b"%d" % rate.limit),
            (b"x-ratelimit-remaining-" + suffix, b"%d" % cell.remaining),
            (b"x-ratelimit-reset-" + suffix, duration_text(cell.reset).encode()),
        ]
    return headers
