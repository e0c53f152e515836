"""
A WebSocket upstream for the tunnel tests: a ``websockets`` server on loopback, in a
thread of its own, whose behaviour the request path chooses:

- ``/echo``: echoes every message; ``/headers``: first sends the request's path and
  fields as JSON, then echoes; ``/close/CODE``: closes with ``CODE``;
- ``/status/CODE``: refuses the upgrade with an ordinary ``CODE`` response;
- ``/firehose/MB``: sends ``MB`` one-megabyte binary messages, counting what it sent;
- ``/hold``: sends nothing and notes when the connection ends;
- ``/v1/realtime``: a fake OpenAI Realtime API.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from ..conftest import Proxy
from ..support import LOOPBACK, wait_until, within

__all__ = ["WebSocketUpstream", "in_thread", "ws_proxy", "ws_upstream", "ws_url"]


@attrs.define
class WebSocketUpstream:
    """A WebSocket server that echoes, reports and closes as the path says."""

    server: Server
    url: str
    closes: list[int | None] = attrs.Factory(list)
    """The close codes its connections received from the client, in order."""
    sent: int = 0
    """Bytes the firehose has sent so far."""
    ended_at: list[float] = attrs.Factory(list)
    """When each ``/hold`` connection ended (``time.monotonic()``)."""


def _refuse(connection: ServerConnection, request: Request) -> Response | None:
    """``/status/401``, ``/status/404``: no upgrade, an ordinary response."""
    if request.path.startswith("/status/"):
        status = int(request.path.split("/")[2])
        return connection.respond(status, f"refused with {status}\n")
    return None


def _choose(connection: ServerConnection, offered: Sequence[str]) -> str | None:
    """``realtime`` when the client offers it; none otherwise (none offered: none)."""
    return "realtime" if "realtime" in offered else None


def _serve(upstream: WebSocketUpstream) -> Callable[[ServerConnection], None]:
    def handle(connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        path = request.path
        if path.startswith("/v1/realtime"):
            _realtime(connection)
            return
        if path.startswith("/headers"):
            connection.send(
                json.dumps({"path": path, "headers": dict(request.headers.raw_items())})
            )
        if path.startswith("/close/"):
            connection.close(int(path.split("/")[2]), "upstream says bye")
            return
        if path.startswith("/firehose/"):
            _firehose(connection, upstream, int(path.split("/")[2]))
            return
        if path == "/hold":
            try:
                connection.recv()
            except ConnectionClosed:
                upstream.ended_at.append(time.monotonic())
            return
        try:
            for message in connection:
                connection.send(message)
        except ConnectionClosed:
            pass
        upstream.closes.append(connection.close_code)

    return handle


def _firehose(connection: ServerConnection, upstream: WebSocketUpstream, megabytes: int) -> None:
    chunk = b"\xa5" * 1024 * 1024
    try:
        for _ in range(megabytes):
            connection.send(chunk)
            upstream.sent += len(chunk)
    except ConnectionClosed:
        pass


def _realtime(connection: ServerConnection) -> None:
    """A fake OpenAI Realtime API: a session, then one response per ``response.create``."""
    connection.send(
        json.dumps(
            {
                "type": "session.created",
                "event_id": "event_1",
                "session": {"type": "realtime", "id": "sess_1", "object": "realtime.session"},
            }
        )
    )
    for message in connection:
        event = json.loads(message)
        if event.get("type") == "response.create":
            connection.send(
                json.dumps(
                    {
                        "type": "response.output_text.delta",
                        "event_id": "event_2",
                        "response_id": "resp_1",
                        "item_id": "item_1",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": "Hello through aiproxy",
                    }
                )
            )


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WebSocketUpstream]:
    """The WebSocket server, on a loopback port, in a thread of its own."""
    upstream = WebSocketUpstream(None, "")  # type: ignore[arg-type]
    server = serve(
        _serve(upstream),
        LOOPBACK,
        0,
        select_subprotocol=_choose,
        process_request=_refuse,
        max_size=None,
    )
    upstream.server = server
    upstream.url = f"http://{LOOPBACK}:{server.socket.getsockname()[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield upstream
    server.shutdown()
    thread.join(5)


@pytest_twisted.async_yield_fixture
async def ws_proxy(
    ws_upstream: WebSocketUpstream, start_proxy: Callable[..., Proxy]
) -> AsyncIterator[Proxy]:
    """aiproxy in front of the WebSocket server; after the test, its tunnels have closed
    on both sides (the upstream's thread may take a moment to close its end)."""
    proxy = start_proxy(ws_upstream.url)
    yield proxy
    await wait_until(lambda: proxy.core.active_tunnels == 0, 10, "every tunnel closed")
    await wait_until(lambda: not _lingering(), 10, "both sides of every tunnel closed")


def _lingering() -> list[object]:
    """The timers that would drop a tunnel side that has not closed yet."""
    return [call for call in reactor.getDelayedCalls() if "Tunnel._drop" in repr(call)]


async def in_thread(work: Callable[[], Any], seconds: float = 20) -> Any:
    """Run a blocking client in a thread, while the reactor serves the proxy."""
    return await within(threads.deferToThread(work), seconds)


def ws_url(proxy: Proxy, path: str) -> str:
    """The ``ws://`` URL of ``path`` through ``proxy``."""
    return f"ws://{LOOPBACK}:{proxy.port}{path}"
