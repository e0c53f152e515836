"""Per-key limits in one process: GCRA for requests and tokens, requests in flight,
token reservations settled by the real usage, and what clients are told."""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet.task import Clock

from aiproxy.access.limits import Refusal, duration_text, token_estimate
from aiproxy.access.memory import Admission, MemoryLimiter


@attrs.define
class Limits:
    """A key's limits, as the key file gives them."""

    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrent: int | None = None


def admitted(result: Admission | Refusal) -> Admission:
    assert isinstance(result, Admission), result
    return result


def refused(result: Admission | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def test_requests_per_minute_allow_a_burst_then_one_per_interval() -> None:
    """RPM 60: sixty at once, then the next waits exactly one second; a refusal costs
    nothing, so asking again does not push the wait further."""
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = Limits(rpm=60)
    for _ in range(60):
        admitted(limiter.admit("alice", limits, 0))
    for _ in range(3):
        refusal = refused(limiter.admit("alice", limits, 0))
        assert (refusal.kind, refusal.limit, refusal.used, refusal.requested) == (
            "requests",
            60,
            60,
            1,
        )
        assert refusal.wait == pytest.approx(1.0)
    clock.advance(1)
    admitted(limiter.admit("alice", limits, 0))
    refused(limiter.admit("alice", limits, 0))


def test_keys_do_not_share_limits() -> None:
    """One key at its limit leaves another untouched."""
    limiter = MemoryLimiter(Clock())
    admitted(limiter.admit("alice", Limits(rpm=1), 0))
    refused(limiter.admit("alice", Limits(rpm=1), 0))
    admitted(limiter.admit("bob", Limits(rpm=1), 0))


def test_concurrent_reservations_cannot_overrun_tokens_per_minute() -> None:
    """TPM 1000 and ten requests at once that may each use 400 tokens: two are
    admitted, the other eight are refused at once (LiteLLM #18730)."""
    limiter = MemoryLimiter(Clock())
    results = [limiter.admit("alice", Limits(tpm=1000), 400) for _ in range(10)]
    assert sum(isinstance(r, Admission) for r in results) == 2
    refusal = refused(results[2])
    assert (refusal.kind, refusal.limit, refusal.used, refusal.requested) == (
        "tokens",
        1000,
        800,
        400,
    )
    assert refusal.wait == pytest.approx(60 * 200 / 1000)


def test_settling_with_the_real_usage_gives_back_the_rest() -> None:
    """A reservation of 400 that used 100 returns 300 tokens to the key at once."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(tpm=1000)
    first = admitted(limiter.admit("alice", limits, 400))
    admitted(limiter.admit("alice", limits, 400))
    refused(limiter.admit("alice", limits, 400))
    first.settle(100)
    admitted(limiter.admit("alice", limits, 400))
    refused(limiter.admit("alice", limits, 400))


def test_usage_above_the_reservation_is_charged() -> None:
    """A response that used more than reserved costs what it used."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(tpm=1000)
    admitted(limiter.admit("alice", limits, 100)).settle(900)
    assert refused(limiter.admit("alice", limits, 200)).used == 900


def test_release_gives_back_the_whole_reservation_once() -> None:
    """When the upstream was never reached the tokens come back; a second release or
    a settle after it change nothing."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(tpm=1000)
    admission = admitted(limiter.admit("alice", limits, 1000))
    refused(limiter.admit("alice", limits, 1))
    admission.release()
    admission.release()
    admission.settle(1000)
    admitted(limiter.admit("alice", limits, 1000))


def test_a_request_larger_than_the_limit_is_capped_not_refused_forever() -> None:
    """A request that may use more tokens than the key's whole limit reserves the
    limit: it waits for a full allowance, never forever."""
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = Limits(tpm=1000)
    admitted(limiter.admit("alice", limits, 50_000))
    refusal = refused(limiter.admit("alice", limits, 50_000))
    assert (refusal.requested, refusal.wait) == (1000, pytest.approx(60))
    clock.advance(60)
    admitted(limiter.admit("alice", limits, 50_000))


def test_tokens_per_day_are_their_own_limit() -> None:
    """An exhausted daily quota is refused as ``daily_tokens`` with the wait until
    enough of the day's tokens are paid back."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(tpm=10_000, tpd=1_000)
    admitted(limiter.admit("alice", limits, 1_000))
    refusal = refused(limiter.admit("alice", limits, 100))
    assert refusal.kind == "daily_tokens"
    assert refusal.wait == pytest.approx(86_400 * 100 / 1_000)


def test_concurrent_requests_are_counted_until_they_end() -> None:
    """With ``concurrent = 2`` a third request in flight is refused; one ending (settled
    or released) makes room."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(concurrent=2)
    first = admitted(limiter.admit("alice", limits, 0))
    second = admitted(limiter.admit("alice", limits, 0))
    assert refused(limiter.admit("alice", limits, 0)).kind == "concurrent"
    first.settle(None)
    third = admitted(limiter.admit("alice", limits, 0))
    second.release()
    third.settle(5)
    admitted(limiter.admit("alice", limits, 0))


def test_a_refusal_reserves_nothing_in_any_limit() -> None:
    """Refused by its token limit, a request does not use up a request either."""
    limiter = MemoryLimiter(Clock())
    limits = Limits(rpm=2, tpm=100)
    admitted(limiter.admit("alice", limits, 100))
    refused(limiter.admit("alice", limits, 100))
    refused(limiter.admit("alice", limits, 100))
    assert admitted(limiter.admit("alice", Limits(rpm=2), 0)).headers[1] == (
        b"x-ratelimit-remaining-requests",
        b"0",
    )


def test_admissions_carry_openai_rate_limit_headers() -> None:
    """An admitted request says each applying limit, what remains and when it resets."""
    limiter = MemoryLimiter(Clock())
    admission = admitted(limiter.admit("alice", Limits(rpm=60, tpm=1000, tpd=10**6), 250))
    assert admission.headers == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"750"),
        (b"x-ratelimit-reset-tokens", b"15s"),
    ]
    assert admitted(limiter.admit("bob", Limits(), 250)).headers == []


@pytest.mark.parametrize(
    ("body", "length", "expected"),
    [
        (json.dumps({"max_tokens": 1, "max_completion_tokens": 10_000}).encode(), None, 10_000),
        (json.dumps({"max_tokens": 400}).encode(), None, 400),
        (json.dumps({"messages": []}).encode(), None, 256),
        (b"not json", None, 256),
        (json.dumps({"max_tokens": True}).encode(), None, 256),
        (None, 4_000, 256),
    ],
    ids=["larger-of-both", "max-tokens", "default", "not-json", "bool", "streamed"],
)
def test_token_estimate_is_prompt_bytes_plus_the_most_it_may_generate(
    body: bytes | None, length: int | None, expected: int
) -> None:
    """The prompt counts one token per 4 bytes; the completion is the larger of
    ``max_tokens`` and ``max_completion_tokens``, else the configured default."""
    size = len(body) if body is not None else length or 0
    assert token_estimate(body, length, 256) == -(-size // 4) + expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.0001, "1ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_durations_are_spelt_as_openai_does(seconds: float, text: str) -> None:
    """``x-ratelimit-reset-*`` values: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    assert duration_text(seconds) == text
