"""The proxy's own endpoints: ``/api/health`` and ``/api/ping``. They never touch the upstream."""

from __future__ import annotations

import json

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.errors import MethodNotAllowed
from aiproxy.request import send_error

__all__ = ["GetOnlyResource", "HealthResource", "JSONResource", "PingResource"]


class GetOnlyResource(Resource):
    """A leaf of aiproxy's own that answers ``GET`` and ``HEAD`` (``render_GET``) only."""

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def render(self, request: Request) -> bytes | int:
        """Answer ``GET`` and ``HEAD``; any other method gets the JSON ``405``."""
        if request.method not in self.allowedMethods:
            request.responseHeaders.setRawHeaders(b"Allow", [b", ".join(self.allowedMethods)])
            method = request.method.decode("ascii", "replace")
            send_error(request, MethodNotAllowed(f"{method} is not allowed here; use GET"))
            return NOT_DONE_YET
        result: bytes | int = super().render(request)
        return result


class JSONResource(GetOnlyResource):
    """A leaf that answers ``GET`` and ``HEAD`` with a JSON document."""

    def document(self) -> object:
        """The JSON-serialisable body."""
        raise NotImplementedError

    def render_GET(self, request: Request) -> bytes:
        """Answer with the document."""
        body = json.dumps(self.document()).encode()
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
        return body


class HealthResource(JSONResource):
    """
    ``GET /api/health``: the proxy is up, and where it sends requests.

    ``200`` with ``"status": "healthy"`` while serving; ``503`` with ``"status":
    "draining"`` once a graceful shutdown has begun, so that a load balancer that
    still reaches this process takes it out of rotation.
    """

    def __init__(self, config: Config, activity: Activity) -> None:
        super().__init__()
        self.config = config
        self.activity = activity

    def render_GET(self, request: Request) -> bytes:
        """Answer with the document; ``503`` while draining."""
        if self.activity.draining:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return super().render_GET(request)

    def document(self) -> object:
        """Status and the live upstream settings."""
        return {
            "status": "draining" if self.activity.draining else "healthy",
            "target_url": self.config.target_url,
            "timeout": _number(self.config.request_timeout),
            "ssl_verify": self.config.ssl_verify,
        }


class PingResource(JSONResource):
    """``GET /api/ping``: the cheapest possible liveness check."""

    def document(self) -> object:
        """A pong."""
        return {"ping": "pong"}


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value
