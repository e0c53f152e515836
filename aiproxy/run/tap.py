"""
``twist aiproxy``: the command line, and the composition root that builds the service.

This is the only module that touches the global reactor; everything it builds takes
the reactor, the clock and the HTTP agent as arguments.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from typing import Any

import attrs
from dotenv import dotenv_values
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.python import usage

from aiproxy._twisted import fail_if_cannot_listen, ssl_context_factory
from aiproxy.config import Config, ConfigError, load_config, log_level_name, settings
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.core.handler import ProxyCore
from aiproxy.ops.logs import use_aiproxy_logging
from aiproxy.ops.metrics import MetricsPublisher, SharedMetrics
from aiproxy.run.drain import DrainService
from aiproxy.run.listening import inherited, shared_if_inherited, with_backlog
from aiproxy.run.service import CoreService, PoolService, SequentialMultiService
from aiproxy.run.workers import FIRST_FD, INHERITED_PORTS, METRICS_DIR, WorkerSupervisor
from aiproxy.server.http1 import ClientLimits, HTTP11Factory
from aiproxy.server.negotiate import NegotiatingFactory
from aiproxy.server.web import ReverseProxyResource, build_site
from aiproxy.upstream.pool import UpstreamPool

__all__ = ["Options", "build_service", "listener_factory", "makeService"]


class Options(usage.Options):
    """The options of ``twist aiproxy``; each falls back to its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Streaming reverse proxy for an OpenAI-compatible API. Every option can also be"
        " set by the environment variable named in its help, or in a .env file in the"
        " working directory; a flag wins over the environment, which wins over .env."
    )
    optParameters = [
        [s.flag, None, None, f"{s.help}. [env: {s.env}] [default: {s.show_default()}]"]
        for s in settings()
    ]

    def __init__(self, environ: Mapping[str, str] | None = None, dotenv_path: str = ".env") -> None:
        super().__init__()
        self["port"] = []
        self._environ = os.environ if environ is None else environ
        self._dotenv_path = dotenv_path

    def opt_port(self, endpoint: str) -> None:
        """Twisted endpoint to listen on; repeatable. [default: tcp:$PORT:interface=$HOST]"""
        self["port"].append(endpoint)

    opt_p = opt_port

    def postOptions(self) -> None:
        """Merge flags, environment and ``.env`` into a validated :class:`Config`."""
        flags = {s.attribute: self[s.flag] for s in settings()}
        dotenv = dotenv_values(self._dotenv_path) if os.path.exists(self._dotenv_path) else {}
        try:
            self["config"] = load_config(flags, self._environ, dotenv, tuple(self["port"]))
        except ConfigError as e:
            raise SystemExit(f"aiproxy: invalid configuration: {e}") from None


def build_service(
    config: Config,
    reactor: Any,
    *,
    inherited_ports: bool = False,
    shared_metrics: SharedMetrics | None = None,
) -> MultiService:
    """
    Everything aiproxy runs: the upstream connection pool, and one listener per
    endpoint under the service that drains their connections.

    Each listener serves aiproxy's HTTP/1.1 server; an ``ssl:`` listener offers HTTP/2
    by ALPN too. Stopping the service stops the listeners, lets the requests in flight
    finish for up to ``config.graceful_timeout`` seconds and aborts the rest, then
    closes the pool.

    @param reactor: provides ``IReactorTCP``, ``IReactorTime`` and ``IReactorCore`` (and
        ``IReactorSSL``/``IReactorUNIX`` for those endpoints).
    @param inherited_ports: the endpoints' sockets are open already, as file
        descriptors 3, 4, ... in order (a worker process, see :mod:`aiproxy.run.workers`).
    @param shared_metrics: where this worker publishes its metrics for its siblings,
        and finds theirs.
    @raise ConfigError: an endpoint string cannot be parsed.
    """
    upstream = UpstreamPool.from_config(reactor, config)
    activity = Activity()
    core = build_core(config, upstream, reactor, activity, shared_metrics)
    # Services stop one after another, in reverse order: the drain (listeners first),
    # then the pool, then the last publication of the metrics.
    top = SequentialMultiService()
    if shared_metrics is not None and core.metrics is not None:
        MetricsPublisher(core.metrics, shared_metrics, reactor).setServiceParent(top)
    CoreService(core).setServiceParent(top)
    PoolService(upstream).setServiceParent(top)
    drain = DrainService(activity, reactor, config.graceful_timeout)
    drain.setServiceParent(top)
    for index, description in enumerate(config.endpoints):
        try:
            endpoint = endpoints.serverFromString(reactor, with_backlog(description))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--port {description!r} is not a valid endpoint: {e}") from None
        tls = ssl_context_factory(endpoint) is not None
        factory = listener_factory(core, config, reactor, tls=tls)
        if inherited_ports:
            endpoint, factory = inherited(reactor, FIRST_FD + index, endpoint, factory)
        listener = StreamServerEndpointService(shared_if_inherited(endpoint), factory)
        fail_if_cannot_listen(listener)
        listener.setServiceParent(drain)
    return top


def listener_factory(
    core: ProxyCore, config: Config, reactor: Any, *, tls: bool
) -> IProtocolFactory:
    """
    What serves the connections of one listener: aiproxy's HTTP/1.1 server, and on a
    TLS listener (``tls``) HTTP/2 too, for clients that choose ``h2`` by ALPN.
    """
    limits = ClientLimits.from_config(config)
    http1 = HTTP11Factory(core, reactor, core.activity, limits, secure=tls)
    if not tls:
        return http1
    resource = ReverseProxyResource(core, config.proxy_buffer_size)
    site = build_site(resource, reactor, core.activity, config=config)
    return NegotiatingFactory(http1, site, core.activity)


def makeService(options: Options) -> IService:
    """The ``twist`` entry point: build the service on the global reactor."""
    from twisted.internet import reactor

    config: Config = options["config"]
    level, log_format = use_aiproxy_logging(
        options, config.twisted_log_level, config.log_format, os.environ, reactor
    )
    # Worker processes log as this one does, whatever twist's own options said.
    config = attrs.evolve(config, log_level=log_level_name(level), log_format=log_format)
    try:
        service: IService
        if config.max_workers > 1:
            service = WorkerSupervisor(config, reactor)
        else:
            metrics_dir = os.environ.get(METRICS_DIR)
            service = build_service(
                config,
                reactor,
                inherited_ports=os.environ.get(INHERITED_PORTS) == "1",
                shared_metrics=None if metrics_dir is None else SharedMetrics(metrics_dir),
            )
    except ConfigError as e:
        raise SystemExit(f"aiproxy: invalid configuration: {e}") from None
    command_line = _ExitIfCannotListen()
    service.setServiceParent(command_line)
    _tune_garbage_collector()  # after building: what was built lives as long as the process
    return command_line


def _tune_garbage_collector() -> None:
    """
    Collect cyclic garbage less often, and never rescan what start-up loaded and built.

    Each proxied request allocates a few hundred objects (Deferreds, protocols,
    headers), so CPython's default threshold of 700 runs a collection every few
    requests; at 20,000 the proxy served about 8% more small requests per CPU second
    (see BENCHMARKS.md). Memory is unaffected in practice: nearly all of that garbage
    is freed by reference counting, not by the collector.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class _ExitIfCannotListen(MultiService):
    """Ends ``twist`` with one line, not a traceback, when a port cannot be opened."""

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            raise SystemExit(f"aiproxy: {e}") from None
