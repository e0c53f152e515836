"""
Prometheus metrics of the proxy, and the ``/api/metrics`` endpoint that serves them.

Every label value comes from a bounded set: methods outside the standard ones are
counted as ``OTHER``, statuses are three-digit codes, and model names (chosen by
clients and upstreams) get a label of their own only for the first
:data:`MAX_MODELS` seen; later ones are counted under ``other``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from twisted.web.server import Request

from aiproxy.health import GetOnlyResource
from aiproxy.record import RequestRecord

__all__ = ["LATENCY_BUCKETS", "MAX_MODELS", "MetricsResource", "ProxyMetrics"]

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"),
)  # fmt: skip
"""Seconds: from a cached reply in milliseconds to a long generation in minutes."""

MAX_MODELS = 100
"""Distinct model names that get a label value of their own."""

MAX_MODEL_LENGTH = 100

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ProxyMetrics:
    """
    The proxy's metrics, in a registry of their own (``registry``, a new one if not
    given), moved by each request when it starts (:meth:`started`) and when it ends
    (:meth:`observe`).

    @param active_streams: how many event streams are being relayed now (read at
        scrape time).
    """

    def __init__(
        self, active_streams: Callable[[], int], registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        registry = self.registry
        self.requests = Counter(
            "aiproxy_requests",
            "Requests answered, by method and status.",
            ["method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "aiproxy_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_ttfb = Histogram(
            "aiproxy_upstream_ttfb_seconds",
            "Seconds from a request's arrival to the upstream's response headers.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.active_requests = Gauge(
            "aiproxy_active_requests", "Requests in flight.", registry=registry
        )
        Gauge(
            "aiproxy_active_streams",
            "Event streams (text/event-stream responses) being relayed.",
            registry=registry,
        ).set_function(active_streams)
        self.upstream_errors = Counter(
            "aiproxy_upstream_errors",
            "Upstream requests that failed, by kind of failure.",
            ["kind"],
            registry=registry,
        )
        self.retries = Counter(
            "aiproxy_retries", "Upstream requests sent again.", registry=registry
        )
        self.client_cancelled = Counter(
            "aiproxy_client_cancelled",
            "Requests whose client left before the response ended.",
            registry=registry,
        )
        self.bytes = Counter(
            "aiproxy_bytes",
            "Body bytes received from clients (in) and sent to them (out).",
            ["direction"],
            registry=registry,
        )
        self.tokens = Counter(
            "aiproxy_tokens",
            "Tokens reported by the upstream's usage, by model and kind.",
            ["model", "kind"],
            registry=registry,
        )
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        self._models: set[str] = set()

    def started(self) -> None:
        """A request has arrived."""
        self.active_requests.inc()

    def observe(self, record: RequestRecord) -> None:
        """Count one request whose response has ended (or whose client has left)."""
        self.active_requests.dec()
        method = record.method if record.method in _METHODS else "OTHER"
        self.requests.labels(method, str(record.status)).inc()
        self.duration.observe(record.duration)
        if record.upstream_headers_after is not None:
            self.upstream_ttfb.observe(record.upstream_headers_after)
        if record.upstream_error is not None:
            self.upstream_errors.labels(record.upstream_error).inc()
        if record.retries:
            self.retries.inc(record.retries)
        if record.cancelled:
            self.client_cancelled.inc()
        if record.bytes_in:
            self._bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            self._bytes_out.inc(record.bytes_out)
        usage = record.usage
        if usage is not None:
            model = self._model_label(usage.model)
            if usage.prompt_tokens:
                self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self.tokens.labels(model, "completion").inc(usage.completion_tokens)

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
