"""aiproxy's logger emits exactly the events twisted.logger's ``Logger`` does."""

from __future__ import annotations

from twisted.logger import LogEvent, Logger, LogLevel, LogPublisher

from aiproxy.ops.logger import ProxyLogger


def _events(logger_class: type[Logger], level: object) -> list[LogEvent]:
    events: list[LogEvent] = []
    logger = logger_class(namespace="aiproxy", observer=LogPublisher(events.append))
    logger.emit(level, "Request started: {path}", path="/v1/models")  # type: ignore[arg-type]
    return events


def test_events_are_those_of_twisted_logger() -> None:
    """Every key and value but the time (and the logger itself) is the same."""

    def comparable(event: LogEvent) -> dict[str, object]:
        return {k: v for k, v in event.items() if k not in ("log_time", "log_logger")}

    [ours] = _events(ProxyLogger, LogLevel.info)
    [theirs] = _events(Logger, LogLevel.info)
    assert comparable(ours) == comparable(theirs)
    assert isinstance(ours["log_logger"], ProxyLogger)
    assert isinstance(ours["log_time"], float)


def test_an_invalid_level_is_reported_as_twisted_does() -> None:
    """A level that is not a ``LogLevel`` gives Twisted's critical event, not a line."""
    [ours] = _events(ProxyLogger, "loud")
    [theirs] = _events(Logger, "loud")
    assert ours["log_level"] is theirs["log_level"] is LogLevel.critical
    assert ours["log_format"] == theirs["log_format"]
