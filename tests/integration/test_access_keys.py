"""
Access keys end to end, through real sockets with the official OpenAI and Anthropic
SDKs: valid keys reach the upstream with only the upstream key, refused keys raise the
SDK's own error without a retry, keys rotate by file edit and by SIGHUP without failing
a request in flight, and no key ever shows in a log line or in the metrics.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs

from aiproxy.access.keyfile import replace_key_file
from aiproxy.access.keys import key_digest, new_key
from aiproxy.ops.logs import format_message

from .conftest import Proxy, Upstream
from .processes import TwistProcess, run_twist
from .support import request, sleep, wait_until, within

UPSTREAM_KEY = "sk-upstream-kept-by-the-proxy-0123456789"
ALICE, BOB, REVOKED, EXPIRED, FUTURE, UNKNOWN = (new_key() for _ in range(6))
NOW = datetime.datetime.now(datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)
MESSAGES = [{"role": "user", "content": "Hi"}]


def write_keys(path: Path, entries: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Make the key file at ``path`` hold ``(id, key, fields)`` entries."""
    tables = [
        {"id": key_id, "sha256": key_digest(key), **fields} for key_id, key, fields in entries
    ]
    replace_key_file(str(path), tables)
    return str(path)


EVERYONE = [
    ("alice", ALICE, {}),
    ("bob", BOB, {"models": ["gpt-4o*"]}),
    ("revoked", REVOKED, {"enabled": False}),
    ("expired", EXPIRED, {"not_after": NOW - HOUR}),
    ("future", FUTURE, {"not_before": NOW + HOUR}),
]


@pytest.fixture
def keys(tmp_path: Path) -> str:
    """A key file with Alice, Bob (gpt-4o* only) and a revoked, expired and future key."""
    return write_keys(tmp_path / "keys.toml", EVERYONE)


@pytest.fixture
def guarded(upstream: Upstream, start_proxy: Callable[..., Proxy], keys: str) -> Proxy:
    """aiproxy with those access keys, holding the upstream key."""
    return start_proxy(upstream.url, access_keys_file=keys, upstream_api_key=UPSTREAM_KEY)


def openai_client(proxy: Proxy, key: str | None) -> openai.OpenAI:
    """The OpenAI SDK pointed at ``proxy`` with ``key`` (L{None}: no Authorization at
    all), retrying as it does by default."""
    return openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key=key or "unused",
        max_retries=2,
        timeout=10,
        default_headers={"Authorization": openai.Omit()} if key is None else None,
    )


def anthropic_client(proxy: Proxy, key: str) -> anthropic.Anthropic:
    """The Anthropic SDK pointed at ``proxy`` with ``key``, retrying as it does by default."""
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=2, timeout=10)


def refusals(proxy: Proxy) -> int:
    """Requests the proxy refused for their access key so far."""
    metrics = proxy.core.metrics
    assert metrics is not None
    return sum(metrics.auth_refusals.values())


@pytest_twisted.ensureDeferred
async def test_openai_sdk_with_a_valid_key_chats_and_streams(
    guarded: Proxy, upstream: Upstream
) -> None:
    """A valid key gets the upstream's completion and stream; the upstream only ever
    saw the proxy's upstream key."""

    def chat_and_stream() -> tuple[str, str]:
        with openai_client(guarded, ALICE) as client:
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        return reply.choices[0].message.content or "", text

    content, streamed = await within(deferToThread(chat_and_stream), 20)
    assert (content, streamed) == ("Hello there", "tok0 tok1 tok2 tok3 tok4 ")
    assert upstream.stats.credentials == [b"authorization: Bearer " + UPSTREAM_KEY.encode()] * 2


@pytest.mark.parametrize(
    ("key", "error", "reason"),
    [
        (None, openai.AuthenticationError, "missing"),
        (UNKNOWN, openai.AuthenticationError, "unknown"),
        (REVOKED, openai.AuthenticationError, "disabled"),
        (EXPIRED, openai.AuthenticationError, "expired"),
        (FUTURE, openai.AuthenticationError, "not_yet_valid"),
        (BOB, openai.PermissionDeniedError, "model"),
    ],
    ids=["missing", "unknown", "revoked", "expired", "future", "model-not-allowed"],
)
@pytest_twisted.ensureDeferred
async def test_openai_sdk_raises_at_once_for_refused_keys(
    guarded: Proxy, upstream: Upstream, key: str | None, error: type[Exception], reason: str
) -> None:
    """Each refused key is the SDK's own error, raised after one request (no retry),
    and nothing reaches the upstream."""

    def chat() -> None:
        with openai_client(guarded, key) as client:
            omit = {"Authorization": openai.Omit()} if key is None else None
            client.chat.completions.create(model="o1-pro", messages=MESSAGES, extra_headers=omit)

    with pytest.raises(error) as caught:
        await within(deferToThread(chat), 20)
    assert refusals(guarded) == 1
    assert guarded.core.metrics is not None
    [(_, refused_for, _)] = guarded.core.metrics.auth_refusals
    assert refused_for == reason
    assert upstream.stats.requests == 0
    if key is not None:
        assert key[4:12] not in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_anthropic_sdk_valid_refused_and_forbidden(
    upstream: Upstream, start_proxy: Callable[..., Proxy], keys: str
) -> None:
    """The Anthropic SDK's x-api-key works, and the upstream gets the proxy's key as
    x-api-key; an unknown key is AuthenticationError, a model outside the key's list
    PermissionDeniedError, each after one request."""
    proxy = start_proxy(
        upstream.url,
        access_keys_file=keys,
        upstream_api_key=UPSTREAM_KEY,
        upstream_auth_header="x-api-key",
    )

    def message(key: str, model: str) -> str:
        with anthropic_client(proxy, key) as client:
            reply = client.messages.create(model=model, max_tokens=10, messages=MESSAGES)
        return reply.content[0].text  # type: ignore[union-attr]

    assert await within(deferToThread(message, ALICE, "claude-test"), 20) == "Hello there"
    assert upstream.stats.credentials == [b"x-api-key: " + UPSTREAM_KEY.encode()]
    with pytest.raises(anthropic.AuthenticationError):
        await within(deferToThread(message, UNKNOWN, "claude-test"), 20)
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        await within(deferToThread(message, BOB, "claude-test"), 20)
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "permission_error",
            "message": "This API key may not use the model requested.",
        },
    }
    assert refusals(proxy) == 2
    assert upstream.stats.requests == 1


async def streamed_words(url: str, key: str) -> list[str]:
    """A slow streamed completion (10 events, 150 ms apart) with ``key``; its words."""
    response, body = await request(
        b"POST",
        url + "/v1/chat/completions",
        {
            b"authorization": [b"Bearer " + key.encode()],
            b"content-type": [b"application/json"],
            b"x-fake-chunks": [b"10"],
            b"x-fake-interval-ms": [b"150"],
        },
        json.dumps({"model": "m", "messages": [], "stream": True}).encode(),
        timeout=20,
    )
    assert response.code == 200
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: {")]
    return [json.loads(e)["choices"][0]["delta"]["content"] for e in events]


async def status_with(url: str, key: str) -> int:
    """The status of a small chat completion with ``key``."""
    response, _ = await request(
        b"POST",
        url + "/v1/chat/completions",
        {b"authorization": [b"Bearer " + key.encode()]},
        b'{"model": "m", "messages": []}',
    )
    return int(response.code)


@pytest_twisted.ensureDeferred
async def test_rotation_by_editing_the_file(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Replacing Alice's key in the file while her stream is in flight: the stream ends
    whole, the new key works and the old one is refused within two seconds; nothing
    logged shows either key or the upstream key."""
    path = tmp_path / "keys.toml"
    write_keys(path, [("alice", ALICE, {})])
    proxy = start_proxy(upstream.url, access_keys_file=str(path), upstream_api_key=UPSTREAM_KEY)
    rotated = new_key()
    with capturedLogs() as events:
        in_flight = Deferred.fromCoroutine(streamed_words(proxy.url, ALICE))
        await sleep(0.3)
        write_keys(path, [("alice", rotated, {})])
        await wait_until(lambda: proxy.core.access_keys.ring.find(rotated.encode()) is not None,
                         3, "the new key file in use")  # fmt: skip
        assert await within(in_flight, 20) == [f"tok{n} " for n in range(10)]
        assert await status_with(proxy.url, rotated) == 200
        assert await status_with(proxy.url, ALICE) == 401
        _, metrics = await request(b"GET", proxy.url + "/api/metrics")
    logged = "\n".join(format_message(e) + json.dumps(e, default=repr) for e in events)
    for secret in (ALICE, rotated, UPSTREAM_KEY):
        assert secret not in logged and secret.encode() not in metrics
    assert "Access keys reloaded" in logged


@pytest_twisted.ensureDeferred
async def test_rotation_by_sighup_in_a_twist_process(upstream: Upstream, tmp_path: Path) -> None:
    """A real ``twist aiproxy``: a file change that polling cannot see (same size and
    time) is used at once on SIGHUP, a stream in flight with the old key ends whole,
    and the process's whole log and /api/metrics show none of the keys."""
    path = tmp_path / "keys.toml"
    write_keys(path, [("alice", ALICE, {}), ("bob", BOB, {})])
    stamp = os.stat(path)
    process = TwistProcess.start(
        upstream.url,
        tmp_path,
        env={"ACCESS_KEYS_FILE": str(path), "UPSTREAM_API_KEY": UPSTREAM_KEY, "LOG_FORMAT": "json"},
    )
    rotated = new_key()
    try:
        await process.wait_ready()
        assert await status_with(process.url, UNKNOWN) == 401
        in_flight = Deferred.fromCoroutine(streamed_words(process.url, ALICE))
        await sleep(0.3)
        write_keys(path, [("alice", rotated, {}), ("bob", BOB, {})])
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(path).st_size == stamp.st_size
        os.kill(process.process.pid, signal.SIGHUP)
        await wait_until(lambda: "Access keys reloaded" in process.whole_log(), 5, "a reload")
        assert await status_with(process.url, rotated) == 200
        assert await status_with(process.url, ALICE) == 401
        assert await within(in_flight, 20) == [f"tok{n} " for n in range(10)]
        _, metrics = await request(b"GET", process.url + "/api/metrics")
    finally:
        await process.stop()
    log = process.whole_log()
    assert '"key_id": "alice"' in log
    for secret in (ALICE, BOB, rotated, UNKNOWN, UPSTREAM_KEY):
        assert secret not in log and secret.encode() not in metrics
    assert b'aiproxy_auth_refusals_total{key_id="-",reason="unknown",status="401"} 2.0' in metrics


@pytest.mark.parametrize(
    ("env", "starts"),
    [
        ({"UPSTREAM_API_KEY": UPSTREAM_KEY}, "UPSTREAM_API_KEY is set and no ACCESS_KEYS_FILE"),
        ({"ACCESS_KEYS_FILE": "keys.toml"}, "ACCESS_KEYS_FILE (--access-keys-file): keys.toml:"),
    ],
    ids=["open-relay", "invalid-key-file"],
)
@pytest_twisted.ensureDeferred
async def test_unsafe_or_invalid_access_settings_stop_the_start(
    upstream: Upstream, tmp_path: Path, env: dict[str, str], starts: str
) -> None:
    """``twist aiproxy`` with an upstream key, no access keys and a public listener, or
    with a key file that has a typo, exits at once with one line that says why (and
    never shows the upstream key)."""
    (tmp_path / "keys.toml").write_text('[[key]]\nid = "alice"\nsha256 = "typo"\n')
    args = [f"--target={upstream.url}", "--port=tcp:0"]
    done = await within(deferToThread(run_twist, args, tmp_path, env), 30)
    assert done.returncode != 0
    (line,) = (done.stdout + done.stderr).strip().splitlines()
    assert line.startswith("aiproxy: invalid configuration: " + starts)
    assert UPSTREAM_KEY not in line


@pytest_twisted.ensureDeferred
async def test_sighup_to_the_parent_reloads_every_worker(
    upstream: Upstream, tmp_path: Path
) -> None:
    """With ``--workers 2``, a SIGHUP to the parent reaches both workers: the parent
    stays up and every request, whichever worker takes it, opens with the new key."""
    path = tmp_path / "keys.toml"
    write_keys(path, [("alice", ALICE, {})])
    stamp = os.stat(path)
    process = TwistProcess.start(
        upstream.url,
        tmp_path,
        "--workers",
        "2",
        env={"ACCESS_KEYS_FILE": str(path), "UPSTREAM_API_KEY": UPSTREAM_KEY},
    )
    rotated = new_key()
    try:
        await process.wait_ready()
        write_keys(path, [("alice", rotated, {})])
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        os.kill(process.process.pid, signal.SIGHUP)
        await wait_until(
            lambda: process.whole_log().count("Access keys reloaded") == 2, 10, "two reloads"
        )
        assert process.process.poll() is None
        assert [await status_with(process.url, rotated) for _ in range(8)] == [200] * 8
    finally:
        await process.stop()
