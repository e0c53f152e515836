"""Requests the proxy turns away before forwarding: WebSocket upgrades (not tunnelled yet)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = ["is_websocket_upgrade"]


def is_websocket_upgrade(headers: RawHeaders) -> bool:
    """Whether the request asks to switch to the WebSocket protocol (``Upgrade: websocket``)."""
    for name, value in headers:
        # Nearly every request has no Upgrade: comparing lengths first spares lowering.
        if len(name) == 7 and name.lower() == b"upgrade":
            for token in value.split(b","):
                if token.strip().lower() == b"websocket":
                    return True
    return False
