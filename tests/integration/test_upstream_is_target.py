"""
The upstream is only ever TARGET_URL: no request target or header makes aiproxy
contact another host, even one that is listening next door.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.server import Site

from aiproxy.testing import FakeOpenAI

from .conftest import Proxy, Upstream
from .support import LOOPBACK, raw_exchange, within


@pytest_twisted.async_yield_fixture
async def other_host() -> AsyncIterator[Upstream]:
    """Another fake upstream, which a request must never reach."""
    fake = FakeOpenAI(reactor)
    port = reactor.listenTCP(0, Site(fake), interface=LOOPBACK)
    yield Upstream(fake, port, f"{LOOPBACK}:{port.getHost().port}")
    await within(port.stopListening(), 5)


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET http://{other}/echo HTTP/1.1", 400),
        (b"GET https://{other}/echo HTTP/1.1", 400),
        (b"GET //{other}/echo HTTP/1.1", 400),
        (b"GET @{other}/echo HTTP/1.1", 400),
        (b"GET {other} HTTP/1.1", 400),
        (b"CONNECT {other} HTTP/1.1", 405),
        (b"GET * HTTP/1.1", 405),
        (b"OPTIONS * HTTP/1.1", 200),
    ],
    ids=[
        "absolute-form",
        "https absolute-form",
        "//host",
        "@host",
        "authority-form",
        "CONNECT",
        "GET *",
        "OPTIONS *",
    ],
)
@pytest_twisted.ensureDeferred
async def test_targets_naming_another_host_are_answered_by_the_proxy(
    request_line: bytes,
    status: int,
    upstream: Upstream,
    other_host: Upstream,
    proxy: Proxy,
) -> None:
    """Absolute-form, authority-form, ``//host``, ``@host``, ``CONNECT`` and ``*``
    targets are answered by aiproxy itself: neither the target nor the other host
    hears of them."""
    line = request_line.replace(b"{other}", other_host.url.encode())
    response = await raw_exchange(
        proxy.port, line + b"\r\nHost: " + other_host.url.encode() + b"\r\n\r\n"
    )
    assert response.status == status
    assert upstream.stats.requests == 0
    assert other_host.stats.requests == 0


@pytest.mark.parametrize(
    "target",
    [b"/echo", b"/@{other}/echo", b"/\\\\{other}/echo", b"/echo?url=http://{other}/"],
    ids=["path", "/@host", "/\\\\host", "url in query"],
)
@pytest_twisted.ensureDeferred
async def test_host_header_or_path_naming_another_host_still_goes_to_target_url(
    target: bytes, upstream: Upstream, other_host: Upstream, proxy: Proxy
) -> None:
    """A ``Host`` naming another host, and paths that contain one, are forwarded to
    TARGET_URL only, with TARGET_URL's own ``Host``; the client's is kept in
    X-Forwarded-Host."""
    other = other_host.url.encode()
    response = await raw_exchange(
        proxy.port,
        b"GET " + target.replace(b"{other}", other) + b" HTTP/1.1\r\nHost: " + other + b"\r\n\r\n",
    )
    assert upstream.stats.requests == 1
    assert other_host.stats.requests == 0
    if target == b"/echo":
        assert response.status == 200
        headers = {name.lower(): value for name, value in response.json()["headers"]}
        assert headers["host"] == upstream.url.removeprefix("http://")
        assert headers["x-forwarded-host"] == other.decode()
