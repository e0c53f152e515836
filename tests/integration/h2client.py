"""
A small HTTP/2 client over hyper-h2 for the end-to-end tests: requests (with bodies,
sent within the peer's flow-control windows) on streams of one TLS connection, each
response recorded as it arrives, and streams reset on demand.
"""

from __future__ import annotations

from typing import Any

import attrs
import h2.events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from .support import LOOPBACK, within

__all__ = ["H2Client", "H2Stream", "connect_h2"]


@attrs.define(eq=False)
class H2Stream:
    """
    One stream's response as the client received it.

    @ivar chunks: each ``DATA`` frame's payload with its arrival time
        (``reactor.seconds()``).
    @ivar events: each complete server-sent event (the bytes after ``data: ``) with the
        arrival time of the frame that completed it.
    @ivar reset: the error code of a ``RST_STREAM`` the server sent, if it sent one.
    @ivar ended: fires when the stream has ended or been reset (by either side); not
        when its connection is lost: wait for it with a timeout.
    """

    stream_id: int
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    body: bytearray = attrs.Factory(bytearray)
    chunks: list[tuple[float, bytes]] = attrs.Factory(list)
    events: list[tuple[float, bytes]] = attrs.Factory(list)
    reset: int | None = None
    complete: bool = False
    ended: Deferred[None] = attrs.Factory(Deferred)
    _buffer: bytes = b""

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])

    def received(self, data: bytes) -> None:
        now = reactor.seconds()
        self.chunks.append((now, data))
        self.body += data
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                self.events.append((now, event[6:]))

    def end(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


class _ReadsOnAfterGoaway(H2Connection):
    """
    h2 as a client that goes on receiving the streams a graceful ``GOAWAY`` (no error)
    lets finish (RFC 9113 section 6.8), as curl and browsers do: h2 itself closes its
    state machine on any ``GOAWAY``.
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        if frame.error_code:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        return [], [event]


class H2Client(Protocol):
    """
    An HTTP/2 client connection. :meth:`request` opens a stream; request bodies are
    sent as the peer's flow-control windows allow; received data is acknowledged at
    once. Records the ``GOAWAY`` error code it is sent in ``goaway``, and the last
    stream that GOAWAY names in ``last_stream_id``.
    """

    def __init__(self) -> None:
        self.h2 = _ReadsOnAfterGoaway(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, H2Stream] = {}
        self.goaway: int | None = None
        self.last_stream_id: int | None = None
        self.closed: Deferred[None] = Deferred()
        self._unsent: dict[int, memoryview] = {}

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self._flush()

    def request(
        self,
        method: bytes,
        path: bytes,
        *extra: tuple[bytes, bytes],
        body: bytes | None = None,
    ) -> H2Stream:
        """Send ``method path`` (with ``body``, if any) on a new stream."""
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", LOOPBACK.encode()),
            (b":path", path),
            *extra,
        ]
        return self.send(headers, body)

    def send(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> H2Stream:
        """Send ``headers`` (pseudo-headers included) and ``body`` on a new stream."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=body is None)
        stream = self.streams[stream_id] = H2Stream(stream_id)
        if body is not None:
            self._unsent[stream_id] = memoryview(body)
            self._send_bodies()
        self._flush()
        return stream

    def get(self, path: bytes) -> H2Stream:
        """Send ``GET path`` on a new stream."""
        return self.request(b"GET", path)

    def reset_stream(self, stream: H2Stream, error_code: int = ErrorCodes.CANCEL) -> None:
        """Send ``RST_STREAM`` for ``stream``; it ends (not complete)."""
        self._unsent.pop(stream.stream_id, None)
        self.h2.reset_stream(stream.stream_id, error_code)
        self._flush()
        stream.end()

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                stream.headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is not None and not stream.ended.called:
                    stream.received(event.data)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                stream.complete = True
                stream.end()
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                self._unsent.pop(event.stream_id, None)
                if not stream.ended.called:
                    stream.reset = event.error_code
                stream.end()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._send_bodies()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
                self.last_stream_id = event.last_stream_id
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)

    def _send_bodies(self) -> None:
        for stream_id, rest in list(self._unsent.items()):
            while rest:
                size = min(
                    len(rest),
                    self.h2.local_flow_control_window(stream_id),
                    self.h2.max_outbound_frame_size,
                )
                if size <= 0:
                    break
                self.h2.send_data(stream_id, rest[:size].tobytes())
                rest = rest[size:]
            if rest:
                self._unsent[stream_id] = rest
            else:
                del self._unsent[stream_id]
                self.h2.end_stream(stream_id)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


async def connect_h2(
    port: int,
    trust_root: ssl.Certificate,
    protocols: list[bytes] | None = None,
    *,
    timeout: float = 5,
) -> H2Client:
    """An HTTP/2 connection over TLS to ``127.0.0.1:port``, negotiated by ALPN."""
    options = ssl.optionsForClientTLS(
        LOOPBACK, trust_root, acceptableProtocols=protocols or [b"h2"]
    )
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=5))
    client = H2Client()
    await within(connectProtocol(endpoint, client), timeout)
    return client
