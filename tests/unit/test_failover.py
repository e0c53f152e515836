"""
Several upstreams as a client sees them: aiproxy's HTTP/1.1 server over a fake
connection, one fake upstream client per upstream of the file, and a fake clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from aiproxy.core.activity import Activity
from aiproxy.core.handler import ProxyCore
from aiproxy.routing.choose import Choice
from aiproxy.routing.health import EJECT_AFTER
from aiproxy.routing.routes import Routes
from aiproxy.routing.upstreams import UpstreamEntry, fingerprint, parse_upstreams
from aiproxy.rules.retry import RetryPolicy
from aiproxy.rules.target import parse_target
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits
from aiproxy.upstream.errors import ConnectFailed, LostBeforeResponse

from .fakes import ClientConnection, FakeUpstream

BODY = b'{"model": "gpt-4o", "messages": []}'
LIMITS = ClientLimits(max_body_size=2**20, header_timeout=10, body_min_rate=0)

TWO = """
[[upstream]]
name = "a"
url = "https://a.example/openai"
keys = ["sk-a-one", "sk-a-two"]

[[upstream]]
name = "b"
url = "http://b.example:8000"
keys = ["sk-b"]
auth_header = "x-api-key"
priority = 1
"""


class Proxy:
    """A proxy core routing to the upstreams of ``text``, each a :class:`FakeUpstream`;
    random picks are always ``pick``."""

    def __init__(self, text: str = TWO, pick: float = 0.0, **options: Any) -> None:
        options.setdefault("request_timeout", 60)
        options.setdefault("failover_on_status", (429, 502, 503, 504))
        options.setdefault("max_failovers", 2)
        self.clock = Clock()
        self.pools: dict[str, FakeUpstream] = {}
        self.routes = Routes(
            "upstreams.toml", parse_upstreams(text), self.clock, self._pool, lambda: pick
        )
        self.core = ProxyCore(
            parse_target("http://unused.example"),
            FakeUpstream(),
            self.clock,
            routes=self.routes,
            **options,
        )
        self.client = ClientConnection(HTTP11Factory(self.core, self.clock, Activity(), LIMITS))

    def _pool(self, entry: UpstreamEntry) -> FakeUpstream:
        self.pools[entry.name] = pool = FakeUpstream()
        return pool

    def post(self, body: bytes = BODY, *headers: tuple[bytes, bytes]) -> None:
        self.client.request(b"POST", b"/v1/chat/completions", list(headers), body=body)


def refused() -> ConnectFailed:
    return ConnectFailed("the upstream (a.example:443) refused the connection")


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    with capturedLogs() as events:
        yield events


def test_a_connect_failure_fails_over_at_once(logged: list[dict[str, Any]]) -> None:
    """``a`` refuses the connection: the request goes to ``b`` at once (no backoff),
    with ``b``'s key in ``b``'s header style, and ``b``'s answer names ``b``; the log
    says where the request failed over from."""
    proxy = Proxy()
    proxy.post(BODY, (b"Authorization", b"Bearer sk-client"))
    a, b = proxy.pools["a"], proxy.pools["b"]
    assert a.last.request_line == b"POST /openai/v1/chat/completions HTTP/1.1"
    assert a.last.headers.getRawHeaders(b"authorization") == [b"Bearer sk-a-one"]
    a.last.deferred.errback(refused())
    assert len(b.calls) == 1
    assert b.last.url == b"http://b.example:8000/v1/chat/completions"
    assert b.last.headers.getRawHeaders(b"x-api-key") == [b"sk-b"]
    assert b.last.headers.getRawHeaders(b"authorization") is None
    assert b.last.sent_body == BODY
    response = b.last.respond(200)
    response.send(b"{}")
    response.end()
    answer = proxy.client.response()
    assert (answer.status, answer.header(b"x-upstream")) == (200, b"b")
    lines = [formatEvent(e) for e in logged]
    assert any(
        "Failing over POST https://a.example/openai/v1/chat/completions from upstream a to b"
        in line
        for line in lines
    ), lines
    [done] = [line for line in lines if line.startswith("Request completed")]
    assert "[Via: b]" in done and "[Failed over from: a]" in done
    assert proxy.core.retries == 0


def test_a_post_lost_after_sending_is_not_failed_over() -> None:
    """A ``POST`` whose connection failed after it was sent may be running upstream:
    ``502``, and ``b`` never sees it."""
    proxy = Proxy()
    proxy.post()
    proxy.pools["a"].last.deferred.errback(LostBeforeResponse("connection lost"))
    assert proxy.pools["b"].calls == []
    assert proxy.client.response().status == 502


def test_a_get_lost_after_sending_is_failed_over() -> None:
    """The same failure for a ``GET`` (safe to repeat) moves it to ``b``."""
    proxy = Proxy()
    proxy.client.request(b"GET", b"/v1/models")
    proxy.pools["a"].last.deferred.errback(LostBeforeResponse("connection lost"))
    assert len(proxy.pools["b"].calls) == 1


def test_a_429_fails_over_to_the_upstreams_other_key_first() -> None:
    """``a``'s first key answers ``429``: the request goes to ``a`` again with its other
    key (``b`` is a lower priority); the first key cools for the wait asked."""
    proxy = Proxy()
    proxy.post()
    a = proxy.pools["a"]
    a.last.respond(429, {b"retry-after-ms": [b"1500"]})
    assert a.calls[0].response is not None and a.calls[0].response.aborted
    assert a.last.headers.getRawHeaders(b"authorization") == [b"Bearer sk-a-two"]
    assert proxy.pools["b"].calls == []
    keys = proxy.routes.router.report()[0]["keys"]
    assert keys == [  # type: ignore[comparison-overlap]
        {"fingerprint": fingerprint("sk-a-one"), "state": "cooling", "seconds_left": 1.5},
        {"fingerprint": fingerprint("sk-a-two"), "state": "healthy"},
    ]


def test_failovers_are_bounded_then_the_last_answer_passes() -> None:
    """With ``MAX_FAILOVERS=1`` and ``503`` everywhere: two attempts, then the second
    ``503`` goes to the client as the upstream sent it."""
    proxy = Proxy(max_failovers=1)
    proxy.post()
    proxy.pools["a"].last.respond(503)
    response = proxy.pools["b"].last.respond(503)
    response.send(b"busy")
    response.end()
    answer = proxy.client.response()
    assert (answer.status, answer.body, answer.header(b"x-upstream")) == (503, b"busy", b"b")
    assert [len(proxy.pools[n].calls) for n in "ab"] == [1, 1]


def test_a_status_outside_failover_on_status_passes_through() -> None:
    """``500`` is not in ``FAILOVER_ON_STATUS``: it reaches the client from ``a``."""
    proxy = Proxy()
    proxy.post()
    proxy.pools["a"].last.respond(500).end()
    assert proxy.client.response().status == 500
    assert proxy.pools["b"].calls == []


def test_when_failover_has_nowhere_to_go_the_retry_rules_apply() -> None:
    """One upstream, connection refused: no failover, then a retry after the backoff."""
    proxy = Proxy(
        TWO.split('[[upstream]]\nname = "b"')[0],
        retry_policy=RetryPolicy(1, 0.5, jitter=lambda: 1.0),
    )
    proxy.post()
    a = proxy.pools["a"]
    a.last.deferred.errback(refused())
    assert len(a.calls) == 1
    proxy.clock.advance(0.5)
    assert len(a.calls) == 2
    a.last.respond(200).end()
    assert proxy.client.response().status == 200
    assert proxy.core.retries == 1


def test_a_timeout_before_headers_counts_against_the_upstream() -> None:
    """``REQUEST_TIMEOUT`` passes: ``504``, no failover (no time is left), and the
    upstream's failure is counted: three eject it."""
    proxy = Proxy(request_timeout=5)
    for _ in range(EJECT_AFTER):
        proxy.post()
        proxy.clock.advance(5)
        assert proxy.client.response().status == 504
        proxy.client = ClientConnection(HTTP11Factory(proxy.core, proxy.clock, Activity(), LIMITS))
    assert proxy.routes.router.report()[0]["state"] == "ejected"
    assert proxy.pools["b"].calls == []


def test_a_probe_whose_client_left_frees_the_probe() -> None:
    """The half-open probe's client leaves: the next request is the probe."""
    proxy = Proxy()
    router = proxy.routes.router
    first = router.choose(None)
    assert isinstance(first, Choice)
    for _ in range(EJECT_AFTER):
        router.failed(first)
    proxy.clock.advance(60)
    proxy.post()
    assert len(proxy.pools["a"].calls) == 1  # the probe
    proxy.client.disconnect()
    assert proxy.pools["a"].last.cancelled
    proxy.client = ClientConnection(HTTP11Factory(proxy.core, proxy.clock, Activity(), LIMITS))
    proxy.post()
    assert len(proxy.pools["a"].calls) == 2


def test_nothing_available_is_503_with_retry_after() -> None:
    """Every key cooling: ``503 upstream_unavailable`` with the shortest wait, rounded
    up, and no upstream call."""
    proxy = Proxy()
    router = proxy.routes.router
    for upstream in router.upstreams:
        for n, key in enumerate(upstream.keys):
            router.rate_limited(Choice(upstream, key), 2.2 + n)
    proxy.post()
    answer = proxy.client.response()
    assert (answer.status, answer.header(b"retry-after")) == (503, b"3")
    assert json.loads(answer.body)["error"]["type"] == "upstream_unavailable"
    assert sum(len(pool.calls) for pool in proxy.pools.values()) == 0


def test_a_model_no_upstream_serves_is_404_model_not_found() -> None:
    """In OpenAI's error shape, without an upstream call."""
    proxy = Proxy(
        TWO.replace("priority = 1", 'priority = 1\nmodels = ["claude-*"]').replace(
            'keys = ["sk-a-one", "sk-a-two"]', 'keys = ["sk-a-one"]\nmodels = ["gpt-*"]'
        )
    )
    proxy.post(b'{"model": "llama-3"}')
    answer = proxy.client.response()
    assert answer.status == 404
    error = json.loads(answer.body)["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert sum(len(pool.calls) for pool in proxy.pools.values()) == 0


def test_the_upstream_name_header_can_be_turned_off() -> None:
    proxy = Proxy(upstream_name_header=False)
    proxy.post()
    proxy.pools["a"].last.respond(200).end()
    assert proxy.client.response().header(b"x-upstream") is None


def test_a_reload_keeps_the_pools_of_unchanged_upstreams(tmp_path: Any) -> None:
    """Reloading: an upstream with the same URL and limit keeps its pool; a changed or
    removed one's pool is closed; health starts afresh."""
    proxy = Proxy()
    a, b = proxy.pools["a"], proxy.pools["b"]
    path = tmp_path / "upstreams.toml"
    path.write_text(TWO.replace("http://b.example:8000", "http://b2.example"))
    proxy.routes.path = str(path)
    router = proxy.routes.router
    proxy.routes.reload()
    assert proxy.routes.router is not router
    assert proxy.routes.routes["a"].client is a and not a.closed
    assert proxy.routes.routes["b"].client is not b and b.closed
