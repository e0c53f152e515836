"""The pure rules for request heads: framing, version, Host, and WebSocket upgrades."""

from __future__ import annotations

import pytest

from aiproxy.core.interfaces import RawHeaders
from aiproxy.rules.framing import (
    MAX_HEAD_SIZE,
    MAX_HEADER_LINES,
    RequestFraming,
    framing_error,
    request_framing,
)
from aiproxy.rules.websocket import is_websocket_upgrade

HOST = [(b"Host", b"proxy.example")]


def test_limits_are_those_the_readme_documents() -> None:
    """A head may be 64 KiB with 100 header lines (the upstream client uses them too)."""
    assert (MAX_HEAD_SIZE, MAX_HEADER_LINES) == (65536, 100)


@pytest.mark.parametrize(
    ("version", "headers", "framing"),
    [
        (b"HTTP/1.1", HOST, RequestFraming(None, False, False)),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"5")], RequestFraming(5, False, False)),
        (b"HTTP/1.1", [*HOST, (b"content-length", b"00012")], RequestFraming(12, False, False)),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"0")], RequestFraming(0, False, False)),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"chunked")],
            RequestFraming(None, True, False),
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"TRANSFER-ENCODING", b"Chunked")],
            RequestFraming(None, True, False),
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b", chunked")],
            RequestFraming(None, True, False),
        ),
        (b"HTTP/1.0", [], RequestFraming(None, False, False)),
        (b"HTTP/1.0", [(b"Content-Length", b"5")], RequestFraming(5, False, False)),
        (b"HTTP/1.0", [(b"Host", b"a"), (b"Host", b"b")], RequestFraming(None, False, False)),
        (
            b"HTTP/1.1",
            [*HOST, (b"Expect", b"100-continue"), (b"Content-Length", b"5")],
            RequestFraming(5, False, True),
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"expect", b"100-Continue"), (b"Transfer-Encoding", b"chunked")],
            RequestFraming(None, True, True),
        ),
        (
            b"HTTP/1.0",
            [(b"Expect", b"100-continue"), (b"Content-Length", b"5")],
            RequestFraming(5, False, False),
        ),
        (b"HTTP/1.1", [*HOST, (b"Expect", b"something-else")], RequestFraming(None, False, False)),
    ],
    ids=[
        "no body",
        "length",
        "length with zeros",
        "length 0",
        "chunked",
        "chunked in capitals",
        "empty list element",
        "HTTP/1.0 needs no Host",
        "HTTP/1.0 length",
        "HTTP/1.0 two Hosts",
        "100-continue",
        "100-continue chunked",
        "HTTP/1.0 ignores Expect",
        "other expectation",
    ],
)
def test_well_framed_heads_pass_with_their_framing(
    version: bytes, headers: RawHeaders, framing: RequestFraming
) -> None:
    """A Content-Length, a chunked body, or no body at all is fine; HTTP/1.0 needs no
    Host; an HTTP/1.1 client may wait for 100 Continue."""
    assert request_framing(version, headers) == framing
    assert framing_error(version, headers) is None


@pytest.mark.parametrize(
    ("version", "headers", "message"),
    [
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"identity")], "only"),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"identity, chunked")], "only"),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"chunked, chunked")], "only"),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"gzip, chunked")], "only"),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
            "only",
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"identity"), (b"Transfer-Encoding", b"chunked")],
            "only",
        ),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"")], "only"),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"identity"), (b"Content-Length", b"5")],
            "both",
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
            "both",
        ),
        (b"HTTP/1.0", [(b"Transfer-Encoding", b"chunked")], "HTTP/1.0"),
        (b"HTTP/1.1", [], "Host"),
        (b"HTTP/1.1", [*HOST, (b"Host", b"other.example")], "Host"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"5"), (b"Content-Length", b"5")], "one"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"5, 5")], "number"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"-1")], "number"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"+3")], "number"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"")], "number"),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"1" * 20)], "too large"),
        (b"HTTP/2.0", HOST, "HTTP/2.0"),
        (b"HTTP/0.9", [], "HTTP/0.9"),
        (b"HTTP/1.2", HOST, "HTTP/1.2"),
    ],
    ids=[
        "identity",
        "identity, chunked",
        "chunked twice",
        "gzip, chunked",
        "gzip then chunked",
        "identity then chunked",
        "empty coding",
        "identity and length",
        "length and chunked",
        "HTTP/1.0 chunked",
        "no Host",
        "two Hosts",
        "two lengths",
        "length list",
        "negative length",
        "signed length",
        "empty length",
        "huge length",
        "HTTP/2.0",
        "HTTP/0.9",
        "HTTP/1.2",
    ],
)
def test_ambiguous_framing_is_a_400(version: bytes, headers: RawHeaders, message: str) -> None:
    """Transfer codings other than exactly chunked, chunked in HTTP/1.0, a missing or
    repeated Host in HTTP/1.1, a Content-Length that is not one number, and versions
    other than HTTP/1.1 and HTTP/1.0 are refused with 400 and say why."""
    error = framing_error(version, headers)
    assert error is not None
    assert (error.status, error.type) == (400, "invalid_request")
    assert message in error.message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"websocket"], True),
        ([b"WebSocket"], True),
        ([b"h2c, websocket"], True),
        ([b"h2c", b"websocket"], True),
        ([b"h2c"], False),
        ([b"websockets"], False),
        ([], False),
    ],
)
def test_websocket_upgrade_is_recognised(values: list[bytes], expected: bool) -> None:
    """Any Upgrade token equal to websocket (in any case) asks for WebSocket; the
    HTTP/1.1 server closes the connection after answering such a request."""
    assert is_websocket_upgrade([(b"Upgrade", v) for v in values]) is expected
