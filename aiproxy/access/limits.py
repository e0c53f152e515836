"""
Per-key limits, pure: the generic cell rate algorithm (GCRA) for requests and tokens
over a period, a count of requests in flight, the token cost a request reserves, and
what a client is told (OpenAI's ``x-ratelimit-*`` headers, ``Retry-After``).

GCRA keeps one number per limit, the *theoretical arrival time* (TAT): the moment
when everything admitted so far would have been paid off at the limit's steady rate.
A request of cost ``n`` is admitted if, after adding ``n`` emission intervals to the
TAT, the TAT is no further than one period ahead of now; otherwise it waits exactly
until it would be. Admitting nothing changes nothing, so a refused request costs no
quota, and the wait is exact. The same arithmetic runs in memory (here) and in Redis.

Tokens are reserved before the upstream call (an estimate: see
:func:`token_estimate`) and settled when the response ends with its real usage:
the TAT moves by the difference, and by the whole reservation if the upstream was
never reached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from aiproxy.core.interfaces import RawHeaders

__all__ = [
    "BYTES_PER_TOKEN",
    "CONCURRENT",
    "DAILY_TOKENS",
    "DAY",
    "MINUTE",
    "REQUESTS",
    "TOKENS",
    "Admitted",
    "Cell",
    "KeyLimits",
    "Limiter",
    "Rate",
    "Refusal",
    "duration_text",
    "has_limits",
    "rate_limit_headers",
    "settled_tat",
    "token_estimate",
]

MINUTE = 60.0
DAY = 86_400.0

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


BYTES_PER_TOKEN = 4
"""The prompt estimate: one token per this many bytes of request body (no tokenizer)."""


class Admitted(Protocol):
    """A request admitted under its key's limits, by any limiter."""

    headers: RawHeaders
    """OpenAI's ``x-ratelimit-*`` fields for the limits that apply."""

    def settle(self, used_tokens: int | None) -> None:
        """
        The response ended having used ``used_tokens`` (L{None}: unknown, so the
        reservation stands); the request no longer counts as in flight.
        """

    def release(self) -> None:
        """The upstream was never reached: give back the tokens reserved."""


class Limiter(Protocol):
    """Where keys' limits are counted: in this process, or in Redis (a Deferred)."""

    def admit(self, key_id: str, limits: KeyLimits, tokens: int) -> Any:
        """
        Admit one request of ``key_id`` that may use ``tokens``: an :class:`Admitted`,
        a :class:`Refusal`, or (from Redis, when it fails and the policy is closed) an
        ``Unavailable``; or a Deferred firing with one of them.
        """

    def close(self) -> Deferred[None] | None:
        """Let go of what it holds (Redis connections); fires once done, if it waits."""


class KeyLimits(Protocol):
    """The limits of one access key; L{None} for no limit."""

    @property
    def rpm(self) -> int | None:
        """Requests per minute."""

    @property
    def tpm(self) -> int | None:
        """Tokens (prompt and completion) per minute."""

    @property
    def tpd(self) -> int | None:
        """Tokens per day."""

    @property
    def concurrent(self) -> int | None:
        """Requests in flight at once."""


@attrs.frozen
class Rate:
    """``limit`` units per ``period`` seconds, any of them at once (a burst of all)."""

    limit: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds one unit takes to be paid off."""
        return self.period / self.limit


@attrs.frozen
class Cell:
    """
    What GCRA says of one limit for a request of some cost.

    @ivar allowed: whether the cost fits now.
    @ivar tat: the theoretical arrival time after admitting it (unchanged if refused).
    @ivar wait: seconds until it would fit; 0 if it does.
    @ivar remaining: units still available now (after it, if admitted).
    @ivar reset: seconds until the limit is back to its full allowance.
    """

    allowed: bool
    tat: float
    wait: float
    remaining: int
    reset: float

    @classmethod
    def check(cls, rate: Rate, tat: float, now: float, cost: int) -> Cell:
        """Whether ``cost`` units fit ``rate`` at ``now``, given the limit's ``tat``."""
        interval = rate.interval
        base = max(tat, now)
        new_tat = base + cost * interval
        ahead = new_tat - now - rate.period
        if ahead > 1e-9:
            return cls(False, tat, ahead, _remaining(rate, base - now), max(base - now, 0.0))
        return cls(True, new_tat, 0.0, _remaining(rate, new_tat - now), new_tat - now)


def _remaining(rate: Rate, owed: float) -> int:
    """Units available when ``owed`` seconds of the period are already spoken for."""
    return max(0, min(rate.limit, math.floor((rate.period - owed) / rate.interval + 1e-9)))


def has_limits(limits: KeyLimits) -> bool:
    """Whether any limit applies to a key."""
    return bool(limits.rpm or limits.tpm or limits.tpd or limits.concurrent)


def settled_tat(rate: Rate, tat: float, reserved: int, used: int) -> float:
    """The TAT once a reservation of ``reserved`` units turns out to cost ``used``."""
    return tat + (used - reserved) * rate.interval


def token_estimate(body: bytes | None, body_length: int | None, default_completion: int) -> int:
    """
    The tokens a request reserves: its prompt, estimated from the body's size (one
    token per :data:`BYTES_PER_TOKEN` bytes), plus the most it may generate: the
    larger of ``max_tokens`` and ``max_completion_tokens`` in its JSON body, else
    ``default_completion``.

    @param body: the body, when it is in memory; L{None} when it streams.
    @param body_length: its length when known (a streamed body's ``Content-Length``).
    """
    size = len(body) if body is not None else body_length or 0
    prompt = -(-size // BYTES_PER_TOKEN)
    completion = _max_completion(body) if body else None
    return prompt + (default_completion if completion is None else completion)


def _max_completion(body: bytes) -> int | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, Mapping):
        return None
    counts = [
        value
        for value in (document.get("max_tokens"), document.get("max_completion_tokens"))
        if type(value) is int and value >= 0
    ]
    return max(counts) if counts else None


def rate_limit_headers(
    requests: tuple[int, int, float] | None, tokens: tuple[int, int, float] | None
) -> RawHeaders:
    """
    OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` fields, for
    each limit that applies: its figure, what remains, and seconds until it is whole.
    """
    headers: RawHeaders = []
    for suffix, figures in ((b"requests", requests), (b"tokens", tokens)):
        if figures is None:
            continue
        limit, remaining, reset = figures
        headers += [
            (b"x-ratelimit-limit-" + suffix, b"%d" % limit),
            (b"x-ratelimit-remaining-" + suffix, b"%d" % remaining),
            (b"x-ratelimit-reset-" + suffix, duration_text(reset).encode()),
        ]
    return headers


def duration_text(seconds: float) -> str:
    """
    A wait as OpenAI's ``x-ratelimit-reset-*`` headers spell it: ``20ms``, ``1s``,
    ``1.5s``, ``6m0s``, ``1h2m3s``.
    """
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = round(seconds, 3)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text
