"""
aiproxy's API docs over a real socket: the Swagger UI page and every file it loads come
from aiproxy itself, and the upstream never sees a docs request.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urljoin

import pytest_twisted
from openapi_spec_validator import validate

from .conftest import Proxy, Upstream
from .support import header, request


@pytest_twisted.ensureDeferred
async def test_swagger_ui_and_everything_it_loads_are_served_by_aiproxy(
    upstream: Upstream, proxy: Proxy
) -> None:
    """GET /api/docs answers the Swagger UI page (no redirect); its stylesheet, script,
    icons and OpenAPI document all load from aiproxy, and the upstream sees nothing.
    The same holds for the ReDoc page and its script."""
    page_url = proxy.url + "/api/docs"
    response, page = await request(b"GET", page_url)
    assert response.code == 200
    assert header(response, b"content-type") == b"text/html; charset=utf-8"
    references = re.findall(rb'(?:(?:src|href)=|fetch\()"([^"]+)"', page)
    urls = [urljoin(page_url, url.decode()) for url in references]
    assert len(urls) == 5
    assert urls[-1] == proxy.url + "/api/openapi.json"
    for url in urls:
        assert url.startswith(proxy.url + "/api/"), url
        response, body = await request(b"GET", url)
        assert response.code == 200, url
        assert body, url
        assert response.length == len(body), url
    document = json.loads(body)
    validate(document)
    assert upstream.url in document["info"]["description"]
    response, page = await request(b"GET", proxy.url + "/api/redoc")
    assert response.code == 200
    response, body = await request(b"GET", proxy.url + "/api/redoc/redoc.standalone.js")
    assert response.code == 200
    assert len(body) > 500_000
    assert upstream.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_cached_swagger_ui_bundle_is_revalidated_with_304(
    upstream: Upstream, proxy: Proxy
) -> None:
    """A browser that has the Swagger UI bundle sends its ETag back and gets a 304 with no
    body instead of the 1.5 MB file again."""
    url = proxy.url + "/api/docs/swagger-ui-bundle.js"
    response, body = await request(b"GET", url)
    assert response.code == 200
    assert len(body) > 1_000_000
    etag = header(response, b"etag")
    assert etag
    response, body = await request(b"GET", url, {b"If-None-Match": [etag]})
    assert response.code == 304
    assert body == b""
    assert header(response, b"etag") == etag
    assert upstream.stats.requests == 0
