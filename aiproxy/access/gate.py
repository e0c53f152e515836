"""
Who may pass, pure: the access key a request presents, looked up in the key ring, and
whether its entry allows the request's path and model.

A client presents its key the way its SDK sends one: ``Authorization: Bearer KEY``
(OpenAI SDKs), ``x-api-key: KEY`` (Anthropic SDKs) or ``api-key: KEY`` (Azure-style).
The same key in several of them is one key; two different ones is a ``400``.

The model is the ``model`` of a JSON body. A key limited to some models may send a
request without a body (``GET /v1/models``), or one whose JSON body names an allowed
model; any other body is refused (``403``), and so is a body too large to be held in
memory for the check (``413``): the proxy never reads a streamed body whole.
"""

from __future__ import annotations

from aiproxy.access.keys import KeyEntry, KeyRing
from aiproxy.core.interfaces import RawHeaders
from aiproxy.errors import (
    AccessRefused,
    BodyUncheckable,
    ConflictingKeys,
    KeyNotPermitted,
    KeyRefused,
)
from aiproxy.rules.model import requested_model
from aiproxy.rules.websocket import take_subprotocol_key

__all__ = ["ANTHROPIC_PATH", "authorize", "presented_keys", "speaks_anthropic"]

ANTHROPIC_PATH = b"/v1/messages"
"""Requests at or below this path are answered in Anthropic's error dialect."""

_INVALID = "invalid_api_key"
_MESSAGES = {
    "disabled": "The API key has been revoked.",
    "expired": "The API key has expired.",
    "not_yet_valid": "The API key is not valid yet.",
}


def speaks_anthropic(path: bytes) -> bool:
    """Whether a request for ``path`` (no query) expects Anthropic's error bodies."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + b"/")


def presented_keys(headers: RawHeaders) -> set[bytes]:
    """
    The distinct keys ``headers`` present (a non-``Bearer`` ``Authorization`` is none),
    the ``openai-insecure-api-key.<key>`` subprotocol of a browser's WebSocket included.
    """
    keys = set()
    in_subprotocol, _ = take_subprotocol_key(headers)
    if in_subprotocol:
        keys.add(in_subprotocol.encode("ascii", "replace"))
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                keys.add(credentials.strip())
        elif lowered in (b"x-api-key", b"api-key") and value.strip():
            keys.add(value.strip())
    return keys


def authorize(
    ring: KeyRing, headers: RawHeaders, path: bytes, body: bytes | None, now: float
) -> KeyEntry | AccessRefused:
    """
    The entry of the key a request presents, if it may make this request at ``now``;
    else the refusal to answer with.

    @param path: the request's path, without its query.
    @param body: the request body when it is in memory; L{None} when it streams.
    """
    keys = presented_keys(headers)
    if not keys:
        return KeyRefused(
            "No API key provided. Send one as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
            "missing_api_key",
            "missing",
        )
    if len(keys) > 1:
        return ConflictingKeys(
            "The request presents two different API keys; send one.",
            "conflicting_api_keys",
            "conflicting",
        )
    entry = ring.find(keys.pop())
    if entry is None:
        return KeyRefused("Incorrect API key provided.", _INVALID, "unknown")
    refusal = entry.refusal(now)
    if refusal is not None:
        return KeyRefused(_MESSAGES[refusal], _INVALID, refusal, entry.id)
    if not entry.allows_path(path):
        return KeyNotPermitted(
            "This API key may not be used for this path.", "path_not_allowed", "path", entry.id
        )
    if entry.models:
        return _model_refusal(entry, body) or entry
    return entry


def _model_refusal(entry: KeyEntry, body: bytes | None) -> AccessRefused | None:
    """Why ``entry``, limited to some models, may not send ``body``; L{None} if it may."""
    if body is None:
        return BodyUncheckable(
            "This API key may only use some models, and a request body this large (over"
            " 256 KiB over HTTP/1.1) cannot be checked for its model.",
            "request_too_large",
            "body_too_large",
            entry.id,
        )
    if not body:
        return None
    model = requested_model(body)
    if model is None:
        return KeyNotPermitted(
            "This API key may only use some models; the request body must be a JSON"
            " object that names one in 'model'.",
            "model_not_allowed",
            "model",
            entry.id,
        )
    if not entry.allows_model(model):
        return KeyNotPermitted(
            "This API key may not use the model requested.",
            "model_not_allowed",
            "model",
            entry.id,
        )
    return None
