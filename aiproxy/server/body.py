"""
A request body that streams from the client to the upstream as it arrives.

The HTTP/1.1 server hands a body too large to keep in memory to the core as a
:class:`StreamedBody`: what arrived before the upstream request started is kept and
written first, then each piece as it arrives. The client's reading is paused while the
upstream connection cannot take more, and while too much waits for the upstream
request to start.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from aiproxy.core.interfaces import BodySink

__all__ = ["UPSTREAM_PAUSE", "WAITING_PAUSE", "BodyReader", "StreamedBody"]

UPSTREAM_PAUSE = 1
"""The reason the upstream connection gave to pause the client: it cannot take more yet."""

WAITING_PAUSE = 2
"""The reason to pause the client while too much of its body waits for the upstream."""


class BodyReader(Protocol):
    """The client connection a body arrives on, as its :class:`StreamedBody` sees it."""

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the client for ``reason`` (one bit of a mask)."""

    def resume_reading(self, reason: int) -> None:
        """``reason`` to pause no longer holds; read again if no other does."""


@implementer(IPushProducer)
class StreamedBody:
    """
    A request body the client is still sending: a ``BodySource`` for the core, and the
    push producer its sink pauses and resumes.

    It can be sent once: it is :meth:`replayable` only until :meth:`start`. Until then,
    what arrives is kept; past ``hold`` bytes, the client's reading is paused.

    @ivar length: the ``Content-Length``; L{None} for a chunked body.
    """

    def __init__(
        self, length: int | None, reader: BodyReader, pieces: list[bytes], hold: int
    ) -> None:
        """
        @param reader: the connection to pause and resume.
        @param pieces: the body's first pieces, already received; kept, not copied.
        @param hold: how many bytes may wait for :meth:`start` before the client is paused.
        """
        self.length = length
        self._reader = reader
        self._pending: list[bytes] | None = pieces
        self._pending_size = sum(map(len, pieces))
        self._hold = hold
        self._sink: BodySink | None = None
        self._started = False
        self._complete = False
        self._failure: Exception | None = None
        self._over = False  # finished, failed or stopped: nothing more goes anywhere
        if self._pending_size > hold:
            reader.pause_reading(WAITING_PAUSE)

    # -- BodySource, for the core ----------------------------------------------------

    def replayable(self) -> bool:
        """Whether nothing of it has been sent yet: true until :meth:`start`."""
        return not self._started

    def start(self, sink: BodySink) -> None:
        """Write what arrived so far to ``sink``, then each piece as it arrives."""
        if self._started:
            sink.fail(RuntimeError("a streamed request body can be sent once only"))
            return
        self._started = True
        if self._failure is not None:
            sink.fail(self._failure)
            return
        if self._over:
            sink.fail(RuntimeError("the request body was stopped before it started"))
            return
        self._sink = sink
        sink.register_producer(self, True)
        pending, self._pending = self._pending, None
        if pending:
            sink.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self._complete and self._sink is not None:
            self._end()
        self._reader.resume_reading(WAITING_PAUSE)

    def stop(self) -> None:
        """The upstream request ended early: drop what arrives from now on."""
        if self._over:
            return
        self._over = True
        self._pending = None
        self._release()

    # -- the connection's side ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """The next piece of the body arrived."""
        sink = self._sink
        if sink is not None:
            sink.write(data)
            return
        pending = self._pending
        if pending is None:
            return  # stopped or failed
        pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._hold:
            self._reader.pause_reading(WAITING_PAUSE)

    def finish(self) -> None:
        """The whole body has arrived."""
        if self._over:
            return
        self._complete = True
        if self._sink is not None:
            self._end()

    def fail(self, reason: Exception) -> None:
        """
        The body cannot be completed (the client left, was too slow, sent too much):
        the sink fails with ``reason``, now or as soon as it starts.
        """
        if self._over:
            return
        self._over = True
        self._failure = reason
        self._pending = None
        sink = self._sink
        self._release()
        if sink is not None:
            sink.fail(reason)

    # -- IPushProducer, for the sink ---------------------------------------------------

    def pauseProducing(self) -> None:
        """The upstream connection cannot take more: pause the client."""
        if not self._over:
            self._reader.pause_reading(UPSTREAM_PAUSE)

    def resumeProducing(self) -> None:
        """The upstream connection can take more: read the client again."""
        self._reader.resume_reading(UPSTREAM_PAUSE)

    def stopProducing(self) -> None:
        """The upstream connection went away: drop what arrives from now on."""
        self.stop()

    # -- inside ------------------------------------------------------------------------

    def _end(self) -> None:
        sink = self._sink
        assert sink is not None
        self._over = True
        self._release()
        sink.finish()

    def _release(self) -> None:
        """Unregister from the sink and lift the pauses this body asked for."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.unregister_producer()
        self._reader.resume_reading(UPSTREAM_PAUSE | WAITING_PAUSE)
