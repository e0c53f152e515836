"""
Pure rules for a request head: how long its body is, and what aiproxy refuses before
reading any of it, on top of what the HTTP parser (llhttp, strict) refuses by itself.

Headers are ``RawHeaders``: ``(name, value)`` pairs of bytes in wire order and case.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from aiproxy.errors import InvalidRequest, ProxyError

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = [
    "MAX_HEADER_LINES",
    "MAX_HEAD_SIZE",
    "RequestFraming",
    "framing_error",
    "request_framing",
]

MAX_HEAD_SIZE = 65536
"""The largest request head, request line and header lines with their line ends, in bytes."""

MAX_HEADER_LINES = 100
"""The most header lines one request head may have (Envoy's default)."""

_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_DIGITS = frozenset(b"0123456789")


class RequestFraming(NamedTuple):
    """
    How a request's body is framed, from its head.

    @ivar length: the ``Content-Length``; L{None} when there is none (a chunked body,
        or no body at all).
    @ivar chunked: the body is sent with chunked framing.
    @ivar expect_continue: an HTTP/1.1 client waits for ``100 Continue`` before its body.
    """

    length: int | None
    chunked: bool
    expect_continue: bool


NO_BODY = RequestFraming(None, False, False)
"""The framing of a request without a body."""


def request_framing(version: bytes, headers: RawHeaders) -> RequestFraming:
    """
    The framing of a request's body, or :class:`InvalidRequest` if its head must be
    refused (one pass over the headers).

    The parser has already refused what it knows is broken: invalid, negative or
    repeated ``Content-Length`` values, ``Content-Length`` with ``Transfer-Encoding``,
    most transfer codings other than ``chunked``. These rules repeat those checks (so
    that they hold for any parser) and add the rest of RFC 9112's rules that decide how
    long the body is, so that no message with ambiguous framing is forwarded:

      - the version is ``HTTP/1.1`` or ``HTTP/1.0`` (llhttp also parses ``HTTP/0.9``
        and ``HTTP/2.0`` request lines);
      - ``Transfer-Encoding``, all of its fields together, is exactly one coding,
        ``chunked`` (llhttp takes ``identity, chunked``, and ``gzip`` then ``chunked``
        on two lines, for chunked); empty list elements are allowed (RFC 9110 section
        5.6.1);
      - an HTTP/1.0 request has no ``Transfer-Encoding`` (RFC 9112 section 6.1);
      - an HTTP/1.1 request has exactly one ``Host`` (RFC 9112 section 3.2);
      - at most one ``Content-Length``, of digits only, and not with
        ``Transfer-Encoding``.

    @param version: the request line's version, such as ``b"HTTP/1.1"``.
    @param headers: the request's header fields, values without surrounding whitespace.
    @raise InvalidRequest: the head must be refused with ``400``.
    """
    if version not in _VERSIONS:
        shown = version.decode("ascii", "replace")
        raise InvalidRequest(f"{shown} is not supported; use HTTP/1.1")
    hosts = 0
    length: bytes | None = None
    codings: list[bytes] | None = None
    expect_continue = False
    for name, value in headers:
        # Comparing lengths first spares lowering the names that cannot match.
        size = len(name)
        if size == 4:
            if name.lower() == b"host":
                hosts += 1
        elif size == 14:
            if name.lower() == b"content-length":
                if length is not None:
                    raise InvalidRequest("a request may have one Content-Length only")
                length = value
        elif size == 17:
            if name.lower() == b"transfer-encoding":
                if codings is None:
                    codings = []
                codings.extend(value.split(b","))
        elif size == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            expect_continue = True
    http11 = version == b"HTTP/1.1"
    if http11 and hosts != 1:
        raise InvalidRequest("an HTTP/1.1 request must have exactly one Host header")
    if codings is not None:
        if not http11:
            raise InvalidRequest("an HTTP/1.0 request cannot have a Transfer-Encoding")
        if length is not None:
            raise InvalidRequest("a request cannot have both Content-Length and Transfer-Encoding")
        named = [coding.strip().lower() for coding in codings]
        if [coding for coding in named if coding] != [b"chunked"]:
            raise InvalidRequest("the only Transfer-Encoding accepted is chunked")
        return RequestFraming(None, True, expect_continue and http11)
    if length is not None:
        if not length or not _DIGITS.issuperset(length):
            raise InvalidRequest("the Content-Length is not a number")
        if len(length.lstrip(b"0")) > 19:  # over 2**63, like llhttp's overflow
            raise InvalidRequest("the Content-Length is too large")
        return RequestFraming(int(length), False, expect_continue and http11)
    if expect_continue and http11:
        return RequestFraming(None, False, True)
    return NO_BODY


def framing_error(version: bytes, headers: RawHeaders) -> ProxyError | None:
    """
    Why a request head must be refused before its body is read; L{None} if it is fine.

    See :func:`request_framing` for the rules.
    """
    try:
        request_framing(version, headers)
    except InvalidRequest as error:
        return error
    return None
