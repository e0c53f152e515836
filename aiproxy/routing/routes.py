"""
Where the attempts of a request go: :class:`Route`, one upstream as the core reaches it,
and :class:`Routes`, the upstreams of ``UPSTREAMS_FILE`` in use (the router that chooses
among them, and one connection pool per upstream), replaced whole when the file is
reloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import cast

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime

from aiproxy.config import Config
from aiproxy.core.interfaces import UpstreamClient
from aiproxy.ops.logger import log
from aiproxy.routing.choose import Choice, Router
from aiproxy.routing.upstreams import (
    UpstreamEntry,
    UpstreamsFileError,
    configured_upstreams,
    read_upstreams,
)
from aiproxy.rules.target import Target
from aiproxy.upstream.pool import UpstreamPool

__all__ = ["Route", "Routes", "host_header", "upstream_routes"]


def host_header(target: Target) -> bytes:
    """The ``Host`` header for ``target``: its host, and its port unless the default."""
    return target.origin.partition(b"://")[2]


@attrs.frozen
class Route:
    """
    One upstream as requests reach it.

    @ivar client: the connection pool its requests go through.
    @ivar host: the ``Host`` header of its requests.
    """

    target: Target
    client: UpstreamClient
    host: bytes

    @classmethod
    def to(cls, target: Target, client: UpstreamClient) -> Route:
        """The route to ``target`` through ``client``."""
        return cls(target, client, host_header(target))


class Routes:
    """
    The upstreams of ``UPSTREAMS_FILE`` in use.

    Reloading (:meth:`reload`) builds a new :class:`Router`, so health starts afresh
    (a disabled key is usable again); an upstream whose URL and connection limit are
    unchanged keeps its pool and its kept-alive connections, the pools of the others
    close (their requests in flight finish first).

    @param pool_for: makes the connection pool of an upstream.
    @param pick: a number in ``[0, 1)`` for each random pick (injected for tests).
    """

    def __init__(
        self,
        path: str,
        entries: Sequence[UpstreamEntry],
        clock: IReactorTime,
        pool_for: Callable[[UpstreamEntry], UpstreamClient],
        pick: Callable[[], float] = random.random,
    ) -> None:
        self.path = path
        self._clock = clock
        self._pool_for = pool_for
        self._pick = pick
        self.routes: dict[str, Route] = {}
        self.router = Router((), clock, pick)
        self.reads_model = False  # whether the model can change the choice
        self._use(entries)

    def route(self, choice: Choice) -> Route:
        """The route of the upstream ``choice`` names (made by the router in use)."""
        return self.routes[choice.upstream.name]

    def reload(self) -> None:
        """Read the file and use its upstreams from now on; if it is invalid, warn and
        keep those in use."""
        try:
            entries = read_upstreams(self.path)
        except UpstreamsFileError as e:
            log.warn("Upstreams not reloaded, the previous ones stay in use: {error}", error=str(e))
            return
        for pool in self._use(entries):
            pool.close()
        log.info(
            "Upstreams reloaded from {path}: {names}",
            path=self.path,
            names=", ".join(entry.name for entry in entries),
        )

    def close(self) -> Deferred[None]:
        """Close every pool; fires when their idle connections are closed."""
        closing = gatherResults([route.client.close() for route in self.routes.values()])
        return closing.addCallback(lambda _: None)

    def _use(self, entries: Sequence[UpstreamEntry]) -> list[UpstreamClient]:
        """Use ``entries`` from now on; the pools no longer used."""
        old = self.routes
        before = {entry.name: entry for entry in self.router.upstreams}
        routes: dict[str, Route] = {}
        for entry in entries:
            was = before.get(entry.name)
            if was is not None and _same_pool(was, entry):
                routes[entry.name] = old[entry.name]
            else:
                routes[entry.name] = Route.to(entry.target, self._pool_for(entry))
        self.routes = routes
        self.router = Router(entries, self._clock, self._pick)
        # One upstream serving every model: the model does not change the choice.
        self.reads_model = len(entries) > 1 or any(entry.models for entry in entries)
        kept_pools = {id(route.client) for route in routes.values()}
        return [route.client for route in old.values() if id(route.client) not in kept_pools]


def _same_pool(was: UpstreamEntry, entry: UpstreamEntry) -> bool:
    """Whether ``entry`` can keep the pool of ``was``: the same URL and limit."""
    return (was.target, was.max_connections) == (entry.target, entry.max_connections)


def upstream_routes(config: Config, reactor: object) -> Routes | None:
    """
    The routes of ``config``'s ``UPSTREAMS_FILE``, one :class:`UpstreamPool` per
    upstream (with ``CONNECT_TIMEOUT``, ``SSL_VERIFY`` and its ``max_connections``);
    L{None} when it is not set.

    @param reactor: what the pools connect with and time on (``IReactorTCP``,
        ``IReactorTime``).
    @raise ConfigError: the file cannot be used (see :func:`configured_upstreams`).
    """
    if not config.upstreams_file:
        return None

    def pool_for(upstream: UpstreamEntry) -> UpstreamClient:
        return UpstreamPool(
            reactor,
            upstream.target,
            connect_timeout=config.connect_timeout,
            ssl_verify=config.ssl_verify,
            max_connections=upstream.max_connections,
        )

    clock = cast(IReactorTime, reactor)
    return Routes(config.upstreams_file, configured_upstreams(config), clock, pool_for)
