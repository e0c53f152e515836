"""
One stream of aiproxy's HTTP/2 server (:mod:`aiproxy.server.http2`): the core's
``ClientSide`` for its response, sent as the client's windows and the transport allow,
and the ``BodyReader`` of its request body, whose window is reopened only as the
upstream takes the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer

from aiproxy.core.interfaces import Exchange, Incoming, RawHeaders, TunnelEnd
from aiproxy.errors import BodyTooLarge, ProxyError
from aiproxy.server.body import StreamedBody
from aiproxy.server.limits import CLIENT_IDLE_TIMEOUT

if TYPE_CHECKING:
    from aiproxy.server.http2 import HTTP2Connection

__all__ = [
    "BUFFERED_BODY_LIMIT",
    "STREAM_HIGH_WATER",
    "STREAM_LOW_WATER",
    "STREAM_WINDOW",
    "HTTP2Stream",
    "too_large",
]

STREAM_WINDOW = 65535
"""Each request body's flow-control window: what a client may send ahead of the upstream."""

BUFFERED_BODY_LIMIT = STREAM_WINDOW
"""The largest request body collected whole and handed over at its end; a longer one
(by its ``content-length``, or as it grows past this) streams to the upstream."""

STREAM_HIGH_WATER = 65536
"""Response bytes a stream may hold unsent before its upstream stops being read."""

STREAM_LOW_WATER = 16384
"""Unsent response bytes below which a paused upstream is read again."""

_PEER_GONE = ConnectionLost("the client reset the stream or left")


def too_large(limit: int) -> BodyTooLarge:
    """The refusal of a body over ``limit`` bytes."""
    return BodyTooLarge(f"the request body is larger than the limit of {limit} bytes")


class HTTP2Stream:
    """
    One request on an HTTP/2 connection: the core's ``ClientSide`` for its response
    (sent as the windows allow) and the ``BodyReader`` of its body (whose window is
    reopened as the body is consumed). After its response has ended, or its client
    has reset it, every call is ignored.
    """

    method = b""
    target = b""
    incoming: Incoming | None = None
    exchange: Exchange | None = None
    source: StreamedBody | None = None
    refusal: ProxyError | None = None
    producer: IPushProducer | None = None
    received = 0
    complete = False
    """The client has sent the whole request (``END_STREAM``)."""
    started = False
    ended = False
    """The response has ended (or the client is gone): nothing more is sent."""
    done = False
    """The response has been sent to the end (or reset): the stream is forgotten."""
    core_done = False
    """The core ended the response itself (finished or aborted it): it needs no telling."""
    discarding = False
    """The body is refused: what still arrives is dropped."""
    _head_sent = False
    _end_pending = False
    _producer_paused = False
    _pauses = 0
    _unacked = 0
    _paused_at: float | None = None

    def __init__(self, connection: HTTP2Connection, stream_id: int, now: float) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.headers: RawHeaders = []
        self.body: list[bytes] | None = []
        self.pending = bytearray()
        self.last_data_at = now
        self.body_from = now
        self.held = 0.0
        """Seconds the proxy held the body back (its window shut): not the client's."""

    # -- ClientSide ----------------------------------------------------------------------

    def send_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, body: bool
    ) -> None:
        """Send the ``HEADERS`` frame (ending the stream if no body follows)."""
        if self.ended or self._head_sent:
            return
        self._head_sent = True
        fields = [(b":status", b"%d" % status)]
        fields += [(name.lower(), value) for name, value in headers]
        connection = self.connection
        if not connection.h2_call(
            self, connection.h2.send_headers, self.stream_id, fields, not body
        ):
            return
        if not body:
            self._response_sent()

    def send_body(self, pieces: Sequence[bytes], raw_chunked: bytes | None) -> None:
        """Send body bytes as the windows allow; hold the rest (pausing the upstream)."""
        if self.ended:
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if not data:
            return
        connection = self.connection
        pending = self.pending
        if not pending and not connection.write_paused:
            h2 = connection.h2
            window = connection.window(self.stream_id)
            if len(data) <= window and len(data) <= h2.max_outbound_frame_size:
                if connection.h2_call(self, h2.send_data, self.stream_id, data):
                    connection.flush()
                return
        pending += data
        connection.sending[self.stream_id] = self
        connection.pump()
        producer = self.producer
        if producer is not None and not self._producer_paused and len(pending) > STREAM_HIGH_WATER:
            self._producer_paused = True
            producer.pauseProducing()

    def flush(self) -> None:
        """Send what h2 holds now."""
        if not self.ended:
            self.connection.flush()

    def finish(self) -> None:
        """End the stream once what is held has been sent."""
        if self.ended:
            return
        if not self._head_sent:  # nothing to end: the client must not wait for more
            self.abort()
            return
        if self.pending:
            self._end_pending = True
            return
        connection = self.connection
        if connection.h2_call(self, connection.h2.end_stream, self.stream_id):
            connection.flush()
            self._response_sent()

    def abort(self) -> None:
        """Reset the stream with ``INTERNAL_ERROR``: the response cannot look complete."""
        if self.ended:
            return
        self.ended = self.core_done = True
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def pause_upstream_with(self, producer: IPushProducer | None) -> None:
        """Let this stream's unsent bytes pause ``producer``; L{None} lets it go (resumed)."""
        old, self.producer = self.producer, producer
        if old is not None and self._producer_paused:
            old.resumeProducing()
        self._producer_paused = False
        if producer is not None and len(self.pending) > STREAM_HIGH_WATER:
            self._producer_paused = True
            producer.pauseProducing()

    tunnels = False
    """No WebSocket tunnel over HTTP/2 (RFC 8441 is not offered)."""

    def upgrade(self, status: int, reason: bytes, headers: RawHeaders) -> TunnelEnd:
        """Never called: this door does not tunnel (:attr:`tunnels`)."""
        raise NotImplementedError("the HTTP/2 door does not tunnel")

    # -- BodyReader, for a streamed body -------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        """Keep the body's window shut for ``reason``."""
        if not self._pauses:
            self._paused_at = self.connection.clock.seconds()
        self._pauses |= reason

    def resume_reading(self, reason: int) -> None:
        """``reason`` holds no more: reopen the window by what the upstream has taken."""
        if not self._pauses & reason:
            return
        self._pauses &= ~reason
        if self._pauses:
            return
        if self._paused_at is not None:
            self.held += self.connection.clock.seconds() - self._paused_at
            self._paused_at = None
        unacked, self._unacked = self._unacked, 0
        if unacked and not self.done:
            self.connection.acknowledge(self.stream_id, unacked)

    # -- the connection's side ------------------------------------------------------------

    def data(self, data: bytes, flow_length: int) -> None:
        """The next piece of the request body, and its share of the windows."""
        connection = self.connection
        padding = flow_length - len(data)
        self.received = received = self.received + len(data)
        self.last_data_at = connection.clock.seconds()
        if self.discarding:
            connection.acknowledge(self.stream_id, flow_length)
            return
        if received > connection.limits.max_body_size:
            connection.acknowledge(self.stream_id, flow_length)
            self.body_refused(too_large(connection.limits.max_body_size))
            return
        source = self.source
        if source is not None:
            source.data_received(data)
            if self._pauses:
                self._unacked += len(data)
                if padding:
                    connection.acknowledge(self.stream_id, padding)
            else:
                connection.acknowledge(self.stream_id, flow_length)
            return
        body = self.body
        assert body is not None
        body.append(data)
        connection.acknowledge(self.stream_id, flow_length)
        if received > BUFFERED_BODY_LIMIT:  # of unknown length: it streams from now on
            self.source = StreamedBody(None, self, body, 0)
            self.body = None
            connection.hand_over(self)

    def ended_by_client(self) -> None:
        """The client has sent the whole request."""
        self.complete = True
        if self.incoming is not None:
            self.incoming.record.bytes_in = self.received
        if self.source is not None:
            self.source.finish()
        elif not self.started and not self.discarding:
            self.connection.hand_over(self)

    def body_refused(self, error: ProxyError) -> None:
        """
        The body is too large or too slow: the core answers ``error`` (or the streamed
        body fails with it); what still arrives is dropped, and the connection takes
        no new stream.
        """
        self.discarding = True
        connection = self.connection
        source, self.body = self.source, None
        if source is not None:
            if self.incoming is not None:
                self.incoming.record.bytes_in = self.received
            source.fail(error)
        elif not self.started:
            self.refusal = error
            connection.hand_over(self)
        unacked, self._unacked = self._unacked, 0
        if unacked:
            connection.acknowledge(self.stream_id, unacked)
        connection.stop_taking_streams()  # after the answer, so that it goes first

    def pump(self, h2: H2Connection) -> bool:
        """Send what the windows allow of the held bytes; whether any are left."""
        pending = self.pending
        stream_id = self.stream_id
        frame = h2.max_outbound_frame_size
        while pending:
            size = min(self.connection.window(stream_id), frame, len(pending))
            if size <= 0:
                break
            chunk = bytes(pending[:size])
            del pending[:size]
            last = self._end_pending and not pending
            if not self.connection.h2_call(self, h2.send_data, stream_id, chunk, last):
                return False
        if self._producer_paused and len(pending) <= STREAM_LOW_WATER:
            self._producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        if pending:
            return True
        if self._end_pending:
            self._response_sent()
        return False

    def reset(self, code: ErrorCodes) -> None:
        """Reset the stream with ``code`` and forget it."""
        self.connection.h2_call(self, self.connection.h2.reset_stream, self.stream_id, code)
        self.connection.flush()
        self.gone()

    def gone(self) -> None:
        """
        The stream is over before its response was sent (reset by either side, or its
        connection lost): the core is told, a body still arriving fails.
        """
        if self.done:
            return
        self.done = self.ended = True
        self.pending.clear()
        self.producer = None
        if self.started and not self.core_done and self.exchange is not None:
            self.exchange.client_gone()
        if self.source is not None and not self.complete:
            self.source.fail(_PEER_GONE)
        self.connection.forget(self)

    def _response_sent(self) -> None:
        """The response has been sent to its end."""
        self.ended = self.core_done = True
        if not self.complete:
            # The body is still arriving and will not be read (RFC 9113 section 8.1).
            if self.source is not None:
                self.source.fail(ConnectionDone("the response ended before the request body"))
            self.connection.h2_call(
                self, self.connection.h2.reset_stream, self.stream_id, ErrorCodes.NO_ERROR
            )
        self.gone()

    def deadline(self, header_timeout: float, min_rate: int) -> float | None:
        """When the body being received is due, or L{None} if it is not being watched."""
        if self.complete or self.discarding or self._pauses or self.done:
            return None
        if not min_rate:
            return self.last_data_at + CLIENT_IDLE_TIMEOUT
        return self.body_from + self.held + header_timeout + self.received / min_rate
