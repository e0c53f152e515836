"""
The upstream target, and the pure rules that turn a client's request target into the
upstream URL.

The upstream URL is always built by concatenating the client's raw request target onto
the configured origin and path prefix: no URL joining, no re-quoting, so no request can
name another host and ``%2F``, ``%7E`` or repeated query keys reach the upstream as sent.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import attrs
import hyperlink

__all__ = [
    "Target",
    "TargetError",
    "has_dot_segments",
    "is_origin_form",
    "local_target",
    "parse_target",
]

DEFAULT_PORTS = {"http": 80, "https": 443}

_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]*")
_ORIGIN_FORM = re.compile(rb"/(?!/)[\x21-\x7e]*")
# A "." or ".." path segment, the dots and the slash after them plain or
# percent-encoded, a backslash counting as a slash (as some servers take it).
_DOT_SEGMENT = re.compile(rb"(?:^|/|\\|%2f|%5c)(?:\.|%2e){1,2}(?:$|/|\\|%2f|%5c)", re.IGNORECASE)


class TargetError(ValueError):
    """The configured upstream URL cannot be used."""


@attrs.frozen
class Target:
    """Where every proxied request goes: one origin and an optional path prefix."""

    scheme: str
    host: str
    port: int
    prefix: bytes
    url: str

    @property
    def origin(self) -> bytes:
        """``scheme://host[:port]`` as bytes, the port only when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}".encode("ascii")

    def url_for(self, request_target: bytes) -> bytes:
        """
        The upstream URL for a client's origin-form request target.

        @param request_target: the raw path and query, beginning with one ``/``.
        """
        return self.origin + self.prefix + request_target


def parse_target(text: str) -> Target:
    """
    Parse and check an upstream base URL such as ``https://host/openai``.

    @raise TargetError: the URL is not an absolute http(s) URL with a host, or it has
        credentials, a query or a fragment.
    """
    try:
        return _parse_target(text)
    except TargetError:
        raise
    except ValueError as e:  # hyperlink's and urllib's parse errors
        raise TargetError(f"{text!r} is not a URL: {e}") from None


def _parse_target(text: str) -> Target:
    url = hyperlink.URL.from_text(text)
    scheme = url.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise TargetError(f"{text!r} must start with http:// or https://")
    if not url.host:
        raise TargetError(f"{text!r} has no host")
    if url.userinfo:
        raise TargetError(f"{text!r} must not carry credentials")
    parts = urlsplit(text)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise TargetError(f"{text!r} must not have a query or fragment")
    try:
        host = url.host if _is_ip_literal(url.host) else url.to_uri().host
        port = url.port if url.port is not None else DEFAULT_PORTS[scheme]
    except ValueError as e:  # IDNA errors are ValueErrors too
        raise TargetError(f"{text!r} has an invalid host or port: {e}") from None
    if not 0 < port < 65536:
        raise TargetError(f"{text!r} has an invalid port")
    prefix = parts.path.rstrip("/").encode("utf-8")
    if not _VISIBLE_ASCII.fullmatch(prefix):
        raise TargetError(f"{text!r} has a path with characters that must be percent-encoded")
    return Target(scheme, host, port, prefix, text)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_origin_form(request_target: bytes) -> bool:
    """
    Whether a request target is an ordinary path: exactly one leading ``/``, then only
    visible ASCII characters.

    Absolute-form (``http://other/``), authority-form (``host:443``), ``*``, targets
    starting with ``//`` or ``@``, and targets with control characters, spaces or
    non-ASCII bytes are not proxied.
    """
    return _ORIGIN_FORM.fullmatch(request_target) is not None


def has_dot_segments(request_target: bytes) -> bool:
    """
    Whether the path of a request target has a ``.`` or ``..`` segment, plain or
    percent-encoded (``/../x``, ``/%2e%2e/x``, ``/..%2Fx``, ``/.%2e\\x``).

    The proxy appends the target to ``TARGET_URL``'s path as it is; whether an upstream
    then resolves ``/prefix/../secret`` outside the prefix is up to it, so such targets
    are refused instead.
    """
    path = request_target.partition(b"?")[0]
    if b"." not in path and b"%" not in path:
        return False
    return _DOT_SEGMENT.search(path) is not None


def local_target(request_target: bytes, depth: int) -> bytes:
    """
    The part of a request target below a resource mounted ``depth`` segments deep.

    ``local_target(b"/openai/v1/models?x=/y", 1) == b"/v1/models?x=/y"``; the
    remaining bytes are returned exactly as received.
    """
    if depth == 0:
        return request_target
    path, question, query = request_target.partition(b"?")
    segments = path.split(b"/", depth + 1)
    rest = segments[depth + 1] if len(segments) > depth + 1 else b""
    return b"/" + rest + question + query
