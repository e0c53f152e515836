"""
The reverse-proxy resource: one upstream exchange per client request, streamed.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from aiproxy.errors import (
    BadRequestTarget,
    InternalError,
    MethodNotAllowed,
    UpstreamTimeout,
    describe_exception,
    upstream_error,
)
from aiproxy.headers import choose_request_id, client_response_headers, upstream_request_headers
from aiproxy.request import client_ip, send_error
from aiproxy.streaming import ReplayableBody, ResponseForwarder
from aiproxy.target import Target, is_origin_form, local_target
from aiproxy.timeouts import with_deadline

__all__ = ["ReverseProxyResource"]

log = Logger(namespace="aiproxy")


class ReverseProxyResource(Resource):
    """
    Forwards every request below it to one upstream and streams the answer back.

    Mount it anywhere: the part of the request target below the mount point is
    appended, byte for byte, to the target's URL. Works with any twisted.web
    ``Request``; with :class:`aiproxy.request.ProxyRequest` the request IDs and timing
    headers are added too.

    @ivar cancelled: how many upstream requests were cancelled because their client
        went away.
    """

    isLeaf = True

    def __init__(
        self,
        target: Target,
        agent: IAgent,
        clock: IReactorTime,
        *,
        request_timeout: float,
        read_size: int = 65536,
        cooperator: Cooperator | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.agent = agent
        self.clock = clock
        self.request_timeout = request_timeout
        self.read_size = read_size
        self.cooperator = cooperator
        self.cancelled = 0

    def render(self, request: Request) -> int | bytes:
        """Start the upstream exchange; the response is written as it arrives."""
        if request.method == b"CONNECT":
            send_error(request, MethodNotAllowed("CONNECT is not supported by this proxy"))
        elif not is_origin_form(request.uri):
            send_error(
                request,
                BadRequestTarget("the request target must be a path beginning with one '/'"),
            )
        else:
            _Exchange(self, request).start()
        return NOT_DONE_YET


class _Exchange:
    """One client request and the upstream request made for it."""

    def __init__(self, resource: ReverseProxyResource, request: Request) -> None:
        self.resource = resource
        self.request = request
        request_id = getattr(request, "request_id", b"")
        self.request_id = request_id or choose_request_id(
            request.requestHeaders.getRawHeaders(b"x-request-id")
        )
        self.url = resource.target.url_for(local_target(request.uri, len(request.prepath or ())))
        self.pending: Deferred[IResponse] | None = None
        self.forwarder: ResponseForwarder | None = None
        self.client_gone = False

    def start(self) -> None:
        request = self.request
        headers = upstream_request_headers(
            request.requestHeaders,
            client_ip=client_ip(request),
            scheme=b"https" if request.isSecure() else b"http",
            request_id=self.request_id,
        )
        assert request.content is not None, "twisted.web sets it before render"
        body = ReplayableBody(request.content, self.resource.read_size, self.resource.cooperator)
        sends_body = body.length > 0 or _declares_body(request)
        d = self.resource.agent.request(
            request.method, self.url, headers, body.producer() if sends_body else None
        )
        self.pending = d
        timeout = self.resource.request_timeout
        with_deadline(
            d,
            timeout,
            self.resource.clock,
            lambda: UpstreamTimeout(f"the upstream sent no response headers within {timeout:g}s"),
        )
        d.addCallbacks(self.respond, self.fail)
        d.addErrback(self.bug)
        request.notifyFinish().addErrback(self.client_went_away)

    def respond(self, response: IResponse) -> None:
        self.pending = None
        request = self.request
        log.debug(
            "Response {status} from {url}",
            status=response.code,
            url=self.url.decode("ascii", "replace"),
            request_id=self.request_id.decode("ascii"),
        )
        request.setResponseCode(response.code, response.phrase)
        for name, values in client_response_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH and _may_have_body(response.code):
            # twisted's client keeps Content-Length apart from the other headers.
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        # Send the headers now: a stream's first event may be a while coming.
        request.write(b"")
        self.forwarder = ResponseForwarder(request)
        self.forwarder.finished.addErrback(self.upstream_died)
        response.deliverBody(self.forwarder)

    def fail(self, failure: Failure) -> None:
        self.pending = None
        if self.client_gone:
            return
        error = upstream_error(failure)
        if isinstance(error, InternalError):
            log.failure(
                "Upstream request failed unexpectedly [ID: {request_id}]",
                failure,
                request_id=self.request_id.decode("ascii"),
            )
        else:
            log.warn(
                "Upstream error {status} for {url}: {message} [ID: {request_id}]",
                status=error.status,
                url=self.url.decode("ascii", "replace"),
                message=error.message,
                request_id=self.request_id.decode("ascii"),
            )
        send_error(self.request, error)

    def upstream_died(self, failure: Failure) -> None:
        log.warn(
            "Upstream body ended early, client response aborted: {reason} [ID: {request_id}]",
            reason=describe_exception(failure.value),
            request_id=self.request_id.decode("ascii"),
        )

    def client_went_away(self, reason: Failure) -> None:
        self.client_gone = True
        if self.pending is not None:
            self.pending.cancel()
        elif self.forwarder is not None and not self.forwarder.finished.called:
            self.forwarder.stop()
        else:
            return
        self.resource.cancelled += 1
        log.info(
            "Client disconnected, upstream request cancelled [ID: {request_id}]",
            request_id=self.request_id.decode("ascii"),
        )

    def bug(self, failure: Failure) -> None:
        log.failure(
            "Bug while proxying [ID: {request_id}]",
            failure,
            request_id=self.request_id.decode("ascii"),
        )
        if not self.client_gone and not self.request.finished:
            send_error(self.request, InternalError("aiproxy failed to handle this request"))


def _may_have_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _declares_body(request: Request) -> bool:
    headers = request.requestHeaders
    return headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
