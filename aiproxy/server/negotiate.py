"""
The door of a TLS listener: aiproxy's own HTTP/2 server (:mod:`aiproxy.server.http2`)
when the client chose ``h2`` by ALPN, its HTTP/1.1 server otherwise; both onto the
same core.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["NegotiatingFactory", "NegotiatingProtocol"]

HANDSHAKE_TIMEOUT = 75.0
"""Seconds a new TLS connection may take to send its first request bytes."""


@implementer(IProtocolNegotiationFactory)
class NegotiatingFactory(Factory):
    """
    Builds the protocol of each TLS connection, offering ``h2`` and ``http/1.1`` by
    ALPN: ``http2`` builds the HTTP/2 protocols, ``http1`` the HTTP/1.1 ones.

    @param clock: the time of the handshake deadline.
    """

    def __init__(self, http1: Factory, http2: Factory, clock: IReactorTime) -> None:
        self.http1 = http1
        self.http2 = http2
        self.clock = clock

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
        self._owner = factory
        self._addr = addr
        self._chosen: Any = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """Give the client a while to handshake and start."""
        self._timer = self._owner.clock.callLater(HANDSHAKE_TIMEOUT, self._too_slow)

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
        factory = self._owner
        if getattr(transport, "negotiatedProtocol", None) == b"h2":
            chosen: Any = factory.http2.buildProtocol(self._addr)
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
        if self._chosen is not None:
            self._chosen.connectionLost(reason)
