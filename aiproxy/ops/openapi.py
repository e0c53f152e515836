"""
The OpenAPI 3.1 document that describes aiproxy: its own endpoints, and the catch-all
route that forwards everything else to the target.

The error responses come from the error classes of :mod:`aiproxy.errors` (status,
``type``, docstring), the health examples from
:func:`~aiproxy.core.endpoints.health_document` and the upstream states from
:mod:`aiproxy.routing.health` itself, so the document says what the code does.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

from aiproxy._version import __version__
from aiproxy.config import Config
from aiproxy.core.endpoints import health_document
from aiproxy.errors import (
    BadRequestTarget,
    BodyTooLarge,
    ClientTooSlow,
    HeadTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotServed,
    NoUpstreamAvailable,
    OriginNotAllowed,
    Overloaded,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    WebSocketNotSupported,
    api_error_body,
    error_body,
)
from aiproxy.routing.health import COOLING, DISABLED, EJECTED, HALF_OPEN, HEALTHY

__all__ = ["openapi_document"]

_PROXY_METHODS = ("get", "post", "put", "patch", "delete", "options", "head")
"""The operations of the catch-all route (``CONNECT`` is refused, and no OpenAPI verb)."""

_PROXY_ERRORS: tuple[type[ProxyError], ...] = (
    BadRequestTarget,
    InvalidRequest,
    MethodNotAllowed,
    ClientTooSlow,
    BodyTooLarge,
    HeadTooLarge,
    InternalError,
    WebSocketNotSupported,
    UpstreamUnreachable,
    Overloaded,
    UpstreamTimeout,
)
"""The errors aiproxy answers itself for a request to be proxied (CORS adds ``403``,
``UPSTREAMS_FILE`` ``503 upstream_unavailable`` and, in OpenAI's shape, ``404``)."""

_BODY_METHODS = ("post", "put", "patch")
"""The operations documented with a request body (which may name a model)."""

_EXAMPLE_REQUEST_ID = b"6f1c2a9e4b7d40c58e2f9a1b3c5d7e90"
_SECONDS_LEFT = {
    "type": "number",
    "description": "Seconds until the state changes by itself; absent when it will not.",
}
_COMMON_HEADERS = ("X-Request-ID", "X-Process-Time", "X-Proxy-By")
_OWN = "aiproxy"
_DOCS = "documentation"
_PROXY = "proxy"


def openapi_document(config: Config) -> dict[str, Any]:
    """
    The OpenAPI 3.1.0 document of an aiproxy configured by ``config``.

    ``/api/metrics`` is in it only when ``config.enable_metrics`` is true, the CORS
    ``403`` only when ``config.enable_cors`` is, and the errors and the ``X-Upstream``
    header of several upstreams only when ``config.upstreams_file`` is set.
    """
    paths: dict[str, Any] = {
        "/api/health": _health_path(config),
        "/api/ping": _get(
            "ping",
            "Liveness check",
            "The cheapest possible check that the proxy answers. Never limited.",
            _OWN,
            {"200": _response("Pong.", _json({"$ref": "#/components/schemas/Ping"}))},
        ),
    }
    if config.enable_metrics:
        paths["/api/metrics"] = _get(
            "metrics",
            "Prometheus metrics",
            "The proxy's metrics in the Prometheus text exposition format. Switched off"
            " with `ENABLE_METRICS=false`.",
            _OWN,
            {"200": _response("The metrics.", {"text/plain": {"schema": {"type": "string"}}})},
        )
    paths["/api/docs"] = _document_path(
        "swaggerUI", "Swagger UI", "This documentation in Swagger UI; works offline.", "text/html"
    )
    paths["/api/redoc"] = _document_path(
        "redoc",
        "ReDoc",
        "This documentation in ReDoc; works offline.",
        "text/html",
    )
    paths["/api/openapi.json"] = _document_path(
        "openapi", "OpenAPI document", "This OpenAPI 3.1 document.", "application/json"
    )
    paths["/{path}"] = _proxy_path(config)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aiproxy",
            "version": __version__,
            "summary": "A streaming reverse proxy for OpenAI-compatible AI APIs.",
            "description": _description(config),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        # Relative to this document's URL (.../api/openapi.json): a path prefix that a
        # proxy in front adds is kept when Swagger UI sends a request.
        "servers": [{"url": "..", "description": "This aiproxy"}],
        "tags": [
            {"name": _PROXY, "description": f"Forwarded to {_destination(config)}."},
            {"name": _OWN, "description": "Answered by aiproxy itself."},
            {"name": _DOCS, "description": "This documentation."},
        ],
        "paths": paths,
        "components": _components(config),
    }


def _destination(config: Config) -> str:
    """Where proxied requests go, in Markdown."""
    if config.upstreams_file:
        return "the upstreams of its `UPSTREAMS_FILE`, chosen by model, priority and weight"
    return f"**`{config.target_url}`** (its `TARGET_URL`)"


def _description(config: Config) -> str:
    return (
        f"aiproxy forwards every request to {_destination(config)}:"
        " method, path, query string, headers (`Authorization` included) and body pass"
        " through, and the upstream's response streams back unchanged, server-sent events"
        " included.\n\n"
        "aiproxy answers a few exact paths itself (`/api/health`, `/api/ping`, ...):"
        " those never reach the upstream, answer `GET` and `HEAD`, and answer any other"
        " method with `405` and the JSON error. Every other path, `/api/health/` and"
        " `/api/chat` included, is the upstream's.\n\n"
        "Errors aiproxy produces itself have the JSON body"
        ' `{"error": {"type", "message", "request_id"}}`, except refusals of the API'
        " itself (access keys, rate limits, a model no upstream serves), which take the"
        " API's own error shape; the upstream's own errors are relayed as they are.\n\n"
        "Every response carries `X-Request-ID`, `X-Process-Time` and `X-Proxy-By`."
    )


def _health_path(config: Config) -> dict[str, Any]:
    healthy = health_document(config)
    schema = {"$ref": "#/components/schemas/Health"}
    return _get(
        "health",
        "Health check",
        "Whether the proxy is serving, and where it sends requests. Never limited.",
        _OWN,
        {
            "200": _response("Serving.", _json(schema, healthy)),
            "503": _response(
                "Draining: a graceful shutdown has begun, take this process out of rotation.",
                _json(schema, {**healthy, "status": "draining"}),
            ),
        },
    )


def _document_path(operation_id: str, summary: str, text: str, media: str) -> dict[str, Any]:
    schema = {"type": "object"} if media == "application/json" else {"type": "string"}
    ok = _response("The document.", {media: {"schema": schema}})
    ok["headers"]["ETag"] = {"$ref": "#/components/headers/ETag"}
    return _get(
        operation_id,
        summary,
        text,
        _DOCS,
        {"200": ok, "304": _response("Not modified: `If-None-Match` names the current `ETag`.")},
    )


def _get(
    operation_id: str, summary: str, description: str, tag: str, responses: dict[str, Any]
) -> dict[str, Any]:
    """A path item with one ``GET`` operation."""
    return {
        "parameters": [{"$ref": "#/components/parameters/RequestID"}],
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "tags": [tag],
            "responses": responses,
        },
    }


def _proxy_path(config: Config) -> dict[str, Any]:
    item: dict[str, Any] = {
        "summary": "Everything else: forwarded to the target",
        "description": f"Forwarded to `{config.target_url}` + `/{{path}}`.",
        "parameters": [
            {
                "name": "path",
                "in": "path",
                "required": True,
                "description": "Any path but aiproxy's own, such as `v1/chat/completions`;"
                " it is forwarded byte for byte with its query string. (Swagger UI sends"
                " a `/` in it as `%2F`, which is forwarded as `%2F` too: use a real client"
                " for nested paths.)",
                "schema": {"type": "string"},
            },
            {"$ref": "#/components/parameters/RequestID"},
        ],
    }
    relayed = _response(
        "The upstream's response, relayed as it is: status, headers (but the hop-by-hop"
        " ones) and body, streamed.",
        {"*/*": {"schema": {}}},
    )
    if config.upstreams_file and config.upstream_name_header:
        relayed["headers"]["X-Upstream"] = {"$ref": "#/components/headers/X-Upstream"}
    for method in _PROXY_METHODS:
        errors = {
            str(error.status): {"$ref": f"#/components/responses/Error{error.status}"}
            for error in _proxy_errors(config, method)
        }
        if config.upstreams_file and method in _BODY_METHODS:
            errors["404"] = {"$ref": "#/components/responses/ModelNotFound"}
        operation: dict[str, Any] = {
            "operationId": f"proxy{method.capitalize()}",
            "summary": f"{method.upper()} to the target",
            "tags": [_PROXY],
            "security": [{}, {"upstreamBearer": []}],
            "responses": {"default": relayed, **dict(sorted(errors.items()))},
        }
        if method in _BODY_METHODS:
            operation["requestBody"] = {
                "description": "Forwarded as it is, up to `MAX_BODY_SIZE`"
                f" ({config.max_body_size} bytes).",
                "content": {"application/json": {"schema": {}}, "*/*": {"schema": {}}},
            }
        item[method] = operation
    return item


def _proxy_errors(config: Config, method: str) -> tuple[type[ProxyError], ...]:
    """The errors aiproxy answers itself, with its own JSON error body, for a
    ``method`` request to be proxied."""
    errors = _PROXY_ERRORS
    if config.upstreams_file:
        errors = (*errors, NoUpstreamAvailable)
    if method == "options" and config.enable_cors:
        errors = (*errors, OriginNotAllowed)
    return errors


def _components(config: Config) -> dict[str, Any]:
    errors = _proxy_errors(config, "options")
    components: dict[str, Any] = {
        "schemas": {
            "Health": {
                "type": "object",
                "required": ["status", "target_url", "timeout", "ssl_verify", "auth"],
                "properties": {
                    "status": {"type": "string", "enum": ["healthy", "draining"]},
                    "target_url": {"type": "string", "description": "`TARGET_URL`."},
                    "timeout": {
                        "type": "number",
                        "description": "`REQUEST_TIMEOUT`, in seconds.",
                    },
                    "ssl_verify": {"type": "boolean", "description": "`SSL_VERIFY`."},
                    "auth": {
                        "type": "string",
                        "enum": ["access_keys", "none"],
                        "description": "Whether clients must present an access key.",
                    },
                    "redis": {
                        "type": "string",
                        "enum": ["reachable", "unreachable", "unused"],
                        "description": "With REDIS_URL: whether Redis answered the last"
                        " check of the per-key limits (unused: none yet).",
                    },
                    "upstreams": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/UpstreamHealth"},
                        "description": "With UPSTREAMS_FILE: each upstream's state, in"
                        " the file's order.",
                    },
                },
            },
            "UpstreamHealth": {
                "type": "object",
                "required": ["name", "state", "keys"],
                "properties": {
                    "name": {"type": "string", "description": "Its name in the file."},
                    "state": {
                        "type": "string",
                        "enum": [HEALTHY, COOLING, DISABLED, EJECTED, HALF_OPEN],
                        "description": "`cooling` and `disabled`: every key is;"
                        " `ejected`: after failures in a row; `half_open`: one request"
                        " may go as a probe.",
                    },
                    "seconds_left": _SECONDS_LEFT,
                    "keys": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["fingerprint", "state"],
                            "properties": {
                                "fingerprint": {
                                    "type": "string",
                                    "description": "8 hex digits of the key's SHA-256.",
                                },
                                "state": {
                                    "type": "string",
                                    "enum": [HEALTHY, COOLING, DISABLED],
                                },
                                "seconds_left": _SECONDS_LEFT,
                            },
                        },
                    },
                },
            },
            "Ping": {
                "type": "object",
                "required": ["ping"],
                "properties": {"ping": {"const": "pong"}},
            },
            "ApiError": {
                "type": "object",
                "required": ["error"],
                "description": "An error in the API's own shape: OpenAI's, or Anthropic's"
                " for `/v1/messages`.",
                "properties": {
                    "type": {"const": "error", "description": "Anthropic's shape only."},
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {
                            "type": {"type": "string"},
                            "message": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {
                                "type": ["string", "null"],
                                "description": "OpenAI's shape only.",
                            },
                        },
                    },
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["type", "message", "request_id"],
                        "properties": {
                            "type": {
                                "type": "string",
                                "enum": sorted({error.type for error in errors}),
                                "description": "What went wrong, for programs.",
                            },
                            "message": {
                                "type": "string",
                                "description": "What went wrong, for people.",
                            },
                            "request_id": {
                                "type": "string",
                                "description": "The response's `X-Request-ID`.",
                            },
                        },
                    }
                },
            },
        },
        "responses": _error_responses(errors),
        "parameters": {
            "RequestID": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your own request ID: kept (and sent upstream) if it is 1-200"
                " letters, digits or `._:@+=/-`; otherwise aiproxy makes one.",
                "schema": {"type": "string"},
            }
        },
        "headers": {
            "X-Request-ID": {
                "description": "The request's ID: the client's own, or a new one.",
                "required": True,
                "schema": {"type": "string"},
            },
            "X-Process-Time": {
                "description": "Seconds from the request's arrival to its response headers."
                " Missing on errors found in the request head (`400`, `408`, `431`).",
                "schema": {"type": "number"},
            },
            "X-Proxy-By": {
                "description": "aiproxy and its version.",
                "required": True,
                "schema": {"type": "string", "examples": [f"aiproxy/{__version__}"]},
            },
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "integer"},
            },
            "ETag": {
                "description": "The document's version, for `If-None-Match`.",
                "schema": {"type": "string"},
            },
        },
        "securitySchemes": {
            "upstreamBearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The upstream's API key. aiproxy does not check it: the"
                " `Authorization` header passes through to the upstream untouched.",
            }
        },
    }
    if config.upstreams_file:
        components["responses"]["ModelNotFound"] = _model_not_found()
        components["headers"]["X-Upstream"] = {
            "description": "The name of the upstream of `UPSTREAMS_FILE` that answered"
            " (never its URL or key); left out with `UPSTREAM_NAME_HEADER=false`.",
            "schema": {"type": "string"},
        }
    return components


def _error_responses(errors: Iterable[type[ProxyError]]) -> dict[str, Any]:
    """One response per status, ``Error<status>``, for the errors of that status."""
    by_status: dict[int, list[type[ProxyError]]] = {}
    for error in errors:
        by_status.setdefault(error.status, []).append(error)
    responses = {}
    for status, group in sorted(by_status.items()):
        description = "\n\n".join(f"`{error.type}`: {_explanation(error)}" for error in group)
        examples = {
            error.type: {"summary": _plain(error), "value": _example(error)} for error in group
        }
        response = _response(
            f"{description}\n\n(aiproxy's own answer; the upstream's {status} is relayed"
            " as it is.)",
            {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"},
                    "examples": examples,
                }
            },
        )
        for error in group:
            for name, _ in error.headers:
                response["headers"][name.decode("ascii")] = {
                    "$ref": f"#/components/headers/{name.decode('ascii')}"
                }
        responses[f"Error{status}"] = response
    return responses


def _model_not_found() -> dict[str, Any]:
    """The ``404`` for a model that no upstream of ``UPSTREAMS_FILE`` serves."""
    error = ModelNotServed(
        "The model 'gpt-unknown' is not served by this proxy.", "model_not_found", "model"
    )
    return _response(
        f"`model_not_found`: {_explanation(ModelNotServed)} In OpenAI's error shape, or"
        " Anthropic's for `/v1/messages`.",
        {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ApiError"},
                "examples": {
                    "openai": {
                        "summary": "OpenAI's shape",
                        "value": json.loads(api_error_body(error, anthropic=False)),
                    },
                    "anthropic": {
                        "summary": "Anthropic's shape (/v1/messages)",
                        "value": json.loads(api_error_body(error, anthropic=True)),
                    },
                },
            }
        },
    )


def _explanation(error: type[ProxyError]) -> str:
    """The first paragraph of the error class's docstring, in Markdown."""
    text = (inspect.getdoc(error) or error.type).split("\n\n")[0]
    return text.replace("\n", " ").replace("``", "`")


def _plain(error: type[ProxyError]) -> str:
    """:func:`_explanation` as plain text."""
    return _explanation(error).replace("`", "")


def _example(error: type[ProxyError]) -> object:
    """The JSON body of ``error``, with its explanation as the message."""
    return json.loads(error_body(error(_plain(error)), _EXAMPLE_REQUEST_ID))


def _response(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response with aiproxy's headers."""
    response: dict[str, Any] = {
        "description": description,
        "headers": {name: {"$ref": f"#/components/headers/{name}"} for name in _COMMON_HEADERS},
    }
    if content is not None:
        response["content"] = content
    return response


def _json(schema: dict[str, Any], example: object = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}
