"""
aiproxy: a streaming reverse proxy for OpenAI-compatible AI APIs, on Twisted.

The layers, in the direction of traffic:

- :mod:`aiproxy.server`: the front doors. :mod:`~aiproxy.server.http1` is aiproxy's
  own HTTP/1.1 server on llhttp (``httptools``), for every listener;
  :mod:`~aiproxy.server.http2` is its HTTP/2 server on ``h2``, chosen by ALPN on
  ``ssl:`` listeners (:mod:`~aiproxy.server.negotiate`); :mod:`~aiproxy.server.web`
  is a twisted.web ``Resource`` for programs that embed aiproxy in their own ``Site``.
  Each parses a request and hands it to the core.
- :mod:`aiproxy.core`: the exchange, whatever the door. :class:`ProxyCore` gives each
  request its ID and record, answers aiproxy's own endpoints and refusals, and runs
  the upstream exchange (retries, timeouts, streaming with flow control, cancelling
  when the client leaves), logging and counting every request the same way.
- :mod:`aiproxy.upstream`: aiproxy's pooled HTTP/1.1 client for the one upstream, on
  llhttp too.
- :mod:`aiproxy.rules`: pure decisions on bytes (headers, target, framing, CORS,
  retry policy, redaction, token usage, WebSocket), with no I/O.
- :mod:`aiproxy.access`: access keys and per-key limits (in memory or in Redis);
  :mod:`aiproxy.routing`: several upstreams, their health and the choice among them.
- :mod:`aiproxy.ops`: log lines, Prometheus metrics, API docs.
- :mod:`aiproxy.run`: ``twist aiproxy`` (:mod:`~aiproxy.run.tap`, the composition
  root), worker processes, listening sockets, the graceful drain.

Embedding: build a :class:`Config` and an :class:`UpstreamPool`, and mount
:func:`build_resource` in your ``Site`` (see the README).
"""

from aiproxy._version import __version__
from aiproxy.config import Config, ConfigError, load_config
from aiproxy.core.handler import ProxyCore
from aiproxy.rules.target import Target, parse_target
from aiproxy.run.service import PoolService
from aiproxy.run.tap import build_service
from aiproxy.server.web import ProxyRequest, ReverseProxyResource, build_resource, build_site
from aiproxy.upstream.pool import UpstreamPool

__all__ = [
    "Config",
    "ConfigError",
    "PoolService",
    "ProxyCore",
    "ProxyRequest",
    "ReverseProxyResource",
    "Target",
    "UpstreamPool",
    "__version__",
    "build_resource",
    "build_service",
    "build_site",
    "load_config",
    "parse_target",
]
