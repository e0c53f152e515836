"""
Pure header rules: what crosses the proxy in each direction, what it adds, and the
request head it sends upstream.

Headers are ``RawHeaders`` (see :mod:`aiproxy.core.interfaces`): ``(name, value)``
pairs of bytes in wire order and case, repeated names kept, so that every field
reaches the other side as it was sent. Names are matched case-insensitively: each
field's name, lowered, against a lower-case constant.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from random import getrandbits
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = [
    "CLIENT_CREDENTIALS",
    "HOP_BY_HOP",
    "UPGRADE_TO_WEBSOCKET",
    "choose_request_id",
    "client_response_headers",
    "connection_tokens",
    "end_to_end",
    "field_with_control_bytes",
    "has_header",
    "header_values",
    "is_event_stream",
    "new_request_id",
    "original_client",
    "request_head",
    "upstream_request_headers",
    "with_rate_limits",
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

UPGRADE_TO_WEBSOCKET = ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))
"""
The hop-by-hop fields a WebSocket upgrade sends upstream (the client's own are dropped
with the other hop-by-hop fields); ``Sec-WebSocket-*`` fields pass as end-to-end ones.
"""

REPLACED_ON_REQUEST = frozenset(
    {
        # The upstream's own: request_head sets it from the upstream URL.
        b"host",
        # Framing of the body we send: request_head sets it from the body's length.
        b"content-length",
        # The front door answers 100-continue itself; the body is already on its way.
        b"expect",
        # Set by the proxy below.
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)

_NOT_PASSED_ON_REQUEST = HOP_BY_HOP | REPLACED_ON_REQUEST

CLIENT_CREDENTIALS = frozenset(
    {b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key", b"ocp-apim-subscription-key"}
)
"""The headers a client's API credentials come in: none of them is passed on when the
proxy holds the upstream's credentials (see :func:`upstream_request_headers`)."""

_NOT_PASSED_WITH_CREDENTIALS = _NOT_PASSED_ON_REQUEST | CLIENT_CREDENTIALS

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
"""Methods whose requests normally carry a body: an empty one still says ``Content-Length: 0``."""

_EVENT_STREAM = b"text/event-stream"

_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,199}\Z")
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""RFC 9110 section 5.5: a field value has no control character but HTAB."""


def header_values(headers: RawHeaders, name: bytes) -> list[bytes]:
    """
    Every value of the field ``name`` in ``headers``, in order; empty if it is absent.

    @param name: the field's name in lower case.
    """
    # Comparing lengths first spares lowering the names that cannot match.
    size = len(name)
    return [value for field, value in headers if len(field) == size and field.lower() == name]


def has_header(headers: RawHeaders, name: bytes) -> bool:
    """
    Whether ``headers`` has a field ``name``.

    @param name: the field's name in lower case.
    """
    size = len(name)
    return any(len(field) == size and field.lower() == name for field, _ in headers)


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    """The lower-case tokens of comma-separated ``values``, blanks left out."""
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token:
                tokens.add(token.lower())
    return tokens


def _without(fields: RawHeaders, names: set[bytes]) -> RawHeaders:
    """``fields`` but those whose lower-case name is one of ``names``."""
    return [field for field in fields if field[0].lower() not in names]


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """The lower-case header names listed in ``headers``' ``Connection`` values."""
    return frozenset(_tokens(header_values(headers, b"connection")))


def end_to_end(headers: RawHeaders, also_drop: frozenset[bytes] = frozenset()) -> RawHeaders:
    """
    Every field except hop-by-hop ones, those ``Connection`` names, and ``also_drop``,
    in order and case.

    @param also_drop: further lower-case names to leave out.
    """
    drop = HOP_BY_HOP | also_drop if also_drop else HOP_BY_HOP
    kept: RawHeaders = []
    connection: list[bytes] = []
    for field in headers:
        name = field[0].lower()
        if name in drop:
            if name == b"connection":
                connection.append(field[1])
        else:
            kept.append(field)
    if connection:
        # Nearly always "keep-alive" or "close": nothing more to drop then.
        named = _tokens(connection) - drop
        if named:
            return _without(kept, named)
    return kept


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
    """
    A fresh unique request ID: 32 random hex digits.

    They come from the process's Mersenne Twister (seeded from the system's randomness,
    and again in a forked child), not from ``os.urandom``: a request ID must be unique,
    not secret, and a system call per request costs more than the rest of this module.
    """
    return b"%032x" % getrandbits(128)


def field_with_control_bytes(headers: RawHeaders) -> bytes | None:
    """
    The name of the first field whose value has a control character (NUL, CR, LF, ESC,
    DEL...: anything RFC 9110 forbids but HTAB); L{None} if there is none. llhttp
    refuses such values itself; other doors check with this.
    """
    search = _CONTROL_BYTE.search
    for name, value in headers:
        if search(value) is not None:
            return name
    return None


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
    incoming: RawHeaders,
    *,
    client_ip: bytes | None,
    scheme: bytes,
    request_id: bytes,
    credentials: RawHeaders | None = None,
) -> RawHeaders:
    """
    The headers to send upstream for a client's request (``Host`` and the body's
    framing aside: see :func:`request_head`).

    End-to-end headers (``Authorization`` included) pass unchanged, in their order and
    case. After them, ``X-Forwarded-For`` carries the chain of every incoming value
    plus the client's IP address (none for a UNIX socket peer), as one field;
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the first ``Host``) say how the
    client reached the proxy; ``X-Request-ID`` carries the request's ID. The client's
    own values of these are replaced.

    @param credentials: when the proxy holds the upstream's credentials, the fields
        to send instead of every one of :data:`CLIENT_CREDENTIALS` (the upstream's key,
        or none); L{None} passes the client's own through.
    """
    outgoing: RawHeaders = []
    chain: list[bytes] = []
    host: bytes | None = None
    connection: list[bytes] = []
    not_passed = _NOT_PASSED_ON_REQUEST if credentials is None else _NOT_PASSED_WITH_CREDENTIALS
    for field in incoming:
        name = field[0].lower()
        if name not in not_passed:
            outgoing.append(field)
        elif name == b"x-forwarded-for":
            chain.append(field[1])
        elif name == b"host":
            if host is None:
                host = field[1]
        elif name == b"connection":
            connection.append(field[1])
    if connection:
        named = _tokens(connection) - not_passed
        if named:
            outgoing = _without(outgoing, named)
    if credentials:
        outgoing += credentials
    if client_ip is not None:
        chain.append(client_ip)
    if chain:
        outgoing.append((b"X-Forwarded-For", b", ".join(chain)))
    outgoing.append((b"X-Forwarded-Proto", scheme))
    if host is not None:
        outgoing.append((b"X-Forwarded-Host", host))
    outgoing.append((b"X-Request-ID", request_id))
    return outgoing


def request_head(
    method: bytes, target: bytes, host: bytes, headers: RawHeaders, body_length: int | None
) -> bytes:
    """
    The whole HTTP/1.1 request head to send upstream, request line to empty line.

    That is ``method target HTTP/1.1``, then ``Host``, then ``headers`` in order, then
    the body's framing: ``Content-Length`` for a body of known length (``0`` too for
    ``POST``, ``PUT`` and ``PATCH``, whose upstreams would otherwise wait for a body;
    nothing for an empty body of another method), or ``Transfer-Encoding: chunked``
    for a body of unknown length.

    @param target: the request target, origin-form (``b"/v1/chat/completions"``).
    @param host: the ``Host`` value: the upstream's authority.
    @param headers: the fields to send (see :func:`upstream_request_headers`): no
        ``Host``, ``Content-Length`` or ``Transfer-Encoding``; checked by nobody here.
    @param body_length: the body's length, 0 or more; L{None} when it is not known
        in advance (sent chunked).
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    append = parts.append
    for name, value in headers:
        append(name)
        append(b": ")
        append(value)
        append(b"\r\n")
    if body_length is None:
        append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif body_length or method in _BODY_METHODS:
        append(b"Content-Length: %d\r\n\r\n" % body_length)
    else:
        append(b"\r\n")
    return b"".join(parts)


def with_rate_limits(headers: RawHeaders, limits: RawHeaders) -> RawHeaders:
    """
    ``headers`` (a response's) with the proxy's ``x-ratelimit-*`` fields ``limits``
    instead of the upstream's, when a proxy limit applies (``limits`` not empty).
    """
    if not limits:
        return headers
    kept = [(n, v) for n, v in headers if not n.lower().startswith(b"x-ratelimit-")]
    return kept + limits


SET_BY_THE_PROXY = frozenset({b"x-request-id", b"x-process-time", b"x-proxy-by"})
"""aiproxy's own response headers: the upstream's are replaced, never repeated."""

_NOT_RELAYED = HOP_BY_HOP | SET_BY_THE_PROXY


def client_response_headers(upstream: RawHeaders) -> RawHeaders:
    """
    The headers to send the client for an upstream response.

    End-to-end headers (``Content-Length`` included) pass unchanged, in their order and
    case, except aiproxy's own (:data:`SET_BY_THE_PROXY`), which it adds itself. An
    event stream (``text/event-stream``) also gets ``X-Accel-Buffering: no`` and
    ``Cache-Control: no-cache`` after them unless the upstream set them, so that a
    buffering proxy in front (nginx) passes events at once.
    """
    kept: RawHeaders = []
    connection: list[bytes] = []
    content_type: bytes | None = None
    accel_buffering = cache_control = False
    for field in upstream:
        name = field[0].lower()
        if name in _NOT_RELAYED:
            if name == b"connection":
                connection.append(field[1])
            continue
        kept.append(field)
        if name == b"content-type":
            if content_type is None:
                content_type = field[1]
        elif name == b"x-accel-buffering":
            accel_buffering = True
        elif name == b"cache-control":
            cache_control = True
    if connection:
        named = _tokens(connection) - HOP_BY_HOP
        if named:
            kept = _without(kept, named)
    if content_type is not None and _is_event_stream_type(content_type):
        if not accel_buffering:
            kept.append((b"X-Accel-Buffering", b"no"))
        if not cache_control:
            kept.append((b"Cache-Control", b"no-cache"))
    return kept


def is_event_stream(headers: RawHeaders) -> bool:
    """Whether ``headers`` are those of a server-sent event stream (by the first
    ``Content-Type``)."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return _is_event_stream_type(value)
    return False


def _is_event_stream_type(content_type: bytes) -> bool:
    return content_type[: len(_EVENT_STREAM)].lower() == _EVENT_STREAM
