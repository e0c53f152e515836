"""
Pure rules of WebSocket upgrades: recognising one, and the API key a browser sends in
the ``Sec-WebSocket-Protocol`` list because it cannot set headers
(``realtime, openai-insecure-api-key.<key>``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = ["KEY_SUBPROTOCOL", "is_websocket_upgrade", "take_subprotocol_key"]

KEY_SUBPROTOCOL = "openai-insecure-api-key."
"""The prefix of the subprotocol entry that carries an API key."""

_PROTOCOL = b"sec-websocket-protocol"


def take_subprotocol_key(headers: RawHeaders) -> tuple[str | None, RawHeaders]:
    """
    The key of an ``openai-insecure-api-key.<key>`` entry of ``Sec-WebSocket-Protocol``
    (L{None} if there is none), and the headers with every such entry removed: a field
    left empty is dropped, never sent empty.
    """
    key: str | None = None
    kept: RawHeaders = []
    for name, value in headers:
        if len(name) != len(_PROTOCOL) or name.lower() != _PROTOCOL:
            kept.append((name, value))
            continue
        entries = []
        for entry in value.split(b","):
            text = entry.strip().decode("ascii", "replace")
            if text.startswith(KEY_SUBPROTOCOL):
                key = key or text[len(KEY_SUBPROTOCOL) :] or None
            elif text:
                entries.append(text.encode("ascii"))
        if entries:
            kept.append((name, b", ".join(entries)))
    return key, kept


def is_websocket_upgrade(headers: RawHeaders) -> bool:
    """Whether the request asks to switch to the WebSocket protocol (``Upgrade: websocket``)."""
    for name, value in headers:
        # Nearly every request has no Upgrade: comparing lengths first spares lowering.
        if len(name) == 7 and name.lower() == b"upgrade":
            for token in value.split(b","):
                if token.strip().lower() == b"websocket":
                    return True
    return False
