"""
Per-key limits shared through a real ``redis-server``: two limiters (as two worker
processes or two proxies would be) hold one limit between them, and the failure policy
applies while Redis is down, until it is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import capturedLogs

from aiproxy.access.keyfile import replace_key_file
from aiproxy.access.keys import key_digest, new_key
from aiproxy.access.limits import Refusal
from aiproxy.access.redis import RedisAdmission, RedisLimiter, Unavailable

from .conftest import Proxy, Upstream
from .processes import TwistProcess
from .redis_server import REDIS_SERVER, RedisServer, connect, start_redis
from .support import raw_exchange, sleep

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")


@attrs.define
class Limits:
    """A key's limits, as the key file gives them."""

    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrent: int | None = None


@pytest_twisted.async_yield_fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A fresh ``redis-server`` for the test, stopped after it."""
    server = await start_redis(tmp_path)
    yield server
    server.stop()


@pytest_twisted.async_yield_fixture
async def clients(redis: RedisServer) -> AsyncIterator[list[Any]]:
    """Two client connections to it, as two processes would have."""
    connections = [await connect(redis), await connect(redis)]
    yield connections
    for connection in connections:
        await connection.disconnect()


@attrs.define
class CountingRedis:
    """A Redis client that counts the scripts it runs."""

    client: Any
    calls: int = 0

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self.calls += 1
        return self.client.eval(script, keys, args)

    def disconnect(self) -> Any:
        return self.client.disconnect()


def limiters(clients: list[Any], *, fail_open: bool = True) -> list[RedisLimiter]:
    return [RedisLimiter(client, reactor, fail_open=fail_open) for client in clients]


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_requests_limit(clients: list[Any]) -> None:
    """RPM 5 checked by two limiters, alternately: five requests in all, not per limiter."""
    first, second = limiters(clients)
    results = [
        await (first if n % 2 else second).admit("alice", Limits(rpm=5), 0) for n in range(10)
    ]
    assert sum(isinstance(r, RedisAdmission) for r in results) == 5
    refusal = results[5]
    assert isinstance(refusal, Refusal)
    assert (refusal.kind, refusal.limit, refusal.used) == ("requests", 5, 5)
    assert 11.5 < refusal.wait <= 12.0


@pytest_twisted.ensureDeferred
async def test_token_reservations_are_shared_and_settled(clients: list[Any]) -> None:
    """TPM 1000 and requests that may use 400: two in all are admitted; settling one
    with its real usage of 100 makes room for one more, in the other process too."""
    first, second = limiters(clients)
    limits = Limits(tpm=1000)
    admitted = [
        await first.admit("alice", limits, 400),
        await second.admit("alice", limits, 400),
    ]
    assert all(isinstance(a, RedisAdmission) for a in admitted)
    refusal = await first.admit("alice", limits, 400)
    assert isinstance(refusal, Refusal) and (refusal.kind, refusal.used) == ("tokens", 800)
    admitted[0].settle(100)
    await sleep(0.05)  # the settlement is sent, not waited for
    assert isinstance(await second.admit("alice", limits, 400), RedisAdmission)


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_are_counted_across_processes(clients: list[Any]) -> None:
    """``concurrent = 1``: the second request, from the other process, waits for the
    first to end."""
    first, second = limiters(clients)
    limits = Limits(concurrent=1)
    admission = await first.admit("alice", limits, 0)
    assert isinstance(admission, RedisAdmission)
    refusal = await second.admit("alice", limits, 0)
    assert isinstance(refusal, Refusal) and refusal.kind == "concurrent"
    admission.release()
    await sleep(0.05)
    assert isinstance(await second.admit("alice", limits, 0), RedisAdmission)


@pytest_twisted.ensureDeferred
async def test_admissions_say_the_limits_as_openai_does(clients: list[Any]) -> None:
    """The first request of a fresh key under RPM 60 and TPM 1000 says what remains."""
    [limiter, _] = limiters(clients)
    admission = await limiter.admit("bob", Limits(rpm=60, tpm=1000), 250)
    assert isinstance(admission, RedisAdmission)
    assert admission.headers == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"750"),
        (b"x-ratelimit-reset-tokens", b"15s"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_key_over_its_limit_is_refused_without_asking_redis_again(
    clients: list[Any],
) -> None:
    """Once Redis has said a key is over its requests limit, the limiter refuses it
    locally until the wait is over."""
    counting = CountingRedis(clients[0])
    limiter = RedisLimiter(counting, reactor, fail_open=True)
    await limiter.admit("carol", Limits(rpm=1), 0)
    assert isinstance(await limiter.admit("carol", Limits(rpm=1), 0), Refusal)
    for _ in range(5):
        refusal = await limiter.admit("carol", Limits(rpm=1), 0)
        assert isinstance(refusal, Refusal) and 0 < refusal.wait <= 60
    assert counting.calls == 2


@pytest.mark.parametrize("fail_open", [True, False], ids=["open", "closed"])
@pytest_twisted.ensureDeferred
async def test_redis_down_applies_the_policy_until_it_is_back(
    redis: RedisServer, clients: list[Any], fail_open: bool
) -> None:
    """Redis stopped: ``open`` admits (no limit figures), ``closed`` refuses, with one
    warning for the outage; once Redis is back the limits hold again."""
    [limiter, _] = limiters(clients, fail_open=fail_open)
    limits = Limits(rpm=1)
    assert isinstance(await limiter.admit("dave", limits, 0), RedisAdmission)
    redis.stop()
    with capturedLogs() as events:
        outcomes = [await limiter.admit("dave", limits, 0) for _ in range(3)]
    if fail_open:
        assert all(o.headers == [] for o in outcomes if not isinstance(o, Unavailable))
        assert not any(isinstance(o, (Unavailable, Refusal)) for o in outcomes)
    else:
        assert all(isinstance(o, Unavailable) for o in outcomes)
    assert [e["log_level"].name for e in events if "Redis failed" in e.get("log_format", "")] == [
        "warn"
    ]
    assert limiter.errors >= 3
    await redis.start()

    async def answers() -> bool:
        return isinstance(await limiter.admit("erin", limits, 0), RedisAdmission)

    deadline = reactor.seconds() + 10
    while not await answers():
        assert reactor.seconds() < deadline, "Redis did not come back"
        await sleep(0.2)
    assert isinstance(await limiter.admit("erin", limits, 0), Refusal)


@pytest_twisted.ensureDeferred
async def test_two_proxies_on_one_redis_hold_one_limit_together(
    redis: RedisServer, upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Two aiproxy instances with the same key file and ``REDIS_URL``: Alice's RPM 3 is
    three requests in all, alternating between them; the fourth and later get ``429``."""
    key = new_key()
    path = str(tmp_path / "keys.toml")
    replace_key_file(path, [{"id": "alice", "sha256": key_digest(key), "rpm": 3}])
    proxies = [
        start_proxy(upstream.url, access_keys_file=path, redis_url=redis.url) for _ in range(2)
    ]
    statuses = []
    for n in range(6):
        response = await raw_exchange(
            proxies[n % 2].port,
            b"GET /v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\n\r\n",
        )
        statuses.append(response.status)
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert upstream.stats.requests == 3
    health = await raw_exchange(proxies[0].port, b"GET /api/health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert health.json()["redis"] == "reachable"


async def _statuses(ports: list[int], key: str, count: int) -> list[int]:
    """``count`` requests with ``key``, taking the ports in turn; their statuses."""
    statuses = []
    for n in range(count):
        response = await raw_exchange(
            ports[n % len(ports)],
            b"GET /v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nConnection: close\r\n\r\n",
        )
        statuses.append(response.status)
    return statuses


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_processes_and_workers_on_one_redis_hold_one_limit(
    redis: RedisServer, upstream: Upstream, tmp_path: Path
) -> None:
    """Two ``twist aiproxy`` processes, and then one with ``--workers 2``, each sharing
    one Redis: a key's RPM 4 is four requests in all, not four per process."""
    key = new_key()
    path = str(tmp_path / "keys.toml")
    replace_key_file(path, [{"id": "alice", "sha256": key_digest(key), "rpm": 4}])
    env = {"ACCESS_KEYS_FILE": path, "REDIS_URL": redis.url}
    pair = [TwistProcess.start(upstream.url, tmp_path, env=env) for _ in range(2)]
    try:
        for process in pair:
            await process.wait_ready()
        statuses = await _statuses([p.port for p in pair], key, 8)
    finally:
        for process in pair:
            await process.stop()
    assert sorted(statuses) == [200] * 4 + [429] * 4

    second = new_key()
    replace_key_file(path, [{"id": "bob", "sha256": key_digest(second), "rpm": 4}])
    workers = TwistProcess.start(upstream.url, tmp_path, "--workers", "2", env=env)
    try:
        await workers.wait_ready()
        statuses = await _statuses([workers.port], second, 8)
    finally:
        await workers.stop()
    assert sorted(statuses) == [200] * 4 + [429] * 4
    assert "Traceback" not in workers.whole_log()
