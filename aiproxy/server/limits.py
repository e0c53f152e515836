"""
What a client may send to any front door, and how slowly, and how long an idle or
refused client connection stays open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from aiproxy.config import Config

__all__ = ["CLIENT_IDLE_TIMEOUT", "CLOSE_TIMEOUT", "LINGER", "ClientLimits"]

CLIENT_IDLE_TIMEOUT = 75.0
"""Seconds a connection with nothing in flight may stay silent before it is closed."""

LINGER = 5.0
"""
Seconds a refused client may go on sending (what it sends is dropped) before its
connection is closed, so that a client that sends its whole body before reading gets
to read the error, instead of a connection reset (RFC 9112 section 9.6).
"""

CLOSE_TIMEOUT = 15.0
"""Seconds a closing connection may take to flush what is left; then it is aborted."""


@attrs.frozen
class ClientLimits:
    """How much a client may send, and how slowly."""

    max_body_size: int
    """The largest request body, in bytes."""
    header_timeout: float
    """Seconds from the first byte of a request head to its end; also the body's grace."""
    body_min_rate: int
    """Bytes per second a request body must average after the grace; 0 for no limit."""
    body_timeout: float = 0.0
    """Seconds from the end of a request head to the end of its body; 0 for no limit."""

    @classmethod
    def from_config(cls, config: Config) -> ClientLimits:
        """The limits ``config`` sets."""
        return cls(
            config.max_body_size, config.header_timeout, config.body_min_rate, config.body_timeout
        )
