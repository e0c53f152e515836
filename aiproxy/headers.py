"""
Pure header rules: what crosses the proxy in each direction, and what it adds.

Headers are handled as raw bytes with every value kept (``getAllRawHeaders`` /
``setRawHeaders``), so repeated headers survive in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from twisted.web.http_headers import Headers

__all__ = [
    "HOP_BY_HOP",
    "choose_request_id",
    "client_response_headers",
    "connection_tokens",
    "end_to_end",
    "new_request_id",
    "upstream_request_headers",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
"""RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded."""

REPLACED_ON_REQUEST = frozenset(
    {
        # The upstream's own, set by the HTTP client from the upstream URL.
        b"host",
        # Framing of the body we send, set by the HTTP client from the body producer.
        b"content-length",
        # twisted.web answered 100-continue itself; the body is already here.
        b"expect",
        # Set by the proxy below.
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)

_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,199}\Z")


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The lower-case header names listed in ``headers``' ``Connection`` values."""
    return frozenset(
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", ())
        for token in value.split(b",")
        if token.strip()
    )


def end_to_end(
    headers: Headers, also_drop: frozenset[bytes] = frozenset()
) -> Iterator[tuple[bytes, Sequence[bytes]]]:
    """
    Every header except hop-by-hop ones, those ``Connection`` names, and ``also_drop``.

    @param also_drop: further lower-case names to leave out.
    """
    drop = HOP_BY_HOP | also_drop
    if headers.hasHeader(b"connection"):
        drop = drop | connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in drop:
            yield name, values


def new_request_id() -> bytes:
    """A fresh unique request ID: 32 random hex digits."""
    return os.urandom(16).hex().encode("ascii")


def choose_request_id(
    incoming: Iterable[bytes] | None, new_id: Callable[[], bytes] = new_request_id
) -> bytes:
    """
    The client's ``X-Request-ID`` when it is one sane token, else a fresh unique one.

    A sane token is 1-200 characters of letters, digits and ``._:@+=/-``.
    """
    values = list(incoming or ())
    if len(values) == 1 and _SANE_REQUEST_ID.match(values[0]):
        return values[0]
    return new_id()


def upstream_request_headers(
    incoming: Headers, *, client_ip: bytes | None, scheme: bytes, request_id: bytes
) -> Headers:
    """
    The headers to send upstream for a client's request.

    End-to-end headers (``Authorization`` included) pass unchanged. ``X-Forwarded-For``
    gains the client's IP address (none for a UNIX socket peer); ``X-Forwarded-Proto``
    and ``X-Forwarded-Host`` say how the client reached the proxy; ``X-Request-ID``
    carries the request's ID.
    """
    outgoing = Headers()
    for name, values in end_to_end(incoming, REPLACED_ON_REQUEST):
        outgoing.setRawHeaders(name, values)
    chain = list(incoming.getRawHeaders(b"x-forwarded-for", ()))
    if client_ip is not None:
        chain.append(client_ip)
    if chain:
        outgoing.setRawHeaders(b"X-Forwarded-For", [b", ".join(chain)])
    outgoing.setRawHeaders(b"X-Forwarded-Proto", [scheme])
    host = incoming.getRawHeaders(b"host")
    if host:
        outgoing.setRawHeaders(b"X-Forwarded-Host", host[:1])
    outgoing.setRawHeaders(b"X-Request-ID", [request_id])
    return outgoing


def client_response_headers(upstream: Headers) -> Iterator[tuple[bytes, Sequence[bytes]]]:
    """
    The headers to send the client for an upstream response.

    End-to-end headers pass unchanged. An event stream (``text/event-stream``) also
    gets ``X-Accel-Buffering: no`` and ``Cache-Control: no-cache`` unless the upstream
    set them, so that a buffering proxy in front (nginx) passes events at once.
    """
    yield from end_to_end(upstream)
    content_type = upstream.getRawHeaders(b"content-type")
    if content_type and content_type[0].lower().startswith(b"text/event-stream"):
        if not upstream.hasHeader(b"x-accel-buffering"):
            yield b"X-Accel-Buffering", [b"no"]
        if not upstream.hasHeader(b"cache-control"):
            yield b"Cache-Control", [b"no-cache"]
