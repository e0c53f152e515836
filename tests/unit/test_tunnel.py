"""
WebSocket upgrades through aiproxy's HTTP/1.1 server: the upgrade asked of the upstream,
its ``101`` relayed as sent, then bytes both ways until a side closes or the tunnel idles;
any other answer relayed as an ordinary response. Over a fake upstream and clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from aiproxy.access.keyfile import replace_key_file
from aiproxy.access.keys import key_digest
from aiproxy.core.tunnel import CLOSE_GRACE

from .fakes import ClientConnection, FakeTunnelEnd
from .test_proxy import Proxy, error_of, start_proxy

UPGRADE = [
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Protocol", b"realtime, chat"),
    (b"X-Request-ID", b"ws-1"),
]
SWITCHED = [
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    (b"Sec-WebSocket-Protocol", b"realtime"),
]
HEAD_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: realtime\r\n"
    b"\r\n"
)
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked "Hello"


def open_tunnel(proxy: Proxy, early: bytes = b"") -> FakeTunnelEnd:
    """A client's upgrade (and ``early`` bytes right after its head), answered ``101``."""
    proxy.client.request(b"GET", b"/v1/realtime?model=gpt-realtime", UPGRADE)
    if early:
        proxy.client.send(early)
    upstream = proxy.upstream.last.switch(SWITCHED)
    assert proxy.client.transport.value() == HEAD_101
    proxy.client.transport.clear()
    return upstream


def test_the_upgrade_is_asked_of_the_upstream() -> None:
    """The upstream gets the client's GET with ``Upgrade: websocket`` and
    ``Connection: Upgrade``, its ``Sec-WebSocket-*`` fields, and the usual forwarding
    fields; no other hop-by-hop field."""
    proxy = start_proxy()
    proxy.client.request(b"GET", b"/v1/realtime?model=gpt-realtime", UPGRADE)
    call = proxy.upstream.last
    assert call.request_line == b"GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1"
    headers = call.raw_headers
    assert (b"Upgrade", b"websocket") in headers and (b"Connection", b"Upgrade") in headers
    for field in UPGRADE[2:5]:
        assert field in headers
    assert [name for name, _ in headers if name.lower() == b"connection"] == [b"Connection"]
    assert call.headers.getRawHeaders(b"x-request-id") == [b"ws-1"]
    assert call.headers.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.7"]


def test_a_101_is_relayed_as_sent_then_bytes_flow_both_ways() -> None:
    """The client gets the upstream's ``101`` head exactly (its accept key and chosen
    subprotocol, nothing added); then bytes are copied unparsed in both directions,
    those the client sent before the ``101`` first."""
    proxy = start_proxy()
    upstream = open_tunnel(proxy, early=FRAME)
    assert upstream.written == [FRAME]
    proxy.client.send(b"\x82\x80\x00\x00\x00\x00")
    upstream.send(b"\x81\x02hi")
    assert upstream.written == [FRAME, b"\x82\x80\x00\x00\x00\x00"]
    assert proxy.client.transport.value() == b"\x81\x02hi"


def test_each_side_pauses_the_other() -> None:
    """Flow control both ways: the client's transport pauses reading from the upstream,
    the upstream's sending pauses reading from the client."""
    proxy = start_proxy()
    upstream = open_tunnel(proxy)
    assert proxy.client.transport.producer is upstream.producer
    assert upstream.paused_by is proxy.client.transport


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_either_side_closing_closes_the_other_and_the_tunnel_is_recorded(side: str) -> None:
    """When one side closes the other is closed at once; the completion line says who
    closed it and the bytes each way."""
    proxy = start_proxy()
    with capturedLogs() as events:
        upstream = open_tunnel(proxy, early=FRAME)
        upstream.send(b"\x81\x03abc")
        if side == "client":
            proxy.client.disconnect()
            assert upstream.closed
        else:
            upstream.lose()
            assert proxy.client.transport.disconnecting
    [record] = [e for e in events if "tunnel_closed_by" in e]
    assert record["status"] == 101
    assert record["tunnel_closed_by"] == side
    assert (record["bytes_in"], record["bytes_out"]) == (len(FRAME), 5)
    assert any("Tunnel opened" in e.get("log_format", "") for e in events)


def test_an_idle_tunnel_is_closed() -> None:
    """No byte either way for ``TUNNEL_IDLE_TIMEOUT`` closes both sides; traffic in
    either direction keeps it open."""
    proxy = start_proxy(tunnel_idle_timeout=20)
    upstream = open_tunnel(proxy)
    for _ in range(4):
        proxy.clock.pump([1] * 10)
        upstream.send(b"\x89\x00")  # a ping
    proxy.clock.pump([1] * 19)
    assert not upstream.closed
    proxy.clock.pump([1] * 2)
    assert upstream.closed and proxy.client.transport.disconnecting
    assert proxy.core.active_tunnels == 0


def test_a_side_that_does_not_close_is_dropped() -> None:
    """A side the tunnel closes that lingers is aborted after the grace."""
    proxy = start_proxy()
    upstream = open_tunnel(proxy)
    proxy.client.disconnect()
    proxy.clock.advance(CLOSE_GRACE)
    assert upstream.aborted


def test_a_tunnel_counts_as_a_request_in_flight_until_it_closes() -> None:
    """``MAX_CONCURRENT_REQUESTS`` counts an open tunnel: another request waits for it."""
    proxy = start_proxy(max_concurrent_requests=1)
    upstream = open_tunnel(proxy)
    other = ClientConnection(proxy.client.protocol.factory)
    other.request(b"GET", b"/v1/models")
    assert other.response().status == 503
    upstream.lose()
    third = ClientConnection(proxy.client.protocol.factory)
    third.request(b"GET", b"/v1/models")
    assert proxy.upstream.last.request_line.startswith(b"GET /openai/v1/models")


def test_a_drain_out_of_time_drops_the_tunnel() -> None:
    """A graceful shutdown leaves an open tunnel running (it is a request in flight);
    when it runs out of time, both sides are dropped at once."""
    proxy = start_proxy()
    upstream = open_tunnel(proxy)
    for connection in proxy.core.activity.connections():
        connection.close_if_idle()
    upstream.send(b"\x81\x02hi")
    assert proxy.client.transport.value() == b"\x81\x02hi"
    assert not proxy.client.transport.disconnecting and not upstream.closed
    for request in list(proxy.core.activity.requests):
        request.abort()
    assert upstream.aborted
    assert proxy.core.active_tunnels == 0


@pytest.mark.parametrize("status", [401, 404])
def test_any_other_answer_is_relayed_and_the_connection_closes(status: int) -> None:
    """An upstream that refuses the upgrade is relayed as an ordinary response; what the
    client sent after its head is never read as a request, and the connection closes."""
    proxy = start_proxy()
    proxy.client.request(b"GET", b"/v1/realtime", UPGRADE)
    proxy.client.send(b"GET /v1/models HTTP/1.1\r\nHost: h\r\n\r\n")
    response = proxy.upstream.last.respond(status, {b"Content-Length": [b"2"]})
    response.send(b"no")
    response.end()
    assert proxy.client.response().status == status
    assert proxy.client.response().body == b"no"
    assert proxy.client.response().header(b"connection") == b"close"
    assert len(proxy.upstream.calls) == 1


def test_a_websocket_upgrade_must_be_a_get() -> None:
    """``POST`` with ``Upgrade: websocket`` is refused ``400`` and not forwarded."""
    proxy = start_proxy()
    proxy.client.request(b"POST", b"/v1/realtime", UPGRADE, body=b"")
    assert proxy.client.response().status == 400
    assert proxy.upstream.calls == []


def test_the_twisted_web_door_does_not_tunnel() -> None:
    """Mounted in a twisted.web site, aiproxy answers a WebSocket upgrade with ``501``."""
    proxy = start_proxy("web")
    proxy.client.request(b"GET", b"/v1/realtime", UPGRADE)
    response = proxy.client.response()
    assert response.status == 501
    assert error_of(response)["type"] == "websocket_not_supported"
    assert proxy.upstream.calls == []


def test_a_browser_key_in_the_subprotocol_list_opens_the_tunnel_and_stays_here(
    tmp_path: Path,
) -> None:
    """With access keys, a browser's ``openai-insecure-api-key.<key>`` subprotocol is its
    key: the upgrade is admitted, the entry is removed from the list sent upstream (the
    field dropped when nothing is left), and the upstream gets the upstream key."""
    key = "aip-" + "b" * 43
    keys = tmp_path / "keys.toml"
    replace_key_file(str(keys), [{"id": "browser", "sha256": key_digest(key)}])
    proxy = start_proxy(access_keys_file=str(keys), upstream_api_key="sk-upstream-1234567890")
    offer = b"realtime, openai-insecure-api-key." + key.encode()
    headers = [(n, offer if n == b"Sec-WebSocket-Protocol" else v) for n, v in UPGRADE]
    proxy.client.request(b"GET", b"/v1/realtime", headers)
    call = proxy.upstream.last
    assert call.headers.getRawHeaders(b"sec-websocket-protocol") == [b"realtime"]
    assert key.encode() not in call.head
    assert call.headers.getRawHeaders(b"authorization") == [b"Bearer sk-upstream-1234567890"]
    alone = [
        (n, b"openai-insecure-api-key." + key.encode())
        if n == b"Sec-WebSocket-Protocol"
        else (n, v)
        for n, v in UPGRADE
    ]
    other = ClientConnection(proxy.client.protocol.factory)
    other.request(b"GET", b"/v1/realtime", alone)
    assert proxy.upstream.last.headers.getRawHeaders(b"sec-websocket-protocol") is None


def test_without_access_keys_the_subprotocol_list_passes_untouched() -> None:
    """With no access keys the browser's subprotocol key is the upstream's own: it passes."""
    proxy = start_proxy()
    offer = b"realtime, openai-insecure-api-key.sk-browser"
    headers = [(n, offer if n == b"Sec-WebSocket-Protocol" else v) for n, v in UPGRADE]
    proxy.client.request(b"GET", b"/v1/realtime", headers)
    assert proxy.upstream.last.headers.getRawHeaders(b"sec-websocket-protocol") == [offer]
