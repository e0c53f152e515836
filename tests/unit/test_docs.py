"""
aiproxy's API docs as a client sees them: ``/api/docs`` (Swagger UI, served whole by
aiproxy), ``/api/redoc`` and ``/api/openapi.json``, through the real site over a fake
connection.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from importlib import resources
from typing import Any
from urllib.parse import urljoin, urlsplit

import jsonschema
import pytest
from openapi_spec_validator import validate

from aiproxy import __version__
from aiproxy.config import Config
from aiproxy.errors import (
    BadRequestTarget,
    BodyTooLarge,
    ClientTooSlow,
    HeadTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    OriginNotAllowed,
    Overloaded,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    WebSocketNotSupported,
    error_body,
)
from aiproxy.ops.docs import etag_matches
from aiproxy.ops.openapi import openapi_document

from .fakes import ParsedResponse
from .test_proxy import TARGET_URL, assert_stamped, error_of, start_proxy

PAGES = [b"/api/docs", b"/api/redoc"]
SWAGGER_UI_FILES = {
    b"/api/docs/swagger-ui-bundle.js": b"text/javascript; charset=utf-8",
    b"/api/docs/swagger-ui.css": b"text/css; charset=utf-8",
    b"/api/docs/favicon-32x32.png": b"image/png",
    b"/api/docs/favicon-16x16.png": b"image/png",
}
REDOC_FILES = {b"/api/redoc/redoc.standalone.js": b"text/javascript; charset=utf-8"}
PACKAGED_FILES = {**SWAGGER_UI_FILES, **REDOC_FILES}
DOCS_PATHS = [*PAGES, b"/api/openapi.json", *PACKAGED_FILES]
TYPES_BY_EXTENSION = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".png": b"image/png",
    ".json": b"application/json",
}


def fetch(
    target: bytes,
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    **settings: object,
) -> ParsedResponse:
    """One request to a fresh aiproxy built from ``Config(**settings)``; no upstream call."""
    proxy = start_proxy(**settings)
    proxy.client.request(method, target, headers or [])
    assert proxy.upstream.calls == [], "a docs request reached the upstream"
    return proxy.client.response()


class References(HTMLParser):
    """Every ``src`` and ``href`` of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def references(page: bytes) -> list[str]:
    """The ``src`` and ``href`` URLs of ``page``."""
    parser = References()
    parser.feed(page.decode("utf-8"))
    return parser.urls


def spec(**settings: Any) -> dict[str, Any]:
    """The OpenAPI document that aiproxy built from ``Config(**settings)`` serves."""
    document: dict[str, Any] = json.loads(fetch(b"/api/openapi.json", **settings).body)
    return document


# --- The pages -------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_doc_pages_answer_html_at_their_exact_path(path: bytes) -> None:
    """/api/docs and /api/redoc answer 200 with an HTML page themselves, not a redirect."""
    response = fetch(path)
    assert response.status == 200
    assert response.header(b"location") is None
    assert response.header(b"content-type") == b"text/html; charset=utf-8"
    assert response.body.startswith(b"<!DOCTYPE html>")
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert_stamped(response)


def test_swagger_ui_page_has_no_absolute_url() -> None:
    """The Swagger UI page names no other host and no absolute path: it works offline and
    under a path prefix."""
    page = fetch(b"/api/docs").body
    assert b"http://" not in page
    assert b"https://" not in page
    assert not re.search(rb"""["'(=]\s*//""", page)
    for url in references(page):
        assert not url.startswith("/"), url
        assert not urlsplit(url).scheme, url


def test_everything_the_swagger_ui_page_references_is_served() -> None:
    """Every file the Swagger UI page loads, and the document it shows, resolve next to
    /api/docs to paths aiproxy itself answers with 200, a body and the right type."""
    page = fetch(b"/api/docs").body
    initializer = re.search(rb'fetch\("([^"]+)"\)', page)
    assert initializer is not None
    urls = [*references(page), initializer.group(1).decode()]
    resolved = {urlsplit(urljoin("http://proxy.example/api/docs", url)).path for url in urls}
    assert resolved == {
        "/api/docs/swagger-ui.css",
        "/api/docs/swagger-ui-bundle.js",
        "/api/docs/favicon-32x32.png",
        "/api/docs/favicon-16x16.png",
        "/api/openapi.json",
    }
    for path in resolved:
        response = fetch(path.encode())
        assert response.status == 200, path
        assert response.body, path
        extension = path[path.rindex(".") :]
        assert response.header(b"content-type") == TYPES_BY_EXTENSION[extension], path


def test_swagger_ui_pages_urls_keep_a_path_prefix() -> None:
    """Behind a proxy that mounts aiproxy at /prefix, the page's files and document are
    looked for under /prefix/api/."""
    page = fetch(b"/api/docs").body
    for url in references(page):
        assert urljoin("https://front.example/prefix/api/docs", url).startswith(
            "https://front.example/prefix/api/"
        )


def test_served_swagger_ui_renders_openapi_3_1() -> None:
    """The Swagger UI that aiproxy serves is version 5 or later, the first to render
    OpenAPI 3.1 documents."""
    bundle = fetch(b"/api/docs/swagger-ui-bundle.js").body
    version = re.search(rb'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle)
    assert version is not None
    assert int(version.group(1)) >= 5


def test_swagger_ui_page_names_the_server_by_the_proxys_own_url() -> None:
    """The Swagger UI page shows the document with its server set to the URL the
    browser reached the proxy at (the page's URL up to ``/api/``), not the document's
    relative ``..``, so the server list names the proxy itself."""
    page = fetch(b"/api/docs").body.decode()
    assert 'new URL("..", document.baseURI)' in page
    assert "spec.servers = [{url: here" in page
    assert "spec: spec" in page
    assert spec()["servers"] == [{"url": "..", "description": "This aiproxy"}]


@pytest.mark.parametrize(("path", "content_type"), PACKAGED_FILES.items())
def test_viewer_files_are_the_packaged_ones_and_cacheable(path: bytes, content_type: bytes) -> None:
    """Each Swagger UI and ReDoc file is served from the openapi-ui-bundles package,
    byte for byte but for its trailing source-map comment (the map is not served: a
    browser's developer tools would ask the upstream for it), with its type, its length
    and a day of public caching."""
    response = fetch(path)
    viewer = "swagger_ui" if path.startswith(b"/api/docs/") else "redoc"
    name = path.rsplit(b"/", 1)[1].decode()
    original = (resources.files("openapi_ui_bundles") / viewer / "vendor" / name).read_bytes()
    assert response.status == 200
    assert b"sourceMappingURL" not in response.body[-200:]
    assert original.startswith(response.body)
    assert len(response.body) >= len(original) - 100
    assert response.header(b"content-type") == content_type
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert response.header(b"cache-control") == b"public, max-age=86400"
    assert_stamped(response)


def test_redoc_page_loads_redoc_from_aiproxy_and_points_to_swagger_ui_on_failure() -> None:
    """The ReDoc page names no other host: it loads ReDoc from aiproxy itself (so it
    works offline) and shows the document next to it; until ReDoc has drawn the page,
    and if its script fails to load, the page says so and links to Swagger UI."""
    body = fetch(b"/api/redoc").body
    page = body.decode()
    assert "://" not in page
    assert '<redoc spec-url="openapi.json">' in page
    assert '<script src="redoc/redoc.standalone.js" onerror=' in page
    assert "ReDoc could not be loaded. Use <a href=docs>Swagger UI</a>" in page
    assert '<a href="docs">Swagger UI</a>' in page
    for url in references(body):
        path = urlsplit(urljoin("http://proxy.example/api/redoc", url)).path
        assert fetch(path.encode()).status == 200, path


def test_served_redoc_is_version_2() -> None:
    """The ReDoc that aiproxy serves is a 2.x release, which renders OpenAPI 3.1."""
    bundle = fetch(b"/api/redoc/redoc.standalone.js").body
    assert re.search(rb'" ReDoc Version: ","2\.\d+\.\d+"', bundle)


# --- Methods and caching ------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS_PATHS)
def test_head_gets_the_headers_without_a_body(path: bytes) -> None:
    """HEAD on a docs path gets GET's headers (length included) and no body."""
    get = fetch(path)
    proxy = start_proxy()
    proxy.client.request(b"HEAD", path)
    raw = proxy.client.transport.value()
    head = proxy.client.response()
    assert head.status == 200
    assert raw.endswith(b"\r\n\r\n")
    for name in (b"content-type", b"content-length", b"etag", b"cache-control"):
        assert head.header(name) == get.header(name), name
    assert_stamped(head)


@pytest.mark.parametrize("path", DOCS_PATHS)
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE"])
def test_other_methods_get_the_json_405(path: bytes, method: bytes) -> None:
    """Methods other than GET and HEAD on a docs path get the JSON 405 error, with Allow."""
    response = fetch(path, method)
    assert response.status == 405
    assert response.header(b"allow") == b"GET, HEAD"
    assert error_of(response)["type"] == "method_not_allowed"


@pytest.mark.parametrize("path", [b"/api/docs", b"/api/openapi.json", *PACKAGED_FILES])
@pytest.mark.parametrize("form", ["{tag}", "W/{tag}", '"other", {tag}', "*"])
def test_a_known_etag_gets_304_without_a_body(path: bytes, form: str) -> None:
    """A GET whose If-None-Match names the current ETag (weak, in a list, or *) gets 304
    with the ETag and caching headers, and no body."""
    etag = fetch(path).header(b"etag")
    assert etag is not None
    assert re.fullmatch(rb'"[0-9a-f]+"', etag)
    proxy = start_proxy()
    proxy.client.request(
        b"GET", path, [(b"If-None-Match", form.format(tag=etag.decode()).encode())]
    )
    response = proxy.client.response()
    assert response.status == 304
    assert response.header(b"etag") == etag
    assert response.header(b"cache-control")
    assert response.header(b"content-length") is None
    assert proxy.client.transport.value().endswith(b"\r\n\r\n")
    assert_stamped(response)


def test_another_etag_gets_the_document() -> None:
    """An If-None-Match naming an old ETag gets the full 200 response."""
    response = fetch(b"/api/openapi.json", headers=[(b"If-None-Match", b'"0123abcd"')])
    assert response.status == 200
    assert json.loads(response.body) == openapi_document(
        Config(target_url=TARGET_URL, request_timeout=30)
    )


@pytest.mark.parametrize(
    ("if_none_match", "matches"),
    [
        ([], False),
        ([b'"abc"'], True),
        ([b'W/"abc"'], True),
        ([b'"x", "abc"'], True),
        ([b'"x"', b'"abc"'], True),
        ([b"*"], True),
        ([b'"abcd"'], False),
        ([b"abc"], False),
        ([b'"x", W/"y"'], False),
    ],
)
def test_etag_matching(if_none_match: list[bytes], matches: bool) -> None:
    """If-None-Match matches our ETag weakly, in any list position, or as *."""
    assert etag_matches(if_none_match, b'"abc"') is matches


@pytest.mark.parametrize(
    "path",
    [
        b"/api/docs/",
        b"/api/docs/swagger-ui.css.map",
        b"/api/openapi.yaml",
        b"/api/redocs",
        b"/api/redoc/",
        b"/api/redoc/redoc.standalone.js.map",
    ],
)
def test_paths_near_the_docs_go_to_the_upstream(path: bytes) -> None:
    """Only the exact docs paths are aiproxy's; /api/docs/ and the like are proxied."""
    proxy = start_proxy()
    proxy.client.request(b"GET", path)
    assert proxy.upstream.last.url == TARGET_URL.encode() + path


@pytest.mark.parametrize(
    "path",
    [
        b"/api/docs",
        b"/api/redoc",
        b"/api/openapi.json",
        b"/api/docs/swagger-ui.css",
        b"/api/redoc/redoc.standalone.js",
    ],
)
def test_docs_can_be_switched_off(path: bytes) -> None:
    """With ``ENABLE_DOCS=false`` the docs paths are the upstream's, like any other."""
    proxy = start_proxy(enable_docs=False)
    proxy.client.request(b"GET", path)
    assert proxy.upstream.last.url == TARGET_URL.encode() + path


# --- The OpenAPI document -----------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{}, {"enable_metrics": False, "enable_cors": False}, {"target_url": "https://a.example"}],
)
def test_openapi_json_is_a_valid_openapi_3_1_document(settings: dict[str, Any]) -> None:
    """/api/openapi.json serves a valid OpenAPI 3.1.0 document with aiproxy's version,
    naming the target it forwards to."""
    settings = {"target_url": TARGET_URL, **settings}
    response = fetch(b"/api/openapi.json", **settings)
    assert response.status == 200
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"cache-control") == b"no-cache"
    document = json.loads(response.body)
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == __version__
    assert settings["target_url"] in document["info"]["description"]


def test_document_describes_aiproxys_own_endpoints_and_the_proxy_route() -> None:
    """Every path aiproxy answers is in the document, and /{path} with every proxied
    method stands for the rest."""
    paths = spec()["paths"]
    own = ["/api/health", "/api/ping", "/api/metrics", "/api/docs", "/api/redoc"]
    assert set(paths) == {*own, "/api/openapi.json", "/{path}"}
    for path in set(paths) - {"/{path}"}:
        assert set(paths[path]) == {"parameters", "get"}, path
    assert {"get", "post", "put", "patch", "delete", "options", "head"} <= set(paths["/{path}"])
    metrics = paths["/api/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_metrics_are_left_out_when_switched_off() -> None:
    """With ENABLE_METRICS=false, /api/metrics is not in the document."""
    assert "/api/metrics" not in spec(enable_metrics=False)["paths"]


def test_proxy_route_lists_the_errors_aiproxy_answers_itself() -> None:
    """Every proxied operation lists aiproxy's own error statuses with the JSON error
    body; OPTIONS adds the CORS 403 when CORS is on."""
    document = spec()
    statuses = {"400", "405", "408", "413", "431", "500", "501", "502", "503", "504"}
    for method, operation in document["paths"]["/{path}"].items():
        if method in ("summary", "description", "parameters"):
            continue
        expected = statuses | {"403"} if method == "options" else statuses
        assert set(operation["responses"]) == expected | {"default"}, method
    for status in statuses | {"403"}:
        content = document["components"]["responses"][f"Error{status}"]["content"]
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    overloaded = document["components"]["responses"]["Error503"]["headers"]
    assert "Retry-After" in overloaded
    options = spec(enable_cors=False)["paths"]["/{path}"]["options"]["responses"]
    assert "403" not in options


@pytest.mark.parametrize(
    "error",
    [
        BadRequestTarget("x"),
        InvalidRequest("x"),
        OriginNotAllowed("x"),
        MethodNotAllowed("x"),
        ClientTooSlow("x"),
        BodyTooLarge("x"),
        HeadTooLarge("x"),
        InternalError("x"),
        WebSocketNotSupported("x"),
        Overloaded("x"),
        UpstreamUnreachable("x"),
        UpstreamTimeout("x"),
    ],
)
def test_error_schema_matches_the_error_bodies_aiproxy_sends(error: ProxyError) -> None:
    """Each error body aiproxy sends is valid against the document's Error schema, which
    lists its type."""
    schema = spec()["components"]["schemas"]["Error"]
    jsonschema.validate(json.loads(error_body(error, b"req-1")), schema)


def test_health_schema_matches_what_health_answers() -> None:
    """The /api/health body is valid against the documented schema, and is its example."""
    document = spec()
    schema = document["components"]["schemas"]["Health"]
    body = json.loads(fetch(b"/api/health").body)
    jsonschema.validate(body, schema)
    jsonschema.validate({**body, "status": "draining"}, schema)
    responses = document["paths"]["/api/health"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["example"] == body
    assert responses["503"]["content"]["application/json"]["example"]["status"] == "draining"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "status": "sick"}, schema)


def test_every_documented_response_carries_aiproxys_headers() -> None:
    """Every response in the document lists X-Request-ID, X-Process-Time and X-Proxy-By,
    as every real response has them."""
    document = spec()
    responses = list(document["components"]["responses"].values())
    for item in document["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict):
                responses += [r for r in operation.get("responses", {}).values() if "$ref" not in r]
    assert responses
    for response in responses:
        assert {"X-Request-ID", "X-Process-Time", "X-Proxy-By"} <= set(response["headers"])
