"""
Prometheus metrics of the proxy, and the ``/api/metrics`` endpoint that serves them.

Every label value comes from a bounded set: methods outside the standard ones are
counted as ``OTHER``, statuses are three-digit codes, and model names (chosen by
clients and upstreams) get a label of their own only for the first
:data:`MAX_MODELS` seen; later ones are counted under ``other``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from twisted.web.server import Request

from aiproxy.health import GetOnlyResource
from aiproxy.record import RequestRecord

__all__ = ["LATENCY_BUCKETS", "MAX_MODELS", "LatencyHistogram", "MetricsResource", "ProxyMetrics"]

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"),
)  # fmt: skip
"""Seconds: from a cached reply in milliseconds to a long generation in minutes."""

MAX_MODELS = 100
"""Distinct model names that get a label value of their own."""

MAX_MODEL_LENGTH = 100

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LatencyHistogram:
    """Observations counted into :data:`LATENCY_BUCKETS`, with their sum."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation, in the first bucket whose bound it does not exceed."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus has it: cumulative counts per upper bound."""
        buckets = []
        total = 0
        for bound, count in zip(LATENCY_BUCKETS, self.counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class ProxyMetrics:
    """
    The proxy's metrics, moved by each request when it starts (:meth:`started`) and
    when it ends (:meth:`observe`), and collected in Prometheus' form when scraped.

    Requests only add to plain numbers (the reactor runs them one at a time);
    :meth:`collect` turns those into metric families. The metrics are registered in
    ``registry`` (a new one if not given).

    @param active_streams: how many event streams are being relayed now (read at
        scrape time).
    """

    def __init__(
        self, active_streams: Callable[[], int], registry: CollectorRegistry | None = None
    ) -> None:
        self.active_streams = active_streams
        self.active_requests = 0
        self.requests: dict[tuple[str, int], int] = {}
        self.duration = LatencyHistogram()
        self.upstream_ttfb = LatencyHistogram()
        self.upstream_errors: dict[str, int] = {}
        self.retries = 0
        self.client_cancelled = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tokens: dict[tuple[str, str], int] = {}
        self._models: set[str] = set()
        self.registry = CollectorRegistry() if registry is None else registry
        self.registry.register(self)

    def started(self) -> None:
        """A request has arrived."""
        self.active_requests += 1

    def observe(self, record: RequestRecord) -> None:
        """Count one request whose response has ended (or whose client has left)."""
        self.active_requests -= 1
        method = record.method if record.method in _METHODS else "OTHER"
        key = (method, record.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.duration.observe(record.duration)
        if record.upstream_headers_after is not None:
            self.upstream_ttfb.observe(record.upstream_headers_after)
        if record.upstream_error is not None:
            kind = record.upstream_error
            self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1
        self.retries += record.retries
        self.client_cancelled += record.cancelled
        self.bytes_in += record.bytes_in
        self.bytes_out += record.bytes_out
        usage = record.usage
        if usage is not None:
            model = self._model_label(usage.model)
            if usage.prompt_tokens:
                self._add_tokens(model, "prompt", usage.prompt_tokens)
            if usage.completion_tokens:
                self._add_tokens(model, "completion", usage.completion_tokens)

    def _add_tokens(self, model: str, kind: str, count: int) -> None:
        self.tokens[model, kind] = self.tokens.get((model, kind), 0) + count

    def _model_label(self, model: str | None) -> str:
        if model is None:
            return "unknown"
        model = model[:MAX_MODEL_LENGTH]
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def collect(self) -> Iterator[Metric]:
        """The metrics as Prometheus metric families (the ``Collector`` interface)."""
        requests = CounterMetricFamily(
            "aiproxy_requests",
            "Requests answered, by method and status.",
            labels=["method", "status"],
        )
        for (method, status), count in self.requests.items():
            requests.add_metric([method, str(status)], count)
        yield requests
        yield self.duration.family(
            "aiproxy_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response.",
        )
        yield self.upstream_ttfb.family(
            "aiproxy_upstream_ttfb_seconds",
            "Seconds from a request's arrival to the upstream's response headers.",
        )
        yield GaugeMetricFamily(
            "aiproxy_active_requests", "Requests in flight.", value=self.active_requests
        )
        yield GaugeMetricFamily(
            "aiproxy_active_streams",
            "Event streams (text/event-stream responses) being relayed.",
            value=self.active_streams(),
        )
        errors = CounterMetricFamily(
            "aiproxy_upstream_errors",
            "Upstream requests that failed, by kind of failure.",
            labels=["kind"],
        )
        for kind, count in self.upstream_errors.items():
            errors.add_metric([kind], count)
        yield errors
        yield CounterMetricFamily(
            "aiproxy_retries", "Upstream requests sent again.", value=self.retries
        )
        yield CounterMetricFamily(
            "aiproxy_client_cancelled",
            "Requests whose client left before the response ended.",
            value=self.client_cancelled,
        )
        moved = CounterMetricFamily(
            "aiproxy_bytes",
            "Body bytes received from clients (in) and sent to them (out).",
            labels=["direction"],
        )
        moved.add_metric(["in"], self.bytes_in)
        moved.add_metric(["out"], self.bytes_out)
        yield moved
        tokens = CounterMetricFamily(
            "aiproxy_tokens",
            "Tokens reported by the upstream's usage, by model and kind.",
            labels=["model", "kind"],
        )
        for (model, kind), count in self.tokens.items():
            tokens.add_metric([model, kind], count)
        yield tokens

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """
        The metrics, and their content type: Prometheus' text format, or OpenMetrics
        when ``accept`` (a request's ``Accept`` header) asks for it.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class MetricsResource(GetOnlyResource):
    """``GET /api/metrics``: the proxy's metrics in Prometheus' text format."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """The current metrics, in the format the scraper accepts."""
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.exposition(
            None if accept is None else accept.decode("latin-1")
        )
        request.responseHeaders.setRawHeaders(b"Content-Type", [content_type.encode()])
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
        return body
