"""How a failed upstream request becomes a status and a JSON error body."""

from __future__ import annotations

import json

import pytest
from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from aiproxy.errors import (
    BadRequestTarget,
    InternalError,
    MethodNotAllowed,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    describe_exception,
    error_body,
    upstream_error,
)


def failure_of(exception: BaseException) -> Failure:
    try:
        raise exception
    except BaseException:
        return Failure()


@pytest.mark.parametrize(
    ("exception", "message"),
    [
        (
            neterror.ConnectionRefusedError(),
            "cannot connect to the upstream: ConnectionRefusedError",
        ),
        (neterror.ConnectError("boom"), "cannot connect to the upstream: ConnectError"),
        (neterror.DNSLookupError("no.such.host"), "cannot connect to the upstream: DNSLookupError"),
        (neterror.TimeoutError(), "cannot connect to the upstream: TimeoutError"),
        (
            SSL.Error([("SSL routines", "", "certificate verify failed")]),
            "cannot connect to the upstream: Error: ",
        ),
        (
            ResponseNeverReceived([failure_of(neterror.ConnectionDone())]),
            "the upstream failed before responding: ConnectionDone",
        ),
        (
            ResponseFailed([failure_of(neterror.ConnectionLost())]),
            "the upstream failed before responding: ConnectionLost",
        ),
        (neterror.ConnectionLost(), "the upstream failed before responding: ConnectionLost"),
        (CancelledError(), "the upstream failed before responding: CancelledError"),
    ],
    ids=[
        "refused",
        "connect-error",
        "dns",
        "connect-timeout",
        "tls",
        "never-received",
        "failed",
        "lost",
        "cancelled",
    ],
)
def test_network_failures_are_502_upstream_unreachable(exception: Exception, message: str) -> None:
    """Connection, DNS, connect-timeout, TLS and exchange failures answer 502 with the cause."""
    error = upstream_error(failure_of(exception))
    assert isinstance(error, UpstreamUnreachable)
    assert (error.status, error.type) == (502, "upstream_unreachable")
    assert error.message.startswith(message)


def test_connection_refused_message_names_the_cause() -> None:
    """The 502 message says why the upstream could not be reached."""
    error = upstream_error(failure_of(neterror.ConnectionRefusedError()))
    assert "ConnectionRefusedError" in error.message


def test_wrapped_reasons_are_described() -> None:
    """Twisted's lists of reasons are unwrapped into the message."""
    exception = ResponseNeverReceived([failure_of(neterror.ConnectionLost("reset by peer"))])
    assert "ConnectionLost" in upstream_error(failure_of(exception)).message


@pytest.mark.parametrize(
    "error",
    [
        UpstreamTimeout("the upstream sent no response headers within 5s"),
        BadRequestTarget("nope"),
        MethodNotAllowed("no CONNECT"),
        UpstreamUnreachable("already decided"),
    ],
)
def test_proxy_errors_pass_through(error: ProxyError) -> None:
    """An error aiproxy already decided on (such as its own timeout) is answered as is."""
    assert upstream_error(failure_of(error)) is error


@pytest.mark.parametrize("exception", [ValueError("bug"), KeyError("k"), ZeroDivisionError()])
def test_other_exceptions_are_500_internal_error(exception: Exception) -> None:
    """Anything unexpected is a 500 internal_error that reveals nothing of the bug."""
    error = upstream_error(failure_of(exception))
    assert isinstance(error, InternalError)
    assert (error.status, error.type) == (500, "internal_error")
    assert error.message == "aiproxy failed to handle this request"


@pytest.mark.parametrize(
    ("error_class", "status", "error_type"),
    [
        (ProxyError, 500, "internal_error"),
        (InternalError, 500, "internal_error"),
        (BadRequestTarget, 400, "invalid_request_target"),
        (MethodNotAllowed, 405, "method_not_allowed"),
        (UpstreamUnreachable, 502, "upstream_unreachable"),
        (UpstreamTimeout, 504, "upstream_timeout"),
    ],
)
def test_each_error_has_its_status_and_type(
    error_class: type[ProxyError], status: int, error_type: str
) -> None:
    """Each error class carries the HTTP status and machine-readable type sent to clients."""
    assert (error_class.status, error_class.type) == (status, error_type)


def test_error_body_is_json_with_type_message_and_request_id() -> None:
    """The error body is {"error": {"type", "message", "request_id"}}."""
    body = error_body(UpstreamTimeout("no headers within 5s"), b"req-42")
    assert json.loads(body) == {
        "error": {
            "type": "upstream_timeout",
            "message": "no headers within 5s",
            "request_id": "req-42",
        }
    }


def test_error_body_survives_odd_bytes_in_the_request_id() -> None:
    """A request ID that is not ASCII still gives valid JSON."""
    document = json.loads(error_body(InternalError("x"), b"\xff\xfe"))
    assert document["error"]["request_id"] == "\ufffd\ufffd"


@pytest.mark.parametrize(
    ("exception", "description"),
    [
        (ValueError("bad thing"), "ValueError: bad thing"),
        (neterror.ConnectionDone(), "ConnectionDone: Connection was closed cleanly."),
        (CancelledError(), "CancelledError"),
        (
            ResponseNeverReceived([failure_of(ValueError("a")), failure_of(KeyError("b"))]),
            "ValueError: a; KeyError: 'b'",
        ),
        (
            ValueError("GET http://h/v1?api_key=sk-proj-0123456789abcdefXYZ failed"),
            "ValueError: GET http://h/v1?api_key=[REDACTED] failed",
        ),
    ],
)
def test_describe_exception(exception: BaseException, description: str) -> None:
    """Exceptions are described on one line, with twisted's reason lists unwrapped and
    secrets redacted."""
    assert describe_exception(exception) == description
