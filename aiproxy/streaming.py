"""
Moving bodies through the proxy, in pieces, with flow control.

Request bodies arrive buffered by twisted.web (in memory under 100 KB, else in a
temporary file); :class:`ReplayableBody` sends them upstream in pieces, and can do so
again for a retry. Response bodies are written to the client chunk by chunk as they
arrive by :class:`ResponseForwarder`, which registers the upstream connection as the
client's producer: a client that reads slowly pauses the upstream.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.rules.usage import UsageMeter

__all__ = [
    "CLIENT_GONE",
    "BodyCutShort",
    "BytesProducer",
    "ReplayableBody",
    "ResponseForwarder",
    "abort_response",
]

log = Logger(namespace="aiproxy")


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written in one piece."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the whole body at once."""
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written in one call."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class ReplayableBody:
    """
    A request body that twisted.web has buffered, as fresh body producers on demand.

    Each :meth:`producer` starts again from the first byte, so a retried request sends
    the same body; a body in a temporary file is read in pieces of at most
    ``read_size`` bytes, never into memory whole.
    """

    def __init__(
        self, content: IO[bytes], read_size: int, cooperator: Cooperator | None = None
    ) -> None:
        self._content = content
        self._read_size = read_size
        self._cooperator = cooperator
        content.seek(0, os.SEEK_END)
        self.length = content.tell()
        content.seek(0)

    def producer(self) -> IBodyProducer:
        """A producer of the whole body, from the start."""
        if isinstance(self._content, io.BytesIO):
            return BytesProducer(self._content.getvalue())
        view = _FileView(self._content.fileno())
        if self._cooperator is None:
            return FileBodyProducer(view, readSize=self._read_size)
        return FileBodyProducer(view, self._cooperator, readSize=self._read_size)


class _FileView(io.RawIOBase):
    """
    Reads a file through its descriptor at an offset of its own.

    Several views of one file do not disturb each other, and closing a view (as
    ``FileBodyProducer`` does when it is done) leaves the file open.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._offset = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._offset)
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._offset}.get(whence)
        if base is None:
            base = os.fstat(self._fd).st_size
        self._offset = base + offset
        return self._offset

    def tell(self) -> int:
        return self._offset


def abort_response(request: Request) -> None:
    """
    End a response so that the client cannot take it for complete.

    HTTP/1.x: the connection is aborted (a chunked body never gets its final chunk, a
    body with ``Content-Length`` comes up short). HTTP/2: the stream is reset.
    """
    channel = request.channel
    abort = getattr(channel, "abortConnection", None)  # an HTTP/2 stream
    if abort is not None:
        abort()
        # Resetting a stream ourselves does not tell its request, as a reset by the
        # client does: tell it, so that notifyFinish fires and the exchange ends.
        channel.connectionLost(Failure(ConnectionAborted()))
    else:
        transport: Any = request.transport
        transport.abortConnection()


CLIENT_GONE = "the client disconnected"
"""The reason given to :meth:`ResponseForwarder.stop` when the client has left."""


class BodyCutShort(Exception):
    """The proxy ended a response body early; the message says why."""


class ResponseForwarder(Protocol):
    """
    Writes an upstream response body to the client as it arrives.

    The upstream connection is registered as the client request's streaming producer,
    so the client's flow control reaches the upstream. If no upstream bytes arrive for
    ``idle_timeout`` seconds, the response is cut off. Each chunk, once written, is
    also shown to ``meter`` (see :mod:`aiproxy.rules.usage`), which only reads it.
    ``finished`` fires with L{None} when the whole body was delivered (or the client
    left), or fails with the reason the body ended early; the client's response is then
    aborted, never finished.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        idle_timeout: float,
        meter: UsageMeter | None = None,
    ) -> None:
        self.request = request
        self.meter = meter
        self.finished: Deferred[None] = Deferred()
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._last_data = clock.seconds()
        self._idle_timer: IDelayedCall | None = None
        self._stopped_because: str | None = None

    @property
    def streaming(self) -> bool:
        """Whether the body is still being forwarded."""
        return self._stopped_because is None and not self.finished.called

    def connectionMade(self) -> None:
        """Let the client's flow control pause and resume the upstream."""
        self.request.registerProducer(self.transport, True)
        self._idle_timer = self._clock.callLater(self._idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        """Pass each chunk on at once."""
        if self._stopped_because is None:
            self._last_data = self._clock.seconds()
            self.request.write(data)
            if self.meter is not None:
                try:
                    self.meter.feed(data)
                except Exception:  # a bug in the meter must not break the response
                    log.failure("Token usage meter failed; this response's usage is not counted")
                    self.meter = None

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        """Finish the client's response, or abort it if the body ended early."""
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        if self._stopped_because == CLIENT_GONE:
            self.finished.callback(None)
        elif self._stopped_because is not None:
            self.finished.errback(BodyCutShort(self._stopped_because))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.request.unregisterProducer()
            self.request.finish()
            self.finished.callback(None)
        else:
            self.request.unregisterProducer()
            abort_response(self.request)
            self.finished.errback(reason)

    def stop(self, because: str) -> None:
        """
        End the body early and close the upstream connection, so it stops generating.

        Unless ``because`` is :data:`CLIENT_GONE`, the client's response is aborted.
        """
        if not self.streaming:
            return
        self._stopped_because = because
        if because != CLIENT_GONE:
            abort_response(self.request)
        transport: Any = self.transport
        transport.stopProducing()

    def _check_idle(self) -> None:
        idle = self._clock.seconds() - self._last_data
        if idle >= self._idle_timeout:
            self._idle_timer = None
            self.stop(f"no upstream data for {self._idle_timeout:g}s (STREAM_IDLE_TIMEOUT)")
        else:
            self._idle_timer = self._clock.callLater(self._idle_timeout - idle, self._check_idle)
