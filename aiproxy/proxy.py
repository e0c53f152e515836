"""
The reverse-proxy resource: one upstream exchange per client request, streamed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from aiproxy.core.admission import Admission
from aiproxy.core.record import RequestRecord
from aiproxy.core.timeouts import with_deadline
from aiproxy.errors import (
    BadRequestTarget,
    InternalError,
    MethodNotAllowed,
    UpstreamTimeout,
    describe_exception,
    failure_kind,
    upstream_error,
)
from aiproxy.request import client_ip, send_error
from aiproxy.rules.headers import (
    choose_request_id,
    client_response_headers,
    is_event_stream,
    upstream_request_headers,
)
from aiproxy.rules.redact import redact_url
from aiproxy.rules.retry import RetryPolicy, retry_after, retry_reason, with_retries
from aiproxy.rules.target import Target, is_origin_form, local_target
from aiproxy.rules.usage import usage_meter
from aiproxy.streaming import CLIENT_GONE, BodyCutShort, ReplayableBody, ResponseForwarder

__all__ = ["NO_RETRIES", "ReverseProxyResource"]

NO_RETRIES = RetryPolicy(max_retries=0, backoff_factor=0)
"""Every upstream request is sent once."""

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
    @ivar retries: how many upstream requests were sent again (see :mod:`aiproxy.rules.retry`).
    @ivar active_streams: how many event streams are being relayed now.
    @ivar admission: turns WebSocket upgrades and requests over
        ``max_concurrent_requests`` away (see :mod:`aiproxy.core.admission`).
    """

    isLeaf = True

    def __init__(
        self,
        target: Target,
        agent: IAgent,
        clock: IReactorTime,
        *,
        request_timeout: float,
        stream_idle_timeout: float = 300.0,
        total_timeout: float = 0.0,
        retry_policy: RetryPolicy = NO_RETRIES,
        read_size: int = 65536,
        cooperator: Cooperator | None = None,
        max_concurrent_requests: int = 0,
    ) -> None:
        super().__init__()
        self.target = target
        self.agent = agent
        self.clock = clock
        self.request_timeout = request_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.total_timeout = total_timeout
        self.retry_policy = retry_policy
        self.read_size = read_size
        self.cooperator = cooperator
        self.admission = Admission(max_concurrent_requests)
        self.cancelled = 0
        self.retries = 0
        self.active_streams = 0

    def render(self, request: Request) -> int | bytes:
        """Start the upstream exchange; the response is written as it arrives."""
        if request.method == b"CONNECT":
            send_error(request, MethodNotAllowed("CONNECT is not supported by this proxy"))
        elif not is_origin_form(request.uri):
            send_error(
                request,
                BadRequestTarget("the request target must be a path beginning with one '/'"),
            )
        elif (refusal := self.admission.admit(request)) is not None:
            send_error(request, refusal)  # 501 WebSocket, 503 over MAX_CONCURRENT_REQUESTS
        else:
            _Exchange(self, request).start()
        return NOT_DONE_YET


class _Exchange:
    """
    One client request and the upstream request(s) made for it.

    What happens upstream is written into the request's :class:`RequestRecord` (a
    :class:`aiproxy.request.ProxyRequest` has one; for other requests it is dropped).
    """

    def __init__(self, resource: ReverseProxyResource, request: Request) -> None:
        self.resource = resource
        self.request = request
        self.clock = resource.clock
        request_id = getattr(request, "request_id", b"")
        self.request_id = request_id or choose_request_id(
            request.requestHeaders.getRawHeaders(b"x-request-id")
        )
        self.log_id = self.request_id.decode("ascii")
        self.record: RequestRecord = getattr(request, "record", None) or RequestRecord()
        self.arrived_at: float = getattr(request, "received_at", None) or self.clock.seconds()
        self.url = resource.target.url_for(local_target(request.uri, len(request.prepath or ())))
        self.pending: Deferred[IResponse] | None = None
        self.forwarder: ResponseForwarder | None = None
        self.client_gone = False
        self.total_timer: IDelayedCall | None = None

    def start(self) -> None:
        request = self.request
        resource = self.resource
        self.headers = upstream_request_headers(
            request.requestHeaders,
            client_ip=client_ip(request),
            scheme=b"https" if request.isSecure() else b"http",
            request_id=self.request_id,
        )
        assert request.content is not None, "twisted.web sets it before render"
        self.body = ReplayableBody(request.content, resource.read_size, resource.cooperator)
        self.sends_body = self.body.length > 0 or _declares_body(request)
        # REQUEST_TIMEOUT (and TOTAL_TIMEOUT, if sooner) covers every attempt.
        wait = resource.request_timeout
        if resource.total_timeout:
            wait = min(wait, resource.total_timeout)
            self.total_timer = self.clock.callLater(resource.total_timeout, self.total_expired)
        self.headers_deadline = self.clock.seconds() + wait
        d = Deferred.fromCoroutine(with_retries(self.send, self.wait_before_next, self.clock))
        self.pending = d
        with_deadline(
            d,
            wait,
            self.clock,
            lambda: UpstreamTimeout(f"the upstream sent no response headers within {wait:g}s"),
        )
        d.addCallbacks(self.respond, self.fail)
        d.addErrback(self.bug)
        request.notifyFinish().addBoth(self.ended)

    def send(self, attempt: int) -> Deferred[IResponse]:
        """Send one attempt, with a body producer of its own."""
        producer = self.body.producer() if self.sends_body else None
        return self.resource.agent.request(self.request.method, self.url, self.headers, producer)

    def wait_before_next(self, attempt: int, outcome: IResponse | Failure) -> float | None:
        """Whether to try again after ``outcome``, and when (:mod:`aiproxy.rules.retry`)."""
        policy = self.resource.retry_policy
        if self.client_gone or attempt >= policy.max_retries:
            return None
        if isinstance(outcome, Failure):
            reason = retry_reason(outcome, self.request.method)
            if reason is None:
                return None
            reason = f"{reason}: {describe_exception(outcome.value)}"
            delay = policy.backoff(attempt + 1)
        else:
            if outcome.code not in policy.retry_on_status:
                return None
            reason = f"the upstream answered {outcome.code}"
            asked = retry_after(outcome.headers, self.clock.seconds())
            delay = policy.backoff(attempt + 1) if asked is None else asked
        if self.clock.seconds() + delay >= self.headers_deadline:
            return None  # the next attempt could not answer in time: keep this outcome
        if not isinstance(outcome, Failure):
            outcome.deliverBody(_Discard())
        self.resource.retries += 1
        self.record.retries = attempt + 1
        log.warn(
            "Retrying {method} {url} in {delay:.3f}s (retry {retry} of {max_retries}):"
            " {reason} [ID: {request_id}]",
            method=self.request.method.decode("ascii", "replace"),
            url=redact_url(self.url),
            delay=delay,
            retry=attempt + 1,
            max_retries=policy.max_retries,
            reason=reason,
            request_id=self.log_id,
        )
        return delay

    def respond(self, response: IResponse) -> None:
        self.pending = None
        request = self.request
        record = self.record
        record.upstream_status = response.code
        record.upstream_headers_after = self.clock.seconds() - self.arrived_at
        log.debug(
            "Response {status} from {url}",
            status=response.code,
            url=redact_url(self.url),
            request_id=self.log_id,
        )
        request.setResponseCode(response.code, response.phrase)
        for name, values in client_response_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH and _may_have_body(response.code):
            # twisted's client keeps Content-Length apart from the other headers.
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        # Send the headers now: a stream's first event may be a while coming.
        request.write(b"")
        record.usage_meter = usage_meter(response.headers)
        self.forwarder = ResponseForwarder(
            request, self.clock, self.resource.stream_idle_timeout, record.usage_meter
        )
        self.forwarder.finished.addErrback(self.body_cut_short)
        if is_event_stream(response.headers):
            self.resource.active_streams += 1
            self.forwarder.finished.addBoth(self.stream_ended)
        response.deliverBody(self.forwarder)

    def stream_ended(self, result: None) -> None:
        self.resource.active_streams -= 1

    def fail(self, failure: Failure) -> None:
        self.pending = None
        if self.client_gone:
            return
        self.record.upstream_error = failure_kind(failure)
        error = upstream_error(failure)
        if isinstance(error, InternalError):
            log.failure(
                "Upstream request failed unexpectedly [ID: {request_id}]",
                failure,
                request_id=self.log_id,
            )
        else:
            log.warn(
                "Upstream error {status} for {url}: {message} [ID: {request_id}]",
                status=error.status,
                url=redact_url(self.url),
                message=error.message,
                request_id=self.log_id,
            )
        send_error(self.request, error)

    def body_cut_short(self, failure: Failure) -> None:
        # Cut by the proxy (STREAM_IDLE_TIMEOUT, TOTAL_TIMEOUT), or by the upstream.
        self.record.upstream_error = (
            "stream_timeout" if failure.check(BodyCutShort) else "body_incomplete"
        )
        log.warn(
            "Response body cut short, client response aborted: {reason} [ID: {request_id}]",
            reason=describe_exception(failure.value),
            request_id=self.log_id,
        )

    def total_expired(self) -> None:
        self.total_timer = None
        if self.forwarder is not None:
            self.forwarder.stop(f"TOTAL_TIMEOUT of {self.resource.total_timeout:g}s reached")

    def ended(self, result: Failure | None) -> None:
        """The client's response has ended, or the client has gone."""
        if self.total_timer is not None and self.total_timer.active():
            self.total_timer.cancel()
        if result is None:
            return
        self.client_gone = True
        if self.pending is not None:
            self.pending.cancel()
        elif self.forwarder is not None and self.forwarder.streaming:
            self.forwarder.stop(CLIENT_GONE)
        else:
            return
        self.resource.cancelled += 1
        log.info(
            "Client disconnected, upstream request cancelled [ID: {request_id}]",
            request_id=self.log_id,
        )

    def bug(self, failure: Failure) -> None:
        log.failure("Bug while proxying [ID: {request_id}]", failure, request_id=self.log_id)
        if not self.client_gone and not self.request.finished:
            send_error(self.request, InternalError("aiproxy failed to handle this request"))


class _Discard(Protocol):
    """Closes the connection of a response that is not passed on (it is being retried)."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopProducing()


def _may_have_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _declares_body(request: Request) -> bool:
    headers = request.requestHeaders
    return headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
