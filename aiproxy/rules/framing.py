"""
Pure rules for a request head: what aiproxy refuses before reading a body, on top of
what twisted.web's parser refuses by itself.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from aiproxy.errors import InvalidRequest, ProxyError

__all__ = ["MAX_HEADER_LINES", "MAX_HEAD_SIZE", "framing_error"]

MAX_HEAD_SIZE = 65536
"""The largest request head, request line and header lines with their line ends, in bytes."""

MAX_HEADER_LINES = 100
"""The most header lines one request head may have (Envoy's default)."""


def framing_error(version: bytes, headers: Headers) -> ProxyError | None:
    """
    Why a request head that twisted.web parsed must still be refused; L{None} if it is fine.

    twisted.web itself refuses invalid, negative or repeated ``Content-Length`` values,
    ``Content-Length`` together with ``chunked``, and transfer codings other than
    ``chunked`` and ``identity``. This adds the rest of RFC 9112's rules that decide how
    long the body is, so that no message with ambiguous framing is forwarded:

      - ``Transfer-Encoding`` must be exactly ``chunked``: twisted.web ignores
        ``identity`` (obsolete since RFC 7230) and would read the body as the next
        request;
      - an HTTP/1.0 request must not have a ``Transfer-Encoding`` (RFC 9112 section 6.1);
      - an HTTP/1.1 request has exactly one ``Host`` (RFC 9112 section 3.2).

    @param version: the request line's version, ``HTTP/1.1`` or ``HTTP/1.0``.
    """
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None:
        if version != b"HTTP/1.1":
            return InvalidRequest("an HTTP/1.0 request cannot have a Transfer-Encoding")
        if any(coding.lower() != b"chunked" for coding in codings):
            return InvalidRequest("the only Transfer-Encoding accepted is chunked")
    if version == b"HTTP/1.1":
        hosts = headers.getRawHeaders(b"host")
        if hosts is None or len(hosts) != 1:
            return InvalidRequest("an HTTP/1.1 request must have exactly one Host header")
    return None
