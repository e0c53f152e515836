"""Many concurrent streams, many clients leaving early: nothing is leaked."""

from __future__ import annotations

import os
import random
import resource
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from .conftest import Proxy, Upstream
from .support import RawClient, connect_raw, wait_until, within

STREAMS = 2000


def open_file_descriptors() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def allow_file_descriptors(needed: int) -> None:
    """Raise the soft limit on open files to ``needed`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise AssertionError(f"this test needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thousands_of_streams_with_random_client_aborts_leave_nothing_behind(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """2,000 concurrent SSE streams, half of the clients leaving at random moments: every
    upstream stream ends (completed or aborted), aborted clients' streams are cancelled
    upstream, and afterwards no connection or file descriptor is left open."""
    allow_file_descriptors(4 * STREAMS + 1000)
    before = open_file_descriptors()
    proxy = start_proxy(upstream.url)
    chooser = random.Random(2026)
    clients: list[RawClient] = []
    leaving: list[RawClient] = []
    for _ in range(STREAMS):
        client = await connect_raw(proxy.port)
        client.transport.write(b"GET /sse/10/100 HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(client)
        if chooser.random() < 0.5:
            leaving.append(client)
            reactor.callLater(chooser.uniform(0.05, 1.2), client.transport.abortConnection)

    stayed = [client for client in clients if client not in leaving]
    await wait_until(
        lambda: (
            all(b"data: [DONE]" in client.received for client in stayed)
            and all(client.closed.called for client in leaving)
        ),
        60,
        "every client has its whole stream or has left",
    )
    stats = upstream.stats
    await wait_until(
        lambda: stats.streams_completed + stats.streams_aborted == stats.streams_started,
        5,
        "every upstream stream has ended",
    )
    left_early = sum(1 for client in leaving if b"[DONE]" not in client.received)
    print(
        f"\n{stats.streams_started} upstream streams: {stats.streams_completed} completed,"
        f" {stats.streams_aborted} aborted; {left_early} clients left before the end;"
        f" {proxy.resource.cancelled} upstream requests cancelled by the proxy"
    )
    assert stats.streams_started >= STREAMS - left_early
    assert stats.streams_completed >= STREAMS - left_early
    assert stats.streams_aborted <= left_early
    # Every early leaver's upstream request was cancelled, before or after it started
    # streaming (a few may have finished upstream just as their client left).
    assert proxy.resource.cancelled >= left_early * 0.9

    for client in stayed:
        client.transport.loseConnection()
    for client in clients:
        await within(client.closed, 10)
    await within(proxy.pool.close(), 10)
    await wait_until(
        lambda: open_file_descriptors() <= before + 2,  # the proxy's listening socket, + slack
        10,
        "every connection is closed",
    )
