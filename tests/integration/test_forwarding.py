"""
What reaches the upstream, and what comes back: methods, raw request targets,
headers and bodies, byte for byte, over real loopback sockets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted

from .conftest import Proxy, Upstream
from .support import (
    close_client,
    connect_raw,
    parse_response,
    pattern_bytes,
    raw_exchange,
    request,
    sleep,
    within,
)


def _headers(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` the upstream received, in order."""
    return [value for n, value in echo["headers"] if n.lower() == name.lower()]


def _names(echo: dict[str, Any]) -> set[str]:
    return {n.lower() for n, _ in echo["headers"]}


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_every_method_reaches_the_upstream_unchanged(
    method: bytes, upstream: Upstream, proxy: Proxy
) -> None:
    """A request with any common method arrives upstream with that method, once."""
    response, body = await request(method, proxy.url + "/echo/method")
    assert response.code == 200
    assert json.loads(body)["method"] == method.decode()
    assert upstream.stats.requests == 1


@pytest_twisted.ensureDeferred
async def test_head_returns_the_upstream_headers_and_no_body(
    upstream: Upstream, proxy: Proxy
) -> None:
    """A HEAD request gets the upstream's status and headers, and not one body byte."""
    get = await raw_exchange(proxy.port, b"GET /echo/head HTTP/1.1\r\nHost: h\r\n\r\n")
    client = await connect_raw(proxy.port)
    try:
        client.transport.write(b"HEAD /echo/head HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.wait_for(lambda data: b"\r\n\r\n" in data, 5)
        await sleep(0.2)  # any body bytes would have arrived by now
        data = bytes(client.received)
    finally:
        await close_client(client)
    head = parse_response(data, head=True)
    assert head is not None
    assert head.status == 200
    assert data.endswith(b"\r\n\r\n"), data
    assert head.header(b"content-type") == [b"application/json"]
    assert upstream.stats.last_echo is not None
    assert upstream.stats.last_echo["method"] == "HEAD"
    assert get.header(b"content-type") == [b"application/json"]


@pytest.mark.parametrize(
    "target",
    [
        b"/echo/a%2Fb/%7Euser/sp%20ace?q=%20a+b&dup=1&dup=2",
        b"/echo/x/.../y/.z/..a",
        b"/echo/a//b///c/",
        b"/echo/user@host/@at?mail=a@b&at=@",
        b"/echo/%2e%2e%2e/semi;colon,comma/%25?%ff=1&empty=&=x&q=a%26b&next=/../",
        b"/echo?only=query",
    ],
)
@pytest_twisted.ensureDeferred
async def test_request_target_reaches_the_upstream_byte_for_byte(
    target: bytes, upstream: Upstream, proxy: Proxy
) -> None:
    """
    The path and query arrive upstream exactly as the client sent them: no decoding of
    ``%2F``, no re-quoting, no ``//`` normalisation, repeated keys kept; dots that are
    not a whole path segment stay too (``.`` and ``..`` segments are refused).
    """
    response = await raw_exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.json()["uri"] == target.decode()


@pytest.mark.parametrize("target_path", ["/prefix", "/prefix/"])
@pytest_twisted.ensureDeferred
async def test_target_url_path_prefix_is_joined_without_escaping(
    target_path: str, prefixed_upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """With ``TARGET_URL=http://host/prefix``, ``/echo/a%2Fb?x=%20y`` goes to
    ``/prefix/echo/a%2Fb?x=%20y`` upstream."""
    proxy = start_proxy(prefixed_upstream.url + target_path)
    response = await raw_exchange(proxy.port, b"GET /echo/a%2Fb?x=%20y HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.json()["uri"] == "/prefix/echo/a%2Fb?x=%20y"


@pytest_twisted.ensureDeferred
async def test_end_to_end_headers_pass_in_order_and_forwarding_headers_are_added(
    upstream: Upstream, proxy: Proxy
) -> None:
    """
    The upstream gets every value of a repeated header in order, the Authorization
    header untouched, its own Host, X-Forwarded-For/Proto/Host saying where the
    request came from, and the client's X-Request-ID, which also comes back.
    """
    response = await raw_exchange(
        proxy.port,
        b"GET /echo/headers HTTP/1.1\r\n"
        b"Host: client.example:8443\r\n"
        b"Authorization: Bearer sk-test-123\r\n"
        b"X-Multi: one\r\n"
        b"X-Multi: two\r\n"
        b"X-Other: a\r\n"
        b"X-Multi: three\r\n"
        b"Accept-Encoding: gzip\r\n"
        b"X-Request-ID: req-abc.123\r\n"
        b"\r\n",
    )
    assert response.status == 200
    echo = response.json()
    upstream_port = upstream.port.getHost().port
    assert _headers(echo, "Host") == [f"127.0.0.1:{upstream_port}"]
    assert _headers(echo, "Authorization") == ["Bearer sk-test-123"]
    assert _headers(echo, "X-Multi") == ["one", "two", "three"]
    assert _headers(echo, "X-Other") == ["a"]
    assert _headers(echo, "Accept-Encoding") == ["gzip"]
    assert _headers(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert _headers(echo, "X-Forwarded-Proto") == ["http"]
    assert _headers(echo, "X-Forwarded-Host") == ["client.example:8443"]
    assert _headers(echo, "X-Request-ID") == ["req-abc.123"]
    assert response.header(b"x-request-id") == [b"req-abc.123"]


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_chain_gets_the_client_appended(
    upstream: Upstream, proxy: Proxy
) -> None:
    """A client's existing X-Forwarded-For chain reaches the upstream with the
    client's address appended."""
    response = await raw_exchange(
        proxy.port,
        b"GET /echo/xff HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.1.2.3, 10.4.5.6\r\n\r\n",
    )
    assert _headers(response.json(), "X-Forwarded-For") == ["10.1.2.3, 10.4.5.6, 127.0.0.1"]


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
@pytest_twisted.ensureDeferred
async def test_request_body_with_content_length_arrives_intact(
    size: int, upstream: Upstream, proxy: Proxy
) -> None:
    """A POST body (64 KiB in memory, 1 MiB spooled to a file) arrives upstream with
    the same length and SHA-256, and one Content-Length."""
    body = pattern_bytes(size)
    response, answer = await request(
        b"POST",
        proxy.url + "/echo/body",
        {b"Content-Type": [b"application/octet-stream"]},
        body,
    )
    echo = json.loads(answer)
    assert response.code == 200
    assert echo["body_length"] == size
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert _headers(echo, "Content-Length") == [str(size)]


@pytest.mark.parametrize("sizes", [[5], [1, 65536, 300_000, 7]])
@pytest_twisted.ensureDeferred
async def test_chunked_upload_arrives_intact(
    sizes: list[int], upstream: Upstream, proxy: Proxy
) -> None:
    """A chunked upload arrives upstream with the same bytes, framed once."""
    chunks = [pattern_bytes(n)[::-1] for n in sizes]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    response = await raw_exchange(
        proxy.port,
        b"POST /echo/chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + framed,
    )
    body = b"".join(chunks)
    echo = response.json()
    assert response.status == 200
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    framing = _headers(echo, "Content-Length") + _headers(echo, "Transfer-Encoding")
    assert len(framing) == 1, echo["headers"]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_request_headers_do_not_reach_the_upstream(
    upstream: Upstream, proxy: Proxy
) -> None:
    """
    Connection, the headers it names, Keep-Alive, TE, Proxy-Authorization and
    Proxy-Connection stop at the proxy; other headers pass.
    """
    response = await raw_exchange(
        proxy.port,
        b"GET /echo/hop HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"Connection: X-Foo, keep-alive\r\n"
        b"Connection: X-Bar\r\n"
        b"X-Foo: 1\r\n"
        b"X-Bar: 2\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n",
    )
    echo = response.json()
    names = _names(echo)
    for name in ("x-foo", "x-bar", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in names, echo["headers"]
    for value in _headers(echo, "Connection"):
        assert "x-foo" not in value.lower() and "x-bar" not in value.lower()
    assert _headers(echo, "X-Kept") == ["yes"]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_headers_do_not_reach_the_client(
    upstream: Upstream, proxy: Proxy
) -> None:
    """
    An upstream response header named in the upstream's Connection header, and its
    Keep-Alive and Proxy-Authenticate, are not passed to the client; end-to-end
    headers are.
    """
    response = await raw_exchange(proxy.port, b"GET /hop-by-hop HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert response.header(b"x-end-to-end") == [b"kept"]
    assert b"keep-alive" not in response.names()
    assert b"proxy-authenticate" not in response.names()
    assert b"x-upstream-private" not in response.names(), response.headers


@pytest_twisted.ensureDeferred
async def test_download_keeps_the_upstream_content_length(upstream: Upstream, proxy: Proxy) -> None:
    """A response the upstream sent with Content-Length reaches the client with the
    same Content-Length (not re-framed as chunked), so download sizes stay known."""
    response = await raw_exchange(proxy.port, b"GET /bytes/100000 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert response.status == 200
    assert len(response.body) == 100000
    assert response.header(b"content-length") == [b"100000"], response.headers


@pytest.mark.parametrize(
    ("request_line", "status", "error_type"),
    [
        (b"GET http://evil.example/echo HTTP/1.1", 400, "invalid_request_target"),
        (b"GET //evil.example/echo HTTP/1.1", 400, "invalid_request_target"),
        (b"CONNECT evil.example:443 HTTP/1.1", 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_targets_that_are_not_paths_are_refused(
    request_line: bytes, status: int, error_type: str, upstream: Upstream, proxy: Proxy
) -> None:
    """An absolute-form target, a ``//host`` path or CONNECT gets a JSON error and never
    reaches the upstream."""
    response = await raw_exchange(proxy.port, request_line + b"\r\nHost: h\r\n\r\n")
    assert response.status == status
    assert response.json()["error"]["type"] == error_type
    assert upstream.stats.requests == 0


@pytest.mark.parametrize(
    ("raw", "method", "body"),
    [
        (b"GET /echo/old?x=1 HTTP/1.0\r\nHost: proxy\r\n\r\n", "GET", b""),
        (
            b"POST /echo/old?x=1 HTTP/1.0\r\nHost: proxy\r\nContent-Length: 5\r\n\r\nhello",
            "POST",
            b"hello",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_http_1_0_clients_are_served(
    raw: bytes, method: str, body: bytes, upstream: Upstream, proxy: Proxy
) -> None:
    """An HTTP/1.0 client gets a response without chunked framing (its status line says
    HTTP/1.1, as RFC 9110 section 2.5 asks of a server), ended by closing the connection."""
    client = await connect_raw(proxy.port)
    client.transport.write(raw)
    await within(client.closed, 5)
    assert bytes(client.received).startswith(b"HTTP/1.1 200 ")
    response = parse_response(bytes(client.received), eof=True)
    assert response is not None
    assert not response.header(b"transfer-encoding")
    echo = response.json()
    assert (echo["method"], echo["uri"]) == (method, "/echo/old?x=1")
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
