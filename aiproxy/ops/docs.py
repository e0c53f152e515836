"""
aiproxy's API documentation: Swagger UI at ``/api/docs``, ReDoc at ``/api/redoc`` and
the OpenAPI document at ``/api/openapi.json``.

Both viewers come from the ``openapi-ui-bundles`` package (static files only, no
dependencies: Swagger UI 5, which renders OpenAPI 3.1, and ReDoc 2) and are served by
aiproxy itself, under ``/api/docs/`` and ``/api/redoc/``, so the pages work without
internet access.

The pages use relative URLs only (``openapi.json``, ``docs/swagger-ui.css``), which
resolve next to the page, so they also work behind a proxy that adds a path prefix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from importlib import resources

from aiproxy.config import Config
from aiproxy.core.interfaces import Endpoint, Incoming, LocalResponse
from aiproxy.ops.openapi import openapi_document
from aiproxy.rules.headers import header_values

__all__ = [
    "REDOC_ASSETS",
    "SWAGGER_UI_ASSETS",
    "docs_endpoints",
    "etag_matches",
    "static_endpoint",
]

HTML = b"text/html; charset=utf-8"
_JS = b"text/javascript; charset=utf-8"

SWAGGER_UI_ASSETS = {
    "swagger-ui-bundle.js": _JS,
    "swagger-ui.css": b"text/css; charset=utf-8",
    "favicon-32x32.png": b"image/png",
    "favicon-16x16.png": b"image/png",
}
"""The files of ``openapi_ui_bundles/swagger_ui/vendor`` that the page uses, and their
types; served under ``/api/docs/``."""

REDOC_ASSETS = {"redoc.standalone.js": _JS}
"""The file of ``openapi_ui_bundles/redoc/vendor`` that the page uses; served under
``/api/redoc/``."""

ASSET_CACHE_CONTROL = b"public, max-age=86400"
"""The viewers' files change only with the package; pages and the document are revalidated."""

SWAGGER_UI_PAGE = rb"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aiproxy API docs</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="docs/favicon-16x16.png" sizes="16x16">
<style>body { margin: 0; }</style>
</head>
<body>
<div id="swagger-ui"><p>Loading the API docs&hellip;</p></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
// The document's server is relative (".."); name it by this proxy's own URL, as the
// browser reached it, so that the server list shows where "Try it out" sends requests.
fetch("openapi.json").then(function (response) { return response.json(); }).then(function (spec) {
  var here = new URL("..", document.baseURI).href.replace(/\/$/, "");
  spec.servers = [{url: here, description: "This aiproxy"}];
  window.ui = SwaggerUIBundle({
    spec: spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null
  });
}).catch(function (error) {
  document.getElementById("swagger-ui").textContent =
    "The API docs could not be shown: " + error + ". The document is at openapi.json.";
});
</script>
</body>
</html>
"""

REDOC_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aiproxy API reference</title>
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<style>body { margin: 0; }</style>
</head>
<body>
<redoc spec-url="openapi.json">
<p>Loading ReDoc&hellip; If this stays, use <a href="docs">Swagger UI</a>.</p>
</redoc>
<script src="redoc/redoc.standalone.js" onerror="this.previousElementSibling.innerHTML =
'<p>ReDoc could not be loaded. Use <a href=docs>Swagger UI</a> instead.</p>'"></script>
</body>
</html>
"""


def etag_matches(if_none_match: Iterable[bytes], etag: bytes) -> bool:
    """
    Whether the ``If-None-Match`` header values name ``etag`` (compared weakly, as
    RFC 9110 section 13.1.2 says for ``GET`` and ``HEAD``), or are ``*``.
    """
    for value in if_none_match:
        for tag in value.split(b","):
            tag = tag.strip()
            if tag == b"*" or tag.removeprefix(b"W/") == etag:
                return True
    return False


def static_endpoint(
    body: bytes, content_type: bytes, cache_control: bytes = b"no-cache"
) -> Endpoint:
    """
    Fixed bytes, held in memory, with ``Content-Type``, ``Cache-Control`` and an
    ``ETag``; ``304`` (no body) for a request whose ``If-None-Match`` names that ``ETag``.
    """
    etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:32].encode("ascii")
    whole = LocalResponse(
        200,
        [(b"ETag", etag), (b"Cache-Control", cache_control), (b"Content-Type", content_type)],
        body,
    )
    unchanged = LocalResponse(304, [(b"ETag", etag), (b"Cache-Control", cache_control)])

    def static(request: Incoming) -> LocalResponse:
        if etag_matches(header_values(request.headers, b"if-none-match"), etag):
            return unchanged
        return whole

    return static


def docs_endpoints(config: Config) -> dict[bytes, Endpoint]:
    """
    ``/api/docs``, ``/api/redoc``, ``/api/openapi.json``, the Swagger UI files under
    ``/api/docs/`` and ReDoc's under ``/api/redoc/``, by their exact paths.

    The OpenAPI document of ``config`` is built and serialised here, once.
    """
    spec = json.dumps(openapi_document(config)).encode()
    return {
        b"/api/docs": static_endpoint(SWAGGER_UI_PAGE, HTML),
        b"/api/redoc": static_endpoint(REDOC_PAGE, HTML),
        b"/api/openapi.json": static_endpoint(spec, b"application/json"),
        **_packaged_files(b"/api/docs/", "swagger_ui", tuple(SWAGGER_UI_ASSETS.items())),
        **_packaged_files(b"/api/redoc/", "redoc", tuple(REDOC_ASSETS.items())),
    }


@functools.cache
def _packaged_files(
    prefix: bytes, viewer: str, assets: tuple[tuple[str, bytes], ...]
) -> dict[bytes, Endpoint]:
    """The files ``assets`` (names and types) of ``openapi_ui_bundles/VIEWER/vendor``,
    at ``prefix`` + name, read from the package once per process."""
    vendor = resources.files("openapi_ui_bundles") / viewer / "vendor"
    return {
        prefix + name.encode("ascii"): static_endpoint(
            _SOURCE_MAP.sub(b"", (vendor / name).read_bytes()), content_type, ASSET_CACHE_CONTROL
        )
        for name, content_type in assets
    }


_SOURCE_MAP = re.compile(rb"/\*# sourceMappingURL=[^*]*\*/\s*\Z|//# sourceMappingURL=\S*\s*\Z")
"""A trailing source-map comment: the map is not served, so a browser's developer tools
would ask the upstream for it."""
