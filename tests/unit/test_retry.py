"""How long aiproxy waits before sending an upstream request again (which failures may
be retried at all is tested with their classification, in test_errors.py)."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from aiproxy.rules.retry import RetryPolicy, retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("retry", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)])
def test_backoff_is_full_jitter_doubling_per_retry(retry: int, ceiling: float) -> None:
    """Retry n waits uniformly in [0, RETRY_BACKOFF_FACTOR * 2**(n-1)]."""
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.0).backoff(retry) == 0.0
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.5).backoff(retry) == ceiling / 2
    assert RetryPolicy(3, 0.5, jitter=lambda: 0.999).backoff(retry) < ceiling


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"Retry-After", b"7")], 7.0),
        ([(b"retry-after", b" 7 ")], 7.0),
        ([(b"Retry-After", formatdate(NOW + 30, usegmt=True).encode())], 30.0),
        ([(b"Retry-After", formatdate(NOW - 30, usegmt=True).encode())], 0.0),
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"Retry-After-Ms", b"-5")], 0.0),
        ([(b"Retry-After", b"9"), (b"retry-after-ms", b"250")], 0.25),
        ([(b"retry-after-ms", b"soon"), (b"Retry-After", b"9")], 9.0),
        ([(b"Retry-After", b"whenever")], None),
        ([(b"Retry-After", b"3"), (b"Retry-After", b"8")], 3.0),
        ([(b"X-Retry-After", b"3")], None),
    ],
)
def test_retry_after_reads_seconds_dates_and_milliseconds(
    headers: list[tuple[bytes, bytes]], expected: float | None
) -> None:
    """Retry-After in seconds or as an HTTP date, retry-after-ms first, names in any case,
    the first field of each; nonsense is ignored."""
    assert retry_after(headers, NOW) == expected
