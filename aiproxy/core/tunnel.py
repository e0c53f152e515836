"""
WebSocket pass-through: once the upstream has answered an upgrade with ``101``, the
client's connection and the upstream's are joined into a byte tunnel. Frames are not
parsed, terminated or re-framed: extensions and subprotocols stay end to end.

Each side's transport is registered as the producer of the other's, so a side that
reads slowly pauses reading from the side that sends (memory stays flat). The tunnel
ends when either side closes or is lost (the other is closed at once), after
``TUNNEL_IDLE_TIMEOUT`` seconds with no bytes either way, at ``TOTAL_TIMEOUT``, or when
a graceful drain runs out of time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer

from aiproxy.ops.logger import log

if TYPE_CHECKING:
    from aiproxy.core.exchange import ProxyExchange
    from aiproxy.core.interfaces import TunnelEnd, TunnelPeer

__all__ = ["CLOSE_GRACE", "TransportEnd", "Tunnel"]

CLOSE_GRACE = 5.0
"""Seconds a side closed by the tunnel may take to take what was sent before it is dropped."""

CLIENT = "client"
UPSTREAM = "upstream"


class TransportEnd:
    """
    A connection's transport as a :class:`~aiproxy.core.interfaces.TunnelEnd`; its
    protocol passes on what it reads (:meth:`data`) and its loss (:meth:`lost`).

    @param held: bytes that arrived with the upgrade, passed on at :meth:`join`.
    """

    def __init__(self, transport: Any, held: bytes = b"") -> None:
        self.transport = transport
        self.producer: IPushProducer = transport
        self._held = held
        self._peer: TunnelPeer | None = None
        self._gone: str | None = None
        self._ended = False

    def join(self, peer: TunnelPeer) -> None:
        """Report to ``peer``: the bytes held first, then the loss if it came already."""
        self._peer = peer
        held, self._held = self._held, b""
        if held:
            peer.received(self, held)
        if self._gone is not None and not self._ended:
            self._ended = True
            peer.closed(self, self._gone or None)

    def data(self, data: bytes) -> None:
        """The protocol read ``data``."""
        peer = self._peer
        if peer is None:
            self._held += data
        else:
            peer.received(self, data)

    def lost(self, reason: str | None) -> None:
        """The connection is gone: closed cleanly (L{None}) or lost (``reason``)."""
        if self._gone is not None:
            return
        self._gone = reason or ""
        peer = self._peer
        if peer is not None and not self._ended:
            self._ended = True
            peer.closed(self, reason)

    @property
    def gone(self) -> bool:
        """Whether the connection is closed or lost."""
        return self._gone is not None

    def write(self, data: bytes) -> None:
        """Send ``data`` (buffered by the transport while the side reads slowly)."""
        if self._gone is None:
            self.transport.write(data)

    def pause_with(self, producer: IPushProducer) -> None:
        """Let this side's buffer pause ``producer``."""
        if self._gone is None:
            self.transport.registerProducer(producer, True)

    def close(self) -> None:
        """Close once what was written is sent."""
        if self._gone is None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now."""
        if self._gone is None:
            self.transport.abortConnection()


class Tunnel:
    """
    A client end and an upstream end joined: bytes copied both ways as they come,
    counted, and the whole tunnel ended (and recorded once) when one side goes.

    @ivar active: set on every byte either way; the idle sweep clears it.
    """

    def __init__(self, exchange: ProxyExchange, client: TunnelEnd, upstream: TunnelEnd) -> None:
        self.exchange = exchange
        self.client = client
        self.upstream = upstream
        self.active = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed_by: str | None = None
        self.ended = False
        self._linger: dict[TunnelEnd, IDelayedCall] = {}

    def start(self) -> None:
        """Join both ends: each side's buffer pauses the other side's reading."""
        core = self.exchange.core
        core.tunnels.watch(self)
        core.active_tunnels += 1
        self.client.pause_with(self.upstream.producer)
        self.upstream.pause_with(self.client.producer)
        self.client.join(self)
        if not self.ended:
            self.upstream.join(self)

    def received(self, end: TunnelEnd, data: bytes) -> None:
        """Copy ``data`` to the other side."""
        if self.ended:
            return
        self.active = True
        if end is self.client:
            self.bytes_in += len(data)
            self.upstream.write(data)
        else:
            self.bytes_out += len(data)
            self.client.write(data)

    def closed(self, end: TunnelEnd, reason: str | None) -> None:
        """One side went: close the other at once."""
        if self.ended:
            timer = self._linger.pop(end, None)
            if timer is not None:
                timer.cancel()
            return
        side = CLIENT if end is self.client else UPSTREAM
        why = "closed" if reason is None else f"lost ({reason})"
        self.end(side, f"the {side} {why}")

    def expired(self) -> None:
        """No byte either way for ``TUNNEL_IDLE_TIMEOUT`` (see the idle sweep)."""
        timeout = self.exchange.core.tunnels.timeout
        self.end("proxy", f"no bytes either way for {timeout:g}s (TUNNEL_IDLE_TIMEOUT)")

    def end(self, closed_by: str, why: str, *, abort: bool = False) -> None:
        """
        Close both sides (dropping either if it lingers; at once if ``abort``), and
        record the tunnel, once.
        """
        if self.ended:
            return
        self.ended = True
        self.closed_by = closed_by
        exchange = self.exchange
        core = exchange.core
        core.tunnels.forget(self)
        core.active_tunnels -= 1
        for end in (self.client, self.upstream):
            if end.gone:
                continue
            if abort:
                end.abort()
            else:
                self._linger[end] = core.clock.callLater(CLOSE_GRACE, self._drop, end)
                end.close()
        record = exchange.request.record
        record.bytes_in += self.bytes_in
        record.bytes_out = self.bytes_out
        log.info(
            "Tunnel closed by the {closed_by}: {why} [Bytes: {bytes_in} in, {bytes_out} out]"
            " [ID: {request_id}]",
            closed_by=closed_by,
            why=why,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            request_id=record.request_id,
        )
        exchange.tunnel_ended(self)

    def _drop(self, end: TunnelEnd) -> None:
        del self._linger[end]
        end.abort()
