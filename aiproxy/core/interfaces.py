"""
The contracts between the proxy core, its front doors and its upstream client.

A front door (the HTTP/1.1 server, the twisted.web resource, later HTTP/2) parses a
client's request, computes its :class:`Incoming` once, and hands it to the core with its
body and a :class:`ClientSide`: the small set of things the core may do to the client's
response. The core talks to the upstream through :class:`UpstreamClient`, whose
responses deliver their bodies to a :class:`ResponseSink`.

Headers are ``RawHeaders``: a list of ``(name, value)`` pairs of bytes, names in the case
they were received (or are to be sent), in wire order, repeated names kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer

if TYPE_CHECKING:
    from aiproxy.core.record import RequestRecord

__all__ = [
    "BodySink",
    "BodySource",
    "ClientConnection",
    "ClientSide",
    "Endpoint",
    "Exchange",
    "Incoming",
    "LocalResponse",
    "RawHeaders",
    "RequestBody",
    "RequestHandler",
    "ResponseSink",
    "TunnelEnd",
    "TunnelPeer",
    "UpstreamClient",
    "UpstreamResponse",
]

RawHeaders = list[tuple[bytes, bytes]]
"""Header fields in wire order and case: ``[(b"Content-Type", b"application/json"), ...]``."""


@attrs.define(eq=False)
class Incoming:
    """
    A client's request as a door hands it to the core, computed once.

    @ivar method: the request method, as sent (``b"POST"``).
    @ivar target: the raw request target below the door's mount point, origin-form
        (``b"/v1/chat/completions?x=1"``); exactly what is appended to ``TARGET_URL``.
    @ivar headers: the request's header fields, as received.
    @ivar version: ``b"HTTP/1.1"``, ``b"HTTP/1.0"`` or ``b"HTTP/2"``.
    @ivar scheme: ``b"https"`` if the client reached the proxy over TLS, else ``b"http"``.
    @ivar peer: the peer's IP address; L{None} for a UNIX socket peer.
    @ivar request_id: the request's ID (see ``rules.headers.choose_request_id``).
    @ivar arrived_at: when the request head was complete, on the core's clock.
    @ivar record: the request's completion record, filled in by door and core.
    """

    method: bytes
    target: bytes
    headers: RawHeaders
    version: bytes
    scheme: bytes
    peer: str | None
    request_id: bytes
    arrived_at: float
    record: RequestRecord


@attrs.frozen
class LocalResponse:
    """A response aiproxy makes itself (its own endpoints, its errors), whole."""

    status: int
    headers: RawHeaders
    """Every field but the framing ones: the door adds ``Content-Length``."""
    body: bytes = b""


class Endpoint(Protocol):
    """One of aiproxy's own endpoints (``/api/health``...): the same for every door."""

    def __call__(self, request: Incoming) -> LocalResponse:
        """The answer to ``request`` (a ``GET`` or ``HEAD``; the core checks the method)."""


class Exchange(Protocol):
    """The core's handle on one request, kept by the door that started it."""

    def client_gone(self) -> None:
        """The client went away before its response ended: cancel the upstream."""


class RequestHandler(Protocol):
    """The core, as a door sees it."""

    def incoming(
        self,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        version: bytes,
        scheme: bytes,
        peer: str | None,
    ) -> Incoming:
        """The :class:`Incoming` of a request whose head is complete: ID, time, record."""

    def handle(self, request: Incoming, body: RequestBody, client: ClientSide) -> Exchange:
        """
        Answer ``request``: aiproxy's own endpoints and refusals, or the upstream's
        response. The response goes to ``client``; the returned exchange is told if the
        client leaves.
        """

    def refuse(self, request: Incoming, error: Exception, client: ClientSide) -> Exchange:
        """
        Answer ``request`` with ``error`` (a ``ProxyError``: ``413``, ``408``...) instead
        of handling it, logged and counted like any request.
        """


class ClientConnection(Protocol):
    """A client connection, as a graceful drain sees it (see ``core.activity``)."""

    def close_if_idle(self) -> None:
        """
        Close now if no request is in flight on it; else close once the responses in
        flight are sent (HTTP/1.x says ``Connection: close`` if it still can).
        """

    def abort(self) -> None:
        """Drop the connection now; every response on it ends unfinished."""


class ClientSide(Protocol):
    """
    What the core may do to one client's response; each door implements it.

    The core calls :meth:`send_head` once, then :meth:`send_body` any number of times,
    then exactly one of :meth:`finish` or :meth:`abort` (or nothing more once the door
    has told it the client is gone).
    """

    def send_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, body: bool
    ) -> None:
        """
        Start the response.

        @param headers: every field to send, in order: end-to-end ones only (no
            ``Connection``, ``Transfer-Encoding`` or other hop-by-hop field), and a
            ``Content-Length`` exactly when ``length`` is not L{None}.
        @param length: the body's length when known; L{None} means "until
            :meth:`finish`" (the door chooses chunked framing, or closing the
            connection for an HTTP/1.0 client).
        @param body: whether a body follows at all (false for a response to ``HEAD``
            and for ``204``/``304``); a ``Content-Length`` then describes the body a
            ``GET`` would have had.
        """

    def send_body(self, pieces: Sequence[bytes], raw_chunked: bytes | None) -> None:
        """
        Send body bytes at once, in order.

        @param pieces: the decoded body bytes.
        @param raw_chunked: the same bytes already in HTTP/1.1 chunked framing (whole
            chunks, no final chunk), when the upstream sent them so; a door whose
            client framing is chunked may write these as they are.
        """

    def flush(self) -> None:
        """
        Send the head now if the door holds it (it may hold it until the first body
        bytes, so that both go out in one write); the core calls this once it has passed
        on whatever body bytes came with the upstream's head.
        """

    def finish(self) -> None:
        """The body is complete: end the response cleanly."""

    def abort(self) -> None:
        """End the response so the client cannot take it for complete."""

    def pause_upstream_with(self, producer: IPushProducer | None) -> None:
        """
        Let the client's flow control pause and resume ``producer`` (the upstream
        connection); L{None} unregisters it.
        """

    @property
    def tunnels(self) -> bool:
        """Whether this door can turn the connection into a tunnel (:meth:`upgrade`)."""

    def upgrade(self, status: int, reason: bytes, headers: RawHeaders) -> TunnelEnd:
        """
        Send a ``101 Switching Protocols`` head (``headers`` exactly as given, hop-by-hop
        fields included) instead of :meth:`send_head`, and hand over the connection:
        from now on its bytes go through the returned end, unparsed.
        """


class TunnelPeer(Protocol):
    """Who a :class:`TunnelEnd` reports to: the tunnel that joins it to the other end."""

    def received(self, end: TunnelEnd, data: bytes) -> None:
        """``end``'s side sent ``data``."""

    def closed(self, end: TunnelEnd, reason: str | None) -> None:
        """``end``'s side closed (``reason`` L{None}) or was lost (``reason`` says how)."""


class TunnelEnd(Protocol):
    """
    One side of a byte tunnel after a ``101``: the client's connection or the
    upstream's. Bytes that arrived with the ``101`` are passed on at :meth:`join`.
    """

    producer: IPushProducer
    """Pauses and resumes reading from this side."""

    @property
    def gone(self) -> bool:
        """Whether this side is closed or lost."""

    def join(self, peer: TunnelPeer) -> None:
        """Report to ``peer`` from now on: what is held at once, then as it comes."""

    def write(self, data: bytes) -> None:
        """Send ``data`` to this side."""

    def pause_with(self, producer: IPushProducer) -> None:
        """Pause ``producer`` (the other side's reading) while this side's sending is behind."""

    def close(self) -> None:
        """Close this side once what was written is sent; drop it if it lingers."""

    def abort(self) -> None:
        """Drop this side now."""


class BodySink(Protocol):
    """Where a :class:`BodySource` writes a request body (the upstream connection)."""

    def write(self, data: bytes) -> None:
        """Send the next piece of the body (framed by the sink, if it chunks)."""

    def finish(self) -> None:
        """The whole body has been written."""

    def fail(self, reason: Exception) -> None:
        """
        The body cannot be completed (the client left, was too slow, sent too much):
        the upstream request is abandoned and fails with ``reason``.
        """

    def register_producer(self, producer: IPushProducer | IPullProducer, streaming: bool) -> None:
        """Let the upstream connection's flow control pause ``producer``."""

    def unregister_producer(self) -> None:
        """Undo :meth:`register_producer`."""


class BodySource(Protocol):
    """A request body that is not all in memory."""

    length: int | None
    """Its length when known; L{None}: sent with chunked framing."""

    def replayable(self) -> bool:
        """Whether it can still be sent again from its first byte."""

    def start(self, sink: BodySink) -> None:
        """Write the body to ``sink``, from its first byte, as fast as ``sink`` allows."""

    def stop(self) -> None:
        """The upstream request ended early: write nothing more."""


RequestBody = bytes | BodySource
"""A request body: in memory (``b""`` for none), or a :class:`BodySource`."""


class ResponseSink(Protocol):
    """Where an :class:`UpstreamResponse` delivers its body."""

    def body_received(self, pieces: list[bytes], raw_chunked: bytes | None) -> None:
        """Body bytes arrived (see :meth:`ClientSide.send_body` for the two forms)."""

    def body_done(self) -> None:
        """The body is complete."""

    def body_failed(self, reason: Exception) -> None:
        """The body ended early (the connection was lost, or the upstream broke framing)."""


class UpstreamResponse(Protocol):
    """An upstream's response head; its body follows once :meth:`deliver` is called."""

    status: int
    reason: bytes
    headers: RawHeaders
    """Every field as received, ``Connection`` and the fields it names included."""
    length: int | None
    """``Content-Length`` when the body has one; L{None} for chunked or close-delimited."""
    has_body: bool
    """False for a response to ``HEAD`` and for ``204``/``304``."""
    producer: IPushProducer
    """Pauses and resumes reading the response (the connection's transport)."""
    tunnel: TunnelEnd | None
    """For a ``101`` to a request that asked to upgrade: the connection, as a tunnel end."""

    def deliver(self, sink: ResponseSink) -> None:
        """Start passing the body to ``sink`` (at once if it has none: ``body_done``)."""

    def abort(self) -> None:
        """Drop the connection now (the client left, or a timeout): the upstream stops."""


class UpstreamClient(Protocol):
    """Sends requests to the one upstream over pooled HTTP/1.1 connections."""

    def request(self, method: bytes, head: bytes, body: RequestBody) -> Deferred[UpstreamResponse]:
        """
        Send one request and fire with its response head.

        @param head: the whole request head as it goes on the wire, request line to
            the empty line, framing fields included. A head with an ``Upgrade`` field
            may be answered ``101``: the response's ``tunnel`` is then the connection.
        @return: fires with the response, or fails with one of
            :mod:`aiproxy.upstream.errors`' exceptions (or ``body``'s failure);
            cancelling it before the response head drops the connection.
        """

    def close(self) -> Deferred[None]:
        """Close every idle connection and take no more requests."""
