"""The log lines operators read: text in the product's format, JSON with named fields."""

from __future__ import annotations

import io
import json
import re

from twisted.application.twist._options import TwistOptions
from twisted.logger import (
    Logger,
    LogLevel,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from aiproxy.logs import (
    format_message,
    json_log_observer,
    text_log_observer,
    use_aiproxy_logging,
)


def _emit(observer_factory, level: LogLevel, fmt: str, **fields: object) -> str:
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


def _twist_options(*argv: str) -> TwistOptions:
    """``twist``'s options as parsed for ``twist [argv] aiproxy``."""
    options = TwistOptions()
    options.parseOptions([*argv, "aiproxy", "--target", "http://127.0.0.1:1"])
    return options


def test_log_level_applies_when_twist_was_not_told_one() -> None:
    """LOG_LEVEL sets twist's level when ``twist --log-level`` was left at its default."""
    options = _twist_options()
    use_aiproxy_logging(options.subOptions, LogLevel.warn)
    assert options["logLevel"] is LogLevel.warn


def test_twists_own_log_level_wins_when_given() -> None:
    """``twist --log-level=debug`` is kept whatever LOG_LEVEL says."""
    options = _twist_options("--log-level=debug")
    use_aiproxy_logging(options.subOptions, LogLevel.warn)
    assert options["logLevel"] is LogLevel.debug


def test_twists_log_format_choice_is_kept() -> None:
    """``--log-format=text`` gets aiproxy's text lines, ``json`` its JSON lines."""
    for flag, ours, theirs in (
        ("text", text_log_observer, textFileLogObserver),
        ("json", json_log_observer, jsonFileLogObserver),
    ):
        options = _twist_options(f"--log-format={flag}")
        assert options["fileLogObserverFactory"] is theirs
        use_aiproxy_logging(options.subOptions, LogLevel.info)
        assert options["fileLogObserverFactory"] is ours
