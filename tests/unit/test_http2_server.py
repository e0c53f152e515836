"""
aiproxy's own HTTP/2 server, as an h2 client sees it: the protocol over a
``StringTransport`` and a fake clock, in front of the real core with a fake upstream.
And the pure rules beside it: the request head's validation, and the frame limits.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from aiproxy.config import Config
from aiproxy.core.activity import Activity
from aiproxy.core.build import build_core
from aiproxy.errors import HeadTooLarge, InvalidRequest
from aiproxy.server import http2
from aiproxy.server.http2 import CLOSE_TIMEOUT, HTTP2Factory
from aiproxy.server.http2_head import request_head
from aiproxy.server.http2_limits import CONTROL_LIMITS, MAX_CONTINUATIONS, WINDOW, FrameWatch
from aiproxy.server.http2_stream import STREAM_WINDOW
from aiproxy.server.limits import CLIENT_IDLE_TIMEOUT, ClientLimits

from .fakes import CLIENT_ADDRESS, CollectingSink, FakeUpstream

TARGET_URL = "http://upstream.example:9000"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@attrs.define
class Response:
    """One stream's response, as the client received it."""

    headers: dict[bytes, bytes] = attrs.Factory(dict)
    body: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])

    def json(self) -> Any:
        return json.loads(self.body)


class Peer:
    """
    An h2 client on one connection to the HTTP/2 door, in memory: what it sends goes
    to the door at once, and what the door writes is read at once (and its data
    acknowledged, unless ``acknowledging`` is false).
    """

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("target_url", TARGET_URL)
        settings.setdefault("request_timeout", 30)
        config = Config(**settings)
        self.clock = Clock()
        self.upstream = FakeUpstream()
        self.activity = Activity()
        self.core = build_core(config, self.upstream, self.clock, self.activity)
        factory = HTTP2Factory(
            self.core, self.clock, self.activity, ClientLimits.from_config(config)
        )
        self.server = factory.buildProtocol(CLIENT_ADDRESS)
        self.transport = StringTransport(peerAddress=CLIENT_ADDRESS)
        self.server.makeConnection(self.transport)
        config_h2 = H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = H2Connection(config_h2)
        self.responses: dict[int, Response] = {}
        self.goaway: ConnectionTerminated | None = None
        self.acknowledging = True
        self.h2.initiate_connection()
        self.send()

    def send(self) -> None:
        """Send what the client has to send, and read the answer."""
        data = self.h2.data_to_send()
        if data:
            self.send_raw(data)
        else:
            self.receive()

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, past the client's state machine."""
        self.server.dataReceived(data)
        self.receive()

    def receive(self) -> None:
        """Read what the door wrote."""
        data = self.transport.value()
        self.transport.clear()
        if not data or (self.goaway is not None and self.goaway.error_code):
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            return
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            response = self.responses.setdefault(stream_id, Response()) if stream_id else None
            if isinstance(event, ResponseReceived):
                response.headers.update(event.headers)  # type: ignore[union-attr]
            elif isinstance(event, DataReceived):
                response.body += event.data  # type: ignore[union-attr]
                if self.acknowledging:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, StreamEnded):
                response.ended = True  # type: ignore[union-attr]
            elif isinstance(event, StreamReset):
                response.reset = event.error_code  # type: ignore[union-attr]
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event
                if not event.error_code:
                    # A graceful GOAWAY: the streams it names go on (RFC 9113 section
                    # 6.8), which h2 as a client does not expect.
                    self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        if self.goaway is None or not self.goaway.error_code:
            self.send()

    def request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/v1/models",
        *extra: tuple[bytes, bytes],
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        """Send a request (and as much of ``body`` as the windows allow); its stream."""
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"proxy.example"),
            (b":path", path),
            *extra,
        ]
        return self.send_block(headers, body, end)

    def send_block(
        self, headers: list[tuple[bytes, bytes]], body: bytes | None = None, end: bool = True
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end and body is None)
        if body is not None:
            self.send_data(stream_id, body, end)
        self.send()
        return stream_id

    def send_data(self, stream_id: int, data: bytes, end: bool = True) -> bytes:
        """Send what the windows allow of ``data``; what is left."""
        while data:
            size = min(len(data), self.h2.local_flow_control_window(stream_id), 16384)
            if size <= 0:
                break
            self.h2.send_data(stream_id, data[:size])
            data = data[size:]
        if not data and end:
            self.h2.end_stream(stream_id)
        self.send()
        return data

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def answer(peer: Peer, body: bytes = b'{"ok": true}', **headers: bytes) -> Any:
    """The upstream answers the last request ``200`` with ``body``, whole."""
    fields = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]
    response = peer.upstream.last.respond(200, fields + list(headers.items()))
    response.send(body)
    response.end()
    peer.receive()
    return response


def streaming(peer: Peer) -> Any:
    """The upstream starts an event stream for the last request."""
    response = peer.upstream.last.respond(200, [(b"Content-Type", b"text/event-stream")])
    peer.receive()
    return response


# --- answering ----------------------------------------------------------------------


def test_a_request_is_proxied_and_answered_on_its_stream() -> None:
    """A GET reaches the upstream as HTTP/1.1 with ``Host`` from ``:authority`` passed
    on as ``X-Forwarded-Host``, and its answer comes back on its stream, lowercase
    fields, aiproxy's own headers, ended cleanly."""
    peer = Peer()
    stream = peer.request(b"GET", b"/v1/models?x=1")
    call = peer.upstream.last
    assert call.request_line == b"GET /v1/models?x=1 HTTP/1.1"
    assert call.headers.getRawHeaders(b"x-forwarded-host") == [b"proxy.example"]
    answer(peer)
    response = peer.responses[stream]
    assert response.status == 200 and response.ended and response.reset is None
    assert response.json() == {"ok": True}
    assert response.headers[b"content-type"] == b"application/json"
    assert response.headers[b"x-request-id"]
    assert response.headers[b"x-proxy-by"].startswith(b"aiproxy/")


def test_own_endpoints_answer_over_http2() -> None:
    """``/api/ping`` is answered by the proxy itself."""
    peer = Peer()
    stream = peer.request(b"GET", b"/api/ping")
    assert peer.responses[stream].json() == {"ping": "pong"}
    assert peer.upstream.calls == []


def test_a_small_body_is_handed_over_whole() -> None:
    """A body within one window reaches the upstream whole, with its Content-Length."""
    peer = Peer()
    peer.request(b"POST", b"/echo", (b"content-length", b"1000"), body=b"y" * 1000)
    call = peer.upstream.last
    assert call.body == b"y" * 1000
    assert call.headers.getRawHeaders(b"content-length") == [b"1000"]


def test_a_large_body_window_reopens_only_as_the_upstream_takes_it() -> None:
    """A 200 KB body streams: the door hands it over at once, but the client's window
    for it is not reopened until the upstream takes the bytes; then the rest flows."""
    peer = Peer()
    body = bytes(range(256)) * 800
    stream = peer.request(b"POST", b"/echo", (b"content-length", b"%d" % len(body)), end=False)
    left = peer.send_data(stream, body)
    assert len(left) == len(body) - STREAM_WINDOW
    assert peer.h2.local_flow_control_window(stream) == 0
    source = peer.upstream.last.body
    assert not isinstance(source, bytes)
    sink = CollectingSink()
    source.start(sink)
    peer.receive()
    assert peer.h2.local_flow_control_window(stream) > 0
    while left:
        left = peer.send_data(stream, left)
    assert sink.finished and sink.data == body


def test_response_data_waits_for_the_clients_window_and_pauses_the_upstream() -> None:
    """A client that does not reopen its window gets 64 KiB; the rest is held, and past
    the high-water mark the upstream is paused; reopening the window sends the rest
    and resumes the upstream."""
    peer = Peer()
    peer.acknowledging = False
    stream = peer.request()
    response = streaming(peer)
    for _ in range(10):
        response.send(b"z" * 16384)
    peer.receive()
    assert len(peer.responses[stream].body) == 65535
    assert response.producer.paused
    peer.h2.acknowledge_received_data(65535, stream)
    peer.acknowledging = True
    peer.send()
    assert len(peer.responses[stream].body) == 10 * 16384
    assert not response.producer.paused


def test_a_full_transport_holds_data_and_pauses_the_upstream() -> None:
    """While the transport says it is full, no DATA is written; past the high-water
    mark the upstream is paused; when the transport resumes, everything is sent."""
    peer = Peer()
    stream = peer.request()
    response = streaming(peer)
    peer.server.pauseProducing()
    for _ in range(6):
        response.send(b"w" * 16384)
    assert peer.transport.value() == b""
    assert response.producer.paused
    peer.server.resumeProducing()
    peer.receive()
    assert len(peer.responses[stream].body) == 6 * 16384
    assert not response.producer.paused


def test_a_cut_upstream_response_resets_the_stream_with_internal_error() -> None:
    """The upstream breaks off the body: the stream is reset with INTERNAL_ERROR, never
    ended, and the connection serves the next request."""
    peer = Peer()
    stream = peer.request()
    response = streaming(peer)
    response.send(b"data: 1\n\n")
    response.end(ConnectionLost())
    peer.receive()
    assert peer.responses[stream].reset == ErrorCodes.INTERNAL_ERROR
    assert not peer.responses[stream].ended
    assert peer.responses[peer.request(b"GET", b"/api/ping")].status == 200


def test_a_client_reset_cancels_its_upstream_request() -> None:
    """RST_STREAM from the client cancels the upstream request (before or during the
    response), and the core counts it."""
    peer = Peer()
    waiting = peer.request()
    peer.h2.reset_stream(waiting, ErrorCodes.CANCEL)
    peer.send()
    assert peer.upstream.last.cancelled
    stream = peer.request()
    response = streaming(peer)
    peer.h2.reset_stream(stream, ErrorCodes.CANCEL)
    peer.send()
    assert response.aborted
    assert peer.core.cancelled == 2


@pytest.mark.parametrize("path", [b"/api/ping", b"/v1/models"])
def test_a_request_reset_in_the_same_read_leaves_nothing_in_flight(path: bytes) -> None:
    """HEADERS and RST_STREAM in one read: whether the core answers at once (its send
    refused by h2) or waits on the upstream (cancelled), nothing stays in flight."""
    peer = Peer()
    stream = peer.h2.get_next_available_stream_id()
    peer.h2.send_headers(
        stream,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", path)],
        end_stream=True,
    )
    peer.h2.reset_stream(stream, ErrorCodes.CANCEL)
    peer.send()
    assert peer.activity.requests == set()
    assert all(call.cancelled for call in peer.upstream.calls)
    assert peer.server.streams == {}


def test_connection_lost_tells_the_core_of_every_stream() -> None:
    """When the connection goes, every request in flight is cancelled upstream."""
    peer = Peer()
    peer.request()
    peer.request()
    peer.server.connectionLost(Failure(ConnectionLost()))
    assert all(call.cancelled for call in peer.upstream.calls)
    assert peer.activity.connections() == []


# --- refusals -----------------------------------------------------------------------

Pseudo = dict[bytes, "bytes | None"]

BAD_HEADS: dict[str, tuple[Pseudo, list[tuple[bytes, bytes]]]] = {
    "control byte in :method": ({b":method": b"GE\x01T"}, []),
    "ESC in :path": ({b":path": b"/v1/\x1b[31m"}, []),
    "space in :path": ({b":path": b"/a b"}, []),
    "no :path": ({b":path": None}, []),
    "unknown pseudo-header": ({b":protocol": b"websocket"}, []),
    "uppercase name": ({}, [(b"X-Upper", b"1")]),
    "connection header": ({}, [(b"connection", b"keep-alive")]),
    "transfer-encoding": ({}, [(b"transfer-encoding", b"chunked")]),
    "te other than trailers": ({}, [(b"te", b"gzip")]),
    "NUL in a value": ({}, [(b"x-a", b"a\x00b")]),
    "DEL in a value": ({}, [(b"x-a", b"a\x7fb")]),
    "padded value": ({}, [(b"x-a", b" a")]),
}


def _block(pseudo: Pseudo, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A GET's header block with ``pseudo`` changed (L{None}: left out), then ``fields``."""
    base: Pseudo = {
        b":method": b"GET",
        b":scheme": b"https",
        b":authority": b"proxy.example",
        b":path": b"/v1/models",
    }
    base.update(pseudo)
    return [(name, value) for name, value in base.items() if value is not None] + fields


@pytest.mark.parametrize(("pseudo", "fields"), BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_a_malformed_head_is_a_400_on_its_stream_only(
    pseudo: Pseudo, fields: list[tuple[bytes, bytes]]
) -> None:
    """Each malformed request head gets the JSON ``400`` on its stream, nothing goes
    upstream, and the connection serves the next request."""
    peer = Peer()
    stream = peer.send_block(_block(pseudo, fields))
    response = peer.responses[stream]
    assert response.status == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert peer.upstream.calls == []
    assert peer.goaway is None
    assert peer.responses[peer.request(b"GET", b"/api/ping")].status == 200


def test_connect_is_the_documented_405() -> None:
    """``CONNECT`` with only ``:authority`` is answered ``405`` by the core."""
    peer = Peer()
    stream = peer.send_block([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert peer.responses[stream].status == 405
    assert peer.responses[stream].json()["error"]["type"] == "method_not_allowed"


def test_a_declared_body_over_the_limit_is_a_413_before_any_of_it() -> None:
    """``content-length`` over MAX_BODY_SIZE: ``413`` at once, the stream reset so the
    client sends no more, GOAWAY (no error), and the connection closes."""
    peer = Peer(max_body_size=1000)
    stream = peer.request(b"POST", b"/echo", (b"content-length", b"5000"), end=False)
    response = peer.responses[stream]
    assert response.status == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert response.ended
    assert peer.goaway is not None and peer.goaway.error_code == 0
    assert peer.upstream.calls == []
    assert peer.closing


def test_a_body_growing_over_the_limit_is_a_413_as_it_passes_it() -> None:
    """A body without a length gets its ``413`` as soon as its DATA passes the limit;
    nothing is sent upstream."""
    peer = Peer(max_body_size=1000)
    stream = peer.request(b"POST", b"/echo", end=False)
    peer.send_data(stream, b"x" * 900, end=False)
    assert stream not in peer.responses
    peer.send_data(stream, b"x" * 200, end=False)
    assert peer.responses[stream].status == 413
    assert peer.upstream.calls == []


def test_a_malformed_content_length_is_a_protocol_error() -> None:
    """A ``content-length`` that is not a number: h2 itself refuses it, and the
    connection ends (PROTOCOL_ERROR, a connection error in h2) without a traceback."""
    peer = Peer()
    peer.request(b"POST", b"/echo", (b"content-length", b"1e3"), end=False)
    assert peer.goaway is not None and peer.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert peer.closing


def test_data_past_content_length_is_a_protocol_error() -> None:
    """More DATA than ``content-length`` said ends the connection (PROTOCOL_ERROR)."""
    peer = Peer()
    stream = peer.request(b"POST", b"/echo", (b"content-length", b"10"), end=False)
    peer.send_raw(
        b"\0\0\x14\0\0" + stream.to_bytes(4, "big") + b"x" * 20  # DATA, 20 bytes
    )
    assert peer.goaway is not None and peer.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert peer.closing


def test_a_protocol_error_ends_the_connection_and_nothing_more_is_read() -> None:
    """DATA on stream 0: GOAWAY PROTOCOL_ERROR, the transport closes, what arrives
    after is dropped, and the connection is aborted if it has not closed in time."""
    peer = Peer()
    peer.send_raw(b"\0\0\x01\0\0\0\0\0\0x")
    assert peer.goaway is not None and peer.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert peer.closing and peer.transport.producer is None
    peer.server.dataReceived(b"\0" * 100_000)
    assert peer.transport.value() == b""
    peer.clock.advance(CLOSE_TIMEOUT)
    assert peer.transport.disconnected


@pytest.mark.parametrize(
    "frame",
    [
        SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096}),
        PingFrame(0, opaque_data=b"12345678"),
    ],
    ids=["settings", "ping"],
)
def test_control_frames_over_the_limit_per_window_are_calmed(frame: Any) -> None:
    """As many SETTINGS or PING frames as the limit in each window are fine, window
    after window; one more in a window gets GOAWAY ENHANCE_YOUR_CALM and a close."""
    peer = Peer()
    limit = CONTROL_LIMITS[frame.type]
    data = frame.serialize()
    peer.clock.advance(WINDOW)
    peer.send_raw(data * (limit - 1))  # the client's own first SETTINGS counted already
    peer.clock.advance(WINDOW)
    peer.send_raw(data * limit)
    assert peer.goaway is None
    peer.send_raw(data)
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert peer.closing


def test_rapid_reset_is_calmed() -> None:
    """Streams opened and reset over and over: past the reset limit, GOAWAY
    ENHANCE_YOUR_CALM, and every request started on the way was cancelled."""
    peer = Peer()
    for _ in range(CONTROL_LIMITS[3] + 1):
        stream = peer.request()
        peer.h2.reset_stream(stream, ErrorCodes.CANCEL)
        peer.send()
        if peer.goaway is not None:
            break
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert all(call.cancelled for call in peer.upstream.calls)


def test_a_continuation_flood_is_calmed() -> None:
    """A header block that goes on in CONTINUATION frames is refused once over its
    limit, before h2 keeps any more of it."""
    peer = Peer()
    block = peer.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/")])
    peer.send_raw(HeadersFrame(1, data=block).serialize())
    for _ in range(MAX_CONTINUATIONS + 1):
        peer.send_raw(ContinuationFrame(1, data=b"a").serialize())
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_list_over_64_kib_is_calmed() -> None:
    """A small header block that decodes to over 64 KiB of fields (one big field,
    then references to it): GOAWAY ENHANCE_YOUR_CALM, from h2's HPACK limit."""
    peer = Peer()
    peer.request(b"GET", b"/v1/models", *[(b"x-big", b"a" * 4000)] * 20)
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert peer.upstream.calls == []
    assert peer.closing


def test_more_streams_than_allowed_at_once_is_a_protocol_error() -> None:
    """A client that opens a 101st stream while 100 are open (past the
    SETTINGS_MAX_CONCURRENT_STREAMS it was sent) gets GOAWAY PROTOCOL_ERROR, and every
    request in flight on it is cancelled."""
    peer = Peer()
    block = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    frames = [
        HeadersFrame(
            2 * n + 1, data=peer.h2.encoder.encode(block), flags=["END_HEADERS", "END_STREAM"]
        ).serialize()
        for n in range(101)
    ]
    peer.send_raw(b"".join(frames[:100]))
    assert peer.goaway is None
    peer.send_raw(frames[100])
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert peer.closing
    assert len(peer.upstream.calls) == 100
    assert all(call.cancelled for call in peer.upstream.calls)
    assert peer.activity.requests == set()


def test_too_much_written_to_a_client_that_does_not_read_is_calmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames written while the transport says it is full are counted; past the limit
    the connection is closed with ENHANCE_YOUR_CALM."""
    monkeypatch.setattr(http2, "MAX_UNREAD", 500)
    peer = Peer()
    peer.server.pauseProducing()
    for _ in range(90):
        peer.request(b"GET", b"/api/ping")
        if peer.closing:
            break
    assert peer.closing
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


# --- time ---------------------------------------------------------------------------


def test_a_header_block_not_complete_in_header_timeout_closes_the_connection() -> None:
    """HEADERS without END_HEADERS and nothing after: after HEADER_TIMEOUT, GOAWAY
    ENHANCE_YOUR_CALM and a close."""
    peer = Peer(header_timeout=5)
    block = peer.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/")])
    peer.send_raw(HeadersFrame(1, data=block).serialize())
    peer.clock.advance(4)
    assert not peer.closing
    peer.clock.advance(2)
    peer.receive()
    assert peer.goaway is not None
    assert peer.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert peer.closing


def test_a_body_slower_than_body_min_rate_is_a_408() -> None:
    """A body that falls behind BODY_MIN_RATE after HEADER_TIMEOUT of grace gets its
    ``408`` on its stream."""
    peer = Peer(header_timeout=5, body_min_rate=100)
    stream = peer.request(b"POST", b"/echo", (b"content-length", b"1000"), end=False)
    peer.send_data(stream, b"x" * 100, end=False)
    peer.clock.advance(5.5)
    assert stream not in peer.responses
    peer.clock.advance(1)
    peer.receive()
    assert peer.responses[stream].status == 408
    assert peer.upstream.calls == []


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    """With no stream open for the idle timeout, the connection gets GOAWAY and closes."""
    peer = Peer()
    peer.request(b"GET", b"/api/ping")
    peer.clock.advance(CLIENT_IDLE_TIMEOUT - 1)
    assert not peer.closing
    peer.clock.advance(1)
    peer.receive()
    assert peer.goaway is not None and peer.goaway.error_code == 0
    assert peer.closing


# --- drain --------------------------------------------------------------------------


def test_drain_sends_goaway_at_once_and_closes_after_the_streams_in_flight() -> None:
    """``close_if_idle`` on a busy connection: GOAWAY (no error) naming the last
    stream at once; that stream runs to its end, a newer one is refused, and then the
    connection closes."""
    peer = Peer()
    stream = peer.request()
    response = streaming(peer)
    peer.server.close_if_idle()
    peer.receive()
    assert peer.goaway is not None
    assert (peer.goaway.error_code, peer.goaway.last_stream_id) == (0, stream)
    assert not peer.closing
    late = peer.request()
    assert peer.responses[late].reset == ErrorCodes.REFUSED_STREAM
    response.send(b"data: [DONE]\n\n")
    response.end()
    peer.receive()
    assert peer.responses[stream].ended
    assert peer.closing


def test_drain_closes_an_idle_connection_at_once() -> None:
    """``close_if_idle`` with no stream open: GOAWAY and close now."""
    peer = Peer()
    peer.server.close_if_idle()
    peer.receive()
    assert peer.goaway is not None and peer.goaway.error_code == 0
    assert peer.closing


# --- garbage ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_never_raise_out_of_the_door(pieces: list[bytes]) -> None:
    """Whatever follows the preface, the door answers or closes; it never raises."""
    peer = Peer()
    for piece in pieces:
        peer.server.dataReceived(piece)
    peer.server.connectionLost(Failure(ConnectionLost()))


# --- the pure rules -----------------------------------------------------------------


def test_request_head_turns_authority_into_host_and_reads_the_length() -> None:
    """``:authority`` becomes ``host`` when there is none; ``content-length`` is read."""
    head = request_head(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/v1/chat/completions"),
            (b":authority", b"proxy.example"),
            (b"content-length", b"12"),
        ]
    )
    assert head.method == b"POST" and head.target == b"/v1/chat/completions"
    assert head.headers == [(b"host", b"proxy.example"), (b"content-length", b"12")]
    assert head.length == 12


@pytest.mark.parametrize(
    "block",
    [
        [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")],  # no :scheme
        [(b"x", b"1"), (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],  # no host at all
    ],
    ids=["no-scheme", "pseudo-after-regular", "repeated-pseudo", "no-authority"],
)
def test_request_head_refuses_malformed_blocks(block: list[tuple[bytes, bytes]]) -> None:
    """Each of these blocks is refused as a ``400``."""
    with pytest.raises(InvalidRequest):
        request_head(block)


def test_request_head_refuses_too_many_fields() -> None:
    """More header fields than the HTTP/1.1 door takes lines: ``431``."""
    block = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
    block += [(b"x-%d" % n, b"v") for n in range(101)]
    with pytest.raises(HeadTooLarge):
        request_head(block)


def test_frame_watch_reads_headers_split_across_reads() -> None:
    """Frame headers split between reads are still counted, one byte at a time: the
    PING over the limit is caught the moment its 9-byte header is complete."""
    watch = FrameWatch()
    limit = CONTROL_LIMITS[6]
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    data = PREFACE + ping * (limit + 1)
    violations = [watch.scan(data[i : i + 1], 0.0) for i in range(len(data))]
    caught = [i for i, violation in enumerate(violations) if violation is not None]
    assert caught == [len(PREFACE) + limit * len(ping) + 8]


def test_frame_watch_lets_acks_and_data_through_uncounted() -> None:
    """PING and SETTINGS acknowledgements and DATA with a payload are never counted."""
    watch = FrameWatch()
    ack = PingFrame(0, opaque_data=b"12345678", flags=["ACK"]).serialize()
    settings_ack = SettingsFrame(0, flags=["ACK"]).serialize()
    data = b"\0\0\x01\0\0\0\0\0\x01x"
    assert watch.scan(PREFACE + (ack + settings_ack + data) * 1000, 0.0) is None
