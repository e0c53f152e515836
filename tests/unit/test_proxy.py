"""
The proxy as a client sees it, through each front door: aiproxy's HTTP/1.1 server and
the twisted.web resource, over a fake connection, with a fake upstream and a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from aiproxy import __version__
from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.core.handler import ProxyCore
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits
from aiproxy.server.web import ReverseProxyResource, build_site
from aiproxy.upstream.errors import BodyIncomplete, ConnectFailed

from .fakes import ClientConnection, FakeUpstream, ParsedResponse, parse_response

TARGET_URL = "http://upstream.example:9000/openai"

DOORS = ["http1", "web"]


@attrs.define
class Proxy:
    """aiproxy with a fake upstream and clock, and one client connection."""

    clock: Clock
    upstream: FakeUpstream
    core: ProxyCore
    client: ClientConnection
    door: str


def server_factory(door: str, core: ProxyCore, clock: Clock, config: Config) -> Factory:
    """The factory of ``door``'s connections, over ``core``."""
    if door == "http1":
        return HTTP11Factory(core, clock, core.activity, ClientLimits.from_config(config))
    resource = ReverseProxyResource(core, config.proxy_buffer_size)
    return build_site(resource, clock, core.activity, config=config)


def start_proxy(door: str = "http1", **settings: Any) -> Proxy:
    """aiproxy built from ``Config(**settings)`` over a fake upstream and clock."""
    settings.setdefault("target_url", TARGET_URL)
    settings.setdefault("request_timeout", 30)
    clock, upstream = Clock(), FakeUpstream()
    config = Config(**settings)
    core = build_core(config, upstream, clock, Activity())
    client = ClientConnection(server_factory(door, core, clock, config))
    return Proxy(clock, upstream, core, client, door)


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest) -> str:
    """Each front door in turn."""
    return str(request.param)


@pytest.fixture
def proxy(door: str) -> Proxy:
    return start_proxy(door)


def error_of(response: ParsedResponse) -> dict[str, str]:
    """The JSON error document of an error response."""
    assert response.header(b"content-type") == b"application/json"
    document = json.loads(response.body)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"type", "message", "request_id"}
    error: dict[str, str] = document["error"]
    return error


def assert_stamped(response: ParsedResponse) -> None:
    """aiproxy's own headers are on the response."""
    assert response.header(b"x-request-id")
    assert response.header(b"x-process-time") is not None
    float(response.header(b"x-process-time") or b"")
    assert response.header(b"x-proxy-by") == f"aiproxy/{__version__}".encode()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {},
            {
                "status": "healthy",
                "target_url": TARGET_URL,
                "timeout": 30,
                "ssl_verify": True,
                "auth": "none",
            },
        ),
        (
            {"target_url": "https://api.example", "request_timeout": 2.5, "ssl_verify": False},
            {
                "status": "healthy",
                "target_url": "https://api.example",
                "timeout": 2.5,
                "ssl_verify": False,
                "auth": "none",
            },
        ),
    ],
)
def test_health_reports_status_and_upstream_settings(
    door: str, settings: dict[str, object], expected: dict[str, object]
) -> None:
    """GET /api/health answers JSON with status, target_url, timeout and ssl_verify."""
    proxy = start_proxy(door, **settings)
    proxy.client.request(b"GET", b"/api/health")
    response = proxy.client.response()
    assert response.status == 200
    assert response.header(b"content-type") == b"application/json"
    assert json.loads(response.body) == expected
    assert proxy.upstream.calls == []


def test_health_with_a_query_is_still_ours(proxy: Proxy) -> None:
    """A query string does not change the endpoint: /api/health?probe=1 is the health check."""
    proxy.client.request(b"GET", b"/api/health?probe=1")
    assert json.loads(proxy.client.response().body)["status"] == "healthy"
    assert proxy.upstream.calls == []


def test_ping_answers_pong(proxy: Proxy) -> None:
    """GET /api/ping answers {"ping": "pong"} without touching the upstream."""
    proxy.client.request(b"GET", b"/api/ping")
    response = proxy.client.response()
    assert (response.status, json.loads(response.body)) == (200, {"ping": "pong"})
    assert proxy.upstream.calls == []


@pytest.mark.parametrize(
    "path",
    [
        b"/api/health/",
        b"/api/chat",
        b"/api/healthz",
        b"/api/ping/",
        b"/API/health",
        b"/api/%68ealth",
        b"/v1/chat/completions",
        b"/",
    ],
)
def test_other_paths_go_to_the_upstream(proxy: Proxy, path: bytes) -> None:
    """Only the exact own paths are answered locally; everything else is proxied."""
    proxy.client.request(b"GET", path)
    assert proxy.upstream.last.url == b"http://upstream.example:9000/openai" + path
    assert proxy.upstream.last.method == b"GET"


@pytest.mark.parametrize(
    ("target_url", "request_target", "url"),
    [
        ("http://upstream.example:9000", b"/v1/models", b"http://upstream.example:9000/v1/models"),
        ("https://api.example/", b"/v1/models", b"https://api.example/v1/models"),
        ("https://api.example/openai", b"/v1/models", b"https://api.example/openai/v1/models"),
        ("https://api.example/openai/", b"/v1/models", b"https://api.example/openai/v1/models"),
        (
            "https://api.example",
            b"/files/a%2Fb?q=%7E&q=2",
            b"https://api.example/files/a%2Fb?q=%7E&q=2",
        ),
        ("https://api.example", b"/a/.../b.c", b"https://api.example/a/.../b.c"),
        ("https://api.example", b"/a//b/@c", b"https://api.example/a//b/@c"),
        ("http://[::1]:8000/p", b"/x?next=/y", b"http://[::1]:8000/p/x?next=/y"),
    ],
)
def test_upstream_url_is_target_plus_raw_request_target(
    door: str, target_url: str, request_target: bytes, url: bytes
) -> None:
    """The upstream URL is TARGET_URL (prefix included) plus the request target, unchanged."""
    proxy = start_proxy(door, target_url=target_url)
    proxy.client.request(b"GET", request_target)
    call = proxy.upstream.last
    scheme = url.partition(b"://")[0]
    assert scheme + call.url.partition(b"://")[1] + call.url.partition(b"://")[2] == url


def test_mounted_proxy_forwards_the_part_below_its_mount_point() -> None:
    """A proxy mounted at /openai sends only what follows /openai, byte for byte."""
    clock, upstream = Clock(), FakeUpstream()
    config = Config(target_url="https://api.example/v1")
    root = Resource()
    root.putChild(b"openai", ReverseProxyResource(build_core(config, upstream, clock)))
    client = ClientConnection(build_site(root, clock))
    client.request(b"GET", b"/openai/chat/a%2Fb?x=/y")
    assert upstream.last.request_line == b"GET /v1/chat/a%2Fb?x=/y HTTP/1.1"
    assert upstream.last.headers.getRawHeaders(b"host") == [b"api.example"]


@pytest.mark.parametrize(
    ("raw", "status", "error_type"),
    [
        (
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            405,
            "method_not_allowed",
        ),
        (b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n", 400, "invalid_request_target"),
        (
            b"GET https://evil.example/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "invalid_request_target",
        ),
        (b"GET //evil/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request_target"),
        (
            b"POST //evil.example/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            400,
            "invalid_request_target",
        ),
    ],
    ids=["connect", "absolute-form", "absolute-form-https", "double-slash", "double-slash-post"],
)
def test_requests_that_could_reach_another_host_are_refused(
    proxy: Proxy, raw: bytes, status: int, error_type: str
) -> None:
    """CONNECT is 405 and non-path request targets are 400, in JSON, and never proxied."""
    proxy.client.send(raw)
    response = proxy.client.response()
    assert response.status == status
    error = error_of(response)
    assert error["type"] == error_type
    assert error["request_id"] == (response.header(b"x-request-id") or b"").decode()
    assert proxy.upstream.calls == []


@pytest.mark.parametrize(
    "target",
    [
        b"/../secret",
        b"/%2e%2e/secret",
        b"/..%2Fsecret",
        b"/v1/./models",
        b"/v1/%2E%2e",
        b"/v1\\..\\x",
    ],
)
def test_targets_with_dot_segments_are_refused(proxy: Proxy, target: bytes) -> None:
    """A ``.`` or ``..`` segment, plain or percent-encoded, could leave ``TARGET_URL``'s
    path prefix at the upstream: it gets ``400`` and is never proxied."""
    proxy.client.request(b"GET", target)
    response = proxy.client.response()
    assert response.status == 400
    assert error_of(response)["type"] == "invalid_request_target"
    assert proxy.upstream.calls == []


@pytest.mark.parametrize(
    "header", [b"Host: a\x01b\x1b[31m", b"X-Forwarded-Host: h\x1b[2J", b"X-Note: a\x7fb"]
)
def test_control_bytes_in_a_header_value_get_a_400(proxy: Proxy, header: bytes) -> None:
    """A header value with a control character (a terminal escape, DEL...) is refused
    with ``400`` on every door and never forwarded."""
    host = b"" if header.startswith(b"Host:") else b"Host: h\r\n"
    proxy.client.send(b"GET /v1/models HTTP/1.1\r\n" + host + header + b"\r\n\r\n")
    assert proxy.client.response().status == 400
    assert proxy.upstream.calls == []


def test_dots_inside_a_segment_pass(proxy: Proxy) -> None:
    """Dots that are not a whole segment (file names, ``...``, ``.well-known``) pass."""
    proxy.client.request(b"GET", b"/v1/files/a..b.json/.../.well-known?x=/../")
    assert proxy.upstream.last.request_line.endswith(
        b"/v1/files/a..b.json/.../.well-known?x=/../ HTTP/1.1"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT evil:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["health", "ping", "absolute-form", "connect"],
)
def test_local_answers_carry_the_proxy_headers(proxy: Proxy, raw: bytes) -> None:
    """Responses aiproxy makes itself have X-Request-ID, X-Process-Time and X-Proxy-By."""
    proxy.client.send(raw)
    assert_stamped(proxy.client.response())


def test_proxied_response_is_relayed_with_the_proxy_headers(proxy: Proxy) -> None:
    """The upstream's status, phrase, headers and body reach the client, plus aiproxy's headers."""
    proxy.client.request(b"GET", b"/v1/models")
    response = proxy.upstream.last.respond(
        404,
        {b"Content-Type": [b"application/json"], b"X-Upstream": [b"1", b"2"]},
        phrase=b"Nope",
    )
    response.send(b'{"error": "no such model"}')
    response.end()
    raw = proxy.client.transport.value()
    assert raw.startswith(b"HTTP/1.1 404 Nope\r\n")
    seen = parse_response(raw)
    assert seen.complete
    assert seen.body == b'{"error": "no such model"}'
    assert seen.header(b"content-type") == b"application/json"
    assert seen.headers.getRawHeaders(b"x-upstream") == [b"1", b"2"]
    assert_stamped(seen)


def test_redirects_are_relayed_not_followed(proxy: Proxy) -> None:
    """A redirect from the upstream goes to the client as is; the proxy makes no second request."""
    proxy.client.request(b"GET", b"/old")
    proxy.upstream.last.respond(302, {b"Location": [b"https://elsewhere.example/new"]}).end()
    seen = proxy.client.response()
    assert (seen.status, seen.header(b"location")) == (302, b"https://elsewhere.example/new")
    assert len(proxy.upstream.calls) == 1


def test_response_hop_by_hop_headers_are_not_relayed(proxy: Proxy) -> None:
    """Connection, Keep-Alive and the headers Connection names stay between upstream and proxy."""
    proxy.client.request(b"GET", b"/v1/models")
    proxy.upstream.last.respond(
        200,
        {
            b"Connection": [b"keep-alive, X-Internal"],
            b"Keep-Alive": [b"timeout=5"],
            b"X-Internal": [b"secret"],
            b"Content-Type": [b"application/json"],
        },
    ).end()
    seen = proxy.client.response()
    assert not seen.headers.hasHeader(b"keep-alive")
    assert not seen.headers.hasHeader(b"x-internal")


def test_response_without_content_type_gets_none_added(proxy: Proxy) -> None:
    """A response the upstream sent without Content-Type reaches the client without one."""
    proxy.client.request(b"GET", b"/raw")
    response = proxy.upstream.last.respond(200, {b"Content-Length": [b"2"]})
    response.send(b"hi")
    response.end()
    seen = proxy.client.response()
    assert seen.body == b"hi"
    assert seen.headers.getRawHeaders(b"content-type") is None


def test_event_stream_is_forwarded_event_by_event(proxy: Proxy) -> None:
    """Each SSE event reaches the client as soon as the upstream sends it, unbuffered."""
    proxy.client.request(b"POST", b"/v1/chat/completions", body=b'{"stream": true}')
    response = proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    for count, event in enumerate(events, 1):
        response.send(event)
        assert proxy.client.response().body == b"".join(events[:count])
    seen = proxy.client.response()
    assert seen.header(b"x-accel-buffering") == b"no"
    assert seen.header(b"cache-control") == b"no-cache"
    assert not seen.complete
    response.end()
    assert proxy.client.response().complete


def test_response_headers_are_forwarded_before_the_first_body_byte(proxy: Proxy) -> None:
    """The client gets the status and headers as soon as the upstream sends them."""
    proxy.client.request(b"POST", b"/v1/chat/completions", body=b'{"stream": true}')
    proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
    seen = proxy.client.response()
    assert seen.status == 200
    assert seen.header(b"content-type") == b"text/event-stream"
    assert seen.body == b""


def test_upstream_body_cut_short_aborts_the_client_connection(proxy: Proxy) -> None:
    """If the upstream body breaks off, the client's connection is aborted, not finished."""
    proxy.client.request(b"GET", b"/v1/big")
    response = proxy.upstream.last.respond(200, {b"Content-Length": [b"100"]})
    response.send(b"x" * 50)
    response.end(BodyIncomplete("the connection was lost"))
    assert proxy.client.aborted
    assert not proxy.client.response().complete


def test_upstream_connection_is_the_clients_producer(proxy: Proxy) -> None:
    """A client that stops reading pauses the upstream connection (flow control)."""
    proxy.client.request(b"GET", b"/v1/big")
    response = proxy.upstream.last.respond(200, {b"Content-Type": [b"application/octet-stream"]})
    proxy.client.transport.producer.pauseProducing()
    assert response.producer.paused
    proxy.client.transport.producer.resumeProducing()
    assert not response.producer.paused


def test_sane_request_id_is_echoed_and_sent_upstream(proxy: Proxy) -> None:
    """A client's sane X-Request-ID is used for the upstream request and echoed back."""
    proxy.client.request(b"GET", b"/v1/models", [(b"X-Request-ID", b"trace-42.a")])
    assert proxy.upstream.last.headers.getRawHeaders(b"x-request-id") == [b"trace-42.a"]
    proxy.upstream.last.respond(200, {b"X-Request-ID": [b"upstream-own"]}).end()
    assert proxy.client.response().header(b"x-request-id") == b"trace-42.a"


def test_insane_request_id_is_replaced_everywhere(proxy: Proxy) -> None:
    """An unusable X-Request-ID is replaced by one new ID, used upstream and in the response."""
    proxy.client.request(b"GET", b"/v1/models", [(b"X-Request-ID", b"<script>alert(1)</script>")])
    [sent] = proxy.upstream.last.headers.getRawHeaders(b"x-request-id")
    assert sent != b"<script>alert(1)</script>"
    proxy.upstream.last.respond(200).end()
    assert proxy.client.response().header(b"x-request-id") == sent


def test_process_time_is_measured_on_the_clock(proxy: Proxy) -> None:
    """X-Process-Time is the seconds from the request's arrival to the response headers."""
    proxy.client.request(b"GET", b"/v1/models")
    proxy.clock.advance(2.5)
    proxy.upstream.last.respond(200).end()
    assert proxy.client.response().header(b"x-process-time") == b"2.5000"


def test_upstream_request_headers(proxy: Proxy) -> None:
    """The upstream gets the end-to-end headers and X-Forwarded-*, not the hop-by-hop ones."""
    proxy.client.request(
        b"POST",
        b"/v1/chat/completions",
        [
            (b"Authorization", b"Bearer sk-test"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"X-Forwarded-For", b"198.51.100.9"),
            (b"Content-Type", b"application/json"),
        ],
        body=b"{}",
    )
    sent = proxy.upstream.last.headers
    assert sent.getRawHeaders(b"authorization") == [b"Bearer sk-test"]
    assert sent.getRawHeaders(b"content-type") == [b"application/json"]
    assert sent.getRawHeaders(b"x-forwarded-for") == [b"198.51.100.9, 203.0.113.7"]
    assert sent.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert sent.getRawHeaders(b"x-forwarded-host") == [b"proxy.example"]
    for dropped in (b"connection", b"x-hop"):
        assert not sent.hasHeader(dropped)
    # Host is the upstream's, and the framing is the proxy's own.
    assert sent.getRawHeaders(b"host") == [b"upstream.example:9000"]
    assert sent.getRawHeaders(b"content-length") == [b"2"]


def test_connection_refused_is_502_json_with_the_request_id(door: str) -> None:
    """An unreachable upstream is answered 502 upstream_unreachable, carrying the request ID."""
    proxy = start_proxy(door, max_retries=0)
    proxy.client.request(b"GET", b"/v1/models", [(b"X-Request-ID", b"req-502")])
    proxy.upstream.last.deferred.errback(ConnectFailed("Connection was refused by other side"))
    response = proxy.client.response()
    assert response.status == 502
    error = error_of(response)
    assert error["type"] == "upstream_unreachable"
    assert "refused" in error["message"]
    assert error["request_id"] == "req-502"
    assert response.header(b"x-request-id") == b"req-502"
    assert_stamped(response)


def test_no_response_headers_within_the_timeout_is_504(proxy: Proxy) -> None:
    """Without response headers within REQUEST_TIMEOUT, the upstream request is cancelled: 504."""
    proxy.client.request(b"GET", b"/v1/slow")
    proxy.clock.advance(29.9)
    assert proxy.client.transport.value() == b""
    assert not proxy.upstream.last.cancelled
    proxy.clock.advance(0.1)
    assert proxy.upstream.last.cancelled
    response = proxy.client.response()
    assert response.status == 504
    error = error_of(response)
    assert error["type"] == "upstream_timeout"
    assert "30s" in error["message"]
    assert error["request_id"] == (response.header(b"x-request-id") or b"").decode()
    assert_stamped(response)


def test_timeout_longer_than_client_idle_timeout_still_answers_504(door: str) -> None:
    """The default 300 s timeout is not cut short by the 75 s idle timeout of client connections."""
    proxy = start_proxy(door, request_timeout=300)
    proxy.client.request(b"GET", b"/v1/slow")
    proxy.clock.advance(299)
    assert proxy.client.transport.value() == b""
    assert not proxy.client.transport.disconnecting
    proxy.clock.advance(1)
    assert proxy.client.response().status == 504


def test_response_in_time_leaves_no_timer(proxy: Proxy) -> None:
    """Once the upstream answers, the timeout no longer applies, even to a long stream."""
    proxy.client.request(b"GET", b"/v1/stream")
    response = proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
    proxy.clock.advance(31)
    response.send(b"data: late\n\n")
    response.end()
    seen = proxy.client.response()
    assert (seen.status, seen.body, seen.complete) == (200, b"data: late\n\n", True)
    assert not proxy.upstream.last.cancelled


def test_client_leaving_before_headers_cancels_the_upstream_request(proxy: Proxy) -> None:
    """A client that disconnects while waiting cancels the upstream request; nothing is sent."""
    proxy.client.request(b"POST", b"/v1/chat/completions", body=b"{}")
    proxy.client.disconnect()
    assert proxy.upstream.last.cancelled
    assert proxy.core.cancelled == 1
    assert proxy.client.transport.value() == b""
    proxy.clock.advance(60)
    assert proxy.client.transport.value() == b""


def test_client_leaving_during_the_body_stops_the_upstream(proxy: Proxy) -> None:
    """A client that disconnects mid-stream closes the upstream connection; no more is written."""
    proxy.client.request(b"GET", b"/v1/stream")
    response = proxy.upstream.last.respond(200, {b"Content-Type": [b"text/event-stream"]})
    response.send(b"data: 1\n\n")
    proxy.client.disconnect()
    assert response.aborted
    assert proxy.core.cancelled == 1


def test_client_leaving_after_the_response_cancels_nothing(proxy: Proxy) -> None:
    """Closing the connection after a complete response is not counted as a cancellation."""
    proxy.client.request(b"GET", b"/v1/models")
    proxy.upstream.last.respond(200).end()
    proxy.client.disconnect()
    assert proxy.core.cancelled == 0


def test_post_body_reaches_the_upstream_intact(proxy: Proxy) -> None:
    """A request body is handed to the upstream request byte for byte, with its length."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hé"}]}).encode()
    proxy.client.request(b"POST", b"/v1/chat/completions", body=body)
    call = proxy.upstream.last
    assert call.sent_body == body
    assert call.headers.getRawHeaders(b"content-length") == [b"%d" % len(body)]


def test_chunked_upload_reaches_the_upstream_intact(door: str) -> None:
    """A chunked upload reaches the upstream whole, with its length when it is known."""
    proxy = start_proxy(door, proxy_buffer_size=1000)
    chunks = [bytes([n]) * 3000 for n in range(10)]
    proxy.client.send(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        + b"0\r\n\r\n"
    )
    call = proxy.upstream.last
    assert call.sent_body == b"".join(chunks)
    assert call.headers.getRawHeaders(b"content-length") == [b"30000"]


def test_empty_post_sends_an_empty_body(proxy: Proxy) -> None:
    """A request that declares an empty body sends one (Content-Length: 0) upstream."""
    proxy.client.request(b"POST", b"/v1/reset", body=b"")
    call = proxy.upstream.last
    assert call.sent_body == b""
    assert call.headers.getRawHeaders(b"content-length") == [b"0"]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"OPTIONS"])
def test_request_without_body_sends_no_body(proxy: Proxy, method: bytes) -> None:
    """A request without a body is sent upstream without a body or framing headers."""
    proxy.client.request(method, b"/v1/models")
    call = proxy.upstream.last
    assert call.method == method
    assert call.body == b""
    assert not call.headers.hasHeader(b"content-length")
    assert not call.headers.hasHeader(b"transfer-encoding")


def test_post_to_own_endpoint_is_a_json_error(door: str) -> None:
    """POST /api/health is refused with a JSON error body, like every error aiproxy answers."""
    proxy = start_proxy(door)
    proxy.client.request(b"POST", b"/api/health", body=b"")
    response = proxy.client.response()
    assert response.status == 405
    assert error_of(response)["type"] == "method_not_allowed"


def test_request_target_with_a_control_byte_is_400(proxy: Proxy) -> None:
    """A request target with a DEL byte is refused with a JSON 400 and never forwarded."""
    proxy.client.send(b"GET /v1/a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n")
    response = proxy.client.response()
    assert response.status == 400
    assert error_of(response)["type"] in ("invalid_request_target", "invalid_request")
    assert proxy.upstream.calls == []


def test_head_response_relays_headers_without_a_body(proxy: Proxy) -> None:
    """A HEAD response keeps the upstream's Content-Length and sends no body."""
    proxy.client.request(b"HEAD", b"/v1/files/1")
    proxy.upstream.last.respond(
        200, {b"Content-Length": [b"1234"], b"Content-Type": [b"application/json"]}
    ).end()
    raw = proxy.client.transport.value()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 1234" in head
    assert rest == b""


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_are_relayed(proxy: Proxy, status: int) -> None:
    """204 and 304 answers reach the client complete, with no body."""
    proxy.client.request(b"GET", b"/v1/thing")
    proxy.upstream.last.respond(status, {b"ETag": [b'"abc"']}).end()
    raw = proxy.client.transport.value()
    assert raw.startswith(b"HTTP/1.1 %d " % status)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b'ETag: "abc"' in head
    assert rest == b""


class _BrokenResponse:
    """An upstream response that makes the proxy's own code fail."""

    status = 200
    reason = b"OK"

    @property
    def headers(self) -> object:
        raise RuntimeError("a bug in handling the response")

    def abort(self) -> None:
        pass


def test_a_bug_while_relaying_answers_500_json(proxy: Proxy) -> None:
    """If aiproxy itself fails on a response, the client gets a 500 JSON error, not a hang."""
    proxy.client.request(b"GET", b"/v1/models", [(b"X-Request-ID", b"req-bug")])
    proxy.upstream.last.deferred.callback(_BrokenResponse())
    response = proxy.client.response()
    assert response.status == 500
    error = error_of(response)
    assert (error["type"], error["request_id"]) == ("internal_error", "req-bug")


def test_response_head_keeps_the_upstreams_order_and_case() -> None:
    """aiproxy's HTTP/1.1 server writes the upstream's header lines in their order and
    letter case, aiproxy's own after them, and the head with the first body bytes."""
    proxy = start_proxy("http1")
    proxy.client.request(b"GET", b"/v1/models")
    upstream = [
        (b"x-zeta", b"1"),
        (b"Content-TYPE", b"application/json"),
        (b"X-alpha", b"2"),
        (b"x-zeta", b"3"),
        (b"content-length", b"2"),
    ]
    response = proxy.upstream.last.respond(200, upstream)
    response.send(b"ok")
    response.end()
    seen = proxy.client.response()
    assert seen.raw_headers[: len(upstream)] == upstream
    assert [name for name, _ in seen.raw_headers[len(upstream) :]][:3] == [
        b"X-Request-ID",
        b"X-Process-Time",
        b"X-Proxy-By",
    ]
    assert seen.body == b"ok"


def test_the_head_goes_out_with_the_first_body_bytes() -> None:
    """When body bytes come with the upstream's head, the client gets head and body in
    one write; when none do, the head goes at once (a stream's first event may be late)."""
    proxy = start_proxy("http1")
    proxy.client.request(b"GET", b"/v1/models")
    proxy.upstream.last.respond(200, [(b"Content-Length", b"2")], with_head=b"ok").end()
    [write] = proxy.client.transport.writes
    assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b"\r\n\r\nok")

    proxy.client.transport.writes.clear()
    proxy.client.request(b"GET", b"/v1/stream")
    response = proxy.upstream.last.respond(200, [(b"Content-Type", b"text/event-stream")])
    [head] = proxy.client.transport.writes
    assert head.endswith(b"\r\n\r\n")
    response.send(b"data: 1\n\n")
    assert proxy.client.transport.writes[1] == b"9\r\ndata: 1\n\n\r\n"
