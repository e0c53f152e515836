"""
Limits and bad input in the twisted.web door, as a client sees them: the ``Site`` that
:func:`aiproxy.server.web.build_site` makes (for programs that embed aiproxy) over a
fake connection, a fake upstream and a fake clock. aiproxy's own HTTP/1.1 server has
the same limits: see test_http1_server.py.
"""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.task import Clock

from aiproxy.config import Config
from aiproxy.server.web import ProxySite, build_resource, build_site
from aiproxy.server.web_channel import LINGER

from .fakes import ClientConnection, FakeUpstream, body_bytes
from .test_proxy import error_of

TARGET_URL = "http://upstream.example:9000"


@attrs.define
class Proxy:
    """aiproxy with a fake upstream and clock; ``client`` is a first connection."""

    clock: Clock
    agent: FakeUpstream
    site: ProxySite
    client: ClientConnection

    def connect(self) -> ClientConnection:
        """Another client connection."""
        return ClientConnection(self.site)


def start_proxy(**settings: object) -> Proxy:
    """aiproxy built from ``Config(**settings)``, client limits included."""
    settings.setdefault("target_url", TARGET_URL)
    config = Config(**settings)
    clock, agent = Clock(), FakeUpstream()
    site = build_site(build_resource(config, agent, clock), clock, config=config)
    return Proxy(clock, agent, site, ClientConnection(site))


def closed(client: ClientConnection) -> bool:
    """Whether the proxy closed (or is closing) the client's connection."""
    return bool(client.transport.disconnecting or client.transport.disconnected)


def closed_after_lingering(proxy: Proxy, client: ClientConnection) -> bool:
    """Whether the proxy closes the connection once the LINGER seconds are over."""
    proxy.clock.advance(LINGER)
    return closed(client)


def head(*lines: bytes, target: bytes = b"/v1/files", method: bytes = b"POST") -> bytes:
    """An HTTP/1.1 request head with a Host and the given header lines."""
    return b"\r\n".join([method + b" " + target + b" HTTP/1.1", b"Host: proxy.example", *lines])


# --- MAX_BODY_SIZE -----------------------------------------------------------------


def test_declared_body_over_max_body_size_is_a_413_before_any_of_it_is_read() -> None:
    """A Content-Length over MAX_BODY_SIZE is answered 413 with the JSON error (and the
    client's request ID) as soon as the head is in; the connection closes, nothing goes
    upstream."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.send(head(b"Content-Length: 1001", b"X-Request-ID: upload-1") + b"\r\n\r\n")
    response = proxy.client.response()
    assert response.status == 413
    error = error_of(response)
    assert error["type"] == "request_too_large"
    assert "1000" in error["message"]
    assert error["request_id"] == "upload-1"
    assert response.header(b"x-request-id") == b"upload-1"
    assert response.header(b"connection") == b"close"
    assert closed_after_lingering(proxy, proxy.client)
    assert proxy.agent.calls == []


def test_body_of_exactly_max_body_size_is_forwarded() -> None:
    """A body of exactly MAX_BODY_SIZE bytes reaches the upstream whole."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.request(b"POST", b"/v1/files", body=b"x" * 1000)
    call = proxy.agent.last
    assert body_bytes(call.body) == b"x" * 1000


def test_chunked_body_growing_past_max_body_size_is_a_413_and_reading_stops() -> None:
    """A chunked body is refused with 413 once it grows past MAX_BODY_SIZE; what the
    client sends after that is not read, and nothing goes upstream."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    chunk = b"190\r\n" + b"y" * 400 + b"\r\n"
    proxy.client.send(chunk * 2)
    assert proxy.client.transport.value() == b""
    proxy.client.send(chunk)
    response = proxy.client.response()
    assert response.status == 413
    assert error_of(response)["type"] == "request_too_large"
    proxy.client.send(chunk + b"0\r\n\r\n" + head(method=b"GET") + b"\r\n\r\n")
    assert closed_after_lingering(proxy, proxy.client)
    assert proxy.client.transport.value().count(b"HTTP/1.1 ") == 1
    assert proxy.agent.calls == []


def test_refused_body_is_not_invited_with_100_continue() -> None:
    """A client that waits for 100 Continue before a body that is too large gets the
    413 instead, and no invitation to send it."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.send(head(b"Expect: 100-continue", b"Content-Length: 5000") + b"\r\n\r\n")
    assert proxy.client.transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in proxy.client.transport.value()


def test_accepted_body_is_still_invited_with_100_continue() -> None:
    """A body within the limit still gets 100 Continue, then is forwarded."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.send(head(b"Expect: 100-continue", b"Content-Length: 5") + b"\r\n\r\n")
    assert proxy.client.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    proxy.client.send(b"hello")
    assert proxy.agent.last.method == b"POST"


def test_body_size_limit_applies_to_each_request_of_a_connection() -> None:
    """Small bodies on one keep-alive connection are each measured on their own."""
    proxy = start_proxy(max_body_size=1000)
    for _ in range(3):
        proxy.client.request(b"POST", b"/v1/files", body=b"z" * 800)
        proxy.agent.last.respond(204).end()
    assert len(proxy.agent.calls) == 3
    assert not closed(proxy.client)


# --- Bad input ---------------------------------------------------------------------

_BIG = b"a" * 65536


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # Already refused by twisted.web's parser (with a bare 400 of its own).
        (b"GET  /v1/models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /v1/models\r\n\r\n", 400),
        (b"GET /v1/models HTTP/2.0\r\nHost: h\r\n\r\n", 400),
        (b"GET /v1/\tmodels HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /v1/\x00models HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET /v1/\xffmodels HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (head(b"Bogus") + b"\r\n\r\n", 400),
        (head(b"X-A : 1") + b"\r\n\r\n", 400),
        (head(b"X-A: a\x00b") + b"\r\n\r\n", 400),
        (head(b"Content-Length: -1") + b"\r\n\r\n", 400),
        (head(b"Content-Length: 5, 5") + b"\r\n\r\nhello", 400),
        (head(b"Content-Length: 5", b"Content-Length: 6") + b"\r\n\r\nhello!", 400),
        (head(b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"\r\n\r\n0\r\n\r\n", 400),
        (head(b"Transfer-Encoding: gzip, chunked") + b"\r\n\r\n0\r\n\r\n", 400),
        (head(b"Transfer-Encoding: chunked") + b"\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
        # Closed by aiproxy.
        (head(b"X-A: a", b"  folded") + b"\r\n\r\n", 400),
        (b"POST /v1/files HTTP/1.1\r\n Host: h\r\n\r\n", 400),
        (head(b"Transfer-Encoding: identity") + b"\r\n\r\nhello", 400),
        (head(b"Transfer-Encoding: identity", b"Content-Length: 5") + b"\r\n\r\nhello", 400),
        (b"POST /v1/f HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /" + _BIG + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431),
        (head(b"X-Big: " + _BIG) + b"\r\n\r\n", 431),
        (head(*[b"X-Part-%d: " % i + b"b" * 1000 for i in range(66)]) + b"\r\n\r\n", 431),
        (head(*[b"X-Line-%d: 1" % i for i in range(100)]) + b"\r\n\r\n", 431),
    ],
    ids=[
        "two spaces",
        "HTTP/0.9",
        "HTTP/2.0 line",
        "tab in target",
        "NUL in target",
        "0xff in target",
        "no colon",
        "space before colon",
        "NUL in value",
        "negative length",
        "length list",
        "conflicting lengths",
        "length and chunked",
        "gzip coding",
        "bad chunk size",
        "obs-fold",
        "space before first header",
        "identity",
        "identity and length",
        "HTTP/1.0 chunked",
        "no Host",
        "two Hosts",
        "long request line",
        "long header line",
        "head over 64 KiB",
        "101 header lines",
    ],
)
def test_bad_request_heads_get_a_json_error_and_the_connection_closes(
    raw: bytes, status: int
) -> None:
    """Malformed or ambiguously framed requests get a JSON 400, oversized heads a JSON
    431; the connection closes and nothing reaches the upstream."""
    proxy = start_proxy()
    proxy.client.send(raw)
    response = proxy.client.response()
    assert response.status == status
    error_of(response)
    assert response.header(b"x-request-id")
    assert response.header(b"connection") == b"close"
    assert closed_after_lingering(proxy, proxy.client)
    assert proxy.agent.calls == []


def test_a_head_of_64_kib_and_100_header_lines_is_forwarded() -> None:
    """The limits are inclusive: a head of exactly 64 KiB with 100 header lines passes."""
    lines = [b"X-Line-%02d: 1" % i for i in range(98)]
    start = head(*lines, method=b"GET") + b"\r\nX-Fill: "
    fill = 65536 - len(start) - len(b"\r\n\r\n")
    proxy = start_proxy()
    proxy.client.send(start + b"f" * fill + b"\r\n\r\n")
    assert len(start) + fill + 4 == 65536
    assert proxy.client.transport.value() == b""
    assert proxy.agent.last.headers.getRawHeaders(b"x-fill") == [b"f" * fill]


def test_a_request_refused_for_its_head_leaves_other_connections_alone() -> None:
    """One client's bad request closes only its own connection."""
    proxy = start_proxy()
    other = proxy.connect()
    proxy.client.send(head(b"Transfer-Encoding: identity") + b"\r\n\r\n")
    other.request(b"GET", b"/v1/models")
    assert closed_after_lingering(proxy, proxy.client)
    assert not closed(other)
    assert proxy.agent.last.url == TARGET_URL.encode() + b"/v1/models"


def test_a_refused_client_may_finish_sending_and_read_the_error() -> None:
    """After a refusal the proxy drops whatever the client still sends, for up to
    LINGER seconds, so that a client that sends its whole body before reading gets the
    error and not a reset; the connection then closes."""
    proxy = start_proxy(max_body_size=1000)
    proxy.client.send(head(b"Content-Length: 100000") + b"\r\n\r\n")
    for _ in range(10):
        proxy.client.send(b"d" * 10000)
        proxy.clock.advance(LINGER / 20)
    assert not closed(proxy.client)
    response = proxy.client.response()
    assert (response.status, response.complete) == (413, True)
    assert proxy.client.transport.value().count(b"HTTP/1.1 ") == 1
    proxy.clock.advance(LINGER / 2)
    assert closed(proxy.client)
    assert proxy.agent.calls == []


def test_a_refused_client_that_closes_leaves_no_timer() -> None:
    """When the refused client closes first, nothing is left waiting to close it."""
    proxy = start_proxy()
    proxy.client.send(head(b"Transfer-Encoding: identity") + b"\r\n\r\n")
    assert proxy.client.response().status == 400
    proxy.client.disconnect()
    assert proxy.clock.getDelayedCalls() == []


# --- HEADER_TIMEOUT ----------------------------------------------------------------


def test_request_head_not_complete_within_header_timeout_gets_a_408() -> None:
    """A head still incomplete HEADER_TIMEOUT seconds after its first byte is answered
    408 and the connection closes."""
    proxy = start_proxy(header_timeout=10)
    proxy.client.send(b"GET /v1/models HTTP/1.1\r\nHost: h\r\n")
    proxy.clock.advance(9.9)
    assert proxy.client.transport.value() == b""
    proxy.clock.advance(0.1)
    response = proxy.client.response()
    assert response.status == 408
    assert error_of(response)["type"] == "request_timeout"
    assert closed(proxy.client)
    assert proxy.agent.calls == []


def test_trickling_header_bytes_does_not_extend_the_header_timeout() -> None:
    """A slowloris client sending a header byte every second is still cut off
    HEADER_TIMEOUT seconds after its first byte."""
    proxy = start_proxy(header_timeout=10)
    for byte in b"GET /v1/models HTTP/1.1\r\nX-Slow: " + b"s" * 20:
        if closed(proxy.client):
            break
        proxy.client.send(bytes([byte]))
        proxy.clock.advance(1)
    assert proxy.clock.seconds() == 10
    assert proxy.client.response().status == 408


def test_a_connection_that_sends_nothing_is_left_to_the_idle_timeout() -> None:
    """The header timeout starts with the first byte: a connection that sends nothing
    is closed by the idle timeout (75 s), without a response."""
    proxy = start_proxy(header_timeout=10)
    proxy.clock.advance(74)
    assert not closed(proxy.client)
    proxy.clock.advance(1)
    assert closed(proxy.client)
    assert proxy.client.transport.value() == b""


def test_idle_keep_alive_connection_is_not_cut_by_the_header_timeout() -> None:
    """Between requests a keep-alive connection may stay idle for longer than
    HEADER_TIMEOUT, and its next request is served."""
    proxy = start_proxy(header_timeout=10)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.respond(204).end()
    proxy.clock.advance(60)
    assert not closed(proxy.client)
    proxy.client.request(b"GET", b"/v1/models")
    assert len(proxy.agent.calls) == 2


@pytest.mark.parametrize("idle", [5, 50])
def test_header_timeout_counts_from_the_first_byte_of_each_request(idle: float) -> None:
    """On a keep-alive connection each request head gets HEADER_TIMEOUT seconds from
    its own first byte, whenever that comes."""
    proxy = start_proxy(header_timeout=10)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.respond(204).end()
    proxy.clock.advance(idle)
    proxy.client.send(b"GET /v1/models HTTP/1.1\r\n")
    proxy.clock.advance(9.5)
    assert not closed(proxy.client)
    proxy.clock.advance(0.5)
    assert closed(proxy.client)
    assert proxy.client.transport.value().count(b"HTTP/1.1 408 ") == 1


def test_header_timeout_applies_after_a_long_upload_on_the_same_connection() -> None:
    """After a big upload (whose rate deadline lay far ahead), the connection's next
    request head still gets only HEADER_TIMEOUT seconds."""
    proxy = start_proxy(header_timeout=10, body_min_rate=500)
    proxy.client.send(head(b"Content-Length: 100000") + b"\r\n\r\n" + b"u" * 99999)
    proxy.clock.advance(10.5)
    proxy.client.send(b"u")
    proxy.agent.last.respond(204).end()
    proxy.client.send(b"GET /v1/models HTTP/1.1\r\n")
    proxy.clock.advance(10)
    assert proxy.client.transport.value().count(b"HTTP/1.1 408 ") == 1
    assert closed(proxy.client)


def test_a_request_being_answered_is_not_subject_to_the_header_timeout() -> None:
    """A slow upstream answer is not the client's fault: no 408 while it is awaited."""
    proxy = start_proxy(header_timeout=10, request_timeout=300)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.clock.advance(60)
    proxy.agent.last.respond(200).end()
    assert proxy.client.response().status == 200
    assert not closed(proxy.client)


def test_pipelined_requests_are_each_answered() -> None:
    """Requests sent back to back on one connection are answered in order, without a
    408 for the ones that waited."""
    proxy = start_proxy(header_timeout=10)
    proxy.client.send(head(method=b"GET") + b"\r\n\r\n" + head(method=b"GET") + b"\r\n\r\n")
    proxy.clock.advance(30)
    proxy.agent.last.respond(204).end()
    proxy.clock.advance(30)
    assert len(proxy.agent.calls) == 2
    proxy.agent.last.respond(204).end()
    assert proxy.client.transport.value().count(b"HTTP/1.1 204 ") == 2
    assert not closed(proxy.client)


def test_no_timer_is_left_when_connections_close() -> None:
    """Connections that made many requests, or were cut off, leave no timer behind."""
    proxy = start_proxy(header_timeout=10)
    for _ in range(20):
        proxy.client.request(b"POST", b"/v1/files", body=b"x" * 10)
        proxy.agent.last.respond(204).end()
        proxy.clock.advance(1)
    slow = proxy.connect()
    slow.send(b"GET /")
    proxy.clock.advance(10)
    assert slow.response().status == 408
    proxy.client.disconnect()
    slow.disconnect()
    assert proxy.clock.getDelayedCalls() == []


# --- BODY_MIN_RATE -----------------------------------------------------------------


def test_stalled_body_gets_a_408_after_the_grace() -> None:
    """A body that stops arriving is answered 408 HEADER_TIMEOUT seconds after the head
    (plus one second per BODY_MIN_RATE bytes received); nothing goes upstream."""
    proxy = start_proxy(header_timeout=10, body_min_rate=500)
    proxy.client.send(head(b"Content-Length: 10000", b"X-Request-ID: slow-1") + b"\r\n\r\n")
    proxy.client.send(b"b" * 1000)
    proxy.clock.advance(11.9)
    assert proxy.client.transport.value() == b""
    proxy.clock.advance(0.1)
    response = proxy.client.response()
    assert response.status == 408
    error = error_of(response)
    assert (error["type"], error["request_id"]) == ("request_timeout", "slow-1")
    assert "500 bytes/s" in error["message"]
    assert closed(proxy.client)
    assert proxy.agent.calls == []


def test_body_at_the_minimum_rate_is_forwarded() -> None:
    """A body that keeps to BODY_MIN_RATE bytes per second, however long it takes, is
    forwarded whole."""
    proxy = start_proxy(header_timeout=10, body_min_rate=500)
    proxy.client.send(head(b"Content-Length: 30000") + b"\r\n\r\n")
    for _ in range(60):
        proxy.clock.advance(1)
        proxy.client.send(b"r" * 500)
    assert not closed(proxy.client)
    call = proxy.agent.last
    assert body_bytes(call.body) == b"r" * 30000


def test_body_slower_than_the_minimum_rate_gets_a_408() -> None:
    """A chunked body at half of BODY_MIN_RATE falls behind after twice the grace."""
    proxy = start_proxy(header_timeout=10, body_min_rate=500)
    proxy.client.send(head(b"Transfer-Encoding: chunked") + b"\r\n\r\n")
    chunk = b"fa\r\n" + b"h" * 250 + b"\r\n"
    for _ in range(19):
        proxy.clock.advance(1)
        proxy.client.send(chunk)
    assert proxy.client.transport.value() == b""
    proxy.clock.advance(2)
    assert proxy.client.response().status == 408
    assert proxy.agent.calls == []


def test_body_min_rate_zero_waits_for_a_slow_body() -> None:
    """With BODY_MIN_RATE=0 a body may trickle in as slowly as the idle timeout allows."""
    proxy = start_proxy(header_timeout=10, body_min_rate=0)
    proxy.client.send(head(b"Content-Length: 10") + b"\r\n\r\n")
    for _ in range(10):
        proxy.clock.advance(60)
        proxy.client.send(b"t")
    assert proxy.agent.last.method == b"POST"


# --- MAX_CONCURRENT_REQUESTS -------------------------------------------------------


def test_proxied_requests_over_max_concurrent_requests_get_a_503_with_retry_after() -> None:
    """With MAX_CONCURRENT_REQUESTS=2 and two requests in flight, a third is answered 503
    with Retry-After: 1 and does not reach the upstream."""
    proxy = start_proxy(max_concurrent_requests=2)
    first, second, third = proxy.client, proxy.connect(), proxy.connect()
    first.request(b"GET", b"/v1/models")
    second.request(b"GET", b"/v1/models")
    third.request(b"GET", b"/v1/models")
    response = third.response()
    assert response.status == 503
    assert response.header(b"retry-after") == b"1"
    assert error_of(response)["type"] == "overloaded"
    assert len(proxy.agent.calls) == 2
    assert not closed(third)


def test_a_finished_or_abandoned_request_frees_its_place() -> None:
    """Once a response has ended, or its client has gone, another request is let in."""
    proxy = start_proxy(max_concurrent_requests=1)
    proxy.client.request(b"GET", b"/v1/models")
    proxy.agent.last.respond(204).end()
    second = proxy.connect()
    second.request(b"GET", b"/v1/models")
    assert len(proxy.agent.calls) == 2
    second.disconnect()
    third = proxy.connect()
    third.request(b"GET", b"/v1/models")
    assert len(proxy.agent.calls) == 3


def test_own_endpoints_are_not_limited() -> None:
    """/api/health and /api/ping answer even when the proxy is at its limit."""
    proxy = start_proxy(max_concurrent_requests=1)
    proxy.client.request(b"GET", b"/v1/models")
    for path in (b"/api/health", b"/api/ping"):
        client = proxy.connect()
        client.request(b"GET", path)
        assert client.response().status == 200


def test_requests_are_not_limited_by_default() -> None:
    """Without MAX_CONCURRENT_REQUESTS any number of requests may be in flight."""
    proxy = start_proxy()
    for _ in range(50):
        proxy.connect().request(b"GET", b"/v1/models")
    assert len(proxy.agent.calls) == 50


# --- Upgrade -----------------------------------------------------------------------


@pytest.mark.parametrize("upgrade", [b"websocket", b"WebSocket", b"h2c, websocket"])
def test_websocket_upgrade_gets_a_501_from_the_twisted_web_door(upgrade: bytes) -> None:
    """Through twisted.web (which owns the connection and cannot hand it over), a
    WebSocket upgrade is answered 501 and not forwarded (aiproxy's own HTTP/1.1
    server tunnels it: see test_tunnel.py)."""
    proxy = start_proxy()
    proxy.client.request(
        b"GET",
        b"/v1/realtime",
        [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade), (b"Sec-WebSocket-Version", b"13")],
    )
    response = proxy.client.response()
    assert response.status == 501
    error = error_of(response)
    assert error["type"] == "websocket_not_supported"
    assert "HTTP/1.1" in error["message"]
    assert proxy.agent.calls == []


def test_other_upgrades_are_dropped_and_the_request_is_forwarded() -> None:
    """``Upgrade: h2c`` is hop-by-hop: the request goes upstream as an ordinary one,
    without Upgrade, Connection or the headers Connection names."""
    proxy = start_proxy()
    proxy.client.request(
        b"GET",
        b"/v1/models",
        [
            (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Upgrade", b"h2c"),
            (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    headers = proxy.agent.last.headers
    for name in (b"upgrade", b"http2-settings", b"connection"):
        assert not headers.hasHeader(name), name
    proxy.agent.last.respond(200).end()
    assert proxy.client.response().status == 200
