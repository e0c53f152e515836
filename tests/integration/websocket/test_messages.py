"""
WebSocket pass-through over real sockets: the ``websockets`` client (and the ``openai``
SDK's realtime client) through aiproxy to a ``websockets`` server on loopback. The
clients block, so each runs in a thread while the reactor serves the proxy.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import openai
import pytest
import pytest_twisted
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from ..conftest import Proxy
from ..support import LOOPBACK
from .conftest import WebSocketUpstream, in_thread, ws_url


@pytest_twisted.ensureDeferred
async def test_messages_flow_both_ways_with_the_chosen_subprotocol(ws_proxy: Proxy) -> None:
    """Text and binary messages are echoed through the proxy; the subprotocol the
    upstream chose reaches the client, and the upstream saw the client's offer and the
    forwarding fields."""

    def talk() -> tuple[Any, ...]:
        with connect(ws_url(ws_proxy, "/headers?x=1"), subprotocols=["realtime", "chat"]) as ws:  # type: ignore[list-item]
            seen = json.loads(ws.recv())
            ws.send("hello")
            text = ws.recv()
            ws.send(b"\x00\x01binary")
            binary = ws.recv()
            return seen, text, binary, ws.subprotocol, ws.response.headers

    seen, text, binary, subprotocol, headers = await in_thread(talk)
    assert (text, binary, subprotocol) == ("hello", b"\x00\x01binary", "realtime")
    assert seen["path"] == "/headers?x=1"
    offered = {k.lower(): v for k, v in seen["headers"].items()}
    assert offered["sec-websocket-protocol"] == "realtime, chat"
    assert offered["x-forwarded-for"] == LOOPBACK
    assert offered["x-request-id"]
    assert "permessage-deflate" in offered["sec-websocket-extensions"]
    assert "permessage-deflate" in headers["Sec-WebSocket-Extensions"]


@pytest_twisted.ensureDeferred
async def test_no_subprotocol_is_invented(ws_proxy: Proxy) -> None:
    """A client that offers none gets none, and no empty header."""

    def talk() -> Headers:
        with connect(ws_url(ws_proxy, "/echo")) as ws:
            assert ws.subprotocol is None
            return ws.response.headers

    headers = await in_thread(talk)
    assert "Sec-WebSocket-Protocol" not in headers


@pytest_twisted.ensureDeferred
async def test_a_ten_megabyte_message_and_pings_pass(ws_proxy: Proxy) -> None:
    """A 10 MB binary message arrives whole and unchanged; a ping gets its pong."""
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)

    def talk() -> tuple[bytes, float]:
        with connect(ws_url(ws_proxy, "/echo"), max_size=None, compression=None) as ws:
            ws.send(payload)
            echoed = ws.recv(timeout=30)
            latency = ws.ping().wait(10) and 0.0
            return echoed, latency  # type: ignore[return-value]

    echoed, _ = await in_thread(talk, 60)
    assert echoed == payload


@pytest_twisted.ensureDeferred
async def test_close_codes_are_relayed_both_ways(
    ws_proxy: Proxy, ws_upstream: WebSocketUpstream
) -> None:
    """The client's close code reaches the upstream, and the upstream's the client."""

    def client_closes() -> None:
        with connect(ws_url(ws_proxy, "/echo")) as ws:
            ws.send("x")
            ws.recv()
            ws.close(4000, "client says bye")

    def upstream_closes() -> tuple[int | None, str | None]:
        with connect(ws_url(ws_proxy, "/close/4001")) as ws:
            try:
                ws.recv(timeout=10)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason
        raise AssertionError("the upstream's close did not arrive")

    before = len(ws_upstream.closes)
    await in_thread(client_closes)
    for _ in range(100):
        if len(ws_upstream.closes) > before:
            break
        await in_thread(lambda: threading.Event().wait(0.02))
    assert ws_upstream.closes[before] == 4000
    assert await in_thread(upstream_closes) == (4001, "upstream says bye")


@pytest.mark.parametrize("status", [401, 404])
@pytest_twisted.ensureDeferred
async def test_an_upstream_that_does_not_switch_is_relayed(ws_proxy: Proxy, status: int) -> None:
    """An upstream answering ``401`` or ``404`` instead of ``101``: the client gets that."""

    def talk() -> int:
        try:
            connect(ws_url(ws_proxy, f"/status/{status}"))
        except InvalidStatus as refused:
            return refused.response.status_code
        raise AssertionError("the connection was upgraded")

    assert await in_thread(talk) == status


@pytest_twisted.ensureDeferred
async def test_the_openai_realtime_client_works_through_the_proxy(ws_proxy: Proxy) -> None:
    """The official SDK's realtime client exchanges events with a realtime upstream."""

    def talk() -> list[str]:
        client = openai.OpenAI(api_key="sk-test", base_url=f"http://{LOOPBACK}:{ws_proxy.port}/v1")
        seen = []
        with client.realtime.connect(model="gpt-realtime") as connection:
            seen.append(connection.recv().type)
            connection.response.create()
            event = connection.recv()
            seen.append(event.type)
            seen.append(getattr(event, "delta", ""))
        return seen

    assert await in_thread(talk) == [
        "session.created",
        "response.output_text.delta",
        "Hello through aiproxy",
    ]
