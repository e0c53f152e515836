"""Inherited listening sockets take one waiting connection at a time, leaving the rest to
the sibling processes that share the socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import AlreadyListened
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

from aiproxy.run.listening import OneAcceptPort, SharedSocketEndpoint, shared_if_inherited


class CountingFactory(Factory):
    """Counts the connections accepted, and keeps their transports to close them."""

    protocol = Protocol

    def __init__(self) -> None:
        self.accepted: list[Protocol] = []

    def buildProtocol(self, addr: object) -> Protocol:
        protocol = Protocol()
        self.accepted.append(protocol)
        return protocol


@pytest.fixture
def waiting() -> Iterator[socket.socket]:
    """A listening socket with three connections waiting in its backlog."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    yield listener
    for client in clients:
        client.close()
    listener.close()


def accepted_on_one_wake_up(port_type: type[tcp.Port], listener: socket.socket) -> int:
    """How many of the waiting connections a port of ``port_type`` accepts when readable."""
    factory = CountingFactory()
    fd = listener.fileno()
    port = port_type._fromListeningDescriptor(MemoryReactor(), fd, socket.AF_INET, factory)
    port.startListening()
    try:
        port.doRead()
    finally:
        for protocol in factory.accepted:
            protocol.transport.socket.close()  # type: ignore[attr-defined]
        port.socket.close()
    return len(factory.accepted)


def test_a_shared_socket_accepts_one_connection_per_wake_up(waiting: socket.socket) -> None:
    """Of three connections waiting, one wake-up of the shared port takes one, leaving
    the others to a sibling process."""
    assert accepted_on_one_wake_up(OneAcceptPort, waiting) == 1


def test_twisteds_port_takes_every_waiting_connection(waiting: socket.socket) -> None:
    """The contrast: Twisted's own port takes all three (a sibling would get none)."""
    assert accepted_on_one_wake_up(tcp.Port, waiting) == 3


def test_inherited_tcp_sockets_are_listened_on_one_accept_at_a_time() -> None:
    """``systemd:domain=INET`` endpoints become shared-socket endpoints; others stay."""
    reactor = MemoryReactor()
    inherited = AdoptedStreamServerEndpoint(reactor, 3, socket.AF_INET)
    shared = shared_if_inherited(inherited)
    assert isinstance(shared, SharedSocketEndpoint)
    assert (shared.fileno, shared.family) == (3, socket.AF_INET)
    tcp_endpoint = serverFromString(reactor, "tcp:0")
    assert shared_if_inherited(tcp_endpoint) is tcp_endpoint
    unix = AdoptedStreamServerEndpoint(reactor, 3, socket.AF_UNIX)
    assert shared_if_inherited(unix) is unix


def test_a_shared_socket_endpoint_listens_once() -> None:
    """Like any adopted socket, it can be listened on only once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    endpoint = SharedSocketEndpoint(MemoryReactor(), listener.detach(), socket.AF_INET)
    ports: list[tcp.Port] = []
    endpoint.listen(CountingFactory()).addCallback(ports.append)
    [port] = ports
    assert isinstance(port, OneAcceptPort)
    failures: list[object] = []
    endpoint.listen(CountingFactory()).addErrback(failures.append)
    [failure] = failures
    assert failure.check(AlreadyListened)  # type: ignore[attr-defined]
    port.socket.close()
