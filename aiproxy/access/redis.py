"""
Per-key limits shared through Redis, so that they hold across worker processes and
across replicas: the same GCRA as :mod:`aiproxy.access.memory`, run by one atomic Lua
script per check with Redis's own clock (``TIME``).

Each key's state lives under keys with a hash tag (``aiproxy:{alice}:rpm``), so one
Redis Cluster slot holds all of it: one theoretical arrival time per limit (expiring
when it is paid off) and a sorted set of the requests in flight (each one's lease ends
after :data:`LEASE` seconds, should its process die before it ends). Keys known to be
over a limit are remembered locally until their wait is over, which spares a round
trip per refused request. When Redis does not answer within :data:`REDIS_TIMEOUT`,
``RATE_LIMIT_ON_REDIS_ERROR`` decides: ``open`` admits (with a warning, once per
outage), ``closed`` refuses.
"""

from __future__ import annotations

from random import getrandbits
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from aiproxy.access.limits import (
    CONCURRENT,
    DAILY_TOKENS,
    REQUESTS,
    TOKENS,
    KeyLimits,
    Refusal,
    rate_limit_headers,
)
from aiproxy.core.interfaces import RawHeaders
from aiproxy.ops.logger import log

__all__ = [
    "LEASE",
    "REDIS_TIMEOUT",
    "RedisAdmission",
    "RedisClient",
    "RedisLimiter",
    "Unavailable",
    "redis_client",
]

REDIS_TIMEOUT = 0.5
"""Seconds a limit check may wait for Redis before the failure policy applies."""

LEASE = 3600
"""Seconds a request counts as in flight at most, should its process never end it."""

_KINDS = (REQUESTS, TOKENS, DAILY_TOKENS, CONCURRENT)

# KEYS: requests TAT, tokens TAT, daily tokens TAT, requests in flight (sorted set).
# ARGV: rpm, tpm, tpd, concurrent (0: none), tokens, request ID, lease seconds.
# Returns {0, kind, limit, used, requested, wait} or
# {1, requests remaining, requests reset, tokens remaining, tokens reset, tpm cost,
#  tpd cost}; waits and resets in seconds, as strings (Redis truncates Lua numbers).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local concurrent = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
if concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[7]))
  local n = redis.call('ZCARD', KEYS[4])
  if n >= concurrent then
    return {0, 4, concurrent, n, 1, '1'}
  end
end
local limits = {
  {tonumber(ARGV[1]), 60, 1, KEYS[1]},
  {tonumber(ARGV[2]), 60, tokens, KEYS[2]},
  {tonumber(ARGV[3]), 86400, tokens, KEYS[3]},
}
local new = {}
local figures = {0, '0', 0, '0', 0, 0}
for i, l in ipairs(limits) do
  local limit, period, cost, key = l[1], l[2], l[3], l[4]
  if limit > 0 then
    if cost > limit then cost = limit end
    local interval = period / limit
    local tat = tonumber(redis.call('GET', key)) or now
    local base = math.max(tat, now)
    local new_tat = base + cost * interval
    local ahead = new_tat - now - period
    local owed = new_tat - now
    if ahead > 1e-9 then
      owed = base - now
    end
    local remaining = math.floor((period - owed) / interval + 1e-9)
    remaining = math.max(0, math.min(limit, remaining))
    if ahead > 1e-9 then
      return {0, i, limit, limit - remaining, cost, string.format('%.6f', ahead)}
    end
    new[#new + 1] = {key, new_tat, owed}
    if i == 1 then
      figures[1] = remaining; figures[2] = string.format('%.6f', owed)
    elseif i == 2 then
      figures[3] = remaining; figures[4] = string.format('%.6f', owed); figures[5] = cost
    else
      figures[6] = cost
    end
  end
end
for _, n in ipairs(new) do
  redis.call('SET', n[1], string.format('%.6f', n[2]), 'PX', math.ceil(n[3] * 1000) + 1000)
end
if concurrent > 0 then
  redis.call('ZADD', KEYS[4], now, ARGV[6])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[7]))
end
return {1, figures[1], figures[2], figures[3], figures[4], figures[5], figures[6]}
"""

# KEYS: tokens TAT, daily tokens TAT, requests in flight.
# ARGV: tpm, tpd, tpm reserved, tpd reserved, tokens used, request ID.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local used = tonumber(ARGV[5])
local limits = {
  {tonumber(ARGV[1]), 60, tonumber(ARGV[3]), KEYS[1]},
  {tonumber(ARGV[2]), 86400, tonumber(ARGV[4]), KEYS[2]},
}
for _, l in ipairs(limits) do
  local limit, period, reserved, key = l[1], l[2], l[3], l[4]
  if limit > 0 and reserved > 0 and used ~= reserved then
    local tat = tonumber(redis.call('GET', key)) or now
    local new_tat = tat + (used - reserved) * period / limit
    if new_tat > now then
      redis.call('SET', key, string.format('%.6f', new_tat), 'PX',
                 math.ceil((new_tat - now) * 1000) + 1000)
    else
      redis.call('DEL', key)
    end
  end
end
redis.call('ZREM', KEYS[3], ARGV[6])
return 1
"""


def redis_client(url: str) -> RedisClient:
    """
    A ``txredisapi`` connection pool for ``url`` (``redis://[:password@]host[:port][/db]``
    or ``rediss://`` for TLS) that connects lazily and reconnects by itself.
    """
    import txredisapi

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("REDIS_URL must look like redis://host:port/0")
    database = parts.path.strip("/")
    client: RedisClient = txredisapi.lazyConnectionPool(
        parts.hostname,
        parts.port or 6379,
        dbid=int(database) if database else None,
        poolsize=4,
        reconnect=True,
        password=unquote(parts.password) if parts.password else None,
        ssl_context_factory=parts.scheme == "rediss",
        connectTimeout=REDIS_TIMEOUT * 4,
    )
    return client


class RedisClient(Protocol):
    """What the limiter uses of a Redis client (``txredisapi``'s connections)."""

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run a Lua script (by its SHA-1 once Redis knows it)."""

    def disconnect(self) -> Deferred[Any]:
        """Close the connections."""


@attrs.frozen
class Unavailable:
    """Redis did not answer and ``RATE_LIMIT_ON_REDIS_ERROR`` is ``closed``."""

    reason: str


def _keys(key_id: str) -> list[str]:
    tag = f"aiproxy:{{{key_id}}}"
    return [f"{tag}:rpm", f"{tag}:tpm", f"{tag}:tpd", f"{tag}:inflight"]


@attrs.define(eq=False)
class RedisAdmission:
    """A request admitted by Redis; settling it runs one more script, unwaited."""

    _limiter: RedisLimiter
    _key_id: str
    _limits: KeyLimits
    _request_id: str
    _reserved: tuple[int, int]
    headers: RawHeaders
    _open: bool = True

    def settle(self, used_tokens: int | None) -> None:
        """The response ended having used ``used_tokens`` (L{None}: as reserved)."""
        self._end(used_tokens)

    def release(self) -> None:
        """The upstream was never reached: give back the tokens reserved."""
        self._end(0)

    def _end(self, used_tokens: int | None) -> None:
        if not self._open:
            return
        self._open = False
        tpm_cost, tpd_cost = self._reserved
        limits = self._limits
        if not (tpm_cost or tpd_cost or limits.concurrent):
            return
        used = max(tpm_cost, tpd_cost) if used_tokens is None else used_tokens
        keys = _keys(self._key_id)
        args = [
            limits.tpm or 0,
            limits.tpd or 0,
            tpm_cost,
            tpd_cost,
            used,
            self._request_id,
        ]
        self._limiter.run(SETTLE, [keys[1], keys[2], keys[3]], args).addErrback(
            self._limiter.failed
        )


@attrs.define(eq=False)
class _Admitted:
    """An admission made without Redis (``open`` policy): no figures, nothing to settle."""

    headers: RawHeaders = attrs.Factory(list)

    def settle(self, used_tokens: int | None) -> None:
        """Nothing was reserved."""

    def release(self) -> None:
        """Nothing was reserved."""


class RedisLimiter:
    """
    Every key's limits, shared by every process that uses the same Redis.

    @param redis: a connected (or reconnecting) Redis client.
    @param clock: the clock of the local cache and of the timeout.
    @param fail_open: admit when Redis fails (``RATE_LIMIT_ON_REDIS_ERROR=open``).
    """

    def __init__(self, redis: RedisClient, clock: IReactorTime, *, fail_open: bool) -> None:
        self.redis = redis
        self.clock = clock
        self.fail_open = fail_open
        self.errors = 0
        self.answered: bool | None = None
        """Whether Redis answered the last check; L{None} before the first."""
        self._over: dict[str, tuple[float, Refusal]] = {}
        self._failing = False

    def admit(
        self, key_id: str, limits: KeyLimits, tokens: int
    ) -> Deferred[RedisAdmission | _Admitted | Refusal | Unavailable]:
        """Admit one request of ``key_id`` that may use ``tokens``, or say why not."""
        request_id = f"{getrandbits(64):016x}"  # its lease among the key's requests in flight
        known = self._over.get(key_id)
        if known is not None:
            until, refusal = known
            now = self.clock.seconds()
            if now < until:
                return succeed(attrs.evolve(refusal, wait=until - now))
            del self._over[key_id]
        args = [
            limits.rpm or 0,
            limits.tpm or 0,
            limits.tpd or 0,
            limits.concurrent or 0,
            tokens,
            request_id,
            LEASE,
        ]
        d = self.run(ADMIT, _keys(key_id), args)
        d.addCallback(self._answer, key_id, limits, request_id)
        d.addErrback(self._unanswered)
        return d

    def close(self) -> Deferred[None]:
        """Close the connections to Redis."""
        return maybeDeferred(self.redis.disconnect)

    def run(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run ``script``, failing with a timeout after :data:`REDIS_TIMEOUT`."""
        d = self.redis.eval(script, keys, args)
        d.addTimeout(REDIS_TIMEOUT, self.clock)
        return d

    def _answer(
        self, reply: list[Any], key_id: str, limits: KeyLimits, request_id: str
    ) -> RedisAdmission | Refusal:
        self._recovered()
        if int(reply[0]) == 0:
            _, kind, limit, used, requested, wait = reply
            refusal = Refusal(
                _KINDS[int(kind) - 1], int(limit), int(used), int(requested), float(wait)
            )
            if refusal.kind in (REQUESTS, DAILY_TOKENS):
                self._over[key_id] = (self.clock.seconds() + refusal.wait, refusal)
            return refusal
        _, rpm_left, rpm_reset, tpm_left, tpm_reset, tpm_cost, tpd_cost = reply
        headers = rate_limit_headers(
            (limits.rpm, int(rpm_left), float(rpm_reset)) if limits.rpm else None,
            (limits.tpm, int(tpm_left), float(tpm_reset)) if limits.tpm else None,
        )
        return RedisAdmission(
            self, key_id, limits, request_id, (int(tpm_cost), int(tpd_cost)), headers
        )

    def _unanswered(self, reason: Failure) -> _Admitted | Unavailable:
        self.failed(reason)
        if self.fail_open:
            return _Admitted()
        return Unavailable("the rate limiter's Redis did not answer")

    def state(self) -> str:
        """What ``/api/health`` says of Redis: ``reachable``, ``unreachable`` or ``unused``."""
        if self.answered is None:
            return "unused"
        return "reachable" if self.answered else "unreachable"

    def failed(self, reason: Failure) -> None:
        """Count a Redis failure; warn at the first of an outage."""
        self.errors += 1
        self.answered = False
        if not self._failing:
            self._failing = True
            policy = "admitting" if self.fail_open else "refusing"
            log.warn(
                "Redis failed for the rate limits ({error}); {policy} requests until it answers",
                error=reason.getErrorMessage(),
                policy=policy,
            )

    def _recovered(self) -> None:
        self.answered = True
        if self._failing:
            self._failing = False
            log.info("Redis answers again; rate limits are shared again")
