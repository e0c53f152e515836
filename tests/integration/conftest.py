"""
Fixtures for the end-to-end tests: a fake OpenAI upstream and aiproxy, each on a real
loopback socket of the test reactor, closed again after each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.web.resource import Resource
from twisted.web.server import Site

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.core.handler import ProxyCore
from aiproxy.server.http1 import ClientLimits, HTTP11Factory
from aiproxy.testing import FakeOpenAI, UpstreamStats
from aiproxy.upstream.pool import UpstreamPool

from .support import LOOPBACK, wait_until, within


@attrs.define
class Upstream:
    """The fake upstream, listening."""

    fake: FakeOpenAI
    port: IListeningPort
    url: str

    @property
    def stats(self) -> UpstreamStats:
        return self.fake.stats


@attrs.define
class Proxy:
    """aiproxy's HTTP/1.1 server, listening, with its core and upstream pool."""

    config: Config
    core: ProxyCore
    pool: UpstreamPool
    listening: IListeningPort

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def resource(self) -> ProxyCore:
        """The core, whose counters (``cancelled``, ``retries``) the tests read."""
        return self.core


def _listen(factory: Factory) -> IListeningPort:
    return reactor.listenTCP(0, factory, interface=LOOPBACK)


def _serve_fake(prefix: bytes | None = None) -> Upstream:
    fake = FakeOpenAI(reactor)
    root: Resource = fake
    if prefix is not None:
        root = Resource()
        root.putChild(prefix, fake)
    port = _listen(Site(root))
    return Upstream(fake, port, f"http://{LOOPBACK}:{port.getHost().port}")


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The fake OpenAI upstream at ``http://127.0.0.1:PORT``."""
    served = _serve_fake()
    yield served
    await within(served.port.stopListening(), 5)


@pytest_twisted.async_yield_fixture
async def prefixed_upstream() -> AsyncIterator[Upstream]:
    """The fake OpenAI upstream mounted at ``http://127.0.0.1:PORT/prefix``."""
    served = _serve_fake(b"prefix")
    yield served
    await within(served.port.stopListening(), 5)


@pytest_twisted.async_yield_fixture
async def start_proxy() -> AsyncIterator[Callable[..., Proxy]]:
    """
    ``start_proxy(target_url, **settings)``: an aiproxy in front of ``target_url``, built
    the way ``aiproxy.run.tap.build_service`` builds it, on a free loopback port.
    """
    started: list[Proxy] = []

    def start(target_url: str, **settings: Any) -> Proxy:
        config = Config(target_url=target_url, **settings)
        pool = UpstreamPool.from_config(reactor, config)
        activity = Activity()
        core = build_core(config, pool, reactor, activity)
        factory = HTTP11Factory(core, reactor, activity, ClientLimits.from_config(config))
        proxy = Proxy(config, core, pool, _listen(factory))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await within(proxy.listening.stopListening(), 5)
        proxy.core.idle_sweep.stop()
        await within(proxy.pool.close(), 5)


@pytest_twisted.async_fixture
async def proxy(upstream: Upstream, start_proxy: Callable[..., Proxy]) -> Proxy:
    """aiproxy in front of :func:`upstream`, with the default settings."""
    return start_proxy(upstream.url)


KEPT_PORTS: set[int] = set()
"""Ports of listeners that live longer than one test (module-scoped fixtures)."""


def _left_open() -> list[object]:
    """Sockets of the test reactor that no longer-lived fixture accounts for."""
    return [
        selectable
        for selectable in {*reactor.getReaders(), *reactor.getWriters()}
        if hasattr(selectable, "getHost") and selectable.getHost().port not in KEPT_PORTS
    ]


@pytest_twisted.async_yield_fixture(autouse=True)
async def reactor_left_clean() -> AsyncIterator[None]:
    """After each test (and its fixtures' teardown), every socket the test opened is
    closed and no timer is pending, within a second."""
    yield

    def clean() -> bool:
        if _left_open():
            return False
        kept = [s for s in reactor.getReaders() if hasattr(s, "getHost")]
        return bool(kept) or not reactor.getDelayedCalls()

    try:
        await wait_until(clean, 1, "the reactor is clean")
    except AssertionError:
        raise AssertionError(f"left behind: {_left_open()} {reactor.getDelayedCalls()}") from None
