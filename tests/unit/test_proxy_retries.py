"""
Retries and timeouts as a client sees them: aiproxy's HTTP/1.1 server over a fake
connection, a fake upstream and a fake clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from aiproxy.core.activity import Activity
from aiproxy.core.handler import ProxyCore
from aiproxy.rules.retry import RetryPolicy
from aiproxy.rules.target import parse_target
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits
from aiproxy.upstream.errors import ConnectFailed, LostBeforeResponse, StaleConnection

from .fakes import ClientConnection, FakeUpstream
from .test_proxy import TARGET_URL, error_of

BODY = b'{"model": "m", "messages": []}'

LIMITS = ClientLimits(max_body_size=2**20, header_timeout=10, body_min_rate=0)


def refused() -> ConnectFailed:
    return ConnectFailed("Connection was refused by other side")


def never_received() -> LostBeforeResponse:
    return LostBeforeResponse("the connection was lost before the response")


class Proxy:
    """A bare proxy core with a fixed-jitter retry policy, a fake upstream and a clock."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("request_timeout", 60)
        options.setdefault("retry_policy", RetryPolicy(3, 0.5, jitter=lambda: 1.0))
        self.clock = Clock()
        self.agent = FakeUpstream()
        self.core = ProxyCore(parse_target(TARGET_URL), self.agent, self.clock, **options)
        self.client = ClientConnection(HTTP11Factory(self.core, self.clock, Activity(), LIMITS))


def test_refused_connections_are_retried_with_backoff_until_one_answers() -> None:
    """Connection refused twice: retried after 0.5 s, then 1 s; the third answer reaches
    the client, and the POST body is sent in full each time."""
    proxy = Proxy()
    proxy.client.request(b"POST", b"/v1/chat/completions", body=BODY)
    proxy.agent.last.deferred.errback(refused())
    proxy.clock.advance(0.49)
    assert len(proxy.agent.calls) == 1
    proxy.clock.advance(0.01)
    assert len(proxy.agent.calls) == 2
    proxy.agent.last.deferred.errback(refused())
    proxy.clock.advance(1.0)
    assert len(proxy.agent.calls) == 3
    proxy.agent.last.respond(200).end()
    assert proxy.client.response().status == 200
    bodies = [call.sent_body for call in proxy.agent.calls]
    assert bodies == [BODY, BODY, BODY]
    assert proxy.core.retries == 2


def test_a_post_that_may_have_reached_the_upstream_is_not_retried() -> None:
    """A POST whose fresh connection failed before any response: one call, then 502."""
    proxy = Proxy()
    proxy.client.request(b"POST", b"/v1/chat/completions", body=BODY)
    proxy.agent.last.deferred.errback(never_received())
    proxy.clock.advance(10)
    assert len(proxy.agent.calls) == 1
    assert proxy.client.response().status == 502


def test_a_post_on_a_stale_kept_alive_connection_is_retried() -> None:
    """A POST lost on a reused keep-alive connection never reached the upstream: retried."""
    proxy = Proxy()
    proxy.client.request(b"POST", b"/v1/chat/completions", body=BODY)
    proxy.agent.last.deferred.errback(StaleConnection("closed by the upstream"))
    proxy.clock.advance(0.5)
    assert len(proxy.agent.calls) == 2
    proxy.agent.last.respond(200).end()
    assert proxy.client.response().status == 200


def test_a_get_without_response_is_retried() -> None:
    """An idempotent request whose connection failed before the response is sent again."""
    proxy = Proxy()
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.deferred.errback(never_received())
    proxy.clock.advance(0.5)
    assert len(proxy.agent.calls) == 2


def test_retries_stop_after_max_retries() -> None:
    """MAX_RETRIES extra attempts, then the 502 with the last reason."""
    proxy = Proxy()
    proxy.client.request(b"GET", b"/v1/models")
    for _ in range(4):
        proxy.agent.last.deferred.errback(refused())
        proxy.clock.advance(10)
    assert len(proxy.agent.calls) == 4
    response = proxy.client.response()
    assert response.status == 502
    assert "refused" in error_of(response)["message"]


def test_no_retry_that_could_not_answer_before_the_request_timeout() -> None:
    """If the next wait would outlast REQUEST_TIMEOUT, the failure is answered now (502)."""
    proxy = Proxy(request_timeout=0.4)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.deferred.errback(refused())
    assert proxy.client.response().status == 502
    assert len(proxy.agent.calls) == 1


def test_a_client_leaving_during_the_wait_stops_the_retries() -> None:
    """Once the client is gone nothing more is sent upstream."""
    proxy = Proxy()
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.deferred.errback(refused())
    proxy.client.disconnect()
    proxy.clock.advance(10)
    assert len(proxy.agent.calls) == 1
    assert proxy.clock.getDelayedCalls() == []


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_upstream_statuses_pass_through_in_one_call_by_default(status: int) -> None:
    """Without RETRY_ON_STATUS an upstream error status is an answer: relayed, not retried."""
    proxy = Proxy()
    proxy.client.request(b"POST", b"/v1/chat/completions", body=BODY)
    response = proxy.agent.last.respond(status, {b"Retry-After": [b"1"]})
    response.send(b'{"error": "busy"}')
    response.end()
    proxy.clock.advance(10)
    assert len(proxy.agent.calls) == 1
    relayed = proxy.client.response()
    assert (relayed.status, relayed.body) == (status, b'{"error": "busy"}')
    assert relayed.header(b"retry-after") == b"1"


def test_retry_on_status_honours_retry_after() -> None:
    """With RETRY_ON_STATUS=503, a 503 asking for 2 s is retried after 2 s."""
    proxy = Proxy(retry_policy=RetryPolicy(3, 0.5, {503}, jitter=lambda: 1.0))
    proxy.client.request(b"GET", b"/v1/models")
    busy = proxy.agent.last.respond(503, {b"Retry-After": [b"2"]})
    assert busy.aborted, "the retried answer's connection is dropped"
    proxy.clock.advance(1.9)
    assert len(proxy.agent.calls) == 1
    proxy.clock.advance(0.1)
    assert len(proxy.agent.calls) == 2
    proxy.agent.last.respond(200).end()
    assert proxy.client.response().status == 200


def test_when_status_retries_run_out_the_last_answer_passes_unchanged() -> None:
    """The last 503 reaches the client with its body once the retries are spent."""
    proxy = Proxy(retry_policy=RetryPolicy(1, 0.5, {503}, jitter=lambda: 1.0))
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.respond(503)
    proxy.clock.advance(0.5)
    last = proxy.agent.last.respond(503, {b"Retry-After": [b"30"]})
    last.send(b"try later")
    last.end()
    relayed = proxy.client.response()
    assert (relayed.status, relayed.body) == (503, b"try later")
    assert len(proxy.agent.calls) == 2


def test_total_timeout_cuts_a_long_response() -> None:
    """TOTAL_TIMEOUT ends a response that is still streaming: aborted, not finished."""
    proxy = Proxy(total_timeout=5)
    proxy.client.request(b"GET", b"/v1/stream")
    upstream = proxy.agent.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
    upstream.send(b"data: 1\n\n")
    proxy.clock.advance(4.9)
    assert not proxy.client.aborted
    proxy.clock.advance(0.1)
    assert proxy.client.aborted
    assert upstream.aborted
    assert not proxy.client.response().complete


def test_total_timeout_before_headers_is_a_504() -> None:
    """TOTAL_TIMEOUT shorter than REQUEST_TIMEOUT bounds the wait for headers too."""
    proxy = Proxy(total_timeout=5)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.clock.advance(5)
    assert proxy.client.response().status == 504
    assert proxy.agent.last.cancelled


def test_retries_are_logged_and_counted_in_the_completion_line() -> None:
    """Each retry logs a warning with its reason and wait; the completion line says how
    many retries there were."""
    proxy = Proxy()
    with capturedLogs() as events:
        proxy.client.request(b"GET", b"/v1/models", [(b"X-Request-ID", b"req-retry")])
        proxy.agent.last.deferred.errback(refused())
        proxy.clock.advance(0.5)
        proxy.agent.last.respond(200).end()
    retries = [e for e in events if e.get("log_format", "").startswith("Retrying")]
    assert len(retries) == 1
    assert retries[0]["retry"] == 1 and retries[0]["delay"] == 0.5
    assert retries[0]["request_id"] == "req-retry"
    assert "cannot connect" in retries[0]["reason"]
    [completed] = [e for e in events if e.get("log_format", "").startswith("Request completed")]
    assert completed["retries"] == 1
    assert "[Retries: 1]" in formatEvent(completed)
