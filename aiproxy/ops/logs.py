"""
Log output for ``twist aiproxy``: text lines for people, JSON lines for machines.

These observers replace ``twist``'s own file observers (see :func:`use_aiproxy_logging`
for which one is used) because aiproxy logs two lines per request: twisted's generic
observers cost about as much CPU per line as proxying the request. The text format is
the product's documented one::

    2025-11-21 10:30:45 - aiproxy - INFO - Request started: POST /api/chat [...]

On a terminal the level is coloured. A JSON line carries ``time``, ``level``, ``logger``
and ``message``, plus the event's named fields (``method``, ``path``, ``status``,
``request_id``...).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol

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

from aiproxy.rules.redact import redact_text

__all__ = [
    "ATOMIC_WRITE",
    "LogClock",
    "format_message",
    "json_log_observer",
    "text_log_observer",
    "use_aiproxy_logging",
    "use_colour",
]

LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

# ANSI SGR codes: debug dim, info green, warning yellow, error red, critical bold red.
_COLOURED_LEVEL_NAMES = {
    level: f"\x1b[{code}m{LEVEL_NAMES[level]}\x1b[0m"
    for level, code in (
        (LogLevel.debug, "2"),
        (LogLevel.info, "32"),
        (LogLevel.warn, "33"),
        (LogLevel.error, "31"),
        (LogLevel.critical, "1;31"),
    )
}

_ENCODER = json.JSONEncoder(default=repr)

# Keys of twisted.python.log's legacy events that duplicate the structured ones.
_LEGACY_KEYS = frozenset({"message", "format", "time", "system", "isError", "why", "failure"})


def format_message(event: LogEvent) -> str:
    """
    The event's message, with the traceback of its failure if it has one; secrets in
    the traceback (URLs' keys and passwords, key-shaped text) are redacted.
    """
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
        text = f"{text}\n{redact_text(failure.getTraceback())}"
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


def _text_line(stamp: _SecondStamp, level_names: Mapping[Any, str]) -> Callable[[LogEvent], str]:
    unknown = level_names[LogLevel.info]

    def render(event: LogEvent) -> str:
        level = level_names.get(event.get("log_level"), unknown)
        namespace = event.get("log_namespace", "-")
        when = stamp(event.get("log_time") or time.time())
        return f"{when} - {namespace} - {level} - {format_message(event)}\n"

    return render


def _json_line(stamp: _SecondStamp) -> Callable[[LogEvent], str]:
    encode = _ENCODER.encode

    def render(event: LogEvent) -> str:
        when = event.get("log_time") or time.time()
        record = {
            "time": f"{stamp(when)}.{int(when % 1 * 1000):03d}Z",
            "level": LEVEL_NAMES.get(event.get("log_level"), "INFO"),
            "logger": event.get("log_namespace", "-"),
            "message": format_message(event),
        }
        for key, value in event.items():
            if key[:4] != "log_" and key not in _SKIPPED_KEYS:
                record[key] = value
        return encode(record) + "\n"

    return render


_SKIPPED_KEYS = frozenset({"time", "level", "logger", "message"}) | _LEGACY_KEYS
"""
Keys left out of a JSON line's fields: the four every line starts with (an event field
of the same name would hide them) and twisted.python.log's legacy duplicates.
"""


class LogClock(Protocol):
    """What a line observer needs of the reactor to write lines in batches."""

    running: bool

    def callLater(self, delay: float, f: Callable[[], object], /) -> object:
        """Call ``f`` after ``delay`` seconds (0: on the next turn)."""

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], object], /) -> object:
        """Call ``f`` at ``phase`` of ``event`` (``"after"``, ``"shutdown"``)."""


ATOMIC_WRITE = 4096
"""
Bytes a batch of lines may take in one write: ``PIPE_BUF`` on Linux, the most a pipe
shared by several worker processes takes in one piece, so lines never interleave.
"""


@implementer(ILogObserver)
class _LineObserver:
    """
    Writes each event as one line. While ``reactor`` runs, lines below ``WARNING`` are
    gathered and written once per reactor turn, in writes of whole lines of at most
    :data:`ATOMIC_WRITE` bytes (a request's two lines cost no system call of their own);
    a warning or worse is written at once, after what was gathered, and whatever is
    gathered at shutdown is written then.
    """

    def __init__(
        self, out: IO[str], render: Callable[[LogEvent], str], reactor: LogClock | None
    ) -> None:
        self._out = out
        self._render = render
        self._reactor = reactor
        self._lines: list[str] = []
        self._size = 0
        if reactor is not None:
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def __call__(self, event: LogEvent) -> None:
        line = self._render(event)
        reactor = self._reactor
        if reactor is None or not reactor.running or event.get("log_level") in _AT_ONCE:
            self._lines.append(line)
            self.flush()
            return
        size = len(line) if line.isascii() else len(line.encode())
        if not self._lines:
            reactor.callLater(0, self.flush)
        elif self._size + size > ATOMIC_WRITE:
            self._write_gathered()
        self._lines.append(line)
        self._size += size

    def flush(self) -> None:
        """Write every gathered line now."""
        if self._lines:
            self._write_gathered()

    def _write_gathered(self) -> None:
        batch = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        self._out.write(batch)
        self._out.flush()


_AT_ONCE = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})


def text_log_observer(
    out: IO[str], *, colour: bool = False, reactor: LogClock | None = None
) -> ILogObserver:
    """
    An observer writing ``date time - logger - LEVEL - message`` lines to ``out``, the
    level in ANSI colour if ``colour``; in batches per turn of ``reactor``, if given
    (see :class:`_LineObserver`).
    """
    names = _COLOURED_LEVEL_NAMES if colour else LEVEL_NAMES
    stamp = _SecondStamp("%Y-%m-%d %H:%M:%S", time.localtime)
    return _LineObserver(out, _text_line(stamp, names), reactor)


def json_log_observer(out: IO[str], *, reactor: LogClock | None = None) -> ILogObserver:
    """
    An observer writing one JSON object per line to ``out``, times in UTC; in batches
    per turn of ``reactor``, if given (see :class:`_LineObserver`).
    """
    stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)
    return _LineObserver(out, _json_line(stamp), reactor)


def use_colour(out: IO[str], environ: Mapping[str, str]) -> bool:
    """
    Whether text lines written to ``out`` should be coloured: ``out`` is a terminal,
    ``NO_COLOR`` is unset or empty (https://no-color.org) and ``TERM`` is not ``dumb``.
    """
    return _is_terminal(out) and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


def use_aiproxy_logging(
    options: usage.Options,
    level: LogLevel,
    log_format: str,
    environ: Mapping[str, str],
    reactor: LogClock | None = None,
) -> tuple[LogLevel, str]:
    """
    Make ``twist`` log with aiproxy's observers, at ``level`` (from ``LOG_LEVEL``), in
    ``log_format`` (from ``LOG_FORMAT``: ``auto``, ``text`` or ``json``).

    ``twist``'s own ``--log-level`` wins when it was set to something other than its
    default. The format is chosen, first match wins, by:

    1. ``LOG_FORMAT=text`` or ``LOG_FORMAT=json``;
    2. ``twist --log-format=text|json``;
    3. ``LOG_FORMAT=auto``: text if the log file (``twist --log-file``, standard output
       by default) is a terminal, JSON otherwise.

    Text lines are coloured when :func:`use_colour` says so for the log file, whichever
    rule chose text. Given ``reactor``, lines below ``WARNING`` are written in batches,
    once per reactor turn. ``twist`` records ``--log-format`` just as it records its own
    default (text if standard output is a terminal, JSON otherwise), so a
    ``--log-format`` that names that default counts as not given. This only makes a
    difference with a ``--log-file`` other than standard output, where ``LOG_FORMAT``
    can say it instead.

    @return: the level and format chosen (``text`` or ``json``; ``log_format`` itself
        when there is no ``twist`` to configure), for worker processes to follow.
    """
    parent = getattr(options, "parent", None)
    if parent is None or "logLevel" not in parent:
        return level, log_format
    if parent["logLevel"] == type(parent).defaultLogLevel:
        parent["logLevel"] = level
    if log_format == "auto":
        log_format = _twist_log_format(parent)

    def text(out: IO[str]) -> ILogObserver:
        return text_log_observer(out, colour=use_colour(out, environ), reactor=reactor)

    def json_lines(out: IO[str]) -> ILogObserver:
        return json_log_observer(out, reactor=reactor)

    parent["fileLogObserverFactory"] = json_lines if log_format == "json" else text
    return parent["logLevel"], log_format


def _twist_log_format(parent: usage.Options) -> str:
    """``twist --log-format`` if it was given, else text on a terminal and JSON otherwise."""
    factory = parent.get("fileLogObserverFactory")
    default: Any = type(parent)()
    default.selectDefaultLogObserver()
    if factory is not default.get("fileLogObserverFactory"):
        if factory is jsonFileLogObserver:
            return "json"
        if factory is textFileLogObserver:
            return "text"
    return "text" if _is_terminal(parent["logFile"]) else "json"


def _is_terminal(out: IO[str]) -> bool:
    isatty = getattr(out, "isatty", None)
    return isatty is not None and bool(isatty())
