"""
What operators see, over real sockets: the completion records as the log writes them,
token usage from a real stream, ``/api/metrics``, and no secret in any log line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import LogEvent, globalLogPublisher

from aiproxy.ops.logs import json_log_observer, text_log_observer

from .conftest import Proxy, Upstream
from .support import close_client, connect_raw, free_port, request, wait_until

PLANTED = "sk-live-PLANTED0123456789"


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every event logged during the test."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def written(events: list[LogEvent]) -> str:
    """``events`` as aiproxy's text and JSON observers write them."""
    text, lines = io.StringIO(), io.StringIO()
    for observer in (text_log_observer(text), json_log_observer(lines)):
        for event in events:
            observer(event)
    return text.getvalue() + lines.getvalue()


async def metrics_of(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``GET /api/metrics``, by name and labels."""
    response, body = await request(b"GET", proxy.url + "/api/metrics")
    assert response.code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_a_streamed_completion_is_logged_and_counted_with_its_usage(
    upstream: Upstream, start_proxy: Callable[..., Proxy], logged: list[LogEvent]
) -> None:
    """
    A streamed chat completion with ``include_usage`` reaches the client whole, and its
    completion record (as a JSON log line) and the metrics show its model and tokens.
    """
    proxy = start_proxy(upstream.url)
    ask = {
        "model": "gpt-observed",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    response, body = await request(
        b"POST",
        proxy.url + "/v1/chat/completions",
        {b"Content-Type": [b"application/json"], b"X-Fake-Chunks": [b"7"]},
        json.dumps(ask).encode(),
    )
    assert response.code == 200
    assert body.endswith(b"data: [DONE]\n\n") and b'"completion_tokens": 7' in body
    await wait_until(lambda: any("bytes_out" in e for e in logged), 5, "the completion record")
    [line] = [
        json.loads(line)
        for line in written(logged).splitlines()
        if line.startswith("{") and '"bytes_out"' in line
    ]
    assert line["path"] == "/v1/chat/completions" and line["client"] == "127.0.0.1"
    assert (line["status"], line["upstream_status"], line["cancelled"]) == (200, 200, False)
    assert line["bytes_out"] == len(body) and line["bytes_in"] == len(json.dumps(ask))
    assert (line["model"], line["prompt_tokens"], line["completion_tokens"]) == (
        "gpt-observed",
        3,
        7,
    )
    assert 0 <= line["upstream_headers_after"] <= line["duration"]
    samples = await metrics_of(proxy)
    tokens = "aiproxy_tokens_total"
    assert samples[(tokens, (("kind", "prompt"), ("model", "gpt-observed")))] == 3
    assert samples[(tokens, (("kind", "completion"), ("model", "gpt-observed")))] == 7
    requests = samples[("aiproxy_requests_total", (("method", "POST"), ("status", "200")))]
    assert requests == 1
    assert samples[("aiproxy_bytes_total", (("direction", "out"),))] >= len(body)


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_any_log_line(
    start_proxy: Callable[..., Proxy], logged: list[LogEvent]
) -> None:
    """
    A key planted in every place a client puts one (``Authorization``, ``x-api-key``,
    ``api-key``, cookies, ``Proxy-Authorization``, a ``key`` query parameter) appears in
    no log line, text or JSON, at DEBUG level, through retries and an upstream failure.
    """
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", max_retries=1, retry_backoff_factor=0)
    response, _ = await request(
        b"GET",
        proxy.url + f"/v1/models?key={PLANTED}&api_key={PLANTED}&limit=1",
        {
            b"Authorization": [f"Bearer {PLANTED}".encode()],
            b"X-Api-Key": [PLANTED.encode()],
            b"Api-Key": [PLANTED.encode()],
            b"Cookie": [f"session={PLANTED}".encode()],
            b"Proxy-Authorization": [f"Basic {PLANTED}".encode()],
        },
    )
    assert response.code == 502
    output = written(logged)
    assert "Retrying GET" in output and "Upstream error 502" in output
    assert "limit=1" in output  # URLs are logged, with their harmless parts
    assert "PLANTED" not in output


@pytest_twisted.ensureDeferred
async def test_metrics_count_an_upstream_error_and_a_cancelled_stream(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A refused connection and a client that leaves a stream both show in the metrics."""
    proxy = start_proxy(upstream.url)
    dead = start_proxy(f"http://127.0.0.1:{free_port()}", max_retries=0)
    response, _ = await request(b"GET", dead.url + "/v1/models")
    assert response.code == 502
    assert (await metrics_of(dead))[("aiproxy_upstream_errors_total", (("kind", "connect"),))] == 1

    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /sse/100/20 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: upstream.stats.streams_started == 1, 5, "the stream to start")
    assert (await metrics_of(proxy))[("aiproxy_active_streams", ())] == 1
    await close_client(client)
    await wait_until(lambda: upstream.stats.streams_aborted == 1, 5, "the upstream abort")
    samples = await metrics_of(proxy)
    assert samples[("aiproxy_client_cancelled_total", ())] == 1
    assert samples[("aiproxy_active_streams", ())] == 0
