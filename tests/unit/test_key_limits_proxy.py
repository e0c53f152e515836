"""
Per-key limits as a client sees them, through each front door with a fake upstream and
clock: ``429`` before anything goes upstream, OpenAI's ``x-ratelimit-*`` headers on the
responses that pass, and token reservations settled by the usage the response reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aiproxy.access.policy import access_policy
from aiproxy.config import Config, ConfigError
from aiproxy.upstream.errors import ConnectFailed

from .fakes import ClientConnection, ParsedResponse
from .test_access_proxy import ALICE, UPSTREAM_KEY, write_keys
from .test_observability import value
from .test_proxy import Proxy, start_proxy

AUTH = (b"Authorization", b"Bearer " + ALICE.encode())


def limited(tmp_path: Path, door: str = "http1", **limits: int) -> Proxy:
    """aiproxy whose one key, Alice's, has ``limits`` (no retries)."""
    keys = write_keys(tmp_path / "keys.toml", {"id": "alice", "key": ALICE, **limits})
    return start_proxy(door, access_keys_file=keys, upstream_api_key=UPSTREAM_KEY, max_retries=0)


def chat(max_tokens: int | None = None, **more: Any) -> bytes:
    document: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [], **more}
    if max_tokens is not None:
        document["max_tokens"] = max_tokens
    return json.dumps(document).encode()


def post(proxy: Proxy, body: bytes, path: bytes = b"/v1/chat/completions") -> ClientConnection:
    """A new client connection that POSTs ``body`` with Alice's key."""
    client = ClientConnection(proxy.client.protocol.factory)
    client.request(b"POST", path, [AUTH], body)
    return client


def reply(proxy: Proxy, usage: dict[str, int] | None = None) -> None:
    """The upstream answers the last request with a JSON body (and usage, if given)."""
    body = json.dumps({"model": "gpt-4o-mini", **({"usage": usage} if usage else {})})
    response = proxy.upstream.last.respond(
        200,
        {
            b"Content-Type": [b"application/json"],
            b"x-ratelimit-limit-requests": [b"10000"],
            b"x-ratelimit-remaining-requests": [b"9999"],
        },
    )
    response.send(body.encode())
    response.end()


def error_of(response: ParsedResponse) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(response.body)
    return document


@pytest.mark.parametrize("door", ["http1", "web"])
def test_over_the_requests_limit_is_a_429_before_the_upstream(tmp_path: Path, door: str) -> None:
    """RPM 2: the third request in the minute gets ``429`` with ``Retry-After``, its
    wait in ``retry-after-ms`` and an OpenAI-shaped body naming the figures; the
    upstream never sees it."""
    proxy = limited(tmp_path, door, rpm=2)
    for _ in range(2):
        post(proxy, chat())
        reply(proxy)
    third = post(proxy, chat()).response()
    assert third.status == 429
    assert third.header(b"retry-after") == b"30"
    assert third.header(b"retry-after-ms") == b"30000"
    error = error_of(third)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "requests",
        "rate_limit_exceeded",
        None,
    )
    assert "limit 2, used 2, requested 1" in error["message"]
    assert "30s" in error["message"]
    assert len(proxy.upstream.calls) == 2
    assert (
        value(proxy, "aiproxy_auth_refusals_total", status="429", reason="requests", key_id="alice")
        == 1
    )


def test_passing_responses_carry_the_proxy_limits_instead_of_the_upstreams(tmp_path: Path) -> None:
    """With a proxy limit, ``x-ratelimit-*`` say the proxy's figures; the upstream's own
    are dropped."""
    proxy = limited(tmp_path, rpm=60, tpm=10_000)
    client = post(proxy, chat(max_tokens=100))
    reply(proxy, {"prompt_tokens": 10, "completion_tokens": 20})
    response = client.response()
    assert response.status == 200
    assert response.header(b"x-ratelimit-limit-requests") == b"60"
    assert response.header(b"x-ratelimit-remaining-requests") == b"59"
    assert response.header(b"x-ratelimit-reset-requests") == b"1s"
    assert response.header(b"x-ratelimit-limit-tokens") == b"10000"
    assert response.header(b"x-ratelimit-remaining-tokens") is not None
    assert response.headers.getRawHeaders(b"x-ratelimit-limit-requests") == [b"60"]


def test_without_a_proxy_limit_the_upstreams_headers_pass(tmp_path: Path) -> None:
    """A key with no limits: the upstream's ``x-ratelimit-*`` reach the client untouched."""
    proxy = limited(tmp_path)
    client = post(proxy, chat())
    reply(proxy)
    assert client.response().header(b"x-ratelimit-limit-requests") == b"10000"


def test_concurrent_requests_cannot_overrun_the_token_limit(tmp_path: Path) -> None:
    """TPM 1000 and ten requests at once with ``max_tokens: 400`` against a slow
    upstream: at most two reach it, the rest get ``429`` at once (LiteLLM #18730)."""
    proxy = limited(tmp_path, tpm=1000)
    clients = [post(proxy, chat(max_tokens=400)) for _ in range(10)]
    assert len(proxy.upstream.calls) == 2
    refused = [c.response() for c in clients[2:]]
    assert {r.status for r in refused} == {429}
    assert error_of(refused[0])["error"]["type"] == "tokens"


def test_the_larger_of_max_tokens_and_max_completion_tokens_is_reserved(tmp_path: Path) -> None:
    """``max_tokens: 1`` with ``max_completion_tokens: 10000`` reserves 10,000 (and the
    prompt's estimate): with TPM 10,000 a second such request must wait."""
    proxy = limited(tmp_path, tpm=10_000)
    body = chat(max_tokens=1, max_completion_tokens=10_000)
    post(proxy, body)
    second = post(proxy, body).response()
    assert second.status == 429
    assert "requested 10000" in error_of(second)["error"]["message"]


def test_the_real_usage_gives_back_what_was_not_used(tmp_path: Path) -> None:
    """A request that reserved 800 tokens and used 30 leaves room for another 800."""
    proxy = limited(tmp_path, tpm=1000)
    post(proxy, chat(max_tokens=800))
    assert post(proxy, chat(max_tokens=800)).response().status == 429
    reply(proxy, {"prompt_tokens": 10, "completion_tokens": 20})
    post(proxy, chat(max_tokens=800))
    assert len(proxy.upstream.calls) == 2


def test_a_request_that_never_reached_the_upstream_gives_its_tokens_back(tmp_path: Path) -> None:
    """An upstream that cannot be reached: the reservation is released, not charged."""
    proxy = limited(tmp_path, tpm=1000)
    first = post(proxy, chat(max_tokens=900))
    proxy.upstream.last.deferred.errback(ConnectFailed("refused", kind="connect"))
    assert first.response().status == 502
    post(proxy, chat(max_tokens=900))
    assert len(proxy.upstream.calls) == 2


def test_an_exhausted_daily_quota_says_not_to_retry(tmp_path: Path) -> None:
    """Over tokens per day: ``insufficient_quota`` with ``x-should-retry: false``."""
    proxy = limited(tmp_path, tpd=500)
    post(proxy, chat(max_tokens=450))
    response = post(proxy, chat(max_tokens=450)).response()
    assert response.status == 429
    assert response.header(b"x-should-retry") == b"false"
    error = error_of(response)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")


def test_anthropic_clients_get_anthropics_shape(tmp_path: Path) -> None:
    """Under ``/v1/messages`` a 429 is ``{"type": "error", "error": {"type":
    "rate_limit_error", ...}}``."""
    proxy = limited(tmp_path, rpm=1)
    post(proxy, b'{"model": "claude-3-haiku", "max_tokens": 10}', b"/v1/messages")
    response = post(proxy, b'{"model": "claude-3-haiku", "max_tokens": 10}', b"/v1/messages")
    document = error_of(response.response())
    assert document["type"] == "error"
    assert document["error"]["type"] == "rate_limit_error"


def test_requests_at_once_are_limited_until_one_ends(tmp_path: Path) -> None:
    """``concurrent = 1``: a second request in flight gets ``429``; once the first has
    ended, the next passes."""
    proxy = limited(tmp_path, concurrent=1)
    first = post(proxy, chat())
    assert post(proxy, chat()).response().status == 429
    reply(proxy)
    assert first.response().status == 200
    post(proxy, chat())
    assert len(proxy.upstream.calls) == 2


def test_workers_with_limits_and_no_redis_stop_the_start(tmp_path: Path) -> None:
    """With more than one worker, limits need REDIS_URL: each worker would count alone."""
    keys = write_keys(tmp_path / "keys.toml", {"id": "alice", "key": ALICE, "rpm": 5})
    config = Config(access_keys_file=keys, max_workers=2)
    with pytest.raises(ConfigError, match="set REDIS_URL"):
        access_policy(config)
    access_policy(Config(access_keys_file=keys, max_workers=2, redis_url="redis://127.0.0.1/0"))
