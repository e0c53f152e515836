"""The API key a browser puts in its WebSocket subprotocol list, taken out of it."""

from __future__ import annotations

import pytest

from aiproxy.rules.websocket import take_subprotocol_key


@pytest.mark.parametrize(
    ("headers", "key", "kept"),
    [
        (
            [(b"Sec-WebSocket-Protocol", b"realtime, openai-insecure-api-key.sk-abc")],
            "sk-abc",
            [(b"Sec-WebSocket-Protocol", b"realtime")],
        ),
        (
            [(b"sec-websocket-protocol", b"openai-insecure-api-key.sk-abc")],
            "sk-abc",
            [],
        ),
        (
            [
                (b"Sec-WebSocket-Protocol", b"realtime"),
                (b"Sec-WebSocket-Protocol", b"openai-insecure-api-key.k1, chat"),
            ],
            "k1",
            [(b"Sec-WebSocket-Protocol", b"realtime"), (b"Sec-WebSocket-Protocol", b"chat")],
        ),
        ([(b"Sec-WebSocket-Protocol", b"realtime, chat")], None, None),
        ([(b"Host", b"h")], None, None),
    ],
    ids=["with-realtime", "alone-field-dropped", "two-fields", "no-key", "no-field"],
)
def test_the_key_entry_is_taken_out_of_the_list(
    headers: list[tuple[bytes, bytes]], key: str | None, kept: list[tuple[bytes, bytes]] | None
) -> None:
    """The key is returned; its entry never goes upstream, and an emptied field is dropped."""
    assert take_subprotocol_key(headers) == (key, headers if kept is None else kept)
