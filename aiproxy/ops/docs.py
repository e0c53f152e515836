"""
aiproxy's API documentation: Swagger UI at ``/api/docs``, ReDoc at ``/api/redoc`` and
the OpenAPI document at ``/api/openapi.json``.

Swagger UI (5.x, which renders OpenAPI 3.1) comes from the ``swagger-ui-py`` package and
is served by aiproxy itself under ``/api/docs/``, so that page works without internet
access. ReDoc is not packaged for Python without Django: its page loads a pinned
version from a CDN, checked by its Subresource Integrity hash.

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
    "REDOC_INTEGRITY",
    "REDOC_SCRIPT",
    "REDOC_VERSION",
    "SWAGGER_UI_ASSETS",
    "docs_endpoints",
    "etag_matches",
    "static_endpoint",
]

HTML = b"text/html; charset=utf-8"

SWAGGER_UI_ASSETS = {
    "swagger-ui-bundle.js": b"text/javascript; charset=utf-8",
    "swagger-ui.css": b"text/css; charset=utf-8",
    "favicon-32x32.png": b"image/png",
    "favicon-16x16.png": b"image/png",
}
"""The files of ``swagger-ui-py``'s ``swagger_ui/static`` that the page uses, and their types."""

ASSET_CACHE_CONTROL = b"public, max-age=86400"
"""Swagger UI's files change only with the package; pages and the document are revalidated."""

REDOC_VERSION = "2.5.4"
REDOC_SCRIPT = f"https://cdn.jsdelivr.net/npm/redoc@{REDOC_VERSION}/bundles/redoc.standalone.js"
REDOC_INTEGRITY = "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5"
"""The ``sha384`` of ``bundles/redoc.standalone.js`` in the npm package ``redoc@2.5.4``."""

SWAGGER_UI_PAGE = b"""<!DOCTYPE html>
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
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null
});
</script>
</body>
</html>
"""

REDOC_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aiproxy API reference</title>
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<style>body {{ margin: 0; }}</style>
</head>
<body>
<redoc spec-url="openapi.json">
<p>Loading ReDoc {REDOC_VERSION} from cdn.jsdelivr.net&hellip; Without internet access,
use <a href="docs">Swagger UI</a>.</p>
</redoc>
<script src="{REDOC_SCRIPT}" integrity="{REDOC_INTEGRITY}" crossorigin="anonymous"></script>
</body>
</html>
""".encode()


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
    ``/api/docs``, ``/api/redoc``, ``/api/openapi.json`` and the Swagger UI files under
    ``/api/docs/``, by their exact paths.

    The OpenAPI document of ``config`` is built and serialised here, once.
    """
    spec = json.dumps(openapi_document(config)).encode()
    return {
        b"/api/docs": static_endpoint(SWAGGER_UI_PAGE, HTML),
        b"/api/redoc": static_endpoint(REDOC_PAGE, HTML),
        b"/api/openapi.json": static_endpoint(spec, b"application/json"),
        **_swagger_ui_files(),
    }


@functools.cache
def _swagger_ui_files() -> dict[bytes, Endpoint]:
    """The Swagger UI files, read from the package once per process."""
    static = resources.files("swagger_ui") / "static"
    return {
        b"/api/docs/" + name.encode("ascii"): static_endpoint(
            _SOURCE_MAP.sub(b"", (static / name).read_bytes()), content_type, ASSET_CACHE_CONTROL
        )
        for name, content_type in SWAGGER_UI_ASSETS.items()
    }


_SOURCE_MAP = re.compile(rb"/\*# sourceMappingURL=[^*]*\*/\s*\Z|//# sourceMappingURL=\S*\s*\Z")
"""A trailing source-map comment: the map is not served, so a browser's developer tools
would ask the upstream for it."""
