"""
Access keys as a client sees them, through each front door with a fake upstream and
clock: who gets in, what is refused and how, and what the upstream and the operator see.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogEvent, capturedLogs

from aiproxy.access.keyfile import replace_key_file
from aiproxy.access.keys import key_digest
from aiproxy.ops.logs import json_log_observer

from .fakes import ClientConnection, ParsedResponse
from .test_observability import value
from .test_proxy import Proxy, start_proxy

ALICE = "aip-alice0000000000000000000000000000000000000"
BOB = "aip-bob000000000000000000000000000000000000000"
UNKNOWN = "aip-unknown00000000000000000000000000000000000"
UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
CHAT = b'{"model": "gpt-4o-mini", "messages": []}'


def when(seconds: float) -> datetime.datetime:
    """A key file date-time ``seconds`` after the epoch (the fake clock starts there)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def write_keys(path: Path, *tables: dict[str, Any]) -> str:
    """Write a key file of ``tables`` (each with ``key`` instead of its digest)."""
    entries = [
        {
            "id": t["id"],
            "sha256": key_digest(t["key"]),
            **{k: v for k, v in t.items() if k not in ("id", "key")},
        }
        for t in tables
    ]
    replace_key_file(str(path), entries)
    return str(path)


@pytest.fixture(params=["http1", "web"])
def guarded(request: pytest.FixtureRequest, tmp_path: Path) -> Proxy:
    """aiproxy with access keys (Alice: any model on /v1/; Bob: gpt-4o* only) and an
    upstream key, through each door."""
    keys = write_keys(
        tmp_path / "keys.toml",
        {"id": "alice", "key": ALICE, "paths": ["/v1/"]},
        {"id": "bob", "key": BOB, "models": ["gpt-4o*"]},
    )
    return start_proxy(request.param, access_keys_file=keys, upstream_api_key=UPSTREAM_KEY)


def ask(
    proxy: Proxy,
    *headers: tuple[bytes, bytes],
    path: bytes = b"/v1/chat/completions",
    body: bytes | None = CHAT,
) -> None:
    """POST ``body`` (GET without one) through the proxy."""
    method = b"POST" if body is not None else b"GET"
    proxy.client.request(method, path, list(headers), body)


def send(
    proxy: Proxy,
    *headers: tuple[bytes, bytes],
    path: bytes = b"/v1/chat/completions",
    body: bytes | None = CHAT,
) -> ParsedResponse:
    """:func:`ask`, and the response the proxy answered itself."""
    ask(proxy, *headers, path=path, body=body)
    return proxy.client.response()


def refusal(response: ParsedResponse, status: int, code: str) -> dict[str, Any]:
    """The OpenAI-shaped body of a refusal with ``status`` and ``code``, checked."""
    assert response.status == status
    assert response.header(b"x-should-retry") == b"false"
    assert response.header(b"x-request-id")
    document = json.loads(response.body)
    assert set(document["error"]) == {"message", "type", "param", "code"}
    assert document["error"]["code"] == code
    return document


def bearer(key: str) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + key.encode())


def test_a_valid_key_reaches_the_upstream_with_only_the_upstream_key(guarded: Proxy) -> None:
    """The client's key never reaches the upstream; exactly one upstream credential does."""
    ask(guarded, bearer(ALICE), (b"x-api-key", ALICE.encode()), (b"api-key", ALICE.encode()))
    call = guarded.upstream.last
    assert ALICE.encode() not in call.head
    credentials = [
        (name, value)
        for name, value in call.raw_headers
        if name.lower() in (b"authorization", b"x-api-key", b"api-key")
    ]
    assert credentials == [(b"Authorization", b"Bearer " + UPSTREAM_KEY.encode())]
    call.respond(200, [(b"Content-Type", b"application/json")]).end()
    assert guarded.client.response().status == 200


@pytest.mark.parametrize("header", [b"x-api-key", b"api-key", b"X-Api-Key"])
def test_sdk_key_headers_are_accepted(guarded: Proxy, header: bytes) -> None:
    """Anthropic's x-api-key and Azure's api-key present a key as Bearer does."""
    ask(guarded, (header, ALICE.encode()))
    assert header not in guarded.upstream.last.head
    assert guarded.upstream.last.headers.getRawHeaders(b"authorization") == [
        b"Bearer " + UPSTREAM_KEY.encode()
    ]


def test_a_missing_key_gets_401_with_www_authenticate(guarded: Proxy) -> None:
    """No key: 401, WWW-Authenticate, x-should-retry false, code missing_api_key; the
    upstream is not asked."""
    response = send(guarded)
    refusal(response, 401, "missing_api_key")
    assert response.header(b"www-authenticate") == b'Bearer realm="aiproxy"'
    assert guarded.upstream.calls == []


def test_an_unknown_key_gets_401_and_is_never_echoed(guarded: Proxy) -> None:
    """An unknown key: 401 invalid_api_key; no part of it is in the body or the log."""
    with capturedLogs() as events:
        response = send(guarded, bearer(UNKNOWN))
    refusal(response, 401, "invalid_api_key")
    assert guarded.upstream.calls == []
    logged = "".join(_json_lines(events))
    secret = UNKNOWN[len("aip-") :]
    for start in range(len(secret) - 8):
        assert secret[start : start + 8] not in response.body.decode()
    assert secret[:8] not in logged


def test_refusals_under_v1_messages_speak_anthropic(guarded: Proxy) -> None:
    """On /v1/messages the body is Anthropic's error shape."""
    response = send(guarded, (b"x-api-key", UNKNOWN.encode()), path=b"/v1/messages")
    assert response.status == 401
    document = json.loads(response.body)
    assert document == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }


def test_two_different_keys_are_a_400(guarded: Proxy) -> None:
    """Two different keys in one request: 400 conflicting_api_keys, nothing upstream."""
    refusal(send(guarded, bearer(ALICE), (b"x-api-key", BOB.encode())), 400, "conflicting_api_keys")
    assert guarded.upstream.calls == []


def test_a_path_outside_the_keys_prefixes_is_a_403(guarded: Proxy) -> None:
    """Alice's key covers /v1/ only."""
    refusal(send(guarded, bearer(ALICE), path=b"/v2/chat"), 403, "path_not_allowed")
    assert guarded.upstream.calls == []


def test_a_model_restricted_key(guarded: Proxy) -> None:
    """Bob may use gpt-4o* models: other models and bodies naming none are 403; a
    request without a body (listing models) passes."""
    other = b'{"model": "o1-pro", "messages": []}'
    refusal(send(guarded, bearer(BOB), body=other), 403, "model_not_allowed")
    refusal(send(guarded, bearer(BOB), body=b"not json"), 403, "model_not_allowed")
    assert guarded.upstream.calls == []
    ask(guarded, bearer(BOB), path=b"/v1/models", body=None)
    assert len(guarded.upstream.calls) == 1
    guarded.upstream.last.respond(200, [(b"Content-Length", b"0")]).end()
    ask(guarded, bearer(BOB))
    assert len(guarded.upstream.calls) == 2


def test_a_large_body_for_a_model_restricted_key_is_a_413(guarded: Proxy) -> None:
    """A body too large to hold in memory cannot be checked for its model: 413 at once,
    before it is read, and nothing upstream. Alice (any model) streams the same body."""
    size = 600 * 1024
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n" % size
    guarded.client.send(head + b"Authorization: Bearer " + BOB.encode() + b"\r\n\r\n")
    guarded.client.send(b"x" * size)
    document = refusal(guarded.client.response(), 413, "request_too_large")
    assert "256 KiB" in document["error"]["message"]
    assert guarded.upstream.calls == []


def test_a_large_body_streams_for_a_key_without_model_limits(guarded: Proxy) -> None:
    """Alice's key has no model list: a large body is proxied as usual."""
    size = 600 * 1024
    guarded.client.request(b"POST", b"/v1/files", [bearer(ALICE)], b"x" * size)
    assert len(guarded.upstream.calls) == 1


@pytest.mark.parametrize(
    ("entry", "now", "message"),
    [
        ({"enabled": False}, 0, "The API key has been revoked."),
        ({"not_before": when(1000)}, 999, "The API key is not valid yet."),
        ({"not_after": when(1000)}, 1000, "The API key has expired."),
    ],
)
def test_revoked_expired_and_future_keys_get_401(
    tmp_path: Path, entry: dict[str, Any], now: float, message: str
) -> None:
    """A key that is disabled, or outside its validity period by the proxy's clock, is
    refused like an unknown one, with a message saying which."""
    keys = write_keys(tmp_path / "keys.toml", {"id": "carol", "key": ALICE, **entry})
    proxy = start_proxy(access_keys_file=keys)
    proxy.clock.advance(now)
    proxy.client = ClientConnection(proxy.client.protocol.factory)  # the first one timed out
    document = refusal(send(proxy, bearer(ALICE)), 401, "invalid_api_key")
    assert document["error"]["message"] == message
    assert proxy.upstream.calls == []


def test_own_endpoints_need_no_key_and_health_says_auth_is_on(guarded: Proxy) -> None:
    """/api/health and /api/ping answer without a key; health says access keys are on."""
    guarded.client.request(b"GET", b"/api/health")
    response = guarded.client.response()
    assert response.status == 200
    assert json.loads(response.body)["auth"] == "access_keys"


def test_the_record_and_metrics_carry_the_key_id(guarded: Proxy) -> None:
    """The completion record names the key's id (never the key); the metrics count
    requests per key id and refusals per status, reason and key id."""
    with capturedLogs() as events:
        ask(guarded, bearer(ALICE))
        guarded.upstream.last.respond(200, [(b"Content-Length", b"0")]).end()
    lines = _json_lines(events)
    assert any('"key_id": "alice"' in line and "[Key: alice]" in line for line in lines)
    assert not any(ALICE in line or UPSTREAM_KEY in line for line in lines)
    send(guarded, bearer(UNKNOWN))
    send(guarded, bearer(BOB), body=b'{"model": "o1"}')
    assert value(guarded, "aiproxy_key_requests_total", key_id="alice") == 1
    assert value(guarded, "aiproxy_key_requests_total", key_id="bob") == 1
    assert (
        value(guarded, "aiproxy_auth_refusals_total", status="401", reason="unknown", key_id="-")
        == 1
    )
    assert (
        value(guarded, "aiproxy_auth_refusals_total", status="403", reason="model", key_id="bob")
        == 1
    )


def test_without_access_settings_the_clients_key_passes_through() -> None:
    """No ACCESS_KEYS_FILE and no UPSTREAM_API_KEY: today's behaviour, the client's
    Authorization reaches the upstream as sent, and health says auth is none."""
    proxy = start_proxy()
    ask(proxy, bearer("sk-client-own"))
    assert proxy.upstream.last.headers.getRawHeaders(b"authorization") == [b"Bearer sk-client-own"]


def _json_lines(events: list[LogEvent]) -> list[str]:
    """``events`` as the JSON log lines aiproxy writes."""
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    observer = json_log_observer(Out())  # type: ignore[arg-type]
    for event in events:
        observer(event)
    return lines
