"""
HTTP/2, negotiated by ALPN over TLS, still works through aiproxy's site (whose
connections start as :class:`aiproxy.channel.ProxyChannel`), body limit included.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import pytest_twisted
import trustme
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from aiproxy.config import Config
from aiproxy.site import build_resource, build_site
from aiproxy.upstream import make_agent, make_pool

from .conftest import Upstream
from .support import LOOPBACK, within


@attrs.define
class H2Response:
    """One response on one stream."""

    headers: dict[bytes, bytes] = attrs.Factory(dict)
    body: bytearray = attrs.Factory(bytearray)

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])


class H2Client(Protocol):
    """Sends requests on HTTP/2 streams at once and collects the responses."""

    def __init__(self, requests: list[tuple[list[tuple[bytes, bytes]], bytes | None]]) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.requests = requests
        self.responses: dict[int, H2Response] = {}
        self.open_streams: set[int] = set()
        self.answered: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        for headers, body in self.requests:
            stream = self.conn.get_next_available_stream_id()
            self.open_streams.add(stream)
            self.responses[stream] = H2Response()
            self.conn.send_headers(stream, headers, end_stream=body is None)
            if body is not None:
                self.conn.send_data(stream, body, end_stream=True)
        self.transport.write(self.conn.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.responses[event.stream_id].headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.responses[event.stream_id].body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.open_streams.discard(event.stream_id)
                if not self.open_streams and not self.answered.called:
                    self.answered.callback(None)
        self.transport.write(self.conn.data_to_send())

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.closed.callback(None)


@pytest_twisted.async_yield_fixture
async def h2_proxy(upstream: Upstream) -> AsyncIterator[tuple[int, Any]]:
    """aiproxy over TLS offering h2 by ALPN, MAX_BODY_SIZE=1000; its port and CA."""
    ca = trustme.CA()
    server = ssl.PrivateCertificate.loadPEM(
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.bytes()
    )
    options = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    config = Config(target_url=upstream.url, max_body_size=1000)
    pool = make_pool(reactor)
    root = build_resource(config, make_agent(reactor, config, pool), reactor)
    site = build_site(root, reactor, config=config)
    port = reactor.listenSSL(0, site, options, interface=LOOPBACK)
    yield port.getHost().port, ca
    await within(port.stopListening(), 5)
    await within(pool.closeCachedConnections(), 5)


async def h2_exchange(
    port: int, ca: Any, requests: list[tuple[list[tuple[bytes, bytes]], bytes | None]]
) -> tuple[bytes | None, list[H2Response]]:
    """Run ``requests`` on one HTTP/2 connection; the negotiated protocol and responses."""
    options = ssl.optionsForClientTLS(
        "localhost",
        trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes()),
        acceptableProtocols=[b"h2"],
    )
    client = H2Client(requests)
    await within(connectProtocol(SSL4ClientEndpoint(reactor, LOOPBACK, port, options), client), 5)
    try:
        await within(client.answered, 5)
        protocol = client.transport.negotiatedProtocol
    finally:
        client.transport.loseConnection()
        await within(client.closed, 5)
    return protocol, [client.responses[stream] for stream in sorted(client.responses)]


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
