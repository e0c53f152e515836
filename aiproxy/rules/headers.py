"""
Pure header rules: what crosses the proxy in each direction, and what it adds.

Headers are handled as raw bytes with every value kept (``getAllRawHeaders`` /
``setRawHeaders``), so repeated headers survive in order.
"""

from __future__ import annotations

import ipaddress
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
    "is_event_stream",
    "new_request_id",
    "original_client",
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


def original_client(
    peer: str | None,
    forwarded_for: Sequence[bytes],
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str | None:
    """
    The address of the client a request came from, as far as it can be believed.

    That is the peer's address, unless the peer is one of the ``trusted`` proxies: then
    ``X-Forwarded-For`` (``forwarded_for``, every value) is read from the right, past
    each trusted proxy, to the first address that is not one; if every address is
    trusted, the leftmost. An entry that is not an IP address ends the walk at the
    proxy that added it, since nothing left of it can be believed.

    @param peer: the connection's peer address; L{None} for a UNIX socket peer.
    """
    if peer is None or not trusted or not _is_trusted(_parse_ip(peer), trusted):
        return peer
    client = peer
    for value in reversed(forwarded_for):
        for item in reversed(value.split(b",")):
            address = item.strip().decode("ascii", "replace")
            if not address:
                continue
            ip = _parse_ip(address)
            if ip is None:
                return client
            client = address
            if not _is_trusted(ip, trusted):
                return client
    return client


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    return ip is not None and any(ip in network for network in trusted)


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
    if is_event_stream(upstream):
        if not upstream.hasHeader(b"x-accel-buffering"):
            yield b"X-Accel-Buffering", [b"no"]
        if not upstream.hasHeader(b"cache-control"):
            yield b"Cache-Control", [b"no-cache"]


def is_event_stream(headers: Headers) -> bool:
    """Whether ``headers`` are those of a server-sent event stream."""
    content_type = headers.getRawHeaders(b"content-type")
    if not content_type:
        return False
    return content_type[0].lower().startswith(b"text/event-stream")
