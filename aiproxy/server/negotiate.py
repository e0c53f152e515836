"""
The door of a TLS listener: HTTP/2 when the client chose ``h2`` by ALPN (served by
twisted.web's HTTP/2 connection, through :mod:`aiproxy.server.web`, onto the same
core), aiproxy's own HTTP/1.1 server otherwise.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy._twisted import new_h2_connection
from aiproxy.core.activity import Activity
from aiproxy.server.web import ProxySite

__all__ = ["NegotiatingFactory", "NegotiatingProtocol"]

HANDSHAKE_TIMEOUT = 75.0
"""Seconds a new TLS connection may take to send its first request bytes."""


@implementer(IProtocolNegotiationFactory)
class NegotiatingFactory(Factory):
    """
    Builds the protocol of each TLS connection, offering ``h2`` and ``http/1.1`` by
    ALPN: ``http1`` builds the HTTP/1.1 protocols, ``site`` serves HTTP/2.
    """

    def __init__(self, http1: Factory, site: ProxySite, activity: Activity) -> None:
        self.http1 = http1
        self.site = site
        self.activity = activity

    def acceptableProtocols(self) -> list[bytes]:
        """``h2`` first, then ``http/1.1``."""
        return [b"h2", b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """A protocol that becomes HTTP/2 or HTTP/1.1 once the handshake has chosen."""
        protocol = NegotiatingProtocol(self, addr)
        protocol.factory = self
        return protocol


class NegotiatingProtocol(Protocol):
    """
    Waits for the client's first bytes (the TLS handshake is over by then), then hands
    the connection to the protocol ALPN chose and forwards everything to it.
    """

    def __init__(self, factory: NegotiatingFactory, addr: IAddress | None) -> None:
        self._factory = factory
        self._addr = addr
        self._chosen: Any = None
        self._timer: IDelayedCall | None = None
        self._h2_drain: _H2Drain | None = None

    def connectionMade(self) -> None:
        """Give the client a while to handshake and start."""
        clock = self._factory.site.reactor
        self._timer = clock.callLater(HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        """Choose the protocol on the first bytes, then pass bytes on."""
        chosen = self._chosen
        if chosen is None:
            chosen = self._choose()
        chosen.dataReceived(data)

    def _choose(self) -> Any:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport: Any = self.transport
        factory = self._factory
        if getattr(transport, "negotiatedProtocol", None) == b"h2":
            site = factory.site
            chosen: Any = new_h2_connection(site, site.reactor)
            chosen.makeConnection(transport)
            transport.registerProducer(chosen, True)
            self._h2_drain = _H2Drain(chosen)
            factory.activity.opened(self._h2_drain)
        else:
            chosen = factory.http1.buildProtocol(self._addr)
            chosen.makeConnection(transport)
        self._chosen = chosen
        return chosen

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Pass the loss on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._h2_drain is not None:
            self._factory.activity.closed(self._h2_drain)
        if self._chosen is not None:
            self._chosen.connectionLost(reason)


class _H2Drain:
    """An HTTP/2 connection as a graceful drain sees it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def close_if_idle(self) -> None:
        """
        Close with ``GOAWAY`` if no stream is open. A busy connection is left alone:
        h2 sends nothing on any stream once it has sent ``GOAWAY``.
        """
        connection = self.connection
        transport = connection.transport
        if transport is None or transport.disconnecting or connection.streams:
            return
        connection.conn.close_connection()
        transport.write(connection.conn.data_to_send())
        # A TLS transport waits for its producer to be unregistered before it closes.
        transport.unregisterProducer()
        transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection."""
        transport = self.connection.transport
        if transport is not None:
            transport.abortConnection()
