"""
The logger every aiproxy module logs with: twisted.logger's ``Logger``, minus the
check of each event's level against every ``LogLevel`` (a sort of all the levels, on
every event: about as much CPU as the rest of ``emit``, twice per request).
"""

from __future__ import annotations

from time import time
from typing import Any

from twisted.logger import Logger, LogLevel

__all__ = ["ProxyLogger", "log"]

_LEVELS = frozenset(LogLevel.iterconstants())


class ProxyLogger(Logger):
    """A ``Logger`` whose :meth:`emit` checks the level by one set lookup."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        """Emit an event, as ``Logger.emit`` does; an invalid level is reported as it does."""
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        event: dict[str, Any] = kwargs
        event.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time(),
        )
        trace = event.get("log_trace")
        if trace is not None:
            trace.append((self, self.observer))
        self.observer(event)


log = ProxyLogger(namespace="aiproxy")
"""aiproxy's logger: its lines are in the ``aiproxy`` namespace."""
