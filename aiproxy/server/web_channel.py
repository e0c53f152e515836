"""
The HTTP/1.1 connection of :func:`aiproxy.server.web.build_site`, for programs that
embed aiproxy in a twisted.web ``Site``: twisted.web's ``HTTPChannel``, plus limits on
the request head, the framing rules twisted.web does not enforce, and deadlines for
slow clients. (aiproxy's own listeners use :mod:`aiproxy.server.http1` instead.)

It overrides one private method of ``HTTPChannel``, ``_respondToBadRequestAndDisconnect``
(listed, with a canary test, in :mod:`aiproxy._twisted`): twisted.web's bare ``400``
becomes aiproxy's JSON one.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from aiproxy.core.activity import Activity
from aiproxy.core.handler import PROXY_BY
from aiproxy.errors import ClientTooSlow, HeadTooLarge, InvalidRequest, ProxyError, error_body
from aiproxy.ops.logger import log
from aiproxy.rules.framing import MAX_HEAD_SIZE, MAX_HEADER_LINES, framing_error
from aiproxy.rules.headers import choose_request_id
from aiproxy.server.limits import LINGER, ClientLimits

__all__ = ["ProxyChannel"]


_HEAD = "head"
_BODY = "body"
_EARLY = 0.001
"""Seconds a deadline check may run early (float rounding) and still count as due."""


class ProxyChannel(HTTPChannel):
    """
    An ``HTTPChannel`` that refuses what a proxy must not forward, with a JSON error.

      - A request head over :data:`MAX_HEAD_SIZE` bytes (or with one line that long) or
        with more than :data:`MAX_HEADER_LINES` header lines: ``431``.
      - Obs-folded header lines, and the framing :func:`framing_error` refuses: ``400``;
        so is everything twisted.web's parser refuses (normally a bare ``400``).
      - A request head not complete ``header_timeout`` seconds after its first byte:
        ``408``. A body that arrives slower than ``body_min_rate`` bytes per second on
        average, after ``header_timeout`` seconds of grace (each ``body_min_rate`` bytes
        received buy one more second): ``408``, answered by the request.

    Each refusal closes the connection: at once after a ``408``, else after the
    client has closed its side or :data:`LINGER` seconds have passed, whichever comes
    first; what it sends meanwhile is dropped. One timer per connection watches the
    deadlines; it is moved only when a deadline could be missed, not for every request.
    """

    # twisted.web's own limits stay just out of the way, so that ours answer 431 first.
    MAX_LENGTH = MAX_HEAD_SIZE
    totalHeadersSize = MAX_HEAD_SIZE
    maxHeaders = MAX_HEADER_LINES

    def __init__(self, limits: ClientLimits, clock: IReactorTime, activity: Activity) -> None:
        super().__init__()
        self.limits = limits
        self.clock = clock
        self.activity = activity
        self._stopped = False  # refused, or handed over early: read nothing more
        self._linger_after_response = False
        self._head_size = 0
        self._head_lines = 0
        self._head_version = b""
        self._phase: str | None = None
        self._phase_started = 0.0
        self._body_received = 0
        self._deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        """The first byte of a request head starts the head's deadline."""
        if self._stopped:
            return
        if self._phase is None and self.line_mode:  # not reading a body, nor handling
            self._watch(_HEAD)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        """Count the head's size and lines, and refuse obs-folded header lines."""
        if self._stopped:  # what came with a refused request
            return
        size = self._head_size + len(line) + 2
        lines = self._head_lines
        if size > MAX_HEAD_SIZE:
            self.refuse(HeadTooLarge(f"the request head is larger than {MAX_HEAD_SIZE} bytes"))
            return
        if lines and line:  # a header line
            if line[0] in b" \t":
                self.refuse(InvalidRequest("obsolete line folding in the request head"))
                return
            if lines > MAX_HEADER_LINES:
                self.refuse(HeadTooLarge(f"the request has over {MAX_HEADER_LINES} header lines"))
                return
            self._head_lines, self._head_size = lines + 1, size
        elif line:  # the request line
            self._head_lines, self._head_size = 1, size
            self._head_version = line.rpartition(b" ")[2]
        elif lines:  # the end of the head
            self._head_lines = self._head_size = 0
        else:  # an empty line before a request line, which twisted.web skips once
            self._head_size = size
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line of the head is longer than the whole head may be."""
        self.refuse(HeadTooLarge(f"the request head is larger than {MAX_HEAD_SIZE} bytes"))

    def allHeadersReceived(self) -> None:
        """Refuse ambiguous framing and oversized bodies; watch the body's rate."""
        request = self.requests[-1]
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        error = framing_error(self._head_version, headers)
        if error is not None:
            self.refuse(error)
            return
        super().allHeadersReceived()
        if self.activity.draining:
            self.close_if_idle()
        if getattr(request, "refusal", None) is not None:  # e.g. its Content-Length
            self.stop_reading_body()
        elif self.length != 0 and self.limits.body_min_rate:
            self._watch(_BODY)
        else:
            self._phase = None

    def rawDataReceived(self, data: bytes) -> None:
        """Count the body's bytes for its rate."""
        if self._stopped:  # what came with a refused request
            return
        if self._phase is _BODY:
            self._body_received += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """The body is complete: stop watching it and handle the request."""
        if self._stopped:
            # twisted.web carries on parsing after a refusal; nothing more is handled.
            return
        self._phase = None
        super().allContentReceived()

    def stop_reading_body(self) -> None:
        """
        The request being received has refused its body (it has a ``refusal``): stop
        reading, hand the request over at once so that it answers with its error, and
        close the connection after that response.
        """
        if self._stopped:
            return
        self._stopped = True
        self._phase = None
        self.persistent = False
        request = self.requests[-1]
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        self._linger_after_response = not isinstance(request.refusal, ClientTooSlow)
        super().allContentReceived()

    def refuse(self, error: ProxyError) -> None:
        """Answer ``error`` to the request being received and close the connection."""
        if self._stopped:
            return
        self._stopped = True
        self._phase = None
        self._cancel_deadline()
        incoming = self.requests[-1].requestHeaders if self.requests else Headers()
        request_id = choose_request_id(incoming.getRawHeaders(b"x-request-id"))
        body = error_body(error, request_id)
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Content-Length": [b"%d" % len(body)],
                b"Connection": [b"close"],
                b"Date": [datetimeToString(self.clock.seconds())],
                b"X-Request-ID": [request_id],
                b"X-Proxy-By": [PROXY_BY],
            }
        )
        for name, value in error.headers:
            headers.addRawHeader(name, value)
        reason = HTTPStatus(error.status).phrase.encode("ascii")
        self.writeHeaders(b"HTTP/1.1", b"%d" % error.status, reason, headers)
        self.write(body)
        log.info(
            "Request refused: {status} {message} [Client: {client}] [ID: {request_id}]",
            status=error.status,
            message=error.message,
            client=getattr(self.getPeer(), "host", "unix"),
            request_id=request_id.decode("ascii"),
        )
        if isinstance(error, ClientTooSlow):
            self.loseConnection()
        else:
            self._linger()

    def loseConnection(self) -> None:
        """Close the connection; after a refused body's response, linger first."""
        if self._linger_after_response:
            self._linger_after_response = False
            self._linger()
        else:
            super().loseConnection()

    def _linger(self) -> None:
        """Stop writing, drop what the client still sends, close after :data:`LINGER`."""
        self._cancel_deadline()
        self._deadline = self.clock.callLater(LINGER, self._close_now)
        half_close = getattr(self.transport, "loseWriteConnection", None)  # not over TLS
        if half_close is not None:
            half_close()

    def _close_now(self) -> None:
        self._deadline = None
        super().loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's parser refuses the request: answer with the JSON ``400``."""
        self.refuse(InvalidRequest("the request is not valid HTTP/1.1"))

    def connectionMade(self) -> None:
        """Count the connection among the proxy's (for a graceful drain)."""
        super().connectionMade()
        self.activity.opened(self)

    def close_if_idle(self) -> None:
        """Close now if no request is in flight; else close after the current response."""
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
            return
        if not self.requests:
            self.loseConnection()
            return
        self.persistent = False
        request = self.requests[-1]
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the deadline timer; the connection no longer counts."""
        self.activity.closed(self)
        self._phase = None
        self._cancel_deadline()
        super().connectionLost(reason)

    def _watch(self, phase: str) -> None:
        """Start the deadline of ``phase``; the timer is moved only if it would be late."""
        now = self.clock.seconds()
        self._phase, self._phase_started, self._body_received = phase, now, 0
        timeout = self.limits.header_timeout
        if self._deadline is None:
            self._deadline = self.clock.callLater(timeout, self._check_deadline)
        elif self._deadline.getTime() > now + timeout:
            self._deadline.reset(timeout)

    def _check_deadline(self) -> None:
        self._deadline = None
        if self._phase is None:
            return
        due = self._phase_started + self.limits.header_timeout
        if self._phase is _BODY:
            due += self._body_received / self.limits.body_min_rate
        now = self.clock.seconds()
        if now + _EARLY < due:
            self._deadline = self.clock.callLater(due - now, self._check_deadline)
        elif self._phase is _HEAD:
            timeout = self.limits.header_timeout
            self.refuse(ClientTooSlow(f"the request head was not complete within {timeout:g}s"))
        else:
            request: Any = self.requests[-1]
            rate = self.limits.body_min_rate
            request.refuse(ClientTooSlow(f"the request body arrived slower than {rate} bytes/s"))
            self.stop_reading_body()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
