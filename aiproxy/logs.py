"""
Log output for ``twist aiproxy``: text lines for people, JSON lines for machines.

These observers replace ``twist``'s own file observers (same choice: text on a terminal,
JSON otherwise, or what ``twist --log-format`` says) because aiproxy logs two lines per
request: twisted's generic observers cost about as much CPU per line as proxying the
request. The text format is the product's documented one::

    2025-11-21 10:30:45 - aiproxy - INFO - Request started: POST /api/chat [...]

A JSON line carries ``time``, ``level``, ``logger`` and ``message``, plus the event's
named fields (``method``, ``path``, ``status``, ``request_id``...).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import usage
from zope.interface import implementer

__all__ = [
    "format_message",
    "json_log_observer",
    "text_log_observer",
    "use_aiproxy_logging",
]

LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

_ENCODER = json.JSONEncoder(default=repr)

# Keys of twisted.python.log's legacy events that duplicate the structured ones.
_LEGACY_KEYS = frozenset({"message", "format", "time", "system", "isError", "why", "failure"})


def format_message(event: LogEvent) -> str:
    """The event's message, with the traceback of its failure if it has one."""
    text = None
    log_format = event.get("log_format")
    if log_format is not None:
        try:
            text = log_format.format_map(event)
        except Exception:
            text = None
    if text is None:
        text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    return text


class _SecondStamp:
    """Formats a time to the second, reusing the last result within the same second."""

    def __init__(self, pattern: str, convert: Callable[[float], time.struct_time]) -> None:
        self._pattern = pattern
        self._convert = convert
        self._second = -1
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self._pattern, self._convert(second))
        return self._text


def _text_line(stamp: _SecondStamp) -> Callable[[LogEvent], str]:
    def render(event: LogEvent) -> str:
        level = LEVEL_NAMES.get(event.get("log_level"), "INFO")
        namespace = event.get("log_namespace", "-")
        when = stamp(event.get("log_time") or time.time())
        return f"{when} - {namespace} - {level} - {format_message(event)}\n"

    return render


def _json_line(stamp: _SecondStamp) -> Callable[[LogEvent], str]:
    def render(event: LogEvent) -> str:
        when = event.get("log_time") or time.time()
        record: dict[str, Any] = {
            "time": f"{stamp(when)}.{int(when % 1 * 1000):03d}Z",
            "level": LEVEL_NAMES.get(event.get("log_level"), "INFO"),
            "logger": event.get("log_namespace", "-"),
            "message": format_message(event),
        }
        for key, value in event.items():
            if key[:4] != "log_" and key not in _LEGACY_KEYS and key not in record:
                record[key] = value
        return _ENCODER.encode(record) + "\n"

    return render


@implementer(ILogObserver)
class _LineObserver:
    def __init__(self, out: IO[str], render: Callable[[LogEvent], str]) -> None:
        self._out = out
        self._render = render

    def __call__(self, event: LogEvent) -> None:
        self._out.write(self._render(event))
        self._out.flush()


def text_log_observer(out: IO[str]) -> ILogObserver:
    """An observer writing ``date time - logger - LEVEL - message`` lines to ``out``."""
    return _LineObserver(out, _text_line(_SecondStamp("%Y-%m-%d %H:%M:%S", time.localtime)))


def json_log_observer(out: IO[str]) -> ILogObserver:
    """An observer writing one JSON object per line to ``out``; times are in UTC."""
    return _LineObserver(out, _json_line(_SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)))


def use_aiproxy_logging(options: usage.Options, level: LogLevel) -> None:
    """
    Make ``twist`` log with aiproxy's observers, at ``level`` (from ``LOG_LEVEL``).

    ``twist``'s own ``--log-level`` wins when it was set to something other than its
    default; ``--log-format`` still chooses between text and JSON.
    """
    parent = getattr(options, "parent", None)
    if parent is None or "logLevel" not in parent:
        return
    if parent["logLevel"] == type(parent).defaultLogLevel:
        parent["logLevel"] = level
    factory = parent.get("fileLogObserverFactory")
    if factory is jsonFileLogObserver:
        parent["fileLogObserverFactory"] = json_log_observer
    elif factory is textFileLogObserver:
        parent["fileLogObserverFactory"] = text_log_observer
