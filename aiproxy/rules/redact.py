"""
Pure rules that keep secrets out of log lines: header values, URL query values and
passwords, and key-shaped text in exception messages and tracebacks.

One rule says which names are secret, for headers and query parameters alike. It is
broad on purpose: a false positive hides a harmless value from a log line, a false
negative writes an API key to it. A name is secret when, lower-cased (and for a query
parameter, percent-decoded), it

- contains ``auth``, ``token``, ``secret``, ``passw``, ``cookie``, ``session``,
  ``credential``, ``signature``, ``apikey``, ``api-key`` or ``api_key``
  (``Authorization``, ``Proxy-Authorization``, ``X-Auth-Token``, ``Cookie``,
  ``Set-Cookie``, ``access_token``, ``client_secret``, ``password``,
  ``X-Amz-Signature``...); or
- ends with ``key`` (``key``, ``api-key``, ``x-api-key``, ``x-goog-api-key``,
  ``Ocp-Apim-Subscription-Key``, ``apiKey``...); or
- is ``sig``, ``code`` or ``pwd`` (Azure SAS signatures, OAuth authorization codes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from twisted.web.http_headers import Headers

__all__ = [
    "REDACTED",
    "is_secret_name",
    "redact_headers",
    "redact_text",
    "redact_url",
]

REDACTED = "[REDACTED]"

_SECRET_NAME = re.compile(
    r"auth|token|secret|passw|cookie|session|credential|signature|apikey|api-key|api_key"
    r"|key$|^(?:sig|code|pwd)$"
)

# Authorization schemes shown in front of the redacted credentials. An unknown first
# word is redacted with the rest: it may be a bare key followed by something else.
_AUTH_SCHEMES = frozenset(
    {"basic", "bearer", "digest", "negotiate", "ntlm", "hoba", "mutual", "aws4-hmac-sha256"}
)

# name=value after "?", "&", ";" or "#": query parameters, and fragments such as
# "#access_token=". A URL's value runs to the next separator; in free text it also stops
# at white space, quotes and angle brackets.
_URL_QUERY = re.compile(r"[?#]")
_URL_PARAM = re.compile(r"(?<=[?&;#])([^=?&;#]+)=([^&;#]+)")
_TEXT_PARAM = re.compile(r"(?<=[?&;#])([^=?&;#\s'\"<>]+)=([^&;#\s'\"<>\\]+)")
# The userinfo of a URL's authority, up to its last "@".
_URL_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)([^/?#]*)@")
_TEXT_USERINFO = re.compile(r"(?<=://)([^/?#@\s'\":]*)(:?)([^/?#\s'\"]*)@")
# Keys recognisable by their shape: OpenAI and Anthropic ("sk-..."), Google ("AIza..."),
# and a bearer token quoted in a message.
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|AIza[A-Za-z0-9_-]{30,})|(?<=\b[Bb]earer )[A-Za-z0-9._~+/=-]+"
)


def is_secret_name(name: str | bytes) -> bool:
    """Whether a header or query parameter called ``name`` carries a secret value."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return _SECRET_NAME.search(name.lower()) is not None


def redact_url(url: bytes | str) -> str:
    """
    ``url`` as text for a log line, with the values of secret parameters (in the query
    or the fragment) and the password of the authority replaced by ``[REDACTED]``.

    Everything else is kept as it was: no re-quoting, parameters in order, repeated
    keys, blank values and keys without ``=``. A userinfo with no password is redacted
    whole, since it is often a token by itself: ``https://[REDACTED]@host/``.
    """
    text = url.decode("ascii", "replace") if isinstance(url, bytes) else url
    if "@" in text:
        text = _URL_USERINFO.sub(_redact_userinfo, text, count=1)
    elif "?" not in text and "#" not in text:
        return text
    query = _URL_QUERY.search(text)
    if query is None:
        return text
    start = query.start()
    return text[:start] + _URL_PARAM.sub(_redact_param, text[start:])


def redact_headers(
    headers: Headers | Iterable[tuple[bytes, Sequence[bytes]]],
) -> dict[str, list[str]]:
    """
    Headers as text for a log line, every value kept in order, secret values replaced.

    An ``Authorization``-like value keeps a known scheme (``Bearer [REDACTED]``); other
    values go through :func:`redact_url`, so a ``Referer`` or ``Location`` URL loses
    its secret query values too.
    """
    pairs = headers.getAllRawHeaders() if isinstance(headers, Headers) else headers
    result: dict[str, list[str]] = {}
    for raw_name, values in pairs:
        name = _text(raw_name)
        if not is_secret_name(name):
            shown = [redact_url(_text(value)) for value in values]
        elif "authori" in name.lower():
            shown = [_redact_credentials(_text(value)) for value in values]
        else:
            shown = [REDACTED for _ in values]
        result.setdefault(name, []).extend(shown)
    return result


def redact_text(text: str) -> str:
    """
    Free text, such as an exception message or a traceback, with the secrets of any
    URL in it redacted, and keys recognisable by their shape (``sk-...``, ``AIza...``,
    ``Bearer ...``) replaced by ``[REDACTED]``.
    """
    text = _TEXT_USERINFO.sub(_redact_text_userinfo, text)
    text = _TEXT_PARAM.sub(_redact_param, text)
    return _KEY_SHAPES.sub(REDACTED, text)


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _redact_param(match: re.Match[str]) -> str:
    name = match.group(1)
    if "%" in name:
        name = unquote(name)
    return f"{match.group(1)}={REDACTED}" if is_secret_name(name) else match.group(0)


def _redact_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}:{REDACTED}@" if colon else f"{match.group(1)}{REDACTED}@"


def _redact_text_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.groups()
    return f"{user}:{REDACTED}@" if colon else f"{REDACTED}@"


def _redact_credentials(value: str) -> str:
    scheme, space, _ = value.strip().partition(" ")
    return f"{scheme} {REDACTED}" if space and scheme.lower() in _AUTH_SCHEMES else REDACTED
