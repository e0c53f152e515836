"""
Pure rules for what reaches a log line: secrets kept out (header values, URL query
values and passwords, key-shaped text anywhere), and the control characters of
client-controlled text escaped so that one line stays one line and no terminal
escape sequence is replayed to the operator.

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
    "is_key_shaped",
    "is_secret_name",
    "loggable",
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
# Keys recognisable by their shape, wherever they appear (a path segment, a query value
# of any name, a request ID): OpenAI, Anthropic and most OpenAI-compatible APIs
# ("sk-..."), Stripe-style ("sk_live_..."), Google ("AIza..."), GitHub, Slack, AWS access
# key IDs, Hugging Face, Groq, xAI, Replicate, aiproxy's own access keys ("aip-..."), and
# JSON web tokens.
_KEY_SHAPE = (
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_-]{16,}|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|AIza[A-Za-z0-9_-]{30,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{20,}"
    r"|xai-[A-Za-z0-9]{20,}|r8_[A-Za-z0-9]{30,}|aip-[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"
)
_KEY_SHAPES = re.compile(_KEY_SHAPE)
# The same, and a bearer token quoted in a message.
_TEXT_SECRETS = re.compile(_KEY_SHAPE + r"|(?<=\b[Bb]earer )[A-Za-z0-9._~+/=-]+")
# What is escaped in client-controlled text: C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_key_shaped(text: str) -> bool:
    """Whether ``text`` contains something shaped like an API key or token."""
    return _KEY_SHAPES.search(text) is not None


def loggable(value: bytes) -> str:
    """
    Client-controlled bytes (a method, a path, a request ID, a header value) as text
    for a log line: bytes outside ASCII shown as ``\\xNN``, control characters as
    ``\\xNN`` too, and key-shaped parts replaced by ``[REDACTED]``.
    """
    text = value.decode("ascii", "backslashreplace")
    if _CONTROL.search(text) is not None:
        text = _CONTROL.sub(_escape, text)
    if _KEY_SHAPES.search(text) is not None:
        text = _KEY_SHAPES.sub(REDACTED, text)
    return text


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def is_secret_name(name: str | bytes) -> bool:
    """Whether a header or query parameter called ``name`` carries a secret value."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return _SECRET_NAME.search(name.lower()) is not None


def redact_url(url: bytes | str) -> str:
    """
    ``url`` as text for a log line, with the values of secret parameters (in the query
    or the fragment), the password of the authority and key-shaped text anywhere
    replaced by ``[REDACTED]``.

    Everything else is kept as it was: no re-quoting, parameters in order, repeated
    keys, blank values and keys without ``=``. A userinfo with no password is redacted
    whole, since it is often a token by itself: ``https://[REDACTED]@host/``.
    """
    text = url.decode("ascii", "replace") if isinstance(url, bytes) else url
    if _KEY_SHAPES.search(text) is not None:
        text = _KEY_SHAPES.sub(REDACTED, text)
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
    return _TEXT_SECRETS.sub(REDACTED, text)


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
