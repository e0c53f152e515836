"""The resource tree and the ``Site`` that serves it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy.channel import ClientLimits, ProxyChannel
from aiproxy.config import Config, IPNetwork
from aiproxy.core.activity import Activity
from aiproxy.errors import OriginNotAllowed
from aiproxy.health import HealthResource, PingResource
from aiproxy.ops.docs import docs_endpoints
from aiproxy.ops.metrics import MetricsResource, ProxyMetrics, SharedMetrics
from aiproxy.proxy import ReverseProxyResource
from aiproxy.request import ProxyRequest, send_error
from aiproxy.rules.cors import CorsPolicy, add_response_headers, allowed_origin, is_preflight
from aiproxy.rules.cors import preflight_headers as cors_preflight_headers
from aiproxy.rules.retry import RetryPolicy
from aiproxy.rules.target import local_target

__all__ = ["ProxyRoot", "ProxySite", "build_resource", "build_site"]

CLIENT_IDLE_TIMEOUT = 75
"""Seconds an idle client keep-alive connection stays open (nginx's default)."""


class ProxyRoot(Resource):
    """
    Serves aiproxy's own endpoints at their exact paths and proxies everything else.

    ``/api/health`` is aiproxy's, while ``/api/health/``, ``/api/chat`` or
    ``/api/healthz`` go to the upstream like any other path.

    ``metrics`` are the metrics that the site of this tree should move (see
    :func:`build_site`), or L{None}.

    When the request carries a CORS policy (``request.cors``, set by
    :class:`ProxyRequest` from the site), CORS preflights are answered here for every
    path and never forwarded (see :mod:`aiproxy.rules.cors`).
    """

    isLeaf = True

    def __init__(
        self,
        endpoints: Mapping[bytes, IResource],
        proxy: IResource,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        super().__init__()
        self.endpoints = dict(endpoints)
        self.proxy = proxy
        self.metrics = metrics

    def render(self, request: Request) -> int | bytes:
        """Hand the request to the endpoint at its exact path, or to the proxy."""
        cors: CorsPolicy | None = getattr(request, "cors", None)
        if cors is not None and is_preflight(request.method, request.requestHeaders):
            return answer_preflight(request, cors)
        target = local_target(request.uri, len(request.prepath or ()))
        path = target.partition(b"?")[0]
        resource = self.endpoints.get(path, self.proxy)
        result: int | bytes = resource.render(request)
        return result


def answer_preflight(request: Request, cors: CorsPolicy) -> int:
    """
    Answer a CORS preflight: ``204`` with the allowed methods and headers for an
    allowed origin, the JSON ``403`` error for another one. The origin's own headers
    (``Access-Control-Allow-Origin``, ``Vary: Origin``) are added by
    :meth:`ProxyRequest.write`, as for every response.
    """
    origin = (request.requestHeaders.getRawHeaders(b"origin") or [b""])[0]
    if allowed_origin(cors, origin) is None:
        shown = origin.decode("ascii", "replace")
        send_error(request, OriginNotAllowed(f"the origin {shown!r} is not allowed by CORS"))
    else:
        request.setResponseCode(204)
        add_response_headers(
            request.responseHeaders, cors_preflight_headers(cors, request.requestHeaders)
        )
        request.finish()
    return NOT_DONE_YET


class ProxySite(Site):
    """
    A ``Site`` of :class:`ProxyRequest`s over :class:`ProxyChannel` connections, which
    enforce ``limits``.

    ``cors`` is the CORS policy of every request (L{None}: CORS is disabled);
    ``metrics`` are moved by each request as it ends (L{None}: no metrics);
    ``trusted_proxies`` are the networks whose ``X-Forwarded-For`` is believed.

    twisted.web's own access log is off: ``ProxyRequest`` logs each request's start and
    completion with its request ID instead.
    """

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        activity: Activity,
        limits: ClientLimits,
        cors: CorsPolicy | None = None,
        metrics: ProxyMetrics | None = None,
        trusted_proxies: Sequence[IPNetwork] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.activity = activity
        self.limits = limits
        self.cors = cors
        self.metrics = metrics
        self.trusted_proxies = tuple(trusted_proxies)

    def protocol(self) -> _GenericHTTPChannelProtocol:
        """
        A new connection: HTTP/1.1 through a :class:`ProxyChannel`, switched to HTTP/2
        when TLS negotiates ``h2`` (as twisted.web's own factory does).
        """
        return _GenericHTTPChannelProtocol(ProxyChannel(self.limits, self.reactor, self.activity))

    def log(self, request: http.Request) -> None:
        """No access log line; see :class:`ProxyRequest`."""


def build_site(
    root: IResource,
    clock: IReactorTime,
    activity: Activity | None = None,
    *,
    config: Config | None = None,
) -> ProxySite:
    """
    A :class:`ProxySite` for ``root`` on ``clock``, recording its requests in
    ``activity`` (a new one if not given), with the client limits of ``config`` (the
    defaults if not given), its CORS policy and its trusted proxies, and the metrics
    of ``root`` (its ``metrics`` attribute, as :func:`build_resource` sets it).

    Request bodies are never parsed as forms: a proxy passes them on as bytes.
    """
    config = Config() if config is None else config
    return ProxySite(
        root,
        Activity() if activity is None else activity,
        ClientLimits.from_config(config),
        CorsPolicy.from_config(config),
        getattr(root, "metrics", None),
        config.trusted_networks,
        reactor=clock,
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,
    )


def build_resource(
    config: Config,
    agent: IAgent,
    clock: IReactorTime,
    activity: Activity | None = None,
    shared_metrics: SharedMetrics | None = None,
) -> ProxyRoot:
    """
    aiproxy's resource tree: ``/api/health``, ``/api/ping``, ``/api/metrics`` (unless
    ``config.enable_metrics`` is false), the API docs (unless ``config.enable_docs``
    is false), and the proxy for the rest.

    ``/api/health`` says ``draining`` once ``activity`` does: pass the site's
    :class:`Activity` (see :func:`build_site`) for that. With ``shared_metrics`` (a
    worker process), ``/api/metrics`` adds in what the other workers published.
    """
    proxy = ReverseProxyResource(
        config.target,
        agent,
        clock,
        request_timeout=config.request_timeout,
        stream_idle_timeout=config.stream_idle_timeout,
        total_timeout=config.total_timeout,
        retry_policy=RetryPolicy(
            config.max_retries, config.retry_backoff_factor, config.retry_on_status
        ),
        read_size=config.proxy_buffer_size,
        max_concurrent_requests=config.max_concurrent_requests,
    )
    activity = Activity() if activity is None else activity
    endpoints: dict[bytes, IResource] = {
        b"/api/health": HealthResource(config, activity),
        b"/api/ping": PingResource(),
    }
    metrics = None
    if config.enable_metrics:
        metrics = ProxyMetrics(lambda: proxy.active_streams, shared=shared_metrics)
        endpoints[b"/api/metrics"] = MetricsResource(metrics)
    if config.enable_docs:
        endpoints.update(docs_endpoints(config))
    return ProxyRoot(endpoints, proxy, metrics)
