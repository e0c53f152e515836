"""
What an HTTP/2 client may send before its connection is closed: a look at each frame's
9-byte header as the bytes arrive, before h2 parses them, so that a flood is stopped by
counting, not by parsing (and buffering) it.

:class:`FrameWatch` counts control frames per :data:`WINDOW` seconds (SETTINGS, PING,
RST_STREAM, PRIORITY, WINDOW_UPDATE, empty DATA, unknown types) and the CONTINUATION
frames and bytes of each header block; it says which limit a frame broke, or L{None}.
It takes the time as an argument and keeps no clock: it is pure.
"""

from __future__ import annotations

from typing import NamedTuple

from h2.errors import ErrorCodes

from aiproxy.rules.framing import MAX_HEAD_SIZE

__all__ = [
    "CONTROL_LIMITS",
    "MAX_CONCURRENT_STREAMS",
    "MAX_CONTINUATIONS",
    "MAX_HEADER_BLOCK",
    "WINDOW",
    "FrameWatch",
    "Violation",
]

PREFACE_SIZE = 24
"""The client connection preface (``PRI * HTTP/2.0...``), before the first frame."""

MAX_CONCURRENT_STREAMS = 100
"""Streams a client may have open at once (``SETTINGS_MAX_CONCURRENT_STREAMS``)."""

MAX_CONTINUATIONS = 16
"""CONTINUATION frames one header block may have (a 64 KiB block needs 4 at most)."""

MAX_HEADER_BLOCK = MAX_HEAD_SIZE
"""Bytes one compressed header block may have, HEADERS and CONTINUATION frames together."""

WINDOW = 10.0
"""Seconds over which control frames are counted."""

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_OTHER = -1  # unknown frame types, and empty DATA frames that do not end their stream

CONTROL_LIMITS = {
    _SETTINGS: 100,
    _PING: 100,
    _RST_STREAM: 200,  # rapid reset (CVE-2023-44487)
    _PRIORITY: 1000,
    _WINDOW_UPDATE: 20000,
    _OTHER: 100,
}
"""Frames of each kind a client may send per :data:`WINDOW` (ACKs are not counted)."""

_NAMES = {
    _SETTINGS: "SETTINGS",
    _PING: "PING",
    _RST_STREAM: "RST_STREAM",
    _PRIORITY: "PRIORITY",
    _WINDOW_UPDATE: "WINDOW_UPDATE",
    _OTHER: "empty or unknown",
}


class Violation(NamedTuple):
    """A limit a client broke: the GOAWAY code it gets, and why (for the log)."""

    error_code: ErrorCodes
    reason: str


class FrameWatch:
    """
    Reads the frame headers of what a client sends and counts what it may only send
    so often; what is between the headers (the payloads) is skipped, not kept.
    """

    def __init__(self) -> None:
        self._skip = PREFACE_SIZE  # bytes before the next frame header
        self._partial = b""  # the start of a frame header split between reads
        self._counts: dict[int, int] = dict.fromkeys(CONTROL_LIMITS, 0)
        self._window_start = 0.0
        self._block_frames = -1  # CONTINUATION frames of the open header block; -1: none
        self._block_bytes = 0
        self.block_opened_at: float | None = None
        """When the header block that is still incomplete began; L{None}: none is."""

    def scan(self, data: bytes, now: float) -> Violation | None:
        """Look at the frame headers in ``data`` (the next bytes of the connection)."""
        pos = self._skip
        size = len(data)
        if pos >= size:
            self._skip = pos - size
            return None
        if self._partial:
            need = 9 - len(self._partial)
            header = self._partial + data[pos : pos + need]
            if len(header) < 9:
                self._partial = header
                self._skip = 0
                return None
            self._partial = b""
            violation = self._frame(header, 0, now)
            if violation is not None:
                return violation
            pos += need + int.from_bytes(header[:3], "big")
        while pos + 9 <= size:
            violation = self._frame(data, pos, now)
            if violation is not None:
                return violation
            pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
        if pos < size:
            self._partial = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - size
        return None

    def _frame(self, data: bytes, pos: int, now: float) -> Violation | None:
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind = data[pos + 3]
        flags = data[pos + 4]
        if self._block_frames >= 0:
            if kind != _CONTINUATION:
                return None  # h2 answers a broken header block with PROTOCOL_ERROR
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > MAX_CONTINUATIONS:
                return Violation(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"over {MAX_CONTINUATIONS} CONTINUATION frames in one header block",
                )
            if self._block_bytes > MAX_HEADER_BLOCK:
                return Violation(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"a header block over {MAX_HEADER_BLOCK} bytes",
                )
            if flags & _END_HEADERS:
                self._block_frames = -1
                self.block_opened_at = None
            return None
        if kind in (_HEADERS, _PUSH_PROMISE):
            if length > MAX_HEADER_BLOCK:
                return Violation(
                    ErrorCodes.ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_BLOCK} bytes"
                )
            if not flags & _END_HEADERS:
                self._block_frames = 0
                self._block_bytes = length
                self.block_opened_at = now
            return None
        if kind == _DATA:
            if length or flags & _END_STREAM:
                return None
            kind = _OTHER
        elif kind in (_SETTINGS, _PING):
            if flags & _ACK:
                return None
        elif kind in (_GOAWAY, _CONTINUATION):
            return None  # a CONTINUATION out of place: h2's PROTOCOL_ERROR
        elif kind not in CONTROL_LIMITS:
            kind = _OTHER
        if now - self._window_start >= WINDOW:
            self._window_start = now
            counts = self._counts
            for key in counts:
                counts[key] = 0
        count = self._counts[kind] = self._counts[kind] + 1
        limit = CONTROL_LIMITS[kind]
        if count > limit:
            return Violation(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"over {limit} {_NAMES[kind]} frames in {WINDOW:g}s",
            )
        return None
