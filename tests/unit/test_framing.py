"""The pure rules for request heads: framing, Host, and WebSocket upgrades."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from aiproxy.core.admission import is_websocket_upgrade
from aiproxy.rules.framing import framing_error

HOST = [(b"Host", b"proxy.example")]


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


@pytest.mark.parametrize(
    ("version", "pairs"),
    [
        (b"HTTP/1.1", HOST),
        (b"HTTP/1.1", [*HOST, (b"Content-Length", b"5")]),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"chunked")]),
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"Chunked")]),
        (b"HTTP/1.0", []),
        (b"HTTP/1.0", [(b"Content-Length", b"5")]),
    ],
)
def test_well_framed_heads_pass(version: bytes, pairs: list[tuple[bytes, bytes]]) -> None:
    """A Content-Length, a chunked body, or no body at all is fine; HTTP/1.0 needs no Host."""
    assert framing_error(version, headers(*pairs)) is None


@pytest.mark.parametrize(
    ("version", "pairs", "message"),
    [
        (b"HTTP/1.1", [*HOST, (b"Transfer-Encoding", b"identity")], "only"),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"identity"), (b"Content-Length", b"5")],
            "only",
        ),
        (
            b"HTTP/1.1",
            [*HOST, (b"Transfer-Encoding", b"identity"), (b"Transfer-Encoding", b"chunked")],
            "only",
        ),
        (b"HTTP/1.0", [(b"Transfer-Encoding", b"chunked")], "HTTP/1.0"),
        (b"HTTP/1.1", [], "Host"),
        (b"HTTP/1.1", [*HOST, (b"Host", b"other.example")], "Host"),
    ],
    ids=["identity", "identity+length", "identity+chunked", "1.0 chunked", "no host", "two hosts"],
)
def test_ambiguous_framing_is_a_400(
    version: bytes, pairs: list[tuple[bytes, bytes]], message: str
) -> None:
    """Transfer codings other than chunked, chunked in HTTP/1.0, and a missing or
    repeated Host in HTTP/1.1 are refused with 400 and say why."""
    error = framing_error(version, headers(*pairs))
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
    """Any Upgrade token equal to websocket (in any case) asks for WebSocket."""
    assert is_websocket_upgrade(headers(*[(b"Upgrade", v) for v in values])) is expected
