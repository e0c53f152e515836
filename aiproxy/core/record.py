"""
What happened to one request, gathered while it is handled: the content of its
completion log line and of the metrics it moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from aiproxy.rules.usage import Usage, UsageMeter

__all__ = ["RequestRecord"]


@attrs.define
class RequestRecord:
    """
    One request's record, made by :meth:`aiproxy.core.handler.ProxyCore.incoming`,
    filled in by the door (the body's bytes) and the core (everything else).

    @ivar client: the client's address (see :func:`aiproxy.rules.headers.original_client`),
        ``unix`` for a UNIX socket peer.
    @ivar upstream_status: the status of the upstream's response; L{None} if none came.
    @ivar upstream_headers_after: seconds from the request's arrival to the upstream's
        response headers (retries included); L{None} if none came.
    @ivar duration: seconds from the request's arrival to the end of its response.
    @ivar bytes_in: request body bytes received from the client.
    @ivar bytes_out: response body bytes sent to the client.
    @ivar retries: how many times the upstream request was sent again.
    @ivar cancelled: the client left before its response ended.
    @ivar upstream_error: the kind of upstream failure (see
        :func:`aiproxy.core.failures.classify`), if there was one.
    @ivar usage_meter: what reads the model and token counts from the response body.
    @ivar usage: the model and token counts read from the response, if any.
    @ivar key_id: the id of the access key presented, when it was found (never the key).
    @ivar auth_refusal: why the request was refused for its access key (``missing``,
        ``unknown``, ``expired``, ``model``...), if it was.
    @ivar tunnel_closed_by: for a WebSocket tunnel, which side ended it (``client``,
        ``upstream`` or ``proxy``).
    @ivar upstream: with several upstreams, the name of the one the last attempt went to.
    @ivar failed_over_from: the upstreams the request failed over from, in order.
    """

    method: str = "-"
    path: str = "-"
    client: str = "-"
    request_id: str = "-"
    status: int = 0
    upstream_status: int | None = None
    upstream_headers_after: float | None = None
    duration: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    cancelled: bool = False
    upstream_error: str | None = None
    usage_meter: UsageMeter | None = None
    usage: Usage | None = None
    key_id: str | None = None
    auth_refusal: str | None = None
    tunnel_closed_by: str | None = None
    upstream: str | None = None
    failed_over_from: tuple[str, ...] = ()

    def log_fields(self) -> dict[str, Any]:
        """The record as the named fields of a log event (and of a JSON log line)."""
        usage = self.usage
        return {
            "method": self.method,
            "path": self.path,
            "client": self.client,
            "request_id": self.request_id,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "upstream_headers_after": self.upstream_headers_after,
            "duration": self.duration,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "retries": self.retries,
            "cancelled": self.cancelled,
            "upstream_error": self.upstream_error,
            "model": None if usage is None else usage.model,
            "prompt_tokens": None if usage is None else usage.prompt_tokens,
            "completion_tokens": None if usage is None else usage.completion_tokens,
            "key_id": self.key_id,
            "auth_refusal": self.auth_refusal,
            "tunnel_closed_by": self.tunnel_closed_by,
            "upstream": self.upstream,
            "failed_over_from": ", ".join(self.failed_over_from) or None,
        }

    def log_format(self) -> str:
        """
        The completion line's format: the product's documented line, then what is
        known of the upstream exchange, each part in brackets.
        """
        if self.cancelled:
            text = "Request aborted, connection lost before the response ended: "
        else:
            text = "Request completed: "
        text += "{method} {path} [Status: {status}] [Time: {duration:.3f}s] [ID: {request_id}]"
        text += " [Client: {client}]"
        if self.key_id is not None:
            text += " [Key: {key_id}]"
        if self.auth_refusal is not None:
            text += " [Refused: {auth_refusal}]"
        if self.upstream is not None:
            text += " [Via: {upstream}]"
        if self.upstream_status is not None:
            text += " [Upstream: {upstream_status} after {upstream_headers_after:.3f}s]"
        elif self.upstream_error is not None:
            text += " [Upstream: {upstream_error}]"
        text += " [Bytes: {bytes_in} in, {bytes_out} out]"
        usage = self.usage
        if usage is not None:
            if usage.model is not None:
                text += " [Model: {model}]"
            if usage.prompt_tokens is not None or usage.completion_tokens is not None:
                text += " [Tokens: {prompt_tokens} prompt, {completion_tokens} completion]"
        if self.retries:
            text += " [Retries: {retries}]"
        if self.failed_over_from:
            text += " [Failed over from: {failed_over_from}]"
        if self.tunnel_closed_by is not None:
            text += " [Tunnel closed by: {tunnel_closed_by}]"
        return text
