"""The service that owns the upstream connection pool."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

__all__ = ["PoolService"]


class PoolService(Service):
    """Closes the upstream connection pool when the application stops."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        """Close every pooled connection; fires when they are closed."""
        super().stopService()
        return self.pool.closeCachedConnections()
