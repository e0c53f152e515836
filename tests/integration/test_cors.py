"""CORS over real sockets: a preflight answered by aiproxy, an actual request proxied."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest_twisted

from .conftest import Proxy, Upstream
from .support import header, request

APP = b"https://app.example"


@pytest_twisted.ensureDeferred
async def test_preflight_then_request_from_an_allowed_origin(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """The preflight never reaches the upstream; the actual request does, and its answer
    carries the origin; another origin's preflight is refused."""
    proxy = start_proxy(upstream.url, cors_origins=("https://app.example",))
    preflight = {
        b"Origin": [APP],
        b"Access-Control-Request-Method": [b"POST"],
        b"Access-Control-Request-Headers": [b"authorization"],
    }
    response, body = await request(b"OPTIONS", proxy.url + "/echo/x", preflight)
    assert response.code == 204
    assert body == b""
    assert header(response, b"access-control-allow-origin") == APP
    assert header(response, b"access-control-allow-methods") == b"POST"
    assert header(response, b"access-control-allow-headers") == b"authorization"
    assert upstream.stats.requests == 0

    response, body = await request(b"POST", proxy.url + "/echo/x", {b"Origin": [APP]}, b'{"a": 1}')
    assert response.code == 200
    assert json.loads(body)["method"] == "POST"
    assert header(response, b"access-control-allow-origin") == APP
    assert b"Origin" in (header(response, b"vary") or b"")
    assert upstream.stats.requests == 1

    refused = {**preflight, b"Origin": [b"https://evil.example"]}
    response, body = await request(b"OPTIONS", proxy.url + "/echo/x", refused)
    assert response.code == 403
    assert json.loads(body)["error"]["type"] == "origin_not_allowed"
    assert header(response, b"access-control-allow-origin") is None
    assert upstream.stats.requests == 1
