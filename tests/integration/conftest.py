"""
Fixtures for the end-to-end tests: a fake OpenAI upstream and aiproxy, each on a real
loopback socket of the test reactor, closed again after each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.web.resource import Resource
from twisted.web.server import Site

from aiproxy.config import Config
from aiproxy.core.handler import ProxyCore
from aiproxy.run.service import CoreService, PoolService
from aiproxy.run.tap import build_service
from aiproxy.testing import FakeOpenAI, UpstreamStats
from aiproxy.upstream.pool import UpstreamPool

from .support import LOOPBACK, free_port, wait_until, within


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
    """aiproxy's whole service, as ``twist aiproxy`` builds it, started on a loopback port."""

    config: Config
    service: MultiService
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def core(self) -> ProxyCore:
        """The proxy core, whose counters (``cancelled``, ``retries``) the tests read."""
        (core,) = [s.core for s in self.service if isinstance(s, CoreService)]
        return core

    resource = core

    @property
    def pool(self) -> UpstreamPool:
        """The upstream connection pool."""
        (pool,) = [s.pool for s in self.service if isinstance(s, PoolService)]
        return pool


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


TCP_ENDPOINT = f"tcp:{{port}}:interface={LOOPBACK}"
"""The endpoint :func:`start_proxy` listens on unless told otherwise."""


@pytest_twisted.async_yield_fixture
async def start_proxy() -> AsyncIterator[Callable[..., Proxy]]:
    """
    ``start_proxy(target_url, endpoint=TCP_ENDPOINT, **settings)``: aiproxy in front of
    ``target_url``, its service built by ``aiproxy.run.tap.build_service`` from
    ``Config(**settings)`` and started on ``endpoint`` with a free loopback port for its
    ``{port}``. After the test it is stopped if it still runs, with no grace for
    requests still in flight unless the test set ``graceful_timeout``.
    """
    started: list[Proxy] = []

    def start(target_url: str, endpoint: str = TCP_ENDPOINT, **settings: Any) -> Proxy:
        settings.setdefault("graceful_timeout", 0)
        port = free_port()
        listen = (endpoint.format(port=port),)
        config = Config(target_url=target_url, listen=listen, **settings)
        service = build_service(config, reactor)
        service.startService()
        proxy = Proxy(config, service, port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.service.running:
            await within(proxy.service.stopService(), 10)


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
