"""
Choosing an upstream and a key for a request, pure, on the injected clock.

Among the upstreams that serve the request's model and are available now (see
:mod:`aiproxy.routing.health`), the lowest priority wins; within it the pick is weighted
random, or, given a sticky string (an access key's id), the same pick every time while
the same upstreams are available, so that a caller keeps one upstream key and its prompt
cache. A request that names no model (``GET /v1/models``, a file upload) goes to the
first available upstream of the lowest priority, in file order. The key of the upstream
is chosen like the upstream, among its usable keys.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from aiproxy.routing.health import (
    COOLING,
    DISABLED,
    EJECTED,
    HEALTHY,
    KeyHealth,
    UpstreamHealth,
)
from aiproxy.routing.upstreams import UpstreamEntry, UpstreamKey

__all__ = ["Choice", "NotServed", "Router", "Unavailable"]

_Candidate = tuple[UpstreamEntry, UpstreamHealth, list[UpstreamKey]]
"""An upstream that may be chosen now, its health and its usable keys."""


@attrs.frozen
class Choice:
    """Where one attempt goes: an upstream, and its key (L{None} if it has none)."""

    upstream: UpstreamEntry
    key: UpstreamKey | None


@attrs.frozen
class Unavailable:
    """Every upstream that serves the model is cooling, ejected or disabled."""

    retry_after: float
    """Seconds until the first of them may be tried again."""


@attrs.frozen
class NotServed:
    """No upstream serves the model."""

    model: str


class Router:
    """
    The upstreams of the file and their health.

    @param pick: a number in ``[0, 1)`` for each random pick (injected for tests).
    """

    def __init__(
        self,
        upstreams: Sequence[UpstreamEntry],
        clock: IReactorTime,
        pick: Callable[[], float] = random.random,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.clock = clock
        self.pick = pick
        self.health = {u.name: UpstreamHealth() for u in self.upstreams}
        self.keys = {(u.name, k.fingerprint): KeyHealth() for u in self.upstreams for k in u.keys}
        # What each choice walks through: every upstream with its health and its keys'.
        self._members = [
            (u, self.health[u.name], [(k, self.keys[u.name, k.fingerprint]) for k in u.keys])
            for u in self.upstreams
        ]
        self._by_model = any(u.models for u in self.upstreams)

    def serves(self, model: str) -> bool:
        """Whether any upstream serves ``model``, available or not."""
        return any(upstream.serves(model) for upstream in self.upstreams)

    def choose(
        self,
        model: str | None,
        *,
        sticky: str | None = None,
        tried: Collection[str] = (),
        tried_keys: Collection[str] = (),
    ) -> Choice | Unavailable | NotServed:
        """
        Where the next attempt of a request for ``model`` goes.

        @param tried: names of upstreams not to choose (the request failed there).
        @param tried_keys: fingerprints of keys not to choose (refused the request).
        """
        members = self._members
        if model is not None and self._by_model:
            members = [member for member in members if member[0].serves(model)]
            if not members:
                return NotServed(model)
        now = self.clock.seconds()
        candidates: list[_Candidate] = []
        waits: list[float] = []
        for upstream, health, key_health in members:
            if tried and upstream.name in tried:
                continue
            wait = health.available_in(now) if health.ejections else 0.0
            keys = [k for k, h in key_health if h.usable(now)]
            if key_health and not keys:
                wait = max(wait, _key_wait(key_health, now))
            elif tried_keys and key_health:
                keys = [k for k in keys if k.fingerprint not in tried_keys]
                if not keys:
                    continue  # every usable key has been tried
            if wait:
                waits.append(wait)
            else:
                candidates.append((upstream, health, keys))
        if not candidates:
            return Unavailable(min(waits) if waits else 0.0)
        if len(candidates) == 1:
            upstream, health, keys = candidates[0]
        else:
            best = min(member[0].priority for member in candidates)
            group = [member for member in candidates if member[0].priority == best]
            if model is None or len(group) == 1:
                upstream, health, keys = group[0]
            else:
                upstream, health, keys = _weighted(group, self._number(sticky, ""))
        health.sent(now)
        if len(keys) > 1:
            return Choice(upstream, keys[int(self._number(sticky, upstream.name) * len(keys))])
        return Choice(upstream, keys[0] if keys else None)

    def report(self) -> list[dict[str, object]]:
        """
        Each upstream's state now, for ``/api/health``: ``healthy``, ``cooling`` (every
        key is), ``disabled`` (every key is), ``ejected`` or ``half_open``, with the
        seconds left when it will change by itself; and each key's, by fingerprint.
        """
        now = self.clock.seconds()
        report: list[dict[str, object]] = []
        for upstream, health, key_health in self._members:
            keys = [
                _state(h.state(now), h.seconds_left(now), fingerprint=k.fingerprint)
                for k, h in key_health
            ]
            state = health.state(now)
            left = max(health.ejected_until - now, 0.0) if state == EJECTED else 0.0
            if state == HEALTHY and keys and all(k["state"] != HEALTHY for k in keys):
                wait = _key_wait(key_health, now)
                state = DISABLED if wait == float("inf") else COOLING
                left = 0.0 if state == DISABLED else wait
            report.append(_state(state, left, name=upstream.name, keys=keys))
        return report

    def _number(self, sticky: str | None, salt: str) -> float:
        if sticky is None:
            return self.pick()
        digest = hashlib.blake2b(f"{salt}\0{sticky}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    # -- what the attempt met ----------------------------------------------------------

    def answered(self, choice: Choice, status: int, wait: float | None) -> None:
        """
        The upstream answered ``status``: a ``5xx`` is a failure of the upstream, a
        ``429`` cools its key (for ``wait``, the delay it asked for, if any), a ``401``
        or ``403`` disables its key; any answer below 500 shows the upstream is up.
        """
        if status >= 500:
            self.failed(choice)
            return
        self.succeeded(choice)
        if status == 429:
            self.rate_limited(choice, wait)
        elif status in (401, 403):
            self.refused_key(choice)

    def succeeded(self, choice: Choice) -> None:
        """The upstream answered with a status below 500."""
        self.health[choice.upstream.name].succeeded()

    def failed(self, choice: Choice) -> None:
        """A connect failure, a timeout before headers, or a ``5xx``."""
        self.health[choice.upstream.name].failed(self.clock.seconds())

    def abandoned(self, choice: Choice) -> None:
        """The attempt ended with no verdict on the upstream (its client left)."""
        self.health[choice.upstream.name].abandoned()

    def rate_limited(self, choice: Choice, wait: float | None) -> None:
        """The upstream answered ``429``; ``wait`` is the delay it asked for, if any."""
        if choice.key is not None:
            self.keys[choice.upstream.name, choice.key.fingerprint].cool(self.clock.seconds(), wait)

    def refused_key(self, choice: Choice) -> None:
        """The upstream answered ``401`` or ``403``: its key is disabled."""
        if choice.key is not None:
            self.keys[choice.upstream.name, choice.key.fingerprint].disable()


def _key_wait(key_health: list[tuple[UpstreamKey, KeyHealth]], now: float) -> float:
    """Seconds until one of an upstream's keys may be used; inf if all are disabled."""
    waits = [h.seconds_left(now) for _, h in key_health if not h.disabled]
    return min(waits) if waits else float("inf")


def _state(state: str, left: float, **fields: object) -> dict[str, object]:
    document = {**fields, "state": state}
    if left:
        document["seconds_left"] = round(left, 3)
    return document


def _weighted(group: list[_Candidate], number: float) -> _Candidate:
    """The member of ``group`` that ``number`` (in ``[0, 1)``) falls on, by weight."""
    total = sum(member[0].weight for member in group)
    point = number * total
    for member in group:
        point -= member[0].weight
        if point < 0:
            return member
    return group[-1]
