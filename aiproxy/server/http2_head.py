"""
The pure rules for an HTTP/2 request's header block (RFC 9113 section 8), as strict as
the HTTP/1.1 door: what h2 decoded becomes the method, target and header fields the
core takes, or an error the stream is answered with.

h2's own validation is off (its errors end the whole connection, and it lets control
bytes through); these rules make each malformed request a stream error instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from aiproxy.core.interfaces import RawHeaders
from aiproxy.errors import HeadTooLarge, InvalidRequest
from aiproxy.rules.framing import MAX_HEADER_LINES, request_framing

__all__ = ["RequestHead", "request_head"]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_VISIBLE = re.compile(rb"[\x21-\x7e]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_WHITESPACE = b" \t"

# Fields that are hop-by-hop in HTTP/1.1 and malformed in HTTP/2 (RFC 9113 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})


class RequestHead(NamedTuple):
    """A valid request head: what the core is handed, and the body's declared length."""

    method: bytes
    target: bytes
    headers: RawHeaders
    length: int | None


def request_head(block: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """
    Check a decoded request header block and turn it into a :class:`RequestHead`.

    - Pseudo-header fields come first, each at most once, only ``:method``,
      ``:scheme``, ``:path`` and ``:authority``; ``:method`` is a token; ``:scheme`` and
      a ``:path`` of visible ASCII are required except for ``CONNECT`` (which the core
      answers with ``405``).
    - Field names are lowercase tokens; no connection-specific field; ``te`` is only
      ``trailers``; values have no control byte but HTAB and no surrounding whitespace;
      at most :data:`~aiproxy.rules.framing.MAX_HEADER_LINES` fields.
    - ``:authority`` becomes ``host`` when there is none (RFC 9113 section 8.3.1), and
      ``content-length`` follows the HTTP/1.1 door's rules
      (:func:`~aiproxy.rules.framing.request_framing`).

    @raise InvalidRequest: the request is malformed (``400``).
    @raise HeadTooLarge: it has too many fields (``431``).
    """
    pseudo: dict[bytes, bytes] = {}
    headers: RawHeaders = []
    has_host = False
    for name, value in block:
        if name[:1] == b":":
            if headers:
                raise InvalidRequest("a pseudo-header field follows a regular one")
            if name not in _PSEUDO:
                raise InvalidRequest("the request has an unknown pseudo-header field")
            if name in pseudo:
                raise InvalidRequest("the request repeats a pseudo-header field")
            pseudo[name] = value
            continue
        if len(headers) >= MAX_HEADER_LINES:
            raise HeadTooLarge(f"the request has over {MAX_HEADER_LINES} header fields")
        if _NAME.fullmatch(name) is None:
            raise InvalidRequest("a header field name is not a lowercase token")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise InvalidRequest("the request has a connection-specific header field")
        if value and (
            value[0] in _WHITESPACE or value[-1] in _WHITESPACE or _CONTROL.search(value)
        ):
            raise InvalidRequest("a header field value has a control character or padding")
        if name == b"host":
            has_host = True
        headers.append((name, value))
    method = pseudo.get(b":method")
    if method is None or _TOKEN.fullmatch(method) is None:
        raise InvalidRequest("the request method is missing or not valid")
    authority = pseudo.get(b":authority")
    if authority is not None and (_CONTROL.search(authority) or b" " in authority):
        raise InvalidRequest("the :authority is not valid")
    target = pseudo.get(b":path", b"")
    if method != b"CONNECT" and (b":scheme" not in pseudo or not target):
        raise InvalidRequest("the request has no :scheme or no :path")
    if target and _VISIBLE.fullmatch(target) is None:
        raise InvalidRequest("the request target is not valid")
    if authority is not None and not has_host:
        headers.insert(0, (b"host", authority))
    framing = request_framing(b"HTTP/1.1", headers) if method != b"CONNECT" else None
    return RequestHead(method, target, headers, None if framing is None else framing.length)
