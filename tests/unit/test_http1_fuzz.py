"""
Property-based tests of the HTTP/1.1 server: valid requests cut into random pieces
reach the core exactly as sent; random garbage gets a 4xx or a close, never an
exception, and nothing malformed reaches the core.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aiproxy.core.interfaces import ClientSide, Incoming, RequestBody
from aiproxy.rules.framing import framing_error
from aiproxy.server.http1 import BUFFERED_BODY_LIMIT

from .test_http1_server import (
    Call,
    FakeExchange,
    FakeHandler,
    FakeSink,
    Server,
    read_responses,
    start_server,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PATH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%/"
FRAMING_NAMES = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}
FRAMING_NAMES |= {b"expect"}


class CollectingHandler(FakeHandler):
    """Answers each request once its whole body is in: a streamed one through a sink."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies: list[bytes] = []

    def handle(self, request: Incoming, body: RequestBody, client: ClientSide) -> FakeExchange:
        call = Call(request, body, client, None, FakeExchange())
        self.calls.append(call)
        if isinstance(body, bytes):
            self.bodies.append(body)
            call.respond(200, b"ok")
            return call.exchange
        index = len(self.bodies)
        self.bodies.append(b"")
        sink = FakeSink()

        def finish() -> None:
            FakeSink.finish(sink)
            self.bodies[index] = sink.data
            call.respond(200, b"ok")

        sink.finish = finish  # type: ignore[method-assign]
        body.start(sink)
        return call.exchange


def server_for_fuzz(max_body_size: int = 10**7) -> tuple[Server, CollectingHandler]:
    server = start_server(max_body_size=max_body_size, header_timeout=10, body_min_rate=0)
    handler = CollectingHandler(server.clock)
    server.handler = handler
    server.factory.handler = handler
    return server, handler


# --- valid requests ------------------------------------------------------------------------

methods = st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"QUERY"])
targets = st.text(PATH, max_size=40).map(lambda path: ("/" + path).encode())
names = (
    st.text(TOKEN, min_size=1, max_size=20)
    .map(str.encode)
    .filter(lambda name: name.lower() not in FRAMING_NAMES)
)
value_bytes = [b for b in range(0x21, 0x7F)] + [0x80, 0xA0, 0xFF]
values = st.one_of(
    st.just(b""),
    st.builds(
        lambda first, middle, last: bytes([first]) + middle + (bytes([last]) if middle else b""),
        st.sampled_from(value_bytes),
        st.lists(st.sampled_from([*value_bytes, 0x20, 0x09]), max_size=30).map(bytes),
        st.sampled_from(value_bytes),
    ),
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=3000),
    st.integers(min_value=BUFFERED_BODY_LIMIT - 2, max_value=BUFFERED_BODY_LIMIT + 3000).map(
        lambda size: b"\x00\r\n" * (size // 3) + b"z" * (size % 3)
    ),
)


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """One valid request's bytes, and what the core must be handed for it."""
    method = draw(methods)
    target = draw(targets)
    headers = draw(st.lists(st.tuples(names, values), max_size=12))
    host = (draw(st.sampled_from([b"Host", b"host", b"HOST"])), b"proxy.example")
    headers.insert(draw(st.integers(0, len(headers))), host)
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked"])) if body else "none"
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        framed = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    else:
        framed = b""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines += [name + b": " + value for name, value in headers]
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + framed
    expected = {"method": method, "target": target, "headers": headers, "body": body}
    return raw, expected


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into random pieces."""
    points = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    edges = [0, *(p for p in points if p < len(data)), len(data)]
    return [data[a:b] for a, b in pairwise(edges) if b > a]


@FUZZ
@given(st.lists(valid_requests(), min_size=1, max_size=3), st.data())
def test_valid_requests_in_random_pieces_reach_the_core_as_sent(
    requests: list[tuple[bytes, dict[str, Any]]], data: st.DataObject
) -> None:
    """Valid requests, pipelined on one connection and cut anywhere, are each handed
    over with exactly the method, target, headers and body the client sent, and
    each answered in order."""
    server, handler = server_for_fuzz()
    client = server.connect()
    stream = b"".join(raw for raw, _ in requests)
    for piece in data.draw(cut(stream)):
        client.send(piece)
    assert len(handler.calls) == len(requests), client.value()[:300]
    for call, body, (_, expected) in zip(handler.calls, handler.bodies, requests, strict=True):
        request = call.request
        assert request.method == expected["method"]
        assert request.target == expected["target"]
        assert request.headers == expected["headers"]
        assert request.version == b"HTTP/1.1"
        assert body == expected["body"]
    assert [r.status for r in client.responses()] == [200] * len(requests)
    assert not client.closed
    streamed = sum(not isinstance(call.body, bytes) for call in handler.calls)
    event(f"{len(requests)} request(s), {streamed} streamed")


# --- garbage ---------------------------------------------------------------------------------

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+\Z")


def assert_well_formed(call: Call) -> None:
    """What the core is handed is never malformed."""
    request = call.request
    assert _TOKEN_RE.match(request.method), request.method
    assert _TARGET_RE.match(request.target), request.target
    assert request.version in (b"HTTP/1.1", b"HTTP/1.0")
    for name, value in request.headers:
        assert _TOKEN_RE.match(name), name
        assert not set(value) & {0, 10, 13}, value
        assert value == value.strip(b" \t"), value
    assert framing_error(request.version, request.headers) is None


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes changed, inserted or removed."""
    raw, _ = draw(valid_requests())
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        index = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 0x7F, 0xFF, ord(":"), ord(","), ord("a")]))
        if kind == "replace":
            data[index] = byte
        elif kind == "insert":
            data.insert(index, byte)
        else:
            del data[index]
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=400),
    mutated(),
    st.lists(
        st.sampled_from(
            [
                b"GET ",
                b"/",
                b" HTTP/1.1",
                b"\r\n",
                b"Host: h",
                b":",
                b" ",
                b"Transfer-Encoding: chunked",
                b"Content-Length: 3",
                b"0",
                b"\n",
                b"abc",
                b"\x00",
                b"HTTP/1.0",
                b"Connection: close",
            ]
        ),
        max_size=20,
    ).map(b"".join),
)


@FUZZ
@given(garbage, st.data())
def test_garbage_gets_a_4xx_or_a_close_and_nothing_malformed_is_handed_over(
    data: bytes, pieces: st.DataObject
) -> None:
    """Whatever bytes arrive, in whatever pieces, the server never raises, answers only
    with complete responses (200 for what it handed over, else 400, 408, 413 or 431),
    hands over only well-formed requests, and has closed the connection once the
    deadlines have passed."""
    server, handler = server_for_fuzz(max_body_size=1000)
    client = server.connect()
    for piece in pieces.draw(cut(data)):
        client.send(piece)
    server.clock.advance(100)
    for call in handler.calls:
        assert_well_formed(call)
    responses = read_responses(client.value())
    statuses = [r.status for r in responses if r.status >= 200]
    assert set(statuses) <= {200, 400, 408, 413, 431}, statuses
    event(f"statuses {sorted(set(statuses))}")
    assert statuses.count(200) == len(handler.handled)
    assert all(r.complete for r in responses)
    assert client.closed
    client.lose()
    assert server.clock.getDelayedCalls() == []
