"""
What operators see of each request: its completion log record, and the Prometheus
metrics at ``/api/metrics``; over aiproxy's HTTP/1.1 server with a fake upstream and clock.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from aiproxy.config import Config
from aiproxy.core.build import build_core
from aiproxy.core.record import RequestRecord
from aiproxy.ops.logs import json_log_observer, text_log_observer
from aiproxy.ops.metrics import MAX_MODELS, ProxyMetrics, SharedMetrics, merge_snapshots
from aiproxy.rules.usage import Usage
from aiproxy.upstream.errors import ConnectFailed

from .fakes import ClientConnection, FakeUpstream
from .test_proxy import DOORS, TARGET_URL, Proxy, server_factory, start_proxy

CHAT_REPLY = json.dumps(
    {
        "id": "chatcmpl-1",
        "model": "gpt-test",
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
    }
).encode()

SSE_WITH_USAGE = [
    b'data: {"model":"gpt-test","choices":[{"delta":{"content":"Hel"}}],"usage":null}\n\n',
    b'data: {"model":"gpt-test","choices":[{"delta":{"content":"lo"}}],"usage":null}\n\n',
    b'data: {"model":"gpt-test","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    b"\n\n",
    b"data: [DONE]\n\n",
]


def completion(events: list[LogEvent]) -> LogEvent:
    """The one completion record among ``events``, leaving out the metrics scrapes."""
    [record] = [e for e in events if "bytes_out" in e and e["path"] != "/api/metrics"]
    return record


def samples(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample that ``GET /api/metrics`` shows, by name and labels."""
    client = ClientConnection(proxy.client.protocol.factory)
    client.request(b"GET", b"/api/metrics")
    response = client.response()
    assert response.status == 200
    assert (response.header(b"content-type") or b"").startswith(b"text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.body.decode())
        for sample in family.samples
    }


def value(proxy: Proxy, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled sample that does not exist yet."""
    return samples(proxy).get((name, tuple(sorted(labels.items()))), 0.0)


def test_completion_record_of_a_json_reply_has_every_field() -> None:
    """The completion line names the client, both statuses, the time to upstream headers,
    the duration, the bytes each way, and the model and tokens of the reply."""
    proxy = start_proxy()
    body = b'{"model": "gpt-test", "messages": []}'
    with capturedLogs() as events:
        proxy.client.request(
            b"POST",
            b"/v1/chat/completions",
            [(b"Content-Type", b"application/json"), (b"X-Request-ID", b"rec-1")],
            body,
        )
        proxy.clock.advance(0.25)
        response = proxy.upstream.last.respond(
            200, {b"Content-Type": [b"application/json; charset=utf-8"]}
        )
        proxy.clock.advance(0.5)
        response.send(CHAT_REPLY[:40])
        response.send(CHAT_REPLY[40:])
        response.end()
    record = completion(events)
    assert {key: record[key] for key in RequestRecord().log_fields()} == {
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": "203.0.113.7",
        "request_id": "rec-1",
        "status": 200,
        "upstream_status": 200,
        "upstream_headers_after": 0.25,
        "duration": 0.75,
        "bytes_in": len(body),
        "bytes_out": len(CHAT_REPLY),
        "retries": 0,
        "cancelled": False,
        "upstream_error": None,
        "model": "gpt-test",
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "key_id": None,
        "auth_refusal": None,
        "tunnel_closed_by": None,
        "upstream": None,
        "failed_over_from": None,
    }
    assert formatEvent(record) == (
        "Request completed: POST /v1/chat/completions [Status: 200] [Time: 0.750s]"
        " [ID: rec-1] [Client: 203.0.113.7] [Upstream: 200 after 0.250s]"
        f" [Bytes: {len(body)} in, {len(CHAT_REPLY)} out] [Model: gpt-test]"
        " [Tokens: 12 prompt, 34 completion]"
    )
    assert proxy.client.response().body == CHAT_REPLY


def test_usage_in_the_last_event_of_a_stream_is_counted() -> None:
    """A stream's usage chunk (``stream_options.include_usage``) gives the tokens, which
    the record and ``aiproxy_tokens_total`` show; the events reach the client unchanged."""
    proxy = start_proxy()
    with capturedLogs() as events:
        proxy.client.request(b"POST", b"/v1/chat/completions", body=b"{}")
        response = proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
        assert value(proxy, "aiproxy_active_streams") == 1
        for event in SSE_WITH_USAGE:
            response.send(event)
        response.end()
    record = completion(events)
    assert (record["model"], record["prompt_tokens"], record["completion_tokens"]) == (
        "gpt-test",
        5,
        2,
    )
    assert proxy.client.response().body == b"".join(SSE_WITH_USAGE)
    assert value(proxy, "aiproxy_active_streams") == 0
    assert value(proxy, "aiproxy_tokens_total", model="gpt-test", kind="prompt") == 5
    assert value(proxy, "aiproxy_tokens_total", model="gpt-test", kind="completion") == 2


def test_a_client_leaving_mid_stream_is_recorded_and_counted_as_cancelled() -> None:
    """The record says cancelled, the line says aborted, and
    ``aiproxy_client_cancelled_total`` moves; the stream no longer counts as active."""
    proxy = start_proxy()
    with capturedLogs() as events:
        proxy.client.request(b"GET", b"/v1/stream")
        response = proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
        response.send(SSE_WITH_USAGE[0])
        proxy.client.disconnect()
    assert response.aborted
    record = completion(events)
    assert record["cancelled"] is True
    assert record["model"] == "gpt-test" and record["prompt_tokens"] is None
    assert formatEvent(record).startswith("Request aborted, connection lost")
    assert value(proxy, "aiproxy_client_cancelled_total") == 1
    assert value(proxy, "aiproxy_active_streams") == 0


def test_a_client_leaving_before_the_response_head_is_recorded_as_cancelled() -> None:
    """Regression: the cancelled upstream attempt used to be answered and recorded as a
    ``502`` upstream error, and the completion line came before the cancel line."""
    proxy = start_proxy()
    with capturedLogs() as events:
        proxy.client.request(b"POST", b"/v1/chat/completions", body=b"{}")
        proxy.client.disconnect()
    assert proxy.upstream.last.cancelled
    record = completion(events)
    assert (record["cancelled"], record["status"], record["upstream_error"]) == (True, 0, None)
    lines = [formatEvent(e) for e in events]
    assert lines[1].startswith("Client disconnected, upstream request cancelled")
    assert lines[2].startswith("Request aborted, connection lost")
    assert value(proxy, "aiproxy_client_cancelled_total") == 1
    assert value(proxy, "aiproxy_upstream_errors_total", kind="connect") == 0


def test_an_unreachable_upstream_is_recorded_by_kind() -> None:
    """A failed connection leaves no upstream status, names the kind of failure in the
    record and counts it in ``aiproxy_upstream_errors_total{kind}``."""
    proxy = start_proxy(max_retries=0)
    with capturedLogs() as events:
        proxy.client.request(b"GET", b"/v1/models")
        proxy.upstream.last.deferred.errback(
            ConnectFailed("no address for upstream.example", kind="dns")
        )
    record = completion(events)
    assert (record["status"], record["upstream_status"]) == (502, None)
    assert record["upstream_error"] == "dns"
    assert "[Upstream: dns]" in formatEvent(record)
    assert value(proxy, "aiproxy_upstream_errors_total", kind="dns") == 1
    assert value(proxy, "aiproxy_upstream_ttfb_seconds_count") == 0


def test_retries_are_counted() -> None:
    """``aiproxy_retries_total`` counts each upstream request sent again."""
    proxy = start_proxy(max_retries=3, retry_backoff_factor=0.5)
    proxy.client.request(b"GET", b"/v1/models")
    for _ in range(2):
        proxy.upstream.last.deferred.errback(ConnectFailed("Connection was refused by other side"))
        proxy.clock.advance(1)
    proxy.upstream.last.respond(200).end()
    assert value(proxy, "aiproxy_retries_total") == 2


def test_requests_durations_and_bytes_are_counted() -> None:
    """A request moves ``aiproxy_requests_total{method,status}``, both histograms and
    ``aiproxy_bytes_total{direction}``; ``aiproxy_active_requests`` counts it in flight."""
    proxy = start_proxy()
    proxy.client.request(b"POST", b"/v1/embeddings", body=b"x" * 100)
    assert value(proxy, "aiproxy_active_requests") == 2  # it, and the scrape itself
    proxy.clock.advance(2)
    response = proxy.upstream.last.respond(201)
    response.send(b"y" * 30)
    response.end()
    assert value(proxy, "aiproxy_requests_total", method="POST", status="201") == 1
    # The scrapes take no time on the fake clock: the one request of 2s is the difference.
    within = samples(proxy)
    bucket = "aiproxy_request_duration_seconds_bucket"
    assert within[(bucket, (("le", "2.5"),))] - within[(bucket, (("le", "1.0"),))] == 1
    assert value(proxy, "aiproxy_upstream_ttfb_seconds_sum") == 2
    assert value(proxy, "aiproxy_bytes_total", direction="in") == 100
    assert value(proxy, "aiproxy_bytes_total", direction="out") >= 30
    assert value(proxy, "aiproxy_active_requests") == 1


def test_histogram_buckets_reach_minutes() -> None:
    """Latency buckets run from milliseconds to ten minutes, as LLM replies do."""
    proxy = start_proxy()
    buckets = {labels for name, labels in samples(proxy) if name.endswith("ttfb_seconds_bucket")}
    bounds = sorted(float(dict(labels)["le"]) for labels in buckets)
    assert bounds[0] <= 0.005 and 600 in bounds and bounds[-1] == float("inf")


def test_unusual_methods_share_one_label() -> None:
    """Methods outside the standard set are counted as ``OTHER``, never by their name."""
    proxy = start_proxy()
    proxy.client.request(b"PROPFIND", b"/coffee")
    proxy.upstream.last.respond(418).end()
    assert value(proxy, "aiproxy_requests_total", method="OTHER", status="418") == 1
    assert not any(dict(labels).get("method") == "PROPFIND" for _, labels in samples(proxy))


def test_model_labels_are_capped() -> None:
    """Only the first ``MAX_MODELS`` model names get a label; later ones count as other."""
    metrics = ProxyMetrics(lambda: 0)
    for n in range(MAX_MODELS + 5):
        metrics.observe(RequestRecord(usage=Usage(f"model-{n}", 1, 1)))
    labels = {
        sample.labels["model"]
        for family in text_string_to_metric_families(metrics.exposition()[0].decode())
        if family.name == "aiproxy_tokens"
        for sample in family.samples
    }
    assert len(labels) == MAX_MODELS + 1
    assert "other" in labels and f"model-{MAX_MODELS}" not in labels


def test_metrics_can_be_switched_off() -> None:
    """With ``ENABLE_METRICS=false`` there is no metrics endpoint: the path is the
    upstream's, like any other."""
    proxy = start_proxy(enable_metrics=False)
    proxy.client.request(b"GET", b"/api/metrics")
    assert [call.url for call in proxy.upstream.calls] == [TARGET_URL.encode() + b"/api/metrics"]


def test_metrics_endpoint_refuses_other_methods() -> None:
    """``POST /api/metrics`` gets the JSON 405 and reaches no upstream."""
    proxy = start_proxy()
    proxy.client.request(b"POST", b"/api/metrics", body=b"")
    response = proxy.client.response()
    assert response.status == 405
    assert json.loads(response.body)["error"]["type"] == "method_not_allowed"
    assert proxy.upstream.calls == []


def _client_seen(peer: Any, headers: list[tuple[bytes, bytes]], **settings: Any) -> str:
    config = Config(target_url=TARGET_URL, **settings)
    clock = Clock()
    core = build_core(config, FakeUpstream(), clock)
    with capturedLogs() as events:
        ClientConnection(server_factory("http1", core, clock, config), peer).request(
            b"GET", b"/api/ping", headers
        )
    [started] = [e for e in events if str(e.get("log_format")).startswith("Request started")]
    client: str = started["client"]
    assert completion(events)["client"] == client
    return client


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    """The client address is the peer's unless the peer is in ``TRUSTED_PROXIES``; then
    it is the first untrusted address of ``X-Forwarded-For``, read from the right."""
    forwarded = [(b"X-Forwarded-For", b"198.51.100.9, 10.0.0.7")]
    balancer = IPv4Address("TCP", "10.0.0.5", 4000)
    assert _client_seen(balancer, forwarded) == "10.0.0.5"
    assert _client_seen(balancer, forwarded, trusted_proxies=("10.0.0.0/8",)) == "198.51.100.9"
    stranger = IPv4Address("TCP", "192.0.2.66", 4000)
    assert _client_seen(stranger, forwarded, trusted_proxies=("10.0.0.0/8",)) == "192.0.2.66"
    assert _client_seen(UNIXAddress(b"/run/aiproxy.sock"), forwarded) == "unix"


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket() -> None:
    """Buckets are "less than or equal": a request of exactly 1s is in ``le="1.0"``."""
    metrics = ProxyMetrics(lambda: 0)
    metrics.started()
    metrics.observe(RequestRecord(duration=1.0))
    [family] = [
        f
        for f in text_string_to_metric_families(metrics.exposition()[0].decode())
        if f.name == "aiproxy_request_duration_seconds"
    ]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert (buckets["0.5"], buckets["1.0"], buckets["+Inf"]) == (0, 1, 1)


def test_worker_snapshots_add_up_and_only_running_workers_count_as_active() -> None:
    """Counters of every worker are summed, an ended worker's included, so totals
    never go down when a worker is replaced; gauges count running workers only."""
    mine = ProxyMetrics(lambda: 1)
    mine.started()
    mine.observe(RequestRecord(method="GET", status=200, duration=0.2, bytes_out=10))
    mine.started()
    running = ProxyMetrics(lambda: 2)
    running.started()
    running.observe(RequestRecord(method="GET", status=200, duration=3.0, retries=2))
    ended = ProxyMetrics(lambda: 5)
    ended.started()
    ended.observe(RequestRecord(method="POST", status=502, upstream_error="connect"))
    ended.started()
    merged = merge_snapshots(
        mine.snapshot(), [(running.snapshot(), True), (ended.snapshot(), False)]
    )
    assert merged["requests"] == {"GET 200": 2, "POST 502": 1}
    assert merged["upstream_errors"] == {"connect": 1}
    assert merged["retries"] == 2 and merged["bytes"] == {"in": 0, "out": 10}
    assert sum(merged["duration"]["counts"]) == 3 and merged["duration"]["sum"] == 3.2
    assert (merged["active_requests"], merged["active_streams"]) == (1, 3)


def test_workers_publish_to_and_read_from_a_shared_directory(tmp_path: Any) -> None:
    """A worker's ``/api/metrics`` shows the sum of its own figures and those its
    siblings published; a half-written or foreign file is ignored."""
    sibling = ProxyMetrics(lambda: 0)
    sibling.started()
    sibling.observe(RequestRecord(method="POST", status=200, usage=Usage("m", 3, 4)))
    SharedMetrics(str(tmp_path), pid=os.getpid() + 1_000_000).publish(sibling.snapshot())
    (tmp_path / "12.json.partial").write_text("{")
    (tmp_path / "notes.txt").write_text("x")
    scraped = ProxyMetrics(lambda: 0, shared=SharedMetrics(str(tmp_path)))
    scraped.started()
    scraped.observe(RequestRecord(method="POST", status=200, usage=Usage("m", 1, 1)))
    families = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped.exposition()[0].decode())
        for sample in family.samples
    }
    assert families[("aiproxy_requests_total", (("method", "POST"), ("status", "200")))] == 2
    assert families[("aiproxy_tokens_total", (("kind", "prompt"), ("model", "m")))] == 4
    assert families[("aiproxy_tokens_total", (("kind", "completion"), ("model", "m")))] == 5


PLANTED_KEY = b"sk-live-PLANTED0123456789abcdef"


def _every_line(events: list[LogEvent]) -> str:
    """What the text and the JSON log observers would write for ``events``."""
    text, lines = io.StringIO(), io.StringIO()
    for event in events:
        text_log_observer(text)(event)
        json_log_observer(lines)(event)
    return text.getvalue() + lines.getvalue()


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/v1/files/" + PLANTED_KEY, []),
        (b"/v1/models?k=" + PLANTED_KEY, []),
        (b"/v1/models", [(b"X-Request-ID", PLANTED_KEY)]),
    ],
    ids=["path", "query", "request-id"],
)
@pytest.mark.parametrize("door", DOORS)
def test_key_shaped_values_never_reach_a_log_line(
    door: str, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """A key in a path segment, a query value of any name or the request ID is
    ``[REDACTED]`` in every log line (retries and the completion line included, DEBUG
    on), while the upstream still gets the request as sent."""
    proxy = start_proxy(door, max_retries=1, log_level="DEBUG")
    with capturedLogs() as events:
        proxy.client.request(b"GET", target, headers)
        proxy.upstream.last.deferred.errback(ConnectFailed("refused", kind="connect"))
        proxy.clock.advance(5)
        proxy.upstream.last.respond(200, {b"Content-Length": [b"0"]}).end()
    assert proxy.upstream.last.request_line.split(b" ")[1].endswith(target)
    lines = _every_line(events)
    assert "Retrying" in lines and "Request completed" in lines
    assert PLANTED_KEY.decode() not in lines
    assert "[REDACTED]" in lines


def test_a_key_shaped_model_name_is_counted_as_other() -> None:
    """An upstream that names its model with an API key does not put it into
    ``/api/metrics`` or the completion line: the model counts as ``other``."""
    proxy = start_proxy()
    reply = json.dumps({"model": PLANTED_KEY.decode(), "usage": {"prompt_tokens": 3}}).encode()
    with capturedLogs() as events:
        proxy.client.request(b"POST", b"/v1/chat/completions", body=b"{}")
        response = proxy.upstream.last.respond(200, {b"Content-Type": [b"application/json"]})
        response.send(reply)
        response.end()
    assert "[Model: other]" in formatEvent(completion(events))
    assert value(proxy, "aiproxy_tokens_total", model="other", kind="prompt") == 3
    assert PLANTED_KEY.decode() not in str(samples(proxy))


def test_control_characters_from_the_client_are_escaped_in_log_lines() -> None:
    """A method, path or request ID with control bytes or non-ASCII bytes (which a door
    such as HTTP/2 may pass to the core) is written with them escaped, so one request
    stays one log line and no terminal escape sequence runs."""
    proxy = start_proxy()
    request = proxy.core.incoming(
        b"GE\x1bT", b"/v1/\x1b[31mred\x08\xff?q=\n", [], b"HTTP/2", b"https", "192.0.2.1"
    )
    record = request.record
    line = record.log_format().format(**record.log_fields())
    assert (record.method, record.path) == ("GE\\x1bT", "/v1/\\x1b[31mred\\x08\\xff")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in line)
