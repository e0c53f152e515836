"""
Pure CORS rules: which requests are preflights, how aiproxy answers them, and which
headers an actual response gets.

When CORS is enabled (``ENABLE_CORS``), aiproxy is the one CORS authority:

- A preflight (``OPTIONS`` with both ``Origin`` and ``Access-Control-Request-Method``)
  is answered by aiproxy and never forwarded: ``204`` for an allowed origin, or the
  JSON ``403 origin_not_allowed`` error, with no CORS headers, for another one.
- With ``CORS_METHODS`` / ``CORS_HEADERS`` of ``*``, a preflight answer reflects the
  request's ``Access-Control-Request-Method`` / ``Access-Control-Request-Headers``
  (and says ``Vary`` on them) rather than sending ``*``: a ``*`` does not cover
  ``Authorization`` and means nothing to a request with credentials.
- Every other response to a request with an ``Origin`` (proxied, aiproxy's own
  endpoints, errors) gets ``Access-Control-Allow-Origin`` (``*`` when ``CORS_ORIGINS``
  is ``*``, else the request's origin when it is on the list) and
  ``Access-Control-Expose-Headers`` for aiproxy's own headers. ``Vary: Origin`` is added
  when the answer depends on the origin (an explicit origin list).
- The upstream's ``Access-Control-Allow-Origin``, ``Access-Control-Allow-Credentials``
  and ``Access-Control-Expose-Headers`` are replaced by aiproxy's (dropped, for an
  origin not on the list), so they are never duplicated.

A request without ``Origin`` is left alone: that costs one header lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from aiproxy.config import Config
from aiproxy.rules.headers import has_header, header_values

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = [
    "EXPOSED_HEADERS",
    "MAX_AGE",
    "REPLACED_ON_RESPONSE",
    "CorsPolicy",
    "add_response_headers",
    "allowed_origin",
    "is_preflight",
    "preflight_headers",
    "response_headers",
]

MAX_AGE = 600
"""Seconds a browser may cache a preflight answer (``Access-Control-Max-Age``)."""

EXPOSED_HEADERS = b"X-Request-ID, X-Process-Time, X-Proxy-By"
"""aiproxy's own response headers, readable by the page's script."""

REPLACED_ON_RESPONSE = (
    b"Access-Control-Allow-Origin",
    b"Access-Control-Allow-Credentials",
    b"Access-Control-Expose-Headers",
)
"""The upstream's CORS headers of an actual response that aiproxy's replace."""

_REPLACED_NAMES = frozenset(name.lower() for name in REPLACED_ON_RESPONSE)

_WILDCARD = (b"*",)


def _encoded(items: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(item.strip().encode("ascii") for item in items if item.strip())


@attrs.frozen
class CorsPolicy:
    """
    What CORS allows: ``origins``, ``methods`` and ``headers`` as bytes, each either
    ``(b"*",)`` (anything) or an explicit list. Origins are compared lower-case and
    without a trailing ``/``.
    """

    origins: tuple[bytes, ...] = _WILDCARD
    methods: tuple[bytes, ...] = _WILDCARD
    headers: tuple[bytes, ...] = _WILDCARD
    max_age: int = MAX_AGE

    @classmethod
    def from_config(cls, config: Config) -> CorsPolicy | None:
        """The policy of ``config``; L{None} when CORS is disabled."""
        if not config.enable_cors:
            return None
        origins = tuple(o.lower().rstrip(b"/") for o in _encoded(config.cors_origins))
        return cls(
            origins=_WILDCARD if b"*" in origins else origins,
            methods=_wildcard_or(_encoded(config.cors_methods)),
            headers=_wildcard_or(_encoded(config.cors_headers)),
        )

    @property
    def any_origin(self) -> bool:
        return self.origins == _WILDCARD


def _wildcard_or(items: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return _WILDCARD if b"*" in items else items


def is_preflight(method: bytes, headers: RawHeaders) -> bool:
    """Whether a request is a CORS preflight: ``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``."""
    return (
        method == b"OPTIONS"
        and has_header(headers, b"origin")
        and has_header(headers, b"access-control-request-method")
    )


def allowed_origin(policy: CorsPolicy, origin: bytes) -> bytes | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin``; L{None} if not allowed."""
    if policy.any_origin:
        return b"*"
    if origin.lower().rstrip(b"/") in policy.origins:
        return origin
    return None


def response_headers(policy: CorsPolicy, origin: bytes) -> list[tuple[bytes, bytes]]:
    """The CORS headers of any response to a request from ``origin`` (none if it is not
    allowed). ``Vary`` values are to be merged with the response's own."""
    allow = allowed_origin(policy, origin)
    result: list[tuple[bytes, bytes]] = []
    if not policy.any_origin:
        result.append((b"Vary", b"Origin"))
    if allow is not None:
        result.append((b"Access-Control-Allow-Origin", allow))
        result.append((b"Access-Control-Expose-Headers", EXPOSED_HEADERS))
    return result


def preflight_headers(policy: CorsPolicy, request: RawHeaders) -> list[tuple[bytes, bytes]]:
    """
    The headers that answer a preflight from an allowed origin, besides those of
    :func:`response_headers`: the allowed methods and headers, and ``Max-Age``.
    """
    result: list[tuple[bytes, bytes]] = []
    vary: list[bytes] = []
    if policy.methods == _WILDCARD:
        method = (header_values(request, b"access-control-request-method") or [b""])[0]
        result.append((b"Access-Control-Allow-Methods", method.strip()))
        vary.append(b"Access-Control-Request-Method")
    else:
        result.append((b"Access-Control-Allow-Methods", b", ".join(policy.methods)))
    if policy.headers == _WILDCARD:
        asked = b", ".join(header_values(request, b"access-control-request-headers"))
        if asked.strip():
            result.append((b"Access-Control-Allow-Headers", asked.strip()))
        vary.append(b"Access-Control-Request-Headers")
    elif policy.headers:
        result.append((b"Access-Control-Allow-Headers", b", ".join(policy.headers)))
    result.append((b"Access-Control-Max-Age", b"%d" % policy.max_age))
    result.extend((b"Vary", name) for name in vary)
    return result


def add_response_headers(headers: RawHeaders, added: Iterable[tuple[bytes, bytes]]) -> None:
    """
    Put CORS headers on a response's ``headers``, a list changed in place: the
    upstream's of :data:`REPLACED_ON_RESPONSE` go, each of ``added`` replaces any field
    of its name (and comes after the response's own), and ``Vary`` names join the
    response's ``Vary`` unless already there. Names are matched in any case; the
    response's fields keep their order and case.
    """
    fields: dict[bytes, tuple[bytes, bytes]] = {}
    vary: list[bytes] = []
    for name, value in added:
        lower = name.lower()
        if lower == b"vary":
            vary.append(value)
        else:
            fields[lower] = (name, value)
    kept: RawHeaders = []
    vary_at = -1
    vary_values: list[bytes] = []
    for field in headers:
        lower = field[0].lower()
        if lower in _REPLACED_NAMES or lower in fields:
            continue
        if lower == b"vary":
            if vary_at < 0:
                vary_at = len(kept)
            vary_values.append(field[1])
        kept.append(field)
    if vary:
        kept = _with_vary(kept, vary_at, vary_values, vary)
    kept.extend(fields.values())
    headers[:] = kept


def _with_vary(
    fields: RawHeaders, vary_at: int, current: list[bytes], names: list[bytes]
) -> RawHeaders:
    """
    ``fields`` with ``names`` joined to its ``Vary`` (the ``current`` values, the first
    at ``vary_at``; -1 for none), as one field in the place of the first, unless ``Vary``
    already names them or is ``*``.
    """
    tokens = {t.strip().lower() for v in current for t in v.split(b",")}
    if b"*" in tokens:
        return fields
    missing: list[bytes] = []
    for name in names:
        if name.lower() not in tokens:
            tokens.add(name.lower())
            missing.append(name)
    if not missing:
        return fields
    joined = b", ".join([*(v for v in current if v.strip()), *missing])
    if vary_at < 0:
        fields.append((b"Vary", joined))
        return fields
    merged = (fields[vary_at][0], joined)
    if len(current) > 1:
        fields = [field for field in fields if field[0].lower() != b"vary"]
        fields.insert(vary_at, merged)
    else:
        fields[vary_at] = merged
    return fields
