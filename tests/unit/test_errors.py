"""
How a failed upstream request becomes a metrics label, a status and JSON error body, and
a retry rule: the one classification of :mod:`aiproxy.core.failures`.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import CancelledError

from aiproxy.core.failures import Retry, classify, describe
from aiproxy.errors import (
    BadRequestTarget,
    BodyTooLarge,
    InternalError,
    MethodNotAllowed,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
)
from aiproxy.upstream.errors import (
    BadResponse,
    BodyIncomplete,
    ConnectFailed,
    LostBeforeResponse,
    StaleConnection,
)


@pytest.mark.parametrize(
    ("failure", "kind", "status", "retry", "message"),
    [
        (
            ConnectFailed("Connection was refused by other side"),
            "connect",
            502,
            Retry.ALWAYS,
            "cannot connect to the upstream: Connection was refused by other side",
        ),
        (
            ConnectFailed("no address for upstream.invalid", "dns"),
            "dns",
            502,
            Retry.ALWAYS,
            "cannot connect to the upstream: no address for upstream.invalid",
        ),
        (
            ConnectFailed("certificate verify failed", "tls"),
            "tls",
            502,
            Retry.NEVER,
            "cannot connect to the upstream: certificate verify failed",
        ),
        (
            StaleConnection("closed before any response byte"),
            "connection_lost",
            502,
            Retry.ALWAYS,
            "the upstream closed the connection: closed before any response byte",
        ),
        (
            LostBeforeResponse("connection reset"),
            "connection_lost",
            502,
            Retry.IDEMPOTENT,
            "the upstream failed before responding: connection reset",
        ),
        (
            BadResponse("a control byte in the reason phrase"),
            "invalid_response",
            502,
            Retry.NEVER,
            "the upstream sent an invalid response: a control byte in the reason phrase",
        ),
        (
            UpstreamTimeout("no response headers within 5s"),
            "timeout",
            504,
            Retry.NEVER,
            "no response headers within 5s",
        ),
    ],
)
def test_upstream_failures_are_classified_in_one_place(
    failure: Exception, kind: str, status: int, retry: Retry, message: str
) -> None:
    """Each upstream failure has its metrics label, status, message and retry rule."""
    verdict = classify(failure)
    assert (verdict.kind, verdict.error.status, verdict.retry) == (kind, status, retry)
    assert verdict.error.message == message


@pytest.mark.parametrize(
    ("rule", "method", "allowed"),
    [
        (Retry.ALWAYS, b"POST", True),
        (Retry.IDEMPOTENT, b"GET", True),
        (Retry.IDEMPOTENT, b"PUT", True),
        (Retry.IDEMPOTENT, b"POST", False),
        (Retry.IDEMPOTENT, b"PATCH", False),
        (Retry.NEVER, b"GET", False),
    ],
)
def test_retry_rules_by_method(rule: Retry, method: bytes, allowed: bool) -> None:
    """A POST that may have reached the upstream is never sent twice; a GET may be."""
    assert rule.allows(method) is allowed


def test_the_clients_own_errors_are_not_the_upstreams() -> None:
    """A body refused while it streams upstream is the client's error: no upstream label."""
    verdict = classify(BodyTooLarge("the request body is larger than the limit"))
    assert (verdict.kind, verdict.error.status, verdict.retry) == (None, 413, Retry.NEVER)


def test_a_cancellation_is_never_retried() -> None:
    """A cancelled attempt (the client left) is not counted against the upstream."""
    verdict = classify(CancelledError())
    assert (verdict.kind, verdict.retry) == (None, Retry.NEVER)


@pytest.mark.parametrize("exception", [ValueError("bug"), KeyError("k"), ZeroDivisionError()])
def test_other_exceptions_are_500_internal_error(exception: Exception) -> None:
    """Anything unexpected is a 500 internal_error that reveals nothing of the bug."""
    verdict = classify(exception)
    assert isinstance(verdict.error, InternalError)
    assert (verdict.kind, verdict.error.status, verdict.error.type) == (
        "internal",
        500,
        "internal_error",
    )
    assert verdict.error.message == "aiproxy failed to handle this request"


def test_body_incomplete_is_labelled() -> None:
    """A body cut by the upstream counts as body_incomplete."""
    assert classify(BodyIncomplete("cut")).kind == "body_incomplete"


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
        (CancelledError(), "CancelledError"),
        (ConnectFailed("refused"), "refused"),
        (
            ValueError("GET http://h/v1?api_key=sk-proj-0123456789abcdefXYZ failed"),
            "ValueError: GET http://h/v1?api_key=[REDACTED] failed",
        ),
        (
            LostBeforeResponse("reset while sending Bearer sk-proj-0123456789abcdefXYZ"),
            "reset while sending Bearer [REDACTED]",
        ),
    ],
)
def test_describe(exception: BaseException, description: str) -> None:
    """Exceptions are described on one line, secrets redacted."""
    assert describe(exception) == description
