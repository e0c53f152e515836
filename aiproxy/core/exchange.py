"""
One client request, from the moment a door hands it over to the end of its response:
aiproxy's own answers (:class:`LocalAnswer`) and the upstream exchange
(:class:`ProxyExchange`) with its retries, timeouts, streaming and cancellation.

Both write their response through the door's :class:`ClientSide`, and both end the
same way: the completion record is filled in, logged and counted once.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from aiproxy.access.gate import speaks_anthropic
from aiproxy.access.limits import Admitted, Refusal, has_limits, token_estimate
from aiproxy.access.redis import Unavailable as LimiterUnavailable
from aiproxy.core.endpoints import (
    error_response,
    http_date,
    model_not_served_response,
    no_upstream_response,
    rate_limit_response,
)
from aiproxy.core.failures import Retry, classify, describe
from aiproxy.core.interfaces import (
    ClientSide,
    Incoming,
    LocalResponse,
    RawHeaders,
    RequestBody,
    TunnelEnd,
    UpstreamResponse,
)
from aiproxy.core.tunnel import Tunnel
from aiproxy.errors import InternalError, ProxyError, RateLimiterUnavailable, UpstreamTimeout
from aiproxy.ops.logger import log
from aiproxy.routing.choose import Choice, NotServed, Router, Unavailable
from aiproxy.rules.cors import add_response_headers, response_headers
from aiproxy.rules.headers import (
    UPGRADE_TO_WEBSOCKET,
    client_response_headers,
    header_values,
    is_event_stream,
    request_head,
    upstream_request_headers,
    with_rate_limits,
)
from aiproxy.rules.model import requested_model
from aiproxy.rules.redact import redact_url
from aiproxy.rules.retry import retry_after
from aiproxy.rules.usage import Usage, UsageMeter, usage_meter
from aiproxy.rules.websocket import take_subprotocol_key

if TYPE_CHECKING:
    from aiproxy.access.keys import KeyEntry
    from aiproxy.core.handler import ProxyCore
    from aiproxy.routing.routes import Route

__all__ = ["LocalAnswer", "ProxyExchange"]


_NO_BODY_STATUSES = frozenset({204, 304})
_KEY_STATUSES = frozenset({401, 403, 429})
"""Upstream statuses about the key a request used, not the upstream as a whole."""


class _Handled:
    """
    A request the core is answering: what every answer has in common, from aiproxy's
    own headers to the completion record.
    """

    __slots__ = ("client", "core", "done", "request")

    def __init__(self, core: ProxyCore, request: Incoming, client: ClientSide) -> None:
        self.core = core
        self.request = request
        self.client = client
        self.done = False

    def own_headers(self, headers: RawHeaders) -> RawHeaders:
        """``headers`` with aiproxy's own added: request ID, timing, CORS."""
        request = self.request
        elapsed = self.core.clock.seconds() - request.arrived_at
        headers.append((b"X-Request-ID", request.request_id))
        headers.append((b"X-Process-Time", b"%.4f" % elapsed))
        headers.append((b"X-Proxy-By", self.core.proxy_by))
        cors = self.core.cors
        if cors is not None:
            origin = header_values(request.headers, b"origin")
            if origin:
                add_response_headers(headers, response_headers(cors, origin[0]))
        return headers

    def answer(self, response: LocalResponse) -> None:
        """Send ``response``, whole, and end."""
        if self.done:
            return
        request = self.request
        headers = [(b"Date", http_date(self.core.clock.seconds())), *response.headers]
        body = response.body
        has_body = response.status not in _NO_BODY_STATUSES
        if has_body:
            headers.append((b"Content-Length", b"%d" % len(body)))
        has_body = has_body and request.method != b"HEAD"
        self.client.send_head(
            response.status,
            _reason(response.status),
            self.own_headers(headers),
            len(body) if response.status not in _NO_BODY_STATUSES else None,
            has_body,
        )
        request.record.status = response.status
        if has_body and body:
            self.client.send_body((body,), None)
            request.record.bytes_out = len(body)
        self.client.finish()
        self.end(cancelled=False)

    def answer_error(self, error: ProxyError) -> None:
        """Answer with ``error``'s status and JSON body."""
        self.answer(error_response(error, self.request.request_id))

    def end(self, cancelled: bool) -> None:
        """The response has ended (or the client left): record, log and count it, once."""
        if self.done:
            return
        self.done = True
        self.core.ended(self, cancelled)

    def client_gone(self) -> None:
        """The client left before the response ended."""
        self.end(cancelled=True)

    def abort(self) -> None:
        """End the response unfinished (a drain that ran out of time)."""
        if not self.done:
            self.client.abort()
            self.client_gone()


class LocalAnswer(_Handled):
    """A request aiproxy answers itself, at once."""

    __slots__ = ()


class ProxyExchange(_Handled):
    """
    A request forwarded to the upstream, and its response relayed as it arrives.

    Attempts are sent until one gives a response or the retry rules
    (:mod:`aiproxy.core.failures`, ``RETRY_ON_STATUS``) say to stop; with several
    upstreams (``UPSTREAMS_FILE``) an attempt that failed where the same rules allow it
    goes at once to another upstream or key (``FAILOVER_ON_STATUS``, ``MAX_FAILOVERS``),
    before any retry. The response head must come within ``REQUEST_TIMEOUT``
    (``TOTAL_TIMEOUT`` if sooner) of the request's arrival. The body is relayed piece
    by piece with the client's flow control pausing the upstream; it is cut off after
    ``STREAM_IDLE_TIMEOUT`` seconds without data and at ``TOTAL_TIMEOUT``. When the
    client leaves, the upstream request is dropped at once.
    """

    __slots__ = (
        "active",
        "admission",
        "attempt",
        "body",
        "bytes_out",
        "choice",
        "deadline",
        "failovers",
        "headers_timer",
        "key",
        "meter",
        "model",
        "pending",
        "response",
        "retry_timer",
        "route",
        "router",
        "sticky",
        "stream",
        "timed_out",
        "total_timer",
        "tried",
        "tried_keys",
        "tunnel",
        "upgrading",
        "wait",
    )

    def __init__(
        self,
        core: ProxyCore,
        request: Incoming,
        body: RequestBody,
        client: ClientSide,
        *,
        key: KeyEntry | None = None,
        upgrading: bool = False,
    ) -> None:
        """
        @param key: the access key the request presented, if access keys are on.
        @param upgrading: a WebSocket upgrade that the client's door can tunnel.
        """
        super().__init__(core, request, client)
        self.body = body
        self.attempt = 0
        self.pending: Deferred[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.retry_timer: IDelayedCall | None = None
        self.headers_timer: IDelayedCall | None = None
        self.total_timer: IDelayedCall | None = None
        self.timed_out = False
        self.meter: UsageMeter | None = None
        self.bytes_out = 0
        self.active = False
        self.stream = False
        self.deadline = 0.0
        self.wait = 0.0
        self.upgrading = upgrading
        self.tunnel: Tunnel | None = None
        self.key = key
        self.admission: Admitted | None = None  # its share of the key's limits
        self.route: Route = core.route  # where the attempt goes
        # With several upstreams: what the router chose for the attempt, the router
        # (a reload replaces it), the request's model, and what its attempts failed at.
        self.choice: Choice | None = None
        self.router: Router | None = None
        self.model: str | None = None
        self.sticky: str | None = None
        self.failovers = 0
        self.tried: tuple[str, ...] = ()
        self.tried_keys: tuple[str, ...] = ()

    # -- sending -------------------------------------------------------------------

    def start(self) -> None:
        """Send the first attempt, once the key's limits admit it; a model that no
        upstream serves is answered ``404`` at once."""
        core = self.core
        routes = core.routes
        if routes is not None:
            body = self.body
            if routes.reads_model and isinstance(body, bytes) and body:
                self.model = model = requested_model(body)
                if model is not None and not routes.router.serves(model):
                    self._not_served(model)
                    return
            if core.sticky_upstreams and self.key is not None:
                self.sticky = self.key.id
        wait = core.request_timeout
        clock = core.clock
        if core.total_timeout:
            wait = min(wait, core.total_timeout)
            self.total_timer = clock.callLater(core.total_timeout, self._total_expired)
        self.wait = wait  # REQUEST_TIMEOUT, or TOTAL_TIMEOUT if sooner
        self.deadline = clock.seconds() + wait
        self.headers_timer = clock.callLater(wait, self._headers_expired)
        self._admit()

    def _admit(self) -> None:
        """Take the request's share of its key's limits (tokens reserved: an estimate of
        the prompt and the most it may generate), then send it."""
        key, limiter = self.key, self.core.limiter
        if key is None or limiter is None or not has_limits(key):
            self._send()
            return
        tokens = 0
        if key.tpm or key.tpd:
            body = self.body
            if isinstance(body, bytes):
                tokens = token_estimate(body, None, self.core.default_max_tokens)
            else:
                tokens = token_estimate(None, body.length, self.core.default_max_tokens)
        result = limiter.admit(key.id, key, tokens)
        if isinstance(result, Deferred):
            result.addCallback(self._admitted).addErrback(self._bug)
        else:
            self._admitted(result)

    def _admitted(self, result: Admitted | Refusal | LimiterUnavailable) -> None:
        if isinstance(result, Refusal):
            assert self.key is not None
            self.request.record.auth_refusal = result.kind
            anthropic = speaks_anthropic(self.request.target.partition(b"?")[0])
            self.answer(rate_limit_response(result, self.key.id, anthropic))
        elif isinstance(result, LimiterUnavailable):
            self.answer_error(RateLimiterUnavailable(result.reason))
        elif self.done:  # the client left while the limiter answered
            result.release()
        else:
            self.admission = result
            self._send()

    def _send(self) -> None:
        """Send an attempt: to the one upstream, or where the router chooses."""
        self.retry_timer = None
        routes = self.core.routes
        if routes is None:
            self._send_to(self.route, None)
            return
        self.router = routes.router
        choice = routes.router.choose(self.model, sticky=self.sticky)
        if isinstance(choice, Choice):
            self._send_to(routes.route(choice), choice)
        elif isinstance(choice, NotServed):  # the file was reloaded without it
            self._not_served(choice.model)
        else:
            self._unavailable(choice)

    def _send_to(self, route: Route, choice: Choice | None) -> None:
        """Send an attempt to ``route``, with the key ``choice`` names if it does."""
        core = self.core
        request = self.request
        self.route = route
        self.choice = choice
        credentials = core.upstream_credentials
        if choice is not None:
            request.record.upstream = choice.upstream.name
            if choice.key is not None:
                credentials = [choice.key.header(choice.upstream.auth_header)]
        sent = request.headers
        if self.upgrading and credentials is not None:
            sent = take_subprotocol_key(sent)[1]  # the client's key never goes upstream
        headers = upstream_request_headers(
            sent,
            client_ip=None if request.peer is None else request.peer.encode("ascii"),
            scheme=request.scheme,
            request_id=request.request_id,
            credentials=credentials,
        )
        if self.upgrading:
            headers += UPGRADE_TO_WEBSOCKET
        body = self.body
        length = len(body) if isinstance(body, bytes) else body.length
        head = request_head(
            request.method, route.target.prefix + request.target, route.host, headers, length
        )
        d = route.client.request(request.method, head, body)
        self.pending = d
        d.addCallbacks(self._got_response, self._attempt_failed)
        d.addErrback(self._bug)

    def _url(self) -> str:
        """The upstream URL of this request, for the log (secrets redacted)."""
        target = self.route.target
        return redact_url(target.origin + target.prefix + self.request.target)

    def _may_repeat(self, rule: Retry) -> bool:
        """Whether ``rule`` lets this request be sent again, body included."""
        body = self.body
        return rule.allows(self.request.method) and (isinstance(body, bytes) or body.replayable())

    def _may_retry(self, rule: Retry) -> bool:
        return self.attempt < self.core.retry_policy.max_retries and self._may_repeat(rule)

    def _fail_over(self, rule: Retry, reason: str, *, key_only: bool = False) -> bool:
        """
        Send the request at once to the next choice of the router, skipping the
        upstream that failed it (only its key when ``key_only``), if ``rule`` allows
        sending it again and ``MAX_FAILOVERS`` and the deadline allow another attempt;
        whether it was sent.
        """
        core = self.core
        routes = core.routes
        failed = self.choice
        if (
            routes is None
            or failed is None
            or self.failovers >= core.max_failovers
            or core.clock.seconds() >= self.deadline
            or not self._may_repeat(rule)
        ):
            return False
        name = failed.upstream.name
        if key_only and failed.key is not None:
            self.tried_keys += (failed.key.fingerprint,)
        else:
            self.tried += (name,)
        self.router = routes.router
        choice = routes.router.choose(
            self.model, sticky=self.sticky, tried=self.tried, tried_keys=self.tried_keys
        )
        if not isinstance(choice, Choice):
            return False
        self.failovers += 1
        record = self.request.record
        record.failed_over_from += (name,)
        log.warn(
            "Failing over {method} {url} from upstream {failed} to {upstream}: {reason}"
            " [ID: {request_id}]",
            method=self.request.method.decode("ascii", "replace"),
            url=self._url(),
            failed=name,
            upstream=choice.upstream.name,
            reason=reason,
            request_id=record.request_id,
        )
        self._send_to(routes.route(choice), choice)
        return True

    def _not_served(self, model: str) -> None:
        """Answer ``404 model_not_found``: no upstream serves ``model``."""
        anthropic = speaks_anthropic(self.request.target.partition(b"?")[0])
        self.answer(model_not_served_response(model, anthropic))

    def _unavailable(self, unavailable: Unavailable) -> None:
        """Answer ``503``: every upstream that serves the request is cooling down,
        ejected or without a usable key; ``Retry-After`` says until when."""
        self.request.record.upstream_error = "no_upstream_available"
        wait = unavailable.retry_after
        self.answer(no_upstream_response(self.request.request_id, wait))

    def _retry(self, delay: float, reason: str) -> bool:
        """Send the request again after ``delay`` unless that is too late; whether it will."""
        core = self.core
        if core.clock.seconds() + delay >= self.deadline:
            return False  # its answer could not come in time: keep this outcome
        self.attempt += 1
        core.retries += 1
        self.request.record.retries = self.attempt
        log.warn(
            "Retrying {method} {url} in {delay:.3f}s (retry {retry} of {max_retries}):"
            " {reason} [ID: {request_id}]",
            method=self.request.method.decode("ascii", "replace"),
            url=self._url(),
            delay=delay,
            retry=self.attempt,
            max_retries=core.retry_policy.max_retries,
            reason=reason,
            request_id=self.request.record.request_id,
        )
        self.retry_timer = core.clock.callLater(delay, self._send)
        return True

    def _attempt_failed(self, failure: Failure) -> None:
        self.pending = None
        choice = self.choice
        if self.done:
            if choice is not None:
                self._judged().abandoned(choice)
            return
        exception: BaseException = failure.value  # type: ignore[assignment]
        if self.timed_out:
            exception = UpstreamTimeout(
                f"the upstream sent no response headers within {self.wait:g}s"
            )
        verdict = classify(exception)
        if choice is not None:
            if verdict.kind is None or verdict.kind == "internal":
                self._judged().abandoned(choice)
            else:
                self._judged().failed(choice)
                if self._fail_over(verdict.failover, verdict.reason):
                    return
        if self._may_retry(verdict.retry):
            delay = self.core.retry_policy.backoff(self.attempt + 1)
            if self._retry(delay, verdict.reason):
                return
        self._cancel_headers_timer()
        record = self.request.record
        record.upstream_error = verdict.kind
        if verdict.kind == "internal":
            log.failure(
                "Upstream request failed unexpectedly [ID: {request_id}]",
                failure,
                request_id=record.request_id,
            )
        elif verdict.kind is not None:
            log.warn(
                "Upstream error {status} for {url}: {message} [ID: {request_id}]",
                status=verdict.error.status,
                url=self._url(),
                message=verdict.error.message,
                request_id=record.request_id,
            )
        self.answer_error(verdict.error)

    def _headers_expired(self) -> None:
        self.headers_timer = None
        if self.done:
            return
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    def _cancel_headers_timer(self) -> None:
        if self.headers_timer is not None:
            self.headers_timer.cancel()
            self.headers_timer = None

    # -- the response --------------------------------------------------------------

    def _judged(self) -> Router:
        """The router that chose the attempt, to be told how it went."""
        assert self.router is not None
        return self.router

    def _got_response(self, response: UpstreamResponse) -> None:
        self.pending = None
        core = self.core
        status = response.status
        choice = self.choice
        if choice is not None:
            self._upstream_answered(choice, status, response.headers)
        if self.done:
            response.abort()
            return
        if (
            choice is not None
            and status in core.failover_on_status
            and self._fail_over(
                Retry.ALWAYS,
                f"the upstream answered {status}",
                key_only=status in _KEY_STATUSES,
            )
        ):
            response.abort()  # its body is not wanted
            return
        if status in core.retry_policy.retry_on_status and self._may_retry(Retry.ALWAYS):
            asked = retry_after(response.headers, core.clock.seconds())
            delay = core.retry_policy.backoff(self.attempt + 1) if asked is None else asked
            if self._retry(delay, f"the upstream answered {status}"):
                response.abort()
                return
        self._cancel_headers_timer()
        request = self.request
        record = request.record
        record.upstream_status = status
        record.status = status
        record.upstream_headers_after = core.clock.seconds() - request.arrived_at
        if core.debug:
            log.debug(
                "Response {status} from {url}",
                status=status,
                url=self._url(),
                request_id=record.request_id,
            )
        upstream_headers = response.headers
        if response.tunnel is not None:
            self._open_tunnel(response, response.tunnel)
            return
        headers = self.own_headers(client_response_headers(upstream_headers))
        if self.admission is not None:
            headers = with_rate_limits(headers, self.admission.headers)
        if choice is not None and core.upstream_name_header:
            headers.append((b"X-Upstream", choice.upstream.name.encode()))
        self.response = response
        has_body = response.has_body
        self.client.send_head(status, response.reason, headers, response.length, has_body)
        if has_body:
            self.meter = usage_meter(upstream_headers)
            if is_event_stream(upstream_headers):
                self.stream = True
                core.active_streams += 1
            self.client.pause_upstream_with(response.producer)
            core.idle_sweep.watch(self)
        response.deliver(self)
        if not self.done:
            self.client.flush()

    def _upstream_answered(self, choice: Choice, status: int, headers: RawHeaders) -> None:
        """Tell the router what the upstream answered (a ``429`` cools its key for the
        wait it asks, a ``401``/``403`` disables the key: logged, by fingerprint)."""
        wait = retry_after(headers, self.core.clock.seconds()) if status == 429 else None
        self._judged().answered(choice, status, wait)
        if status in (401, 403) and choice.key is not None:
            log.error(
                "Upstream {upstream} refused its key {fingerprint} ({status}): the key is"
                " not used again until the upstreams file is reloaded [ID: {request_id}]",
                upstream=choice.upstream.name,
                fingerprint=choice.key.fingerprint,
                status=status,
                request_id=self.request.record.request_id,
            )

    def _open_tunnel(self, response: UpstreamResponse, upstream: TunnelEnd) -> None:
        """The upstream switched to WebSocket: relay its ``101`` as sent, then bytes."""
        client = self.client.upgrade(response.status, response.reason, response.headers)
        log.info(
            "Tunnel opened: {method} {path} [ID: {request_id}]",
            method=self.request.record.method,
            path=self.request.record.path,
            request_id=self.request.record.request_id,
        )
        self.tunnel = Tunnel(self, client, upstream)
        self.tunnel.start()

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        """The tunnel has closed: the exchange ends with it."""
        self.request.record.tunnel_closed_by = tunnel.closed_by
        self.bytes_out = tunnel.bytes_out
        self.end(cancelled=False)

    def body_received(self, pieces: list[bytes], raw_chunked: bytes | None) -> None:
        """Pass body bytes on at once, and show them to the usage meter."""
        if self.done:
            return
        self.active = True
        self.client.send_body(pieces, raw_chunked)
        meter = self.meter
        for piece in pieces:
            self.bytes_out += len(piece)
            if meter is not None:
                try:
                    meter.feed(piece)
                except Exception:  # a bug in the meter must not break the response
                    log.failure("Token usage meter failed; this response's usage is not counted")
                    self.meter = meter = None

    def body_done(self) -> None:
        """The body is complete: finish the client's response."""
        if self.done:
            return
        self.client.pause_upstream_with(None)
        self.client.finish()
        self.end(cancelled=False)

    def body_failed(self, reason: Exception) -> None:
        """The upstream broke off the body: the client's response is cut off too."""
        if self.done:
            return
        self.request.record.upstream_error = "body_incomplete"
        self._cut(describe(reason))

    def _cut(self, reason: str) -> None:
        """End the response early: drop the upstream, abort the client's response."""
        log.warn(
            "Response body cut short, client response aborted: {reason} [ID: {request_id}]",
            reason=reason,
            request_id=self.request.record.request_id,
        )
        response = self.response
        if response is not None:
            response.abort()
        self.client.pause_upstream_with(None)
        self.client.abort()
        self.end(cancelled=False)

    def expired(self) -> None:
        """``STREAM_IDLE_TIMEOUT`` passed without upstream data (see :class:`IdleSweep`)."""
        if self.done:
            return
        self.request.record.upstream_error = "stream_timeout"
        timeout = self.core.idle_sweep.timeout
        self._cut(
            f"no upstream data for {timeout:g}s (STREAM_IDLE_TIMEOUT)",
        )

    def _total_expired(self) -> None:
        self.total_timer = None
        if self.tunnel is not None:
            self.tunnel.end("proxy", f"TOTAL_TIMEOUT of {self.core.total_timeout:g}s reached")
            return
        if self.done or self.response is None:
            return  # before the response head, the headers deadline covers it
        self.request.record.upstream_error = "stream_timeout"
        self._cut(
            f"TOTAL_TIMEOUT of {self.core.total_timeout:g}s reached",
        )

    # -- the end ---------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client left: drop the upstream request at once, so it stops generating."""
        if self.done:
            return
        if self.tunnel is not None:  # a drain out of time
            self.tunnel.end("proxy", "the graceful shutdown ran out of time", abort=True)
            return
        pending, self.pending = self.pending, None
        response = self.response
        if pending is not None or self.retry_timer is not None or response is not None:
            self.core.cancelled += 1
            log.info(
                "Client disconnected, upstream request cancelled [ID: {request_id}]",
                request_id=self.request.record.request_id,
            )
        # Ended first (the retry timer with it), so that the cancelled attempt's failure
        # is seen as the client's doing, not answered as an upstream error.
        self.end(cancelled=True)
        if pending is not None:
            pending.cancel()
        elif response is not None:
            response.abort()

    def end(self, cancelled: bool) -> None:
        """Stop every timer and watch, then record the request."""
        if self.done:
            return
        core = self.core
        self._cancel_headers_timer()
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.response is not None:
            core.idle_sweep.forget(self)
        if self.stream:
            core.active_streams -= 1
        record = self.request.record
        record.bytes_out = self.bytes_out
        if self.meter is not None:
            record.usage = self.meter.result()
        admission = self.admission
        if admission is not None:
            if record.upstream_status is None:  # the upstream was never reached
                admission.release()
            else:
                admission.settle(_tokens_used(record.usage))
        super().end(cancelled)

    def _bug(self, failure: Failure) -> None:
        log.failure(
            "Bug while proxying [ID: {request_id}]",
            failure,
            request_id=self.request.record.request_id,
        )
        if self.done:
            return
        if self.response is None:
            self.answer_error(InternalError("aiproxy failed to handle this request"))
        else:
            self.client.abort()
            self.end(cancelled=False)


def _tokens_used(usage: Usage | None) -> int | None:
    """All the tokens a response says it used; L{None} if it does not say."""
    if usage is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
        return None
    return (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
