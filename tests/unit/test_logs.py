"""The log lines operators read: text in the product's format, JSON with named fields."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.application.twist import _options
from twisted.application.twist._options import TwistOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from aiproxy.ops.logs import (
    ATOMIC_WRITE,
    format_message,
    json_log_observer,
    text_log_observer,
    use_aiproxy_logging,
    use_colour,
)
from aiproxy.run.tap import makeService
from aiproxy.run.workers import WorkerSupervisor

KEY = "sk-live-PLANTED0123456789"
GREEN_INFO = "\x1b[32mINFO\x1b[0m"


class FakeTerminal(io.StringIO):
    """A log file that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _emit(
    observer_factory: Callable[[io.StringIO], ILogObserver],
    level: LogLevel,
    fmt: str,
    **fields: object,
) -> str:
    out = io.StringIO()
    Logger(namespace="aiproxy", observer=observer_factory(out)).emit(level, fmt, **fields)
    return out.getvalue()


def test_text_line_has_the_documented_shape() -> None:
    """A text line is ``date time - logger - LEVEL - message``."""
    line = _emit(
        text_log_observer,
        LogLevel.info,
        "Request started: {method} {path} [Client: {client}] [ID: {request_id}]",
        method="POST",
        path="/api/chat",
        client="192.0.2.1",
        request_id="abc",
    )
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - aiproxy - INFO - "
        r"Request started: POST /api/chat \[Client: 192\.0\.2\.1\] \[ID: abc\]\n",
        line,
    )


def test_text_levels_use_python_logging_names() -> None:
    """Twisted's ``warn`` level is written ``WARNING``, like Python's logging."""
    assert " - WARNING - careful\n" in _emit(text_log_observer, LogLevel.warn, "careful")


def test_json_line_carries_named_fields() -> None:
    """A JSON line has time (UTC), level, logger, the message and every named field."""
    line = _emit(
        json_log_observer,
        LogLevel.info,
        "Request completed: {method} [Status: {status}] [Time: {duration:.3f}s]",
        method="GET",
        status=200,
        duration=0.5,
    )
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "aiproxy"
    assert record["message"] == "Request completed: GET [Status: 200] [Time: 0.500s]"
    assert (record["method"], record["status"], record["duration"]) == ("GET", 200, 0.5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert not any(key.startswith("log_") for key in record)


def test_json_line_survives_values_json_cannot_encode() -> None:
    """A field JSON cannot encode is written as its repr, not dropped with the line."""
    record = json.loads(_emit(json_log_observer, LogLevel.info, "x", thing=object()))
    assert record["thing"].startswith("<object object")


def test_failures_include_the_traceback() -> None:
    """A logged failure's traceback follows its message."""
    failure = Failure(ZeroDivisionError("division by zero"))
    out = io.StringIO()
    Logger(namespace="aiproxy", observer=text_log_observer(out)).failure("boom", failure)
    assert "boom" in out.getvalue()
    assert "ZeroDivisionError" in out.getvalue()


def test_format_message_falls_back_to_twisteds_formatter() -> None:
    """Twisted's own format syntax (calling a method) still formats."""
    event = {"log_format": "{thing.upper()}", "thing": "quiet"}
    assert format_message(event) == "QUIET"


def test_failure_tracebacks_lose_secrets() -> None:
    """A key in a logged failure's message or URL does not reach the log."""
    failure = Failure(ValueError(f"bad URL https://h/v1?key={KEY} with Bearer {KEY}"))
    out = io.StringIO()
    Logger(namespace="aiproxy", observer=text_log_observer(out)).failure("boom", failure)
    assert "ValueError: bad URL https://h/v1?key=[REDACTED] with Bearer [REDACTED]" in (
        out.getvalue()
    )
    assert KEY not in out.getvalue()


def test_coloured_text_colours_only_the_level() -> None:
    """A coloured line is the plain line with its level wrapped in ANSI colour codes."""
    plain = _emit(text_log_observer, LogLevel.info, "Request started")
    coloured = _emit(lambda out: text_log_observer(out, colour=True), LogLevel.info, "x")
    assert f" - aiproxy - {GREEN_INFO} - x\n" in coloured
    assert "\x1b" not in plain


def test_each_level_has_its_colour() -> None:
    """Debug is dim, info green, warning yellow, error red, critical bold red."""
    colours = {
        LogLevel.debug: "\x1b[2mDEBUG",
        LogLevel.info: "\x1b[32mINFO",
        LogLevel.warn: "\x1b[33mWARNING",
        LogLevel.error: "\x1b[31mERROR",
        LogLevel.critical: "\x1b[1;31mCRITICAL",
    }
    for level, start in colours.items():
        line = _emit(lambda out: text_log_observer(out, colour=True), level, "x")
        assert f" - {start}\x1b[0m - x\n" in line


@pytest.mark.parametrize(
    ("out", "environ", "coloured"),
    [
        (FakeTerminal(), {}, True),
        (FakeTerminal(), {"NO_COLOR": ""}, True),
        (FakeTerminal(), {"TERM": "xterm-256color"}, True),
        (FakeTerminal(), {"NO_COLOR": "1"}, False),
        (FakeTerminal(), {"TERM": "dumb"}, False),
        (io.StringIO(), {}, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(
    out: io.StringIO, environ: dict[str, str], coloured: bool
) -> None:
    """Text is coloured on a terminal, unless NO_COLOR is set or TERM is dumb."""
    assert use_colour(out, environ) is coloured


@pytest.fixture
def twist_stdout(monkeypatch: pytest.MonkeyPatch) -> Callable[[io.StringIO], None]:
    """Sets the standard output that ``twist`` logs to by default."""

    def use(out: io.StringIO) -> None:
        monkeypatch.setattr(_options, "stdout", out)

    return use


def _twist_options(*argv: str) -> TwistOptions:
    """``twist``'s options as parsed for ``twist [argv] aiproxy``."""
    options = TwistOptions()
    options.parseOptions([*argv, "aiproxy", "--target", "http://127.0.0.1:1"])
    return options


def _log_line(options: TwistOptions, log_format: str, environ: dict[str, str] | None = None) -> str:
    """What twist writes for one INFO event once aiproxy has set up its logging."""
    use_aiproxy_logging(options.subOptions, LogLevel.info, log_format, environ or {})
    out = options["logFile"]
    observer = options["fileLogObserverFactory"](out)
    Logger(namespace="aiproxy", observer=observer).info("Request started")
    return str(out.getvalue())


def _is_json(line: str) -> bool:
    return bool(json.loads(line)["message"] == "Request started")


def _is_plain_text(line: str) -> bool:
    return line.endswith(" - aiproxy - INFO - Request started\n")


def _is_coloured_text(line: str) -> bool:
    return line.endswith(f" - aiproxy - {GREEN_INFO} - Request started\n")


def test_log_level_applies_when_twist_was_not_told_one() -> None:
    """LOG_LEVEL sets twist's level when ``twist --log-level`` was left at its default."""
    options = _twist_options()
    use_aiproxy_logging(options.subOptions, LogLevel.warn, "auto", {})
    assert options["logLevel"] is LogLevel.warn


def test_twists_own_log_level_wins_when_given() -> None:
    """``twist --log-level=debug`` is kept whatever LOG_LEVEL says."""
    options = _twist_options("--log-level=debug")
    use_aiproxy_logging(options.subOptions, LogLevel.warn, "auto", {})
    assert options["logLevel"] is LogLevel.debug


def test_auto_logs_coloured_text_on_a_terminal(twist_stdout: Callable[[io.StringIO], None]) -> None:
    """LOG_FORMAT=auto writes coloured text lines when twist logs to a terminal."""
    twist_stdout(FakeTerminal())
    assert _is_coloured_text(_log_line(_twist_options(), "auto"))


def test_auto_logs_plain_text_with_no_color(twist_stdout: Callable[[io.StringIO], None]) -> None:
    """NO_COLOR keeps the text lines on a terminal free of colour codes."""
    twist_stdout(FakeTerminal())
    assert _is_plain_text(_log_line(_twist_options(), "auto", {"NO_COLOR": "1"}))


def test_auto_logs_json_when_not_a_terminal(twist_stdout: Callable[[io.StringIO], None]) -> None:
    """LOG_FORMAT=auto writes JSON lines when twist's log file is not a terminal."""
    twist_stdout(io.StringIO())
    assert _is_json(_log_line(_twist_options(), "auto"))


def test_auto_follows_twists_log_file(
    twist_stdout: Callable[[io.StringIO], None], tmp_path: Path
) -> None:
    """With ``twist --log-file``, LOG_FORMAT=auto looks at that file, not the terminal."""
    twist_stdout(FakeTerminal())
    path = tmp_path / "aiproxy.log"
    options = _twist_options(f"--log-file={path}")
    use_aiproxy_logging(options.subOptions, LogLevel.info, "auto", {})
    observer = options["fileLogObserverFactory"](options["logFile"])
    Logger(namespace="aiproxy", observer=observer).info("Request started")
    options["logFile"].close()
    assert _is_json(path.read_text())


@pytest.mark.parametrize(
    ("flag", "stdout", "is_expected"),
    [
        ("json", FakeTerminal, _is_json),
        ("text", io.StringIO, _is_plain_text),
    ],
)
def test_twists_log_format_wins_over_auto(
    twist_stdout: Callable[[io.StringIO], None],
    flag: str,
    stdout: type[io.StringIO],
    is_expected: Callable[[str], bool],
) -> None:
    """``twist --log-format`` chooses the format when LOG_FORMAT is auto."""
    twist_stdout(stdout())
    assert is_expected(_log_line(_twist_options(f"--log-format={flag}"), "auto"))


@pytest.mark.parametrize(
    ("log_format", "flag", "stdout", "is_expected"),
    [
        ("json", "text", FakeTerminal, _is_json),
        ("json", None, FakeTerminal, _is_json),
        ("text", "json", io.StringIO, _is_plain_text),
        ("text", "json", FakeTerminal, _is_coloured_text),
        ("text", None, io.StringIO, _is_plain_text),
    ],
)
def test_log_format_text_or_json_wins_over_everything(
    twist_stdout: Callable[[io.StringIO], None],
    log_format: str,
    flag: str | None,
    stdout: type[io.StringIO],
    is_expected: Callable[[str], bool],
) -> None:
    """LOG_FORMAT=text or json wins over ``twist --log-format`` and the terminal check."""
    twist_stdout(stdout())
    argv = [] if flag is None else [f"--log-format={flag}"]
    assert is_expected(_log_line(_twist_options(*argv), log_format))


def test_worker_processes_log_as_twist_was_told(
    twist_stdout: Callable[[io.StringIO], None],
) -> None:
    """With ``--workers``, the level and format that twist's own options chose (not only
    LOG_LEVEL and LOG_FORMAT) reach the workers' environment."""
    twist_stdout(FakeTerminal())
    options = TwistOptions()
    options.parseOptions(
        ["--log-format=json", "--log-level=debug", "aiproxy", "--workers=2", "--port=tcp:0"]
    )
    [supervisor] = list(makeService(options.subOptions))
    assert isinstance(supervisor, WorkerSupervisor)
    assert (supervisor.env["LOG_FORMAT"], supervisor.env["LOG_LEVEL"]) == ("json", "DEBUG")


class CountingFile(io.StringIO):
    """A log file that remembers what each flush (one system call on a real file) sent."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._flushed = 0

    def flush(self) -> None:
        text = self.getvalue()
        if len(text) > self._flushed:
            self.writes.append(text[self._flushed :])
            self._flushed = len(text)


def _running_reactor() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


@pytest.mark.parametrize("observer_factory", [json_log_observer, text_log_observer])
def test_lines_of_one_reactor_turn_are_written_together(
    observer_factory: Callable[..., ILogObserver],
) -> None:
    """While the reactor runs, INFO lines wait for the end of the turn, then go out in
    one write, in order."""
    reactor = _running_reactor()
    out = CountingFile()
    log = Logger(namespace="aiproxy", observer=observer_factory(out, reactor=reactor))
    log.info("Request started: {n}", n=1)
    log.info("Request completed: {n}", n=1)
    assert out.writes == []
    reactor.advance(0)
    [write] = out.writes
    assert write.count("\n") == 2
    assert write.index("Request started") < write.index("Request completed")


def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    """A WARNING (or worse) line does not wait for the end of the turn, nor jump the
    queue."""
    reactor = _running_reactor()
    out = CountingFile()
    log = Logger(namespace="aiproxy", observer=json_log_observer(out, reactor=reactor))
    log.info("first")
    log.warn("second")
    assert [json.loads(line)["message"] for line in "".join(out.writes).splitlines()] == [
        "first",
        "second",
    ]


def test_batches_are_whole_lines_within_one_atomic_pipe_write() -> None:
    """However many lines a turn logs, each write holds whole lines and at most
    ``PIPE_BUF`` bytes, so several workers sharing one pipe never interleave lines."""
    reactor = _running_reactor()
    out = CountingFile()
    log = Logger(namespace="aiproxy", observer=json_log_observer(out, reactor=reactor))
    for n in range(200):
        log.info("Request completed: {path}", path=f"/v1/é/{'x' * (n % 90)}")
    reactor.advance(0)
    assert len(out.writes) > 1
    for write in out.writes:
        assert write.endswith("\n")
        assert len(write.encode()) <= ATOMIC_WRITE
    lines = "".join(out.writes).splitlines()
    assert [json.loads(line)["path"] for line in lines] == [
        f"/v1/é/{'x' * (n % 90)}" for n in range(200)
    ]


def test_gathered_lines_are_written_at_shutdown() -> None:
    """Lines gathered when the reactor stops are written by its shutdown, and lines
    logged once it has stopped are written at once."""
    reactor = _running_reactor()
    out = CountingFile()
    log = Logger(namespace="aiproxy", observer=text_log_observer(out, reactor=reactor))
    log.info("Stopping")
    reactor.stop()
    for trigger, args, kwargs in reactor.triggers["after"]["shutdown"]:
        trigger(*args, **kwargs)
    log.info("Main loop terminated.")
    assert len(out.writes) == 2
    assert out.writes[0].endswith("Stopping\n")
    assert out.writes[1].endswith("Main loop terminated.\n")
