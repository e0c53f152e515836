"""
The one place where a failed upstream request becomes what everyone else sees of it:
the metrics label, the status and JSON error the client gets, and whether it may be
sent again.
"""

from __future__ import annotations

import enum

import attrs
from twisted.internet.defer import CancelledError

from aiproxy.errors import InternalError, ProxyError, UpstreamTimeout, UpstreamUnreachable
from aiproxy.rules.redact import redact_text
from aiproxy.rules.retry import IDEMPOTENT_METHODS
from aiproxy.upstream.errors import (
    BadResponse,
    ConnectFailed,
    LostBeforeResponse,
    StaleConnection,
    UpstreamFailure,
)

__all__ = ["Retry", "Verdict", "classify", "describe"]


class Retry(enum.Enum):
    """When a failed attempt may be sent again (if the body can be sent again too)."""

    NEVER = "never"
    ALWAYS = "always"
    """The upstream cannot have seen the request."""
    IDEMPOTENT = "idempotent"
    """The upstream may have seen it: only methods that are safe to repeat."""

    def allows(self, method: bytes) -> bool:
        """Whether a request with ``method`` may be sent again after this failure."""
        return self is Retry.ALWAYS or (self is Retry.IDEMPOTENT and method in IDEMPOTENT_METHODS)


@attrs.frozen
class Verdict:
    """
    What a failure means.

    @ivar kind: the ``aiproxy_upstream_errors_total`` label; L{None} when the upstream
        is not to blame (the client's body failed, or the client left).
    @ivar error: what the client is told, if it is still there.
    @ivar retry: whether the request may be sent again.
    @ivar reason: one line for the log (and the retry's log line), secrets redacted.
    @ivar failover: whether the request may go to another upstream instead; as
        ``retry``, except that a request that never reached the upstream may always go
        elsewhere (a TLS failure would fail again there, not at another upstream).
    """

    kind: str | None
    error: ProxyError
    retry: Retry
    reason: str
    failover: Retry = attrs.field()

    @failover.default
    def _same_as_retry(self) -> Retry:
        return self.retry


def classify(failure: BaseException) -> Verdict:
    """The :class:`Verdict` on an upstream attempt that failed with ``failure``."""
    text = describe(failure)
    if isinstance(failure, ConnectFailed):
        retry = Retry.NEVER if failure.kind == "tls" else Retry.ALWAYS
        error = UpstreamUnreachable(f"cannot connect to the upstream: {text}")
        return Verdict(failure.kind, error, retry, f"cannot connect: {text}", Retry.ALWAYS)
    if isinstance(failure, StaleConnection):
        error = UpstreamUnreachable(f"the upstream closed the connection: {text}")
        reason = f"kept-alive connection closed by the upstream: {text}"
        return Verdict(failure.kind, error, Retry.ALWAYS, reason)
    if isinstance(failure, LostBeforeResponse):
        error = UpstreamUnreachable(f"the upstream failed before responding: {text}")
        reason = f"connection failed before the response: {text}"
        return Verdict(failure.kind, error, Retry.IDEMPOTENT, reason)
    if isinstance(failure, BadResponse):
        error = UpstreamUnreachable(f"the upstream sent an invalid response: {text}")
        return Verdict(failure.kind, error, Retry.NEVER, text)
    if isinstance(failure, UpstreamFailure):
        error = UpstreamUnreachable(f"the upstream failed: {text}")
        return Verdict(failure.kind, error, Retry.NEVER, text)
    if isinstance(failure, UpstreamTimeout):
        return Verdict("timeout", failure, Retry.NEVER, text)
    if isinstance(failure, ProxyError):  # the client's body: too large, too slow
        return Verdict(None, failure, Retry.NEVER, text)
    if isinstance(failure, CancelledError):
        error = UpstreamUnreachable("the upstream request was cancelled")
        return Verdict(None, error, Retry.NEVER, text)
    bug = InternalError("aiproxy failed to handle this request")
    return Verdict("internal", bug, Retry.NEVER, text)


def describe(exception: BaseException) -> str:
    """One line about ``exception``, with any secret in it redacted: it is logged and sent."""
    text = str(exception).strip()
    if not text:
        return type(exception).__name__
    if isinstance(exception, (UpstreamFailure, ProxyError)):
        return redact_text(text)
    return f"{type(exception).__name__}: {redact_text(text)}"
