"""
One request on an HTTP/1.1 connection of :mod:`aiproxy.server.http1`: what llhttp has
read of it, and the core's ``ClientSide`` for its response, framed for this client
(chunked or ``Content-Length``, ``Connection: close`` when the connection ends after
it), its head held until the first body bytes so that both go in one write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IPushProducer

from aiproxy._twisted import write_now
from aiproxy.core.interfaces import Exchange, Incoming, RawHeaders, TunnelEnd
from aiproxy.errors import ProxyError
from aiproxy.server.body import StreamedBody

if TYPE_CHECKING:
    from aiproxy.core.activity import Activity

__all__ = ["BODY", "DONE", "HEAD", "Connection", "HTTP11Request"]

# A request's state, as llhttp has read it.
HEAD = 0  # its head is arriving
BODY = 1  # its body is arriving
DONE = 2  # all of it has arrived (or all that will be read)

_FIELD = b": ".join
_LAST_CHUNK = b"0\r\n\r\n"
_END = b"\r\n"
_CLOSE = b"Connection: close\r\n\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"
_CHUNKED_CLOSE = b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"


class Connection(Protocol):
    """What a request's response needs of its connection."""

    transport: Any
    activity: Activity

    @property
    def closing(self) -> bool:
        """Whether the connection closes once the requests in flight are answered."""

    def closes_after(self, request: HTTP11Request) -> None:
        """``request``'s response says ``Connection: close``."""

    def response_ended(self, request: HTTP11Request) -> None:
        """``request``'s response is complete."""

    def abort_now(self) -> None:
        """Drop the connection at once."""

    def become_tunnel(self, request: HTTP11Request, head: bytes) -> TunnelEnd:
        """Send ``head`` (a ``101``) and hand the connection over as a tunnel end."""


class HTTP11Request:
    """
    One request on an HTTP/1.1 connection: what was received, and the core's
    ``ClientSide`` for its response, which frames it for this client.

    After the response has ended (or the client has gone), every call is ignored.

    @ivar method: the request method, as sent.
    @ivar target: the request target, as sent.
    @ivar headers: the header fields, in wire order and case (trailing whitespace off).
    @ivar version: ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``.
    @ivar state: how much of it has arrived: its head, its body, or all of it.
    @ivar received: body bytes received so far.
    @ivar close_after: the connection closes once its response has been sent.
    @ivar started: handed to the core.
    @ivar ended: its response has ended, or its client has gone.
    """

    method = b""
    target = b""
    version = b"HTTP/1.1"
    state = HEAD
    length: int | None = None
    chunked = False
    received = 0
    source: StreamedBody | None = None
    expect_continue = False
    refusal: ProxyError | None = None
    """An error the core answers instead of handling it (a body too large, too slow)."""
    door_error: ProxyError | None = None
    """An error in its head, answered by the connection itself."""
    upgrade_pending = False
    tunnel = False
    """A WebSocket upgrade: the connection may become a tunnel (:meth:`upgrade`)."""
    close_after = False
    linger = False
    close_now = False
    started = False
    ended = False
    exchange: Exchange | None = None
    incoming: Incoming | None = None
    _head_sent = False
    _held_head = b""
    _has_body = False
    _chunked = False
    producing = False

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.url: list[bytes] = []
        self.headers: RawHeaders = []
        self.body: list[bytes] | None = []

    # -- ClientSide ----------------------------------------------------------------------

    def send_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, body: bool
    ) -> None:
        """
        Write the status line, ``headers`` as given, and the framing: chunked for a
        body of unknown length to an HTTP/1.1 client (an HTTP/1.0 one reads until the
        connection closes), and ``Connection: close`` if the connection closes after
        this response.
        """
        if self._head_sent or self.ended:
            return
        self._head_sent = True
        connection = self._connection
        has_body = body and self.method != b"HEAD"
        self._has_body = has_body
        # A body still arriving when the response starts is dropped after it: close.
        close = (
            self.close_after
            or self.state != DONE
            or connection.closing
            or connection.activity.draining
        )
        if has_body and length is None:
            if self.version == b"HTTP/1.1":
                self._chunked = True
                end = _CHUNKED_CLOSE if close else _CHUNKED
            else:
                close = True
                end = _CLOSE
        elif close:
            end = _CLOSE
        elif self.version == b"HTTP/1.0":
            end = _KEEP_ALIVE
        else:
            end = _END
        if close and not self.close_after:
            self.close_after = True
            connection.closes_after(self)
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        lines += map(_FIELD, headers)
        lines.append(end)
        # Held until the first body bytes or the end, so that both go in one write.
        self._held_head = b"\r\n".join(lines)

    def send_body(self, pieces: Sequence[bytes], raw_chunked: bytes | None) -> None:
        """Write body bytes, chunk-framed for a chunked response (``raw_chunked`` as is)."""
        if self.ended:
            return
        if not self._has_body:
            self.flush()
            return
        if self._chunked:
            if raw_chunked is not None:
                data = raw_chunked
            else:
                data = b"".join(
                    [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece]
                )
        else:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self._held_head:
            data = self._held_head + data
            self._held_head = b""
        if data:
            write_now(self._connection.transport, data)

    def flush(self) -> None:
        """Send the head now if it is still held (no body bytes came with it)."""
        if self._held_head and not self.ended:
            head, self._held_head = self._held_head, b""
            write_now(self._connection.transport, head)

    def finish(self) -> None:
        """End the response: the last chunk, then the next request (or the close)."""
        if self.ended:
            return
        if not self._head_sent:  # nothing to end: the client must not wait for more
            self.abort()
            return
        data = self._held_head + _LAST_CHUNK if self._chunked else self._held_head
        self._held_head = b""
        if data:
            write_now(self._connection.transport, data)
        self._connection.response_ended(self)

    def abort(self) -> None:
        """Abort the connection, so that the response cannot look complete."""
        if self.ended:
            return
        self.ended = True
        self._held_head = b""
        self._connection.abort_now()

    def pause_upstream_with(self, producer: IPushProducer | None) -> None:
        """Register ``producer`` as the client transport's streaming producer; None: unregister."""
        if self.ended:
            return
        transport = self._connection.transport
        if self.producing:
            self.producing = False
            transport.unregisterProducer()
        if producer is not None:
            transport.registerProducer(producer, True)
            self.producing = True

    @property
    def tunnels(self) -> bool:
        """Whether this request may become a tunnel: a WebSocket upgrade over HTTP/1.1."""
        return self.tunnel and self.version == b"HTTP/1.1" and not self.ended

    def upgrade(self, status: int, reason: bytes, headers: RawHeaders) -> TunnelEnd:
        """Write the ``101`` head as given; the connection is a tunnel end from now on."""
        self._head_sent = self.ended = True
        lines = [b"HTTP/1.1 %d %s" % (status, reason), *map(_FIELD, headers), b"\r\n"]
        return self._connection.become_tunnel(self, b"\r\n".join(lines))
