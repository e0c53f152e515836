"""
The proxy core as the doors see it: :class:`ProxyCore` turns a parsed request into its
:class:`Incoming` once, decides who answers it (a CORS preflight, one of aiproxy's own
endpoints, a refusal, or the upstream), and logs, counts and tracks every request the
same way whichever door it came by.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

from aiproxy._version import __version__
from aiproxy.access.gate import authorize, speaks_anthropic
from aiproxy.config import IPNetwork
from aiproxy.core.activity import Activity
from aiproxy.core.endpoints import OWN_METHODS, access_refusal_response, error_response
from aiproxy.core.exchange import LocalAnswer, ProxyExchange, _Handled
from aiproxy.core.interfaces import (
    ClientSide,
    Endpoint,
    Exchange,
    Incoming,
    LocalResponse,
    RawHeaders,
    RequestBody,
    UpstreamClient,
)
from aiproxy.core.record import RequestRecord
from aiproxy.core.sweep import IdleSweep
from aiproxy.errors import (
    AccessRefused,
    BadRequestTarget,
    InvalidRequest,
    MethodNotAllowed,
    OriginNotAllowed,
    Overloaded,
    ProxyError,
    WebSocketNotSupported,
)
from aiproxy.ops.logger import log
from aiproxy.routing.routes import Route, Routes
from aiproxy.rules.cors import (
    CorsPolicy,
    add_response_headers,
    allowed_origin,
    is_preflight,
    preflight_headers,
)
from aiproxy.rules.headers import choose_request_id, header_values, original_client
from aiproxy.rules.redact import loggable
from aiproxy.rules.retry import RetryPolicy
from aiproxy.rules.target import Target, has_dot_segments, is_origin_form
from aiproxy.rules.websocket import is_websocket_upgrade

if TYPE_CHECKING:
    from aiproxy.access.keys import KeyEntry
    from aiproxy.access.limits import Limiter
    from aiproxy.access.policy import AccessPolicy
    from aiproxy.ops.metrics import ProxyMetrics

__all__ = ["PROXY_BY", "ProxyCore"]

PROXY_BY = f"aiproxy/{__version__}".encode()
"""The ``X-Proxy-By`` value of every response."""

NO_RETRIES = RetryPolicy(max_retries=0, backoff_factor=0)


class ProxyCore:
    """
    Answers every request a door hands over; implements the doors' ``RequestHandler``.

    @param target: where requests go.
    @param upstream: the client that sends them there.
    @param clock: the time of every timeout.
    @param endpoints: aiproxy's own endpoints by exact path (``/api/health``...);
        they answer ``GET`` and ``HEAD``.
    @param cors: the CORS policy, or L{None} when CORS is off.
    @param metrics: moved by each request as it starts and ends, if given.
    @param trusted_proxies: networks whose ``X-Forwarded-For`` is believed for the
        client address in logs.
    @param max_concurrent_requests: proxied requests in flight at once (then ``503``);
        0 for no limit.
    @param log_requests: whether the per-request ``INFO`` lines (start and completion)
        are logged at all; false when the log level is above ``INFO``, so that no event
        is built only to be filtered out.
    @param debug: whether ``DEBUG`` lines are logged at all (likewise).
    @param access: who may use the proxy (access keys), and which credentials go
        upstream; L{None}: anyone, with their own credentials.
    @param routes: the upstreams of ``UPSTREAMS_FILE``, which requests go to instead
        of ``target``; L{None}: ``target`` only.
    @param failover_on_status: with ``routes``, the upstream statuses after which a
        request goes to another upstream or key (``FAILOVER_ON_STATUS``).
    @param max_failovers: with ``routes``, how many times one request may
        (``MAX_FAILOVERS``).
    @param sticky_upstreams: with ``routes``, keep each access key on one upstream and
        upstream key (``STICKY_UPSTREAMS``).
    @param upstream_name_header: with ``routes``, name the upstream that answered in
        ``X-Upstream`` (``UPSTREAM_NAME_HEADER``).

    @ivar access_keys: the access keys clients must present (L{None}: none).
    @ivar limiter: where the keys' limits are counted (L{None}: no limits).
    @ivar default_max_tokens: the completion tokens a request that names no
        ``max_tokens`` reserves under a token limit.
    @ivar upstream_credentials: sent upstream instead of every client credential
        (L{None}: the client's own pass through); an upstream key of ``routes`` takes
        their place when the upstream has one.
    @ivar route: the route to ``target``.
    @ivar cancelled: upstream requests cancelled because their client went away.
    @ivar retries: upstream requests sent again.
    @ivar active_streams: event streams being relayed now.
    @ivar active_tunnels: WebSocket tunnels open now.
    @ivar tunnels: the idle sweep of the tunnels (``TUNNEL_IDLE_TIMEOUT``).
    """

    def __init__(
        self,
        target: Target,
        upstream: UpstreamClient,
        clock: IReactorTime,
        *,
        activity: Activity | None = None,
        endpoints: Mapping[bytes, Endpoint] | None = None,
        cors: CorsPolicy | None = None,
        metrics: ProxyMetrics | None = None,
        trusted_proxies: Sequence[IPNetwork] = (),
        request_timeout: float = 300.0,
        stream_idle_timeout: float = 300.0,
        tunnel_idle_timeout: float = 300.0,
        total_timeout: float = 0.0,
        retry_policy: RetryPolicy = NO_RETRIES,
        max_concurrent_requests: int = 0,
        log_requests: bool = True,
        debug: bool = False,
        access: AccessPolicy | None = None,
        routes: Routes | None = None,
        failover_on_status: Collection[int] = (),
        max_failovers: int = 0,
        sticky_upstreams: bool = False,
        upstream_name_header: bool = True,
    ) -> None:
        self.target = target
        self.route = Route.to(target, upstream)
        self.routes = routes
        self.failover_on_status = frozenset(failover_on_status)
        self.max_failovers = max_failovers
        self.sticky_upstreams = sticky_upstreams
        self.upstream_name_header = upstream_name_header
        self.clock = clock
        self.activity = Activity() if activity is None else activity
        self.endpoints = dict(endpoints or {})
        self.cors = cors
        self.metrics = metrics
        self.trusted_proxies = tuple(trusted_proxies)
        self.request_timeout = request_timeout
        self.total_timeout = total_timeout
        self.retry_policy = retry_policy
        self.max_concurrent_requests = max_concurrent_requests
        self.log_requests = log_requests
        self.debug = debug
        self.access_keys = None if access is None else access.keys
        self.limiter: Limiter | None = None
        self.default_max_tokens = 4096
        self.upstream_credentials = None if access is None else access.credentials
        self.idle_sweep = IdleSweep(clock, stream_idle_timeout)
        self.tunnels = IdleSweep(clock, tunnel_idle_timeout)
        self.proxy_by = PROXY_BY
        self.cancelled = 0
        self.retries = 0
        self.active_streams = 0
        self.active_tunnels = 0
        self.proxied_in_flight = 0

    # -- what doors call ---------------------------------------------------------

    def incoming(
        self,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        version: bytes,
        scheme: bytes,
        peer: str | None,
    ) -> Incoming:
        """The :class:`Incoming` of a request whose head is complete: ID, time, record."""
        request_id = choose_request_id(header_values(headers, b"x-request-id"))
        client = peer
        if self.trusted_proxies:
            client = original_client(
                peer, header_values(headers, b"x-forwarded-for"), self.trusted_proxies
            )
        record = RequestRecord(
            method=loggable(method),
            path=loggable(target.partition(b"?")[0]),
            client="unix" if client is None else client,
            request_id=loggable(request_id),
        )
        return Incoming(
            method, target, headers, version, scheme, peer, request_id, self.clock.seconds(), record
        )

    def handle(self, request: Incoming, body: RequestBody, client: ClientSide) -> Exchange:
        """Answer ``request``: a preflight, an endpoint, a refusal, or the upstream's answer."""
        method = request.method
        target = request.target
        cors = self.cors
        if cors is not None and method == b"OPTIONS" and is_preflight(method, request.headers):
            return self._answer(request, client, self._preflight)
        if target == b"*":
            if method == b"OPTIONS":
                return self._answer(request, client, _EMPTY_OK)
            return self._refuse(request, client, MethodNotAllowed("only OPTIONS applies to *"))
        endpoint = self.endpoints.get(target.partition(b"?")[0]) if self.endpoints else None
        if endpoint is not None:
            if method not in OWN_METHODS:
                shown = method.decode("ascii", "replace")
                not_allowed = MethodNotAllowed(f"{shown} is not allowed here; use GET")
                return self._refuse(request, client, not_allowed, [(b"Allow", b"GET, HEAD")])
            return self._answer(request, client, endpoint)
        if method == b"CONNECT":
            return self._refuse(
                request, client, MethodNotAllowed("CONNECT is not supported by this proxy")
            )
        if not is_origin_form(target):
            return self._refuse(
                request,
                client,
                BadRequestTarget("the request target must be a path beginning with one '/'"),
            )
        if has_dot_segments(target):
            return self._refuse(
                request,
                client,
                BadRequestTarget("the request target must not have '.' or '..' segments"),
            )
        keys = self.access_keys
        key: KeyEntry | None = None
        if keys is not None:
            path = target.partition(b"?")[0]
            entry = authorize(
                keys.ring,
                request.headers,
                path,
                body if isinstance(body, bytes) else None,
                self.clock.seconds(),
            )
            if isinstance(entry, AccessRefused):
                return self._refuse_access(request, client, entry, speaks_anthropic(path))
            request.record.key_id = entry.id
            key = entry
        upgrading = is_websocket_upgrade(request.headers)
        if upgrading:
            refusal = _tunnel_refusal(request, body, client)
            if refusal is not None:
                return self._refuse(request, client, refusal)
        limit = self.max_concurrent_requests
        if limit and self.proxied_in_flight >= limit:
            overloaded = f"the proxy is handling its limit of {limit} requests; retry shortly"
            return self._refuse(request, client, Overloaded(overloaded))
        exchange = ProxyExchange(self, request, body, client, key=key, upgrading=upgrading)
        self._started(exchange)
        if limit:
            self.proxied_in_flight += 1
        exchange.start()
        return exchange

    def refuse(self, request: Incoming, error: Exception, client: ClientSide) -> Exchange:
        """Answer ``request`` with ``error`` (a ``ProxyError``), logged and counted."""
        assert isinstance(error, ProxyError), error
        return self._refuse(request, client, error)

    # -- every request's life ------------------------------------------------------

    def _started(self, handled: _Handled) -> None:
        record = handled.request.record
        if self.log_requests:
            log.info(
                "Request started: {method} {path} [Client: {client}] [ID: {request_id}]",
                method=record.method,
                path=record.path,
                client=record.client,
                request_id=record.request_id,
            )
        self.activity.started(handled)
        if self.metrics is not None:
            self.metrics.started()

    def ended(self, handled: _Handled, cancelled: bool) -> None:
        """``handled`` has ended: fill in its record, log it, count it."""
        if self.max_concurrent_requests and isinstance(handled, ProxyExchange):
            self.proxied_in_flight -= 1
        self.activity.ended(handled)
        request = handled.request
        record = request.record
        record.duration = self.clock.seconds() - request.arrived_at
        record.cancelled = cancelled
        if self.log_requests:
            log.info(record.log_format(), **record.log_fields())
        if self.metrics is not None:
            self.metrics.observe(record)

    def _answer(self, request: Incoming, client: ClientSide, endpoint: Endpoint) -> Exchange:
        """Answer with what ``endpoint`` makes (once the request counts as started)."""
        answer = LocalAnswer(self, request, client)
        self._started(answer)
        answer.answer(endpoint(request))
        return answer

    def _refuse(
        self,
        request: Incoming,
        client: ClientSide,
        error: ProxyError,
        headers: RawHeaders | None = None,
    ) -> Exchange:
        answer = LocalAnswer(self, request, client)
        self._started(answer)
        if headers:
            response = error_response(error, request.request_id)
            answer.answer(
                LocalResponse(response.status, [*headers, *response.headers], response.body)
            )
        else:
            answer.answer_error(error)
        return answer

    def _refuse_access(
        self, request: Incoming, client: ClientSide, refusal: AccessRefused, anthropic: bool
    ) -> Exchange:
        record = request.record
        record.key_id = refusal.key_id
        record.auth_refusal = refusal.reason
        answer = LocalAnswer(self, request, client)
        self._started(answer)
        answer.answer(access_refusal_response(refusal, anthropic))
        return answer

    def _preflight(self, request: Incoming) -> LocalResponse:
        cors = self.cors
        assert cors is not None
        origin = (header_values(request.headers, b"origin") or [b""])[0]
        if allowed_origin(cors, origin) is None:
            shown = origin.decode("ascii", "replace")
            return error_response(
                OriginNotAllowed(f"the origin {shown!r} is not allowed by CORS"),
                request.request_id,
            )
        headers: RawHeaders = []
        add_response_headers(headers, preflight_headers(cors, request.headers))
        return LocalResponse(204, headers)


def _empty_ok(request: Incoming) -> LocalResponse:
    """``OPTIONS *``: nothing to say about the server as a whole."""
    return LocalResponse(200, [])


_EMPTY_OK: Endpoint = _empty_ok


def _tunnel_refusal(request: Incoming, body: RequestBody, client: ClientSide) -> ProxyError | None:
    """Why a WebSocket upgrade cannot be tunnelled; L{None} if it can."""
    if not client.tunnels:
        return WebSocketNotSupported(
            "WebSocket needs an HTTP/1.1 connection to aiproxy's own server"
        )
    if request.method != b"GET" or body != b"":
        return InvalidRequest("a WebSocket upgrade is a GET without a body")
    return None
