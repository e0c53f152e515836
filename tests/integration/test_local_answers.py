"""
What the proxy answers itself: JSON errors when the upstream cannot be reached or is
too slow, and its health endpoints, which never touch the upstream.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor

from .conftest import Proxy, Upstream
from .support import free_port, header, request, wait_until, within


@pytest.mark.parametrize("client_id", [None, b"my-request-1"])
@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_a_502_json_error_with_the_request_id(
    client_id: bytes | None, start_proxy: Callable[..., Proxy]
) -> None:
    """
    When nothing listens at the target, the client gets a 502 with a JSON error of type
    ``upstream_unreachable`` whose ``request_id`` is the response's X-Request-ID (the
    client's own, if it sent one).
    """
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}")
    headers = {b"X-Request-ID": [client_id]} if client_id else {}
    response, body = await request(b"POST", proxy.url + "/v1/chat/completions", headers, b"{}")
    assert response.code == 502
    assert header(response, b"content-type") == b"application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "upstream_unreachable"
    assert error["message"]
    request_id = header(response, b"x-request-id")
    assert request_id
    assert error["request_id"] == request_id.decode()
    if client_id:
        assert request_id == client_id


@pytest.mark.parametrize("path", ["/hang", "/slow-headers/3"])
@pytest_twisted.ensureDeferred
async def test_upstream_without_headers_in_time_is_a_504_json_error(
    path: str, upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """
    With ``REQUEST_TIMEOUT=0.5``, an upstream that sends no response headers gets the
    client a 504 JSON error of type ``upstream_timeout`` after about 0.5 s, and the
    upstream request is dropped.
    """
    proxy = start_proxy(upstream.url, request_timeout=0.5)
    start = reactor.seconds()
    response, body = await request(b"GET", proxy.url + path)
    elapsed = reactor.seconds() - start
    print(f"\n504 after {elapsed:.3f}s")
    assert response.code == 504
    assert 0.45 <= elapsed < 0.9
    error = json.loads(body)["error"]
    assert error["type"] == "upstream_timeout"
    assert error["request_id"].encode() == header(response, b"x-request-id")
    await wait_until(
        lambda: upstream.stats.hangs_aborted == 1, 1, "the upstream saw the request dropped"
    )


@pytest_twisted.ensureDeferred
async def test_upstream_answering_within_the_timeout_is_proxied(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """An upstream that takes 0.2 s to answer is proxied normally with
    ``REQUEST_TIMEOUT=0.5``."""
    proxy = start_proxy(upstream.url, request_timeout=0.5)
    response, body = await request(b"GET", proxy.url + "/slow-headers/0.2")
    assert response.code == 200
    assert json.loads(body) == {"slept": 0.2}


@pytest.mark.parametrize("code", [400, 401, 404, 429, 500, 503])
@pytest_twisted.ensureDeferred
async def test_upstream_error_statuses_are_relayed_unchanged(
    code: int, upstream: Upstream, proxy: Proxy
) -> None:
    """An upstream's error status and body reach the client as they are."""
    response, body = await request(b"GET", proxy.url + f"/status/{code}")
    assert response.code == code
    assert json.loads(body) == {"status": code}


@pytest_twisted.ensureDeferred
async def test_health_and_ping_are_answered_without_the_upstream(
    upstream: Upstream, proxy: Proxy
) -> None:
    """``/api/health`` and ``/api/ping`` answer over a real socket; the upstream sees no
    request."""
    response, body = await request(b"GET", proxy.url + "/api/health")
    assert response.code == 200
    assert header(response, b"content-type") == b"application/json"
    assert json.loads(body) == {
        "status": "healthy",
        "target_url": upstream.url,
        "timeout": 300,
        "ssl_verify": True,
        "auth": "none",
    }
    for path in ("/api/ping", "/api/ping?probe=1"):
        response, body = await request(b"GET", proxy.url + path)
        assert response.code == 200
        assert json.loads(body) == {"ping": "pong"}
        assert header(response, b"x-request-id")
    assert upstream.stats.requests == 0


@pytest.mark.parametrize("path", ["/api/health/", "/api/healthz", "/api/ping/x"])
@pytest_twisted.ensureDeferred
async def test_paths_near_the_health_endpoints_go_to_the_upstream(
    path: str, upstream: Upstream, proxy: Proxy
) -> None:
    """Only the exact health paths are the proxy's; ``/api/health/`` and the like are
    proxied (here the fake upstream answers 404)."""
    response, _ = await request(b"GET", proxy.url + path)
    assert response.code == 404
    assert upstream.stats.requests == 1


@pytest_twisted.ensureDeferred
async def test_build_service_listens_proxies_and_stops(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """The service ``twist aiproxy`` runs listens on its endpoint, proxies, and when
    stopped closes its listener and its upstream connections."""
    proxy = start_proxy(upstream.url)
    response, body = await request(b"GET", proxy.url + "/api/ping")
    assert json.loads(body) == {"ping": "pong"}
    response, body = await request(b"GET", proxy.url + "/v1/models")
    assert response.code == 200
    assert json.loads(body)["data"] == [{"id": "fake-model"}]
    assert upstream.stats.requests == 1
    await within(proxy.service.stopService(), 5)
    with pytest.raises(Exception, match="refused"):
        await request(b"GET", proxy.url + "/api/ping", timeout=5)
