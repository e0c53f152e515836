"""
Prometheus metrics of the proxy, and the ``/api/metrics`` endpoint that serves them.

Every label value comes from a bounded set: methods outside the standard ones are
counted as ``OTHER``, statuses are three-digit codes, and model names (chosen by
clients and upstreams) get a label of their own only for the first
:data:`MAX_MODELS` seen; later ones are counted under ``other``; so do access key ids
beyond the first :data:`MAX_KEY_IDS`, and upstream names (of ``UPSTREAMS_FILE``, which
may change while the proxy runs) beyond the first :data:`MAX_UPSTREAMS`.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from aiproxy.core.interfaces import Endpoint, Incoming, LocalResponse
from aiproxy.core.record import RequestRecord
from aiproxy.ops.logger import log
from aiproxy.routing.health import COOLING, DISABLED, EJECTED, HALF_OPEN, HEALTHY
from aiproxy.rules.headers import header_values

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_KEY_IDS",
    "MAX_MODELS",
    "MAX_UPSTREAMS",
    "LatencyHistogram",
    "MetricsPublisher",
    "ProxyMetrics",
    "SharedMetrics",
    "merge_snapshots",
    "metrics_endpoint",
]

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"),
)  # fmt: skip
"""Seconds: from a cached reply in milliseconds to a long generation in minutes."""

MAX_MODELS = 100
"""Distinct model names that get a label value of their own."""

MAX_KEY_IDS = 100
"""Distinct access key ids that get a label value of their own."""

MAX_UPSTREAMS = 100
"""Distinct upstream names that get a label value of their own."""

PUBLISH_INTERVAL = 1.0
"""Seconds between two snapshots a worker publishes for its siblings."""


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_UPSTREAM_STATES = (HEALTHY, COOLING, DISABLED, EJECTED, HALF_OPEN)


class LatencyHistogram:
    """Observations counted into :data:`LATENCY_BUCKETS`, with their sum."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation, in the first bucket whose bound it does not exceed."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """The counts and the sum, as JSON can hold them."""
        return {"counts": list(self.counts), "sum": self.sum}


Snapshot = dict[str, Any]
"""One process's metrics as plain JSON data (see :meth:`ProxyMetrics.snapshot`)."""

_GAUGES = ("active_requests", "active_streams", "active_tunnels", "upstream_states")


class ProxyMetrics:
    """
    The proxy's metrics, moved by each request when it starts (:meth:`started`) and
    when it ends (:meth:`observe`), and collected in Prometheus' form when scraped.

    Requests only add to plain numbers (the reactor runs them one at a time);
    :meth:`collect` turns those into metric families. The metrics are registered in
    ``registry`` (a new one if not given). With ``shared`` (worker processes), what
    the other workers last published is added in.

    With several upstreams (``UPSTREAMS_FILE``), requests whose record names an
    upstream are also counted by upstream, and ``upstream_states`` gives each one's
    state (see :meth:`aiproxy.routing.choose.Router.report`).

    @param active_streams: how many event streams are being relayed now (read at
        scrape time), and likewise ``active_tunnels`` (WebSocket tunnels open),
        ``limiter_errors`` (checks of the per-key limits that Redis did not answer) and
        ``upstream_states`` (each upstream's ``name`` and ``state``).
    """

    def __init__(
        self,
        active_streams: Callable[[], int],
        registry: CollectorRegistry | None = None,
        shared: SharedMetrics | None = None,
        active_tunnels: Callable[[], int] = lambda: 0,
        limiter_errors: Callable[[], int] = lambda: 0,
        upstream_states: Callable[[], list[dict[str, object]]] | None = None,
    ) -> None:
        self.active_streams = active_streams
        self.active_tunnels = active_tunnels
        self.limiter_errors = limiter_errors
        self.upstream_states = upstream_states
        self.tunnels_closed: dict[str, int] = {}
        self.tunnel_bytes = {"in": 0, "out": 0}
        self.shared = shared
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
        self.key_requests: dict[str, int] = {}
        self.auth_refusals: dict[tuple[int, str, str], int] = {}
        self.upstream_requests: dict[tuple[str, str], int] = {}
        self.upstream_failovers: dict[str, int] = {}
        self.ttfb_by_upstream: dict[str, LatencyHistogram] = {}
        self._models = _BoundedLabels(MAX_MODELS)
        self._key_ids = _BoundedLabels(MAX_KEY_IDS)
        self._upstreams = _BoundedLabels(MAX_UPSTREAMS)
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
        key_id = record.key_id
        if key_id is not None:
            key_id = self._key_ids.label(key_id)
            self.key_requests[key_id] = self.key_requests.get(key_id, 0) + 1
        if record.auth_refusal is not None:
            refusal = (record.status, record.auth_refusal, key_id or "-")
            self.auth_refusals[refusal] = self.auth_refusals.get(refusal, 0) + 1
        closed_by = record.tunnel_closed_by
        if closed_by is not None:
            self.tunnels_closed[closed_by] = self.tunnels_closed.get(closed_by, 0) + 1
            self.tunnel_bytes["in"] += record.bytes_in
            self.tunnel_bytes["out"] += record.bytes_out
        usage = record.usage
        if usage is not None:
            model = "unknown" if usage.model is None else self._models.label(usage.model)
            if usage.prompt_tokens:
                self._add_tokens(model, "prompt", usage.prompt_tokens)
            if usage.completion_tokens:
                self._add_tokens(model, "completion", usage.completion_tokens)
        upstream = record.upstream
        if upstream is not None:
            self._observe_upstream(upstream, record)

    def _add_tokens(self, model: str, kind: str, count: int) -> None:
        self.tokens[model, kind] = self.tokens.get((model, kind), 0) + count

    def _observe_upstream(self, name: str, record: RequestRecord) -> None:
        """Count a request whose last attempt went to upstream ``name``, by the status
        it answered (else the kind of its failure, else ``-``: the client left, or its
        upload failed, first), and the upstreams it failed over from."""
        upstreams = self._upstreams
        name = upstreams.label(name)
        status = record.upstream_status
        outcome = (record.upstream_error or "-") if status is None else str(status)
        self.upstream_requests[name, outcome] = self.upstream_requests.get((name, outcome), 0) + 1
        if record.upstream_headers_after is not None:
            ttfb = self.ttfb_by_upstream.get(name)
            if ttfb is None:
                ttfb = self.ttfb_by_upstream[name] = LatencyHistogram()
            ttfb.observe(record.upstream_headers_after)
        for failed in record.failed_over_from:
            failed = upstreams.label(failed)
            self.upstream_failovers[failed] = self.upstream_failovers.get(failed, 0) + 1

    def _upstream_state_gauges(self) -> dict[str, int]:
        """For each upstream and each state, 1 if it is in that state now, else 0."""
        if self.upstream_states is None:
            return {}
        gauges: dict[str, int] = {}
        for upstream in self.upstream_states():
            name = self._upstreams.label(str(upstream["name"]))
            for state in _UPSTREAM_STATES:
                key = f"{name} {state}"
                gauges[key] = gauges.get(key, 0) + int(upstream["state"] == state)
        return gauges

    def snapshot(self) -> Snapshot:
        """This process's metrics now, as plain JSON data."""
        return {
            "requests": {f"{method} {status}": n for (method, status), n in self.requests.items()},
            "duration": self.duration.snapshot(),
            "ttfb": self.upstream_ttfb.snapshot(),
            "upstream_errors": dict(self.upstream_errors),
            "retries": self.retries,
            "client_cancelled": self.client_cancelled,
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "tokens": {f"{kind} {model}": n for (model, kind), n in self.tokens.items()},
            "key_requests": dict(self.key_requests),
            "auth_refusals": {
                f"{status} {reason} {key_id}": n
                for (status, reason, key_id), n in self.auth_refusals.items()
            },
            "tunnels_closed": dict(self.tunnels_closed),
            "tunnel_bytes": dict(self.tunnel_bytes),
            "upstream_requests": {
                f"{name} {outcome}": n for (name, outcome), n in self.upstream_requests.items()
            },
            "upstream_failovers": dict(self.upstream_failovers),
            "ttfb_by_upstream": {n: h.snapshot() for n, h in self.ttfb_by_upstream.items()},
            "limiter_errors": self.limiter_errors(),
            "active_requests": self.active_requests,
            "active_streams": self.active_streams(),
            "active_tunnels": self.active_tunnels(),
            "upstream_states": self._upstream_state_gauges(),
        }

    def collect(self) -> Iterator[Metric]:
        """The metrics as Prometheus metric families (the ``Collector`` interface)."""
        state = self.snapshot()
        if self.shared is not None:
            state = merge_snapshots(state, self.shared.others())
        yield _counter_family(
            "aiproxy_requests",
            "Requests answered, by method and status.",
            ["method", "status"],
            state["requests"],
        )
        yield _histogram_family(
            "aiproxy_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response.",
            state["duration"],
        )
        yield _histogram_family(
            "aiproxy_upstream_ttfb_seconds",
            "Seconds from a request's arrival to the upstream's response headers.",
            state["ttfb"],
        )
        yield GaugeMetricFamily(
            "aiproxy_active_requests", "Requests in flight.", value=state["active_requests"]
        )
        yield GaugeMetricFamily(
            "aiproxy_active_streams",
            "Event streams (text/event-stream responses) being relayed.",
            value=state["active_streams"],
        )
        yield GaugeMetricFamily(
            "aiproxy_active_tunnels",
            "WebSocket tunnels open.",
            value=state.get("active_tunnels", 0),
        )
        yield _counter_family(
            "aiproxy_tunnels_closed",
            "WebSocket tunnels closed, by the side that ended them (client, upstream, proxy).",
            ["closed_by"],
            state.get("tunnels_closed", {}),
        )
        yield _counter_family(
            "aiproxy_tunnel_bytes",
            "Bytes through closed WebSocket tunnels: from clients (in) and to them (out).",
            ["direction"],
            state.get("tunnel_bytes", {}),
        )
        yield CounterMetricFamily(
            "aiproxy_rate_limit_redis_errors",
            "Checks of the per-key limits that Redis did not answer in time.",
            value=state.get("limiter_errors", 0),
        )
        yield _counter_family(
            "aiproxy_upstream_errors",
            "Upstream requests that failed, by kind of failure.",
            ["kind"],
            state["upstream_errors"],
        )
        yield CounterMetricFamily(
            "aiproxy_retries", "Upstream requests sent again.", value=state["retries"]
        )
        yield CounterMetricFamily(
            "aiproxy_client_cancelled",
            "Requests whose client left before the response ended.",
            value=state["client_cancelled"],
        )
        yield _counter_family(
            "aiproxy_bytes",
            "Body bytes received from clients (in) and sent to them (out).",
            ["direction"],
            state["bytes"],
        )
        yield _counter_family(
            "aiproxy_tokens",
            "Tokens reported by the upstream's usage, by model and kind.",
            ["kind", "model"],
            state["tokens"],
        )
        yield _counter_family(
            "aiproxy_key_requests",
            "Requests that presented a known access key, by key id.",
            ["key_id"],
            state.get("key_requests", {}),
        )
        yield _counter_family(
            "aiproxy_auth_refusals",
            "Requests refused for their access key, by status, reason and key id"
            " (- when the key is missing or unknown).",
            ["status", "reason", "key_id"],
            state.get("auth_refusals", {}),
        )
        if self.upstream_states is not None or state["upstream_requests"]:
            yield from _upstream_families(state)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """
        The metrics, and their content type: Prometheus' text format, or OpenMetrics
        when ``accept`` (a request's ``Accept`` header) asks for it.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _BoundedLabels:
    """Label values chosen by others: the first ``limit`` seen are their own, the rest
    are ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def label(self, value: str) -> str:
        """``value``'s label: itself, or ``other`` once ``limit`` others have one."""
        seen = self._seen
        if value in seen:
            return value
        if len(seen) < self.limit:
            seen.add(value)
            return value
        return "other"


def _upstream_families(state: Snapshot) -> Iterator[Metric]:
    """The metrics of each of several upstreams."""
    yield _counter_family(
        "aiproxy_upstream_requests",
        "Requests whose last attempt went to an upstream, by upstream and the status it"
        " answered (else the kind of failure, else - when the client left first).",
        ["upstream", "status"],
        state["upstream_requests"],
    )
    yield _counter_family(
        "aiproxy_upstream_failovers",
        "Times a request went on to another upstream or key, by the upstream it left.",
        ["upstream"],
        state["upstream_failovers"],
    )
    ttfb = HistogramMetricFamily(
        "aiproxy_upstream_ttfb_by_upstream_seconds",
        "Seconds from a request's arrival to the response headers of the upstream"
        " its last attempt went to, by upstream.",
        labels=["upstream"],
    )
    for name, histogram in state["ttfb_by_upstream"].items():
        ttfb.add_metric([name], _buckets(histogram), histogram["sum"])
    yield ttfb
    yield _labelled_family(
        GaugeMetricFamily,
        "aiproxy_upstream_state",
        "Each upstream's state: 1 for the state it is in, 0 for the others (with worker"
        " processes, how many running workers see it in that state).",
        ["upstream", "state"],
        state["upstream_states"],
    )


def _counter_family(
    name: str, documentation: str, labels: list[str], counts: dict[str, int]
) -> Metric:
    """A labelled counter (see :func:`_labelled_family`)."""
    return _labelled_family(CounterMetricFamily, name, documentation, labels, counts)


def _labelled_family(
    kind: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: list[str],
    values: dict[str, int],
) -> Metric:
    """A labelled metric of ``kind`` from values keyed by their label values joined with
    spaces (the last label takes the rest, so a model name may contain spaces)."""
    family = kind(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(key.split(" ", len(labels) - 1), value)
    return family


def _histogram_family(name: str, documentation: str, state: dict[str, Any]) -> Metric:
    """A histogram from non-cumulative counts per bucket and their sum."""
    return HistogramMetricFamily(
        name, documentation, buckets=_buckets(state), sum_value=state["sum"]
    )


def _buckets(state: dict[str, Any]) -> list[tuple[str, float]]:
    """The cumulative counts of a :meth:`LatencyHistogram.snapshot`, by bucket bound."""
    buckets = []
    total = 0
    for bound, count in zip(LATENCY_BUCKETS, state["counts"], strict=True):
        total += count
        buckets.append((floatToGoString(bound), total))
    return buckets


def merge_snapshots(own: Snapshot, others: Iterable[tuple[Snapshot, bool]]) -> Snapshot:
    """
    ``own`` plus the snapshots of other processes: counters and histograms are summed
    (a process that has ended still counts, so totals never go down); the gauges only
    from processes that are still running (``others`` says which, with each snapshot).
    """
    merged = dict(own)  # _add builds new values and changes none of its arguments
    for snapshot, alive in others:
        for key, value in snapshot.items():
            if key in _GAUGES and not alive:
                continue
            merged[key] = _add(merged.get(key), value)
    return merged


def _add(mine: Any, theirs: Any) -> Any:
    if isinstance(theirs, dict):
        total = dict(mine or {})
        for key, value in theirs.items():
            total[key] = _add(total.get(key), value)
        return total
    if isinstance(theirs, list):
        return [a + b for a, b in zip(mine or [0] * len(theirs), theirs, strict=True)]
    return (mine or 0) + theirs


class SharedMetrics:
    """
    A directory where each worker process publishes its metrics, as
    ``<pid>.json``, for the worker that is scraped to add them in.
    """

    def __init__(self, directory: str, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid

    def publish(self, snapshot: Snapshot) -> None:
        """Write this process's snapshot (atomically: a reader sees the old or the new)."""
        path = os.path.join(self.directory, f"{self.pid}.json")
        partial = f"{path}.partial"
        with open(partial, "w") as out:
            json.dump(snapshot, out)
        os.replace(partial, path)

    def others(self) -> list[tuple[Snapshot, bool]]:
        """The other processes' last snapshots, each with whether it still runs."""
        found = []
        for name in os.listdir(self.directory):
            pid_text, _, extension = name.partition(".")
            if extension != "json" or not pid_text.isdigit() or int(pid_text) == self.pid:
                continue
            try:
                with open(os.path.join(self.directory, name)) as snapshot:
                    found.append((json.load(snapshot), _running(int(pid_text))))
            except (OSError, ValueError):
                continue  # gone, or being replaced
        return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsPublisher(Service):
    """Publishes ``metrics`` to ``shared`` every ``interval`` seconds, and once at stop."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        shared: SharedMetrics,
        clock: IReactorTime,
        interval: float = PUBLISH_INTERVAL,
    ) -> None:
        self.metrics = metrics
        self.shared = shared
        self.loop = LoopingCall(self.publish)
        self.loop.clock = clock
        self.interval = interval

    def publish(self) -> None:
        """Write the current snapshot; a failure is logged and the next try goes on."""
        try:
            self.shared.publish(self.metrics.snapshot())
        except OSError:
            log.failure(
                "Cannot publish this worker's metrics to {directory}",
                directory=self.shared.directory,
            )

    def startService(self) -> None:
        """Publish now and every ``interval`` seconds."""
        super().startService()
        self.loop.start(self.interval, now=True)

    def stopService(self) -> None:
        """Publish the last figures."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        self.publish()


def metrics_endpoint(metrics: ProxyMetrics) -> Endpoint:
    """``GET /api/metrics``: the proxy's metrics, in the format the scraper accepts."""

    def scrape(request: Incoming) -> LocalResponse:
        accept = header_values(request.headers, b"accept")
        body, content_type = metrics.exposition(accept[0].decode("latin-1") if accept else None)
        return LocalResponse(
            200,
            [(b"Content-Type", content_type.encode()), (b"Cache-Control", b"no-store")],
            body,
        )

    return scrape
