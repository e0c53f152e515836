"""The services that start and stop aiproxy: the upstream pool's, and their ordering."""

from __future__ import annotations

from typing import Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred

from aiproxy.core.handler import ProxyCore
from aiproxy.ops.logger import log

__all__ = ["CoreService", "PoolService", "SequentialMultiService"]


class Pools(Protocol):
    """Connection pools: one (``UpstreamClient``) or one per upstream (``Routes``)."""

    def close(self) -> Deferred[None]:
        """Close every idle connection and take no more requests."""


class PoolService(Service):
    """Closes the upstream connection pools when the application stops."""

    def __init__(self, pool: Pools) -> None:
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        """Close every pooled connection; fires when they are closed."""
        super().stopService()
        return self.pool.close()


class CoreService(Service):
    """Stops the proxy core's timers, and closes its limiter's connections, when the
    application stops."""

    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def stopService(self) -> Deferred[None] | None:
        """Stop the idle sweeps; close the limiter (its Redis connections)."""
        super().stopService()
        core = self.core
        core.idle_sweep.stop()
        core.tunnels.stop()
        limiter = core.limiter
        return None if limiter is None else limiter.close()


class SequentialMultiService(MultiService):
    """
    A ``MultiService`` that stops its services one after another, the last added
    first, each once the one added after it has finished stopping.

    Twisted's ``MultiService`` stops them all at once; aiproxy's upstream pool may only
    close once the drain of client connections is over.
    """

    def stopService(self) -> Deferred[None]:
        """Stop each service in turn; a failure is logged and the next one stopped."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_each())

    async def _stop_each(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("{service} failed to stop", service=service)
