"""
``twist aiproxy``: the command line, and the composition root that builds the service.

This is the only module that touches the global reactor; everything it builds takes
the reactor, the clock and the HTTP agent as arguments.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NoReturn

import attrs
from dotenv import dotenv_values
from dotenv.parser import parse_stream
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.copyright import version as twisted_version
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IReactorFromThreads
from twisted.logger import Logger
from twisted.python import usage

from aiproxy._twisted import fail_if_cannot_listen, ssl_context_factory
from aiproxy._version import __version__
from aiproxy.access.policy import access_policy
from aiproxy.access.watch import reload_keys
from aiproxy.config import Config, ConfigError, load_config, log_level_name, settings
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.core.handler import ProxyCore
from aiproxy.ops.logs import use_aiproxy_logging
from aiproxy.ops.metrics import MetricsPublisher, SharedMetrics
from aiproxy.routing.routes import upstream_routes
from aiproxy.routing.upstreams import configured_upstreams
from aiproxy.rules.redact import redact_url
from aiproxy.run.drain import DrainService
from aiproxy.run.listening import inherited, server_endpoint, shared_if_inherited
from aiproxy.run.service import CoreService, PoolService, SequentialMultiService
from aiproxy.run.watch import FileWatcher, OnHangup
from aiproxy.run.workers import (
    FIRST_FD,
    INHERITED_PORTS,
    METRICS_DIR,
    WORKER,
    WorkerSupervisor,
    tag_worker_lines,
)
from aiproxy.server.http1 import ClientLimits, HTTP11Factory
from aiproxy.server.http2 import HTTP2Factory
from aiproxy.server.negotiate import NegotiatingFactory
from aiproxy.upstream.pool import UpstreamPool

__all__ = ["Options", "build_service", "listener_factory", "makeService", "read_dotenv"]

log = Logger(namespace="aiproxy")

USAGE_ERROR = 64
"""``twist``'s exit status for a command line it cannot parse (``EX_USAGE``)."""


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

    def opt_version(self) -> NoReturn:
        """Print aiproxy's version and exit."""
        print(
            f"aiproxy {__version__} (Twisted {twisted_version}, Python {platform.python_version()})"
        )
        raise SystemExit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse ``options``; one that is mistyped or misused ends ``twist`` with the
        error and a hint to ``--help``, not the whole help."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"aiproxy: {e}\nRun 'twist aiproxy --help' for the options.\n")
            raise SystemExit(USAGE_ERROR) from None

    def postOptions(self) -> None:
        """Merge flags, environment and ``.env`` into a validated :class:`Config`."""
        flags = {s.attribute: self[s.flag] for s in settings()}
        dotenv, lines = read_dotenv(self._dotenv_path)
        try:
            self["config"] = load_config(
                flags, self._environ, dotenv, tuple(self["port"]), dotenv_lines=lines
            )
            # Here too for --workers: a bad key file or upstreams file stops us.
            upstreams = configured_upstreams(self["config"])
            access_policy(self["config"], any(upstream.keys for upstream in upstreams))
        except ConfigError as e:
            raise SystemExit(f"aiproxy: invalid configuration: {e}") from None


def read_dotenv(path: str) -> tuple[dict[str, str | None], dict[str, int]]:
    """The variables of the ``.env`` file at ``path`` (none if there is no such file),
    and the line each is on."""
    if not os.path.exists(path):
        return {}, {}
    lines = {}
    with open(path, encoding="utf-8") as f:
        for binding in parse_stream(f):
            if binding.key is not None:
                text = binding.original.string
                blank = text[: len(text) - len(text.lstrip())]  # blank lines parsed with it
                lines[binding.key] = binding.original.line + blank.count("\n")
    return dict(dotenv_values(path)), lines


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
    routes = upstream_routes(config, reactor)
    activity = Activity()
    core = build_core(config, upstream, reactor, activity, shared_metrics, routes)
    # Services stop one after another, in reverse order: the drain (listeners first),
    # then the pool, then the last publication of the metrics.
    top = SequentialMultiService()
    if shared_metrics is not None and core.metrics is not None:
        MetricsPublisher(core.metrics, shared_metrics, reactor).setServiceParent(top)
    CoreService(core).setServiceParent(top)
    reloads: list[tuple[str, Callable[[], None]]] = []
    if core.access_keys is not None:
        reloads.append((core.access_keys.path, partial(reload_keys, core.access_keys)))
    if routes is not None:
        reloads.append((routes.path, routes.reload))
        PoolService(routes).setServiceParent(top)
    for path, reload in reloads:
        FileWatcher(path, reload, reactor).setServiceParent(top)
    if reloads:
        actions = [reload for _, reload in reloads]
        OnHangup(partial(_run_each, actions), reactor.callFromThread).setServiceParent(top)
    PoolService(upstream).setServiceParent(top)
    drain = DrainService(activity, reactor, config.graceful_timeout)
    drain.setServiceParent(top)
    for index, description in enumerate(config.endpoints):
        endpoint = server_endpoint(reactor, description)
        tls = ssl_context_factory(endpoint) is not None
        factory = listener_factory(core, config, reactor, tls=tls)
        if inherited_ports:
            endpoint, factory = inherited(reactor, FIRST_FD + index, endpoint, factory)
        listener = StreamServerEndpointService(shared_if_inherited(endpoint), factory)
        fail_if_cannot_listen(listener)
        listener.setServiceParent(drain)
    return top


def _run_each(actions: Sequence[Callable[[], None]]) -> None:
    for action in actions:
        action()


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
    http2 = HTTP2Factory(core, reactor, core.activity, limits)
    return NegotiatingFactory(http1, http2, reactor)


def makeService(options: Options) -> IService:
    """The ``twist`` entry point: build the service on the global reactor."""
    from twisted.internet import reactor

    config: Config = options["config"]
    level, log_format = use_aiproxy_logging(
        options, config.twisted_log_level, config.log_format, os.environ, reactor
    )
    # Worker processes log as this one does, whatever twist's own options said.
    config = attrs.evolve(config, log_level=log_level_name(level), log_format=log_format)
    worker = os.environ.get(WORKER)
    parent = getattr(options, "parent", None)
    if worker is not None and parent is not None and "fileLogObserverFactory" in parent:
        parent["fileLogObserverFactory"] = tag_worker_lines(
            parent["fileLogObserverFactory"], int(worker), log_format
        )
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
    if os.environ.get(INHERITED_PORTS) != "1":  # a worker: its parent said it
        log_start(config)
    command_line = _ExitIfCannotListen()
    service.setServiceParent(command_line)
    if isinstance(service, WorkerSupervisor) and (config.access_keys_file or config.upstreams_file):
        call_from_signal = IReactorFromThreads(reactor).callFromThread
        OnHangup(partial(_hang_up_workers, service), call_from_signal).setServiceParent(
            command_line
        )
    _tune_garbage_collector()  # after building: what was built lives as long as the process
    return command_line


def log_start(config: Config) -> None:
    """Log one line that says what this aiproxy is and how it is set up: its version,
    the target (never its credentials), the listeners, the workers, and which of
    metrics, docs, CORS and access keys are on."""

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    log.info(
        "aiproxy {version} starting: target {target}, listening on {listeners},"
        " {workers} worker(s), metrics {metrics}, docs {docs}, CORS {cors}, access keys {keys}",
        version=__version__,
        target=(
            f"the upstreams of {config.upstreams_file}"
            if config.upstreams_file
            else redact_url(config.target_url)
        ),
        listeners=", ".join(config.endpoints),
        workers=config.max_workers,
        metrics=on(config.enable_metrics),
        docs=on(config.enable_docs),
        cors=on(config.enable_cors),
        keys=on(bool(config.access_keys_file)),
    )


def _hang_up_workers(supervisor: WorkerSupervisor) -> None:
    """Pass a ``SIGHUP`` on to every worker: each reloads its access keys and upstreams."""
    for worker in list(supervisor.workers.values()):
        worker.signal("HUP")


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
