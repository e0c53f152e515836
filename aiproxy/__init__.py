"""
aiproxy: a streaming reverse proxy for OpenAI-compatible AI APIs, on Twisted.

Run it with ``twist aiproxy``, or embed it: build a :class:`Config`, a pool and an
agent (:mod:`aiproxy.upstream_agent`), and mount :func:`build_resource`'s tree (or a bare
:class:`ReverseProxyResource`) in a ``Site``.
"""

from aiproxy._version import __version__
from aiproxy.config import Config, ConfigError, load_config
from aiproxy.proxy import ReverseProxyResource
from aiproxy.request import ProxyRequest
from aiproxy.rules.target import Target, parse_target
from aiproxy.run.service import PoolService
from aiproxy.run.tap import build_service
from aiproxy.site import ProxyRoot, build_resource, build_site
from aiproxy.upstream_agent import make_agent, make_pool

__all__ = [
    "Config",
    "ConfigError",
    "PoolService",
    "ProxyRequest",
    "ProxyRoot",
    "ReverseProxyResource",
    "Target",
    "__version__",
    "build_resource",
    "build_service",
    "build_site",
    "load_config",
    "make_agent",
    "make_pool",
    "parse_target",
]
