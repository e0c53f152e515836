"""Building a :class:`ProxyCore` from a :class:`Config`, with aiproxy's own endpoints."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel

from aiproxy.access.limits import Limiter
from aiproxy.access.memory import MemoryLimiter
from aiproxy.access.policy import access_policy
from aiproxy.access.redis import RedisLimiter, redis_client
from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.endpoints import health_endpoint, ping_endpoint
from aiproxy.core.handler import ProxyCore
from aiproxy.core.interfaces import Endpoint, UpstreamClient
from aiproxy.ops.docs import docs_endpoints
from aiproxy.ops.metrics import ProxyMetrics, SharedMetrics, metrics_endpoint
from aiproxy.routing.routes import Routes
from aiproxy.rules.cors import CorsPolicy
from aiproxy.rules.retry import RetryPolicy

__all__ = ["build_core"]


def build_core(
    config: Config,
    upstream: UpstreamClient,
    clock: IReactorTime,
    activity: Activity | None = None,
    shared_metrics: SharedMetrics | None = None,
    routes: Routes | None = None,
) -> ProxyCore:
    """
    The core that ``config`` describes: ``/api/health`` and ``/api/ping``, the metrics
    at ``/api/metrics`` (unless ``config.enable_metrics`` is false), the API docs
    (unless ``config.enable_docs`` is false), CORS (unless ``config.enable_cors`` is
    false), and the proxy for the rest.

    Access keys and the upstream key come from ``config`` (see
    :func:`aiproxy.access.policy.access_policy`, whose ``ConfigError`` this raises).
    ``/api/health`` says ``draining`` once ``activity`` does. With ``shared_metrics`` (a
    worker process), ``/api/metrics`` adds in what the other workers published. With
    ``routes`` (``UPSTREAMS_FILE``), requests go to its upstreams instead of
    ``upstream``, and ``/api/health`` and the metrics report each of them.
    """
    activity = Activity() if activity is None else activity
    endpoints: dict[bytes, Endpoint] = {
        b"/api/health": health_endpoint(
            config,
            activity,
            (lambda: _redis_state(core)) if config.redis_url else None,
            (lambda: routes.router.report()) if routes is not None else None,
        ),
        b"/api/ping": ping_endpoint(),
    }
    core = ProxyCore(
        config.target,
        upstream,
        clock,
        activity=activity,
        endpoints=endpoints,
        cors=CorsPolicy.from_config(config),
        trusted_proxies=config.trusted_networks,
        request_timeout=config.request_timeout,
        stream_idle_timeout=config.stream_idle_timeout,
        tunnel_idle_timeout=config.tunnel_idle_timeout,
        total_timeout=config.total_timeout,
        retry_policy=RetryPolicy(
            config.max_retries, config.retry_backoff_factor, config.retry_on_status
        ),
        max_concurrent_requests=config.max_concurrent_requests,
        log_requests=config.twisted_log_level <= LogLevel.info,
        debug=config.twisted_log_level <= LogLevel.debug,
        access=access_policy(
            config, routes is not None and any(u.keys for u in routes.router.upstreams)
        ),
        routes=routes,
        failover_on_status=config.failover_on_status,
        max_failovers=config.max_failovers,
        sticky_upstreams=config.sticky_upstreams,
        upstream_name_header=config.upstream_name_header,
    )
    if core.access_keys is not None:
        core.limiter = _limiter(config, clock)
        core.default_max_tokens = config.default_max_tokens
    if config.enable_metrics:
        core.metrics = ProxyMetrics(
            lambda: core.active_streams,
            shared=shared_metrics,
            active_tunnels=lambda: core.active_tunnels,
            limiter_errors=lambda: getattr(core.limiter, "errors", 0),
            upstream_states=(lambda: routes.router.report()) if routes is not None else None,
        )
        endpoints[b"/api/metrics"] = metrics_endpoint(core.metrics)
    if config.enable_docs:
        endpoints.update(docs_endpoints(config))
    core.endpoints = endpoints
    return core


def _limiter(config: Config, clock: IReactorTime) -> Limiter:
    """Where the access keys' limits are counted: in Redis if ``REDIS_URL`` says so
    (shared by every process that uses it), else in this process."""
    if config.redis_url:
        fail_open = config.rate_limit_on_redis_error == "open"
        return RedisLimiter(redis_client(config.redis_url), clock, fail_open=fail_open)
    return MemoryLimiter(clock)


def _redis_state(core: ProxyCore) -> str:
    limiter = core.limiter
    return limiter.state() if isinstance(limiter, RedisLimiter) else "unused"
