"""
The HTTP client side: one pooled ``Agent`` that only ever talks to the configured target.

Two private corners of twisted.web's client are used, both in this module: the pool's
``_factory`` (to build our connection class) and a connection's ``_parser`` (to read the
upstream's ``Connection`` header, which the public ``Response`` does not show).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from aiproxy.config import Config
from aiproxy.rules.headers import connection_tokens
from aiproxy.rules.retry import ReusedConnectionFailed, was_cancelled
from aiproxy.rules.target import Target

__all__ = ["InsecureTLSPolicy", "UpstreamEndpoints", "make_agent", "make_pool"]

IDLE_CONNECTIONS_PER_HOST = 64
"""Idle keep-alive connections kept for reuse; more active ones are closed after use."""

IDLE_CONNECTION_TIMEOUT = 30
"""Seconds an idle upstream connection is kept: below common upstream keep-alive limits,
so that the proxy, not the upstream, closes it."""


def make_pool(reactor: IReactorCore) -> HTTPConnectionPool:
    """A persistent connection pool sized for a proxy."""
    pool = _UpstreamPool(reactor, persistent=True)
    pool.maxPersistentPerHost = IDLE_CONNECTIONS_PER_HOST
    pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
    # aiproxy decides about retries itself (aiproxy.rules.retry), for every method alike.
    pool.retryAutomatically = False
    return pool


class _UpstreamConnection(HTTP11ClientProtocol):
    """
    An HTTP/1.1 client connection that also drops the response headers its
    ``Connection`` header names, and tells a failure on a reused connection apart.

    Twisted's client sets the fixed connection-control headers apart from
    ``response.headers`` (``Connection`` among them) but leaves the headers that
    ``Connection`` names in, so only its parser can tell which those are.
    """

    _requests_sent = 0

    def request(self, request: Any) -> Deferred[Any]:
        """Send ``request``; strip its response's ``Connection``-named headers on arrival."""
        reused = self._requests_sent > 0
        self._requests_sent += 1
        result: Deferred[Any] = super().request(request)
        if reused:
            result.addErrback(_mark_reused_connection_failure)
        parser = self._parser
        if parser is not None:
            all_headers_received = parser.allHeadersReceived

            def strip_then_continue() -> None:
                for name in connection_tokens(parser.connHeaders):
                    parser.headers.removeHeader(name)
                all_headers_received()

            parser.allHeadersReceived = strip_then_continue  # type: ignore[method-assign]
        return result


def _mark_reused_connection_failure(failure: Failure) -> Failure:
    """A reused connection that failed before any response byte: the stale keep-alive race."""
    if failure.check(
        ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent
    ) and not was_cancelled(failure):
        return Failure(ReusedConnectionFailed(failure))
    return failure


class _UpstreamClientFactory(_HTTP11ClientFactory):
    """Builds :class:`_UpstreamConnection`s, without a log line each."""

    noisy = False

    def buildProtocol(self, addr: object) -> HTTP11ClientProtocol:
        return _UpstreamConnection(self._quiescentCallback)


class _UpstreamPool(HTTPConnectionPool):
    _factory = _UpstreamClientFactory


def make_agent(reactor: IReactorCore, config: Config, pool: HTTPConnectionPool) -> Agent:
    """
    The ``Agent`` for ``config``'s target, over ``pool``: it follows no redirects and
    decodes no content.

    Connections time out after ``config.connect_timeout``; TLS certificates are checked
    against the system's trust store unless ``config.ssl_verify`` is false.
    """
    policy: IPolicyForHTTPS = (
        BrowserLikePolicyForHTTPS() if config.ssl_verify else InsecureTLSPolicy()
    )
    endpoints = UpstreamEndpoints(
        reactor, config.target, connect_timeout=config.connect_timeout, policy=policy
    )
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    Gives the ``Agent`` one endpoint, built once, for the single upstream.

    Every request URL is built on the target's origin, so no other host can be asked
    for; building the endpoint once saves the host-name encoding per request. New
    connections get ``TCP_NODELAY``, so that small writes (SSE events) go at once.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        target: Target,
        *,
        connect_timeout: float,
        policy: IPolicyForHTTPS,
    ) -> None:
        endpoint: IStreamClientEndpoint = _NoDelayEndpoint(
            _tcp_endpoint(reactor, target.host, target.port, connect_timeout)
        )
        if target.scheme == "https":
            creator = policy.creatorForNetloc(target.host.encode("ascii"), target.port)
            endpoint = wrapClientTLS(creator, endpoint)
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        """The upstream's endpoint."""
        return self._endpoint


def _tcp_endpoint(
    reactor: IReactorCore, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    A TCP endpoint for ``host``: a host name is resolved on every new connection (in
    the reactor's thread pool, trying each address), an IP address is used as it is.
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    """Turns Nagle's algorithm off on each new connection, so small writes go at once."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def no_delay(protocol: IProtocol) -> IProtocol:
            transport = getattr(protocol, "transport", None)
            if ITCPTransport.providedBy(transport):
                transport.setTcpNoDelay(True)
            return protocol

        return self._endpoint.connect(factory).addCallback(no_delay)


@implementer(IPolicyForHTTPS)
class InsecureTLSPolicy:
    """TLS without certificate checks (``SSL_VERIFY=false``); still sends SNI."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """A connection creator that accepts any certificate."""
        return _UncheckedTLS(hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _UncheckedTLS:
    def __init__(self, hostname: bytes) -> None:
        self._context = CertificateOptions().getContext()
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection
