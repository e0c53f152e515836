"""
HTTP/2, negotiated by ALPN over TLS, works through the twisted.web door too: aiproxy's
resource in a site made by :func:`aiproxy.server.web.build_site` (whose HTTP/1.1
connections are :class:`aiproxy.server.web_channel.ProxyChannel`), body limit included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import trustme
from twisted.internet import reactor, ssl

from aiproxy.config import Config
from aiproxy.server.web import build_resource, build_site
from aiproxy.upstream.pool import UpstreamPool

from .conftest import Upstream
from .h2client import H2Stream, connect_h2
from .support import LOOPBACK, close_client, within


@pytest_twisted.async_yield_fixture
async def h2_proxy(upstream: Upstream) -> AsyncIterator[tuple[int, Any]]:
    """aiproxy over TLS offering h2 by ALPN, MAX_BODY_SIZE=1000; its port and CA."""
    ca = trustme.CA()
    server = ssl.PrivateCertificate.loadPEM(
        ca.issue_cert(LOOPBACK).private_key_and_cert_chain_pem.bytes()
    )
    options = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    config = Config(target_url=upstream.url, max_body_size=1000)
    pool = UpstreamPool.from_config(reactor, config)
    root = build_resource(config, pool, reactor)
    site = build_site(root, reactor, config=config)
    port = reactor.listenSSL(0, site, options, interface=LOOPBACK)
    yield port.getHost().port, ca
    await within(port.stopListening(), 5)
    await within(pool.close(), 5)


async def h2_exchange(
    port: int, ca: Any, requests: list[tuple[list[tuple[bytes, bytes]], bytes | None]]
) -> tuple[bytes | None, list[H2Stream]]:
    """Run ``requests`` on one HTTP/2 connection; the negotiated protocol and responses."""
    client = await connect_h2(port, ssl.Certificate.loadPEM(ca.cert_pem.bytes()))
    try:
        streams = [client.send(headers, body) for headers, body in requests]
        for stream in streams:
            await within(stream.ended, 5)
        protocol = client.transport.negotiatedProtocol
    finally:
        await close_client(client)
    return protocol, streams


def request_headers(method: bytes, path: bytes, *extra: tuple[bytes, bytes]) -> Any:
    return [
        (b":method", method),
        (b":path", path),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        *extra,
    ]


@pytest_twisted.ensureDeferred
async def test_http2_requests_are_proxied(upstream: Upstream, h2_proxy: tuple[int, Any]) -> None:
    """Two requests on one HTTP/2 connection are both proxied and answered."""
    port, ca = h2_proxy
    protocol, responses = await h2_exchange(
        port,
        ca,
        [
            (request_headers(b"GET", b"/v1/models"), None),
            (request_headers(b"POST", b"/echo", (b"content-length", b"5")), b"hello"),
        ],
    )
    assert protocol == b"h2"
    assert [r.status for r in responses] == [200, 200]
    assert json.loads(responses[0].body)["data"][0]["id"] == "fake-model"
    assert json.loads(responses[1].body)["body_length"] == 5
    assert upstream.stats.requests == 2


@pytest_twisted.ensureDeferred
async def test_http2_body_over_max_body_size_is_a_413(
    upstream: Upstream, h2_proxy: tuple[int, Any]
) -> None:
    """Over HTTP/2 a body over MAX_BODY_SIZE (declared or not) gets the JSON 413 on its
    stream, and the other streams of the connection are served."""
    port, ca = h2_proxy
    _, responses = await h2_exchange(
        port,
        ca,
        [
            (request_headers(b"POST", b"/echo", (b"content-length", b"5000")), b"x" * 5000),
            (request_headers(b"POST", b"/echo"), b"y" * 5000),
            (request_headers(b"GET", b"/v1/models"), None),
        ],
    )
    assert [r.status for r in responses] == [413, 413, 200]
    assert json.loads(responses[0].body)["error"]["type"] == "request_too_large"
    assert upstream.stats.requests == 1
