"""
The per-key limits of one process, in memory: one GCRA cell per limit and key, and a
count of requests in flight, on the injected clock.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from aiproxy.access.limits import (
    CONCURRENT,
    DAILY_TOKENS,
    DAY,
    MINUTE,
    REQUESTS,
    TOKENS,
    Cell,
    KeyLimits,
    Rate,
    Refusal,
    rate_limit_headers,
    settled_tat,
)
from aiproxy.core.interfaces import RawHeaders

__all__ = ["Admission", "MemoryLimiter"]


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

    def close(self) -> None:
        """Nothing to let go of."""

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
        headers = rate_limit_headers(_figures(cells, REQUESTS), _figures(cells, TOKENS))
        return Admission(state, reserved, headers, bool(concurrent))


def _figures(cells: dict[str, tuple[Rate, int, Cell]], kind: str) -> tuple[int, int, float] | None:
    """A limit's figure, what remains and when it is whole; L{None} if it does not apply."""
    entry = cells.get(kind)
    if entry is None:
        return None
    rate, _, cell = entry
    return rate.limit, cell.remaining, cell.reset
