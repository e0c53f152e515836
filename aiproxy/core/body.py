"""
Request bodies that are not all in memory, for the upstream client to send.

A body that a door has buffered in a file (twisted.web keeps bodies over 100 KB in a
temporary file) is sent with :class:`FileBody`: piece by piece, as fast as the upstream
connection takes them, and again from the start for a retry.
"""

from __future__ import annotations

import io
import os
from typing import IO

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from aiproxy.core.interfaces import BodySink, RequestBody

__all__ = ["FileBody", "body_of"]


def body_of(content: IO[bytes] | None, read_size: int) -> RequestBody:
    """
    The body held in ``content``: its bytes when it is in memory, else a
    :class:`FileBody` read in pieces of ``read_size`` bytes.
    """
    if content is None:
        return b""
    if isinstance(content, io.BytesIO):
        return content.getvalue()
    return FileBody(content.fileno(), read_size)


@implementer(IPullProducer)
class FileBody:
    """
    A body in a file, sent in pieces of at most ``read_size`` bytes. Each
    :meth:`start` reads from the first byte again, through the file descriptor at an
    offset of its own, so the file itself is never moved or closed.
    """

    def __init__(self, fd: int, read_size: int) -> None:
        self._fd = fd
        self._read_size = read_size
        self.length: int | None = os.fstat(fd).st_size
        self._offset = 0
        self._sink: BodySink | None = None

    def replayable(self) -> bool:
        """Always: the file stays until the request ends."""
        return True

    def start(self, sink: BodySink) -> None:
        """Send the body to ``sink`` from its first byte, a piece each time it asks."""
        self._offset = 0
        self._sink = sink
        sink.register_producer(self, False)

    def stop(self) -> None:
        """Send nothing more."""
        self._sink = None

    def resumeProducing(self) -> None:
        """The connection can take more: send the next piece (or finish)."""
        sink = self._sink
        if sink is None:
            return
        assert self.length is not None
        size = min(self._read_size, self.length - self._offset)
        data = os.pread(self._fd, size, self._offset) if size > 0 else b""
        if not data:
            self._sink = None
            sink.unregister_producer()
            sink.finish()
            return
        self._offset += len(data)
        sink.write(data)

    def stopProducing(self) -> None:
        """The connection went away."""
        self._sink = None
