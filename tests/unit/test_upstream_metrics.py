"""
What operators and clients are shown of several upstreams (``UPSTREAMS_FILE``): the
per-upstream metrics of ``/api/metrics``, read from the exposition text as a scraper
reads it, and what ``/api/openapi.json`` says of the answers several upstreams bring.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from aiproxy.config import Config
from aiproxy.core.build import build_core
from aiproxy.core.record import RequestRecord
from aiproxy.errors import NoUpstreamAvailable, error_body
from aiproxy.ops.metrics import MAX_UPSTREAMS, ProxyMetrics, SharedMetrics, merge_snapshots
from aiproxy.ops.openapi import openapi_document
from aiproxy.routing.routes import Routes
from aiproxy.routing.upstreams import UpstreamEntry, parse_upstreams
from aiproxy.upstream.errors import ConnectFailed

from .fakes import ClientConnection, FakeUpstream
from .test_proxy import TARGET_URL, server_factory

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

UPSTREAM_FAMILIES = {
    "aiproxy_upstream_requests",
    "aiproxy_upstream_failovers",
    "aiproxy_upstream_ttfb_by_upstream_seconds",
    "aiproxy_upstream_state",
}

TWO = """
[[upstream]]
name = "a"
url = "https://a.example"

[[upstream]]
name = "b"
url = "https://b.example"
priority = 1
"""


def exposition(metrics: ProxyMetrics) -> tuple[set[str], Samples]:
    """The names of the families ``metrics`` exposes, and every sample by name and labels."""
    families = list(text_string_to_metric_families(metrics.exposition()[0].decode()))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }
    return {family.name for family in families}, samples


def upstream_samples(metrics: ProxyMetrics) -> Samples:
    """The samples of the per-upstream families only."""
    _, samples = exposition(metrics)
    return {
        key: value for key, value in samples.items() if key[0].startswith(tuple(UPSTREAM_FAMILIES))
    }


def requests(upstream: str, status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of an ``aiproxy_upstream_requests_total`` sample."""
    return ("aiproxy_upstream_requests_total", (("status", status), ("upstream", upstream)))


def failovers(upstream: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of an ``aiproxy_upstream_failovers_total`` sample."""
    return ("aiproxy_upstream_failovers_total", (("upstream", upstream),))


def state(upstream: str, name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of an ``aiproxy_upstream_state`` sample."""
    return ("aiproxy_upstream_state", (("state", name), ("upstream", upstream)))


def states(upstream: str, current: str) -> Samples:
    """The five state samples of ``upstream``: 1 for ``current``, 0 for the others."""
    return {
        state(upstream, name): int(name == current)
        for name in ("healthy", "cooling", "disabled", "ejected", "half_open")
    }


def observed(*records: RequestRecord, **options: Any) -> ProxyMetrics:
    """Metrics that have counted ``records``."""
    metrics = ProxyMetrics(lambda: 0, **options)
    for record in records:
        metrics.started()
        metrics.observe(record)
    return metrics


class Several:
    """aiproxy built from ``Config(**settings)`` with the upstreams of the file at
    ``path`` (written with ``text``), each a :class:`FakeUpstream`, over a fake clock."""

    def __init__(self, path: Any, text: str = TWO, **settings: Any) -> None:
        path.write_text(text)
        self.clock = Clock()
        self.pools: dict[str, FakeUpstream] = {}
        self.routes = Routes(str(path), parse_upstreams(text), self.clock, self._pool, lambda: 0)
        self.config = Config(target_url=TARGET_URL, upstreams_file=str(path), **settings)
        self.core = build_core(self.config, FakeUpstream(), self.clock, routes=self.routes)

    def _pool(self, entry: UpstreamEntry) -> FakeUpstream:
        self.pools[entry.name] = pool = FakeUpstream()
        return pool

    def client(self) -> ClientConnection:
        """A new client connection to the proxy."""
        return ClientConnection(server_factory("http1", self.core, self.clock, self.config))

    @property
    def metrics(self) -> ProxyMetrics:
        """The proxy's metrics."""
        assert self.core.metrics is not None
        return self.core.metrics


def test_a_request_is_counted_by_its_upstream_and_the_status_it_answered() -> None:
    """Requests whose last attempt went to an upstream are counted by that upstream and
    its status; with no status, by the kind of failure, and ``-`` when the client left
    before the upstream answered."""
    metrics = observed(
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=0.1),
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=0.1),
        RequestRecord(upstream="a", upstream_status=429, upstream_headers_after=0.1),
        RequestRecord(upstream="b", status=502, upstream_error="connect"),
        RequestRecord(upstream="b", status=0, cancelled=True),
    )
    samples = upstream_samples(metrics)
    counted = {k: v for k, v in samples.items() if k[0] == "aiproxy_upstream_requests_total"}
    assert counted == {
        requests("a", "200"): 2,
        requests("a", "429"): 1,
        requests("b", "connect"): 1,
        requests("b", "-"): 1,
    }


def test_each_upstream_failed_over_from_counts_one_failover() -> None:
    """A request that failed over from ``a`` then ``b`` and was answered by ``c`` counts
    one failover for ``a`` and one for ``b``, and one request for ``c``."""
    metrics = observed(
        RequestRecord(upstream="c", upstream_status=200, failed_over_from=("a", "b")),
        RequestRecord(upstream="c", upstream_status=200, failed_over_from=("a",)),
    )
    samples = upstream_samples(metrics)
    assert {k: v for k, v in samples.items() if k[0] == "aiproxy_upstream_failovers_total"} == {
        failovers("a"): 2,
        failovers("b"): 1,
    }
    assert samples[requests("c", "200")] == 2
    assert requests("a", "200") not in samples


def test_time_to_upstream_headers_is_a_histogram_per_upstream() -> None:
    """Each upstream has its own histogram of the seconds to its response headers
    (buckets "less than or equal"); a request without headers adds no observation.
    The histogram of every upstream together is unchanged."""
    metrics = observed(
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=0.25),
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=2.0),
        RequestRecord(upstream="b", upstream_status=200, upstream_headers_after=0.01),
        RequestRecord(upstream="b", upstream_error="timeout"),
    )
    _, samples = exposition(metrics)

    def bucket(upstream: str, le: str) -> float:
        labels = (("le", le), ("upstream", upstream))
        return samples["aiproxy_upstream_ttfb_by_upstream_seconds_bucket", labels]

    assert [bucket("a", le) for le in ("0.1", "0.25", "1.0", "2.5", "+Inf")] == [0, 1, 1, 2, 2]
    assert [bucket("b", le) for le in ("0.005", "0.01", "+Inf")] == [0, 1, 1]
    upstream_a = (("upstream", "a"),)
    assert samples["aiproxy_upstream_ttfb_by_upstream_seconds_count", upstream_a] == 2
    assert samples["aiproxy_upstream_ttfb_by_upstream_seconds_sum", upstream_a] == 2.25
    assert samples["aiproxy_upstream_ttfb_seconds_count", ()] == 3


def test_each_upstreams_state_is_a_gauge_read_at_scrape_time() -> None:
    """``aiproxy_upstream_state`` is 1 for the state each upstream is in and 0 for the
    other four, as the router reports it when scraped."""
    report: list[dict[str, object]] = [
        {"name": "a", "state": "healthy", "keys": []},
        {"name": "b", "state": "ejected", "seconds_left": 4.5, "keys": []},
    ]
    metrics = observed(upstream_states=lambda: report)
    assert upstream_samples(metrics) == {**states("a", "healthy"), **states("b", "ejected")}
    report[1] = {"name": "b", "state": "half_open", "keys": []}
    assert upstream_samples(metrics) == {**states("a", "healthy"), **states("b", "half_open")}


def test_worker_snapshots_add_up_per_upstream() -> None:
    """Workers' per-upstream counters and histograms are summed, an ended worker's
    included; the state gauges count the running workers that see each state."""
    mine = observed(
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=0.2),
        upstream_states=lambda: [{"name": "a", "state": "healthy", "keys": []}],
    )
    running = observed(
        RequestRecord(
            upstream="b", upstream_status=200, upstream_headers_after=1.0, failed_over_from=("a",)
        ),
        upstream_states=lambda: [{"name": "a", "state": "cooling", "keys": []}],
    )
    ended = observed(
        RequestRecord(upstream="a", upstream_status=200, upstream_headers_after=0.3),
        upstream_states=lambda: [{"name": "a", "state": "ejected", "keys": []}],
    )
    merged = merge_snapshots(
        mine.snapshot(), [(running.snapshot(), True), (ended.snapshot(), False)]
    )
    assert merged["upstream_requests"] == {"a 200": 2, "b 200": 1}
    assert merged["upstream_failovers"] == {"a": 1}
    assert sum(merged["ttfb_by_upstream"]["a"]["counts"]) == 2
    assert merged["ttfb_by_upstream"]["a"]["sum"] == 0.5
    assert merged["upstream_states"] == {
        "a healthy": 1,
        "a cooling": 1,
        "a disabled": 0,
        "a ejected": 0,
        "a half_open": 0,
    }


def test_a_scraped_worker_shows_its_siblings_upstream_figures(tmp_path: Any) -> None:
    """The worker a scrape reaches shows the per-upstream figures its siblings
    published, added to its own."""
    sibling = observed(
        RequestRecord(upstream="a", upstream_status=503, failed_over_from=("b",)),
        upstream_states=lambda: [{"name": "a", "state": "cooling", "keys": []}],
    )
    SharedMetrics(str(tmp_path)).publish(sibling.snapshot())  # as this process: running
    scraped = observed(
        RequestRecord(upstream="a", upstream_status=503, upstream_headers_after=0.5),
        shared=SharedMetrics(str(tmp_path), pid=os.getpid() + 1_000_000),
        upstream_states=lambda: [{"name": "a", "state": "healthy", "keys": []}],
    )
    samples = upstream_samples(scraped)
    assert samples[requests("a", "503")] == 2
    assert samples[failovers("b")] == 1
    assert samples["aiproxy_upstream_ttfb_by_upstream_seconds_count", (("upstream", "a"),)] == 1
    assert {k: v for k, v in samples.items() if k[0] == "aiproxy_upstream_state"} == {
        **states("a", "healthy"),
        state("a", "cooling"): 1,
    }


def test_one_upstream_shows_no_upstream_metrics() -> None:
    """With one upstream (records name none, no state callback), the per-upstream
    families are not exposed at all, and the other metrics are as before."""
    metrics = observed(
        RequestRecord(method="POST", status=200, upstream_status=200, upstream_headers_after=0.2),
        RequestRecord(method="POST", status=502, upstream_error="connect"),
    )
    families, samples = exposition(metrics)
    assert not families & UPSTREAM_FAMILIES
    assert upstream_samples(metrics) == {}
    assert samples["aiproxy_upstream_ttfb_seconds_count", ()] == 1
    assert samples["aiproxy_upstream_errors_total", (("kind", "connect"),)] == 1


def test_a_state_callback_alone_exposes_every_upstream_family() -> None:
    """With several upstreams, the families are there before any request, so that a
    dashboard finds them."""
    families, _ = exposition(observed(upstream_states=lambda: []))
    assert families >= UPSTREAM_FAMILIES


def test_upstream_labels_are_capped() -> None:
    """Only the first ``MAX_UPSTREAMS`` upstream names get a label; later ones (an
    upstreams file reloaded many times) count as ``other``."""
    names = [f"up-{n}" for n in range(MAX_UPSTREAMS + 3)]
    metrics = observed(
        *(RequestRecord(upstream=name, upstream_status=200) for name in names),
        RequestRecord(upstream="up-0", upstream_status=200, failed_over_from=(names[-1],)),
    )
    samples = upstream_samples(metrics)
    labels = {dict(labels)["upstream"] for _, labels in samples}
    assert len(labels) == MAX_UPSTREAMS + 1
    assert samples[requests("other", "200")] == 3
    assert samples[failovers("other")] == 1


def test_the_proxy_counts_each_request_by_upstream_and_reads_the_router_in_use(
    tmp_path: Any,
) -> None:
    """Through the proxy: a request refused by ``a`` and answered by ``b`` counts as a
    ``b`` request and an ``a`` failover; the state gauge follows the router that a
    reload of the upstreams file puts in place."""
    proxy = Several(tmp_path / "upstreams.toml")
    client = proxy.client()
    client.request(b"POST", b"/v1/chat/completions", body=b'{"model": "m"}')
    proxy.pools["a"].last.deferred.errback(ConnectFailed("refused"))
    proxy.clock.advance(0.5)
    proxy.pools["b"].last.respond(200).end()
    assert client.response().status == 200
    samples = upstream_samples(proxy.metrics)
    assert samples[requests("b", "200")] == 1
    assert samples[failovers("a")] == 1
    assert samples["aiproxy_upstream_ttfb_by_upstream_seconds_sum", (("upstream", "b"),)] == 0.5
    assert {k: v for k, v in samples.items() if k[0] == "aiproxy_upstream_state"} == {
        **states("a", "healthy"),
        **states("b", "healthy"),
    }
    (tmp_path / "upstreams.toml").write_text(TWO.replace('"b"', '"c"'))
    proxy.routes.reload()
    gauges = {k for k in upstream_samples(proxy.metrics) if k[0] == "aiproxy_upstream_state"}
    assert gauges == {*states("a", "healthy"), *states("c", "healthy")}


# --- The OpenAPI document -----------------------------------------------------------


def schema_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The document's schema ``name``, with the document around it for its ``$ref``s."""
    return {**document, "$ref": f"#/components/schemas/{name}"}


def test_the_document_describes_the_answers_of_several_upstreams() -> None:
    """With UPSTREAMS_FILE the document stays valid and adds: ``404 model_not_found`` in
    OpenAI's shape to the operations with a body, ``503 upstream_unavailable`` (with
    ``Retry-After``) to every operation, and ``X-Upstream`` to relayed responses."""
    document = openapi_document(Config(target_url=TARGET_URL, upstreams_file="u.toml"))
    validate(document)
    for method, operation in document["paths"]["/{path}"].items():
        if method in ("summary", "description", "parameters"):
            continue
        responses = operation["responses"]
        assert responses["503"] == {"$ref": "#/components/responses/Error503"}, method
        assert ("404" in responses) is (method in ("post", "put", "patch")), method
        assert responses["default"]["headers"]["X-Upstream"] == {
            "$ref": "#/components/headers/X-Upstream"
        }
    components = document["components"]
    assert (
        "upstream_unavailable"
        in components["responses"]["Error503"]["content"]["application/json"]["examples"]
    )
    assert "Retry-After" in components["responses"]["Error503"]["headers"]
    assert (
        "upstream_unavailable"
        in components["schemas"]["Error"]["properties"]["error"]["properties"]["type"]["enum"]
    )
    not_found = components["responses"]["ModelNotFound"]
    assert {"X-Request-ID", "X-Process-Time", "X-Proxy-By"} <= set(not_found["headers"])
    examples = not_found["content"]["application/json"]["examples"]
    assert examples["openai"]["value"]["error"]["code"] == "model_not_found"
    for example in examples.values():
        jsonschema.validate(example["value"], schema_of(document, "ApiError"))


def test_the_upstream_header_and_errors_are_left_out_when_unused() -> None:
    """Without UPSTREAMS_FILE there is no 404, no ``upstream_unavailable`` and no
    ``X-Upstream``; with ``UPSTREAM_NAME_HEADER=false``, no ``X-Upstream``."""
    document = openapi_document(Config(target_url=TARGET_URL))
    post = document["paths"]["/{path}"]["post"]["responses"]
    assert "404" not in post
    assert "X-Upstream" not in post["default"]["headers"]
    assert "ModelNotFound" not in document["components"]["responses"]
    assert "X-Upstream" not in document["components"]["headers"]
    error_types = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert "upstream_unavailable" not in error_types["properties"]["type"]["enum"]
    quiet = openapi_document(
        Config(target_url=TARGET_URL, upstreams_file="u.toml", upstream_name_header=False)
    )
    assert "X-Upstream" not in quiet["paths"]["/{path}"]["get"]["responses"]["default"]["headers"]


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/messages"])
def test_a_model_no_upstream_serves_gets_the_documented_404(tmp_path: Any, path: bytes) -> None:
    """The 404 aiproxy sends for a model no upstream serves, in OpenAI's shape or
    Anthropic's, is valid against the documented schema."""
    models = TWO.replace('"https://a.example"', '"https://a.example"\nmodels = ["gpt-*"]')
    proxy = Several(tmp_path / "upstreams.toml", models + 'models = ["claude-*"]\n')
    client = proxy.client()
    client.request(b"POST", path, body=b'{"model": "llama-3"}')
    answer = client.response()
    assert answer.status == 404
    document = openapi_document(proxy.config)
    jsonschema.validate(json.loads(answer.body), schema_of(document, "ApiError"))


def test_the_error_bodies_of_several_upstreams_match_the_error_schema() -> None:
    """The ``503 upstream_unavailable`` body is valid against the Error schema."""
    document = openapi_document(Config(target_url=TARGET_URL, upstreams_file="u.toml"))
    body = json.loads(error_body(NoUpstreamAvailable("x"), b"req-1"))
    jsonschema.validate(body, schema_of(document, "Error"))


def test_health_with_several_upstreams_matches_the_health_schema(tmp_path: Any) -> None:
    """``/api/health`` with ``"upstreams"`` (states, keys, seconds left) is valid against
    the documented schema, which refuses a state the router does not have."""
    keyed = TWO.replace('url = "https://a.example"', 'url = "https://a.example"\nkeys = ["sk-1"]')
    proxy = Several(tmp_path / "upstreams.toml", keyed, auth="none")
    client = proxy.client()
    client.request(b"POST", b"/v1/chat/completions", body=b'{"model": "m"}')
    proxy.pools["a"].last.respond(429, [(b"Retry-After", b"7")])
    proxy.pools["b"].last.respond(200).end()
    client = proxy.client()
    client.request(b"GET", b"/api/health")
    body = json.loads(client.response().body)
    [a, b] = body["upstreams"]
    assert (a["state"], a["keys"][0]["state"], b["state"]) == ("cooling", "cooling", "healthy")
    schema = schema_of(openapi_document(proxy.config), "Health")
    jsonschema.validate(body, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "upstreams": [{**a, "state": "sick"}]}, schema)
