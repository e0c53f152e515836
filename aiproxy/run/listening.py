"""
Listening on an inherited socket that other processes accept on too.

A worker process (``--workers``) or a process started by systemd socket activation gets
its listening socket (TCP or UNIX) as a file descriptor, shared with its siblings. Twisted's own
listening port accepts up to a hundred waiting connections each time the socket is
readable, so when clients connect in a burst one process takes them all and its
siblings idle: in the ``small`` benchmark (64 connections opened at once) two workers
served 1,168 requests/s on one core between them. Accepting one connection per wake-up
lets each process take connections only as fast as it gets back to its event loop, so a
busy process leaves the next ones to an idle sibling: 2,035 requests/s on both cores
(see BENCHMARKS.md).

The private corners of Twisted this needs (how ``reactor.adoptStreamPort`` builds its
ports, and an ``ssl:`` endpoint's TLS context) are reached through :mod:`aiproxy._twisted`.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import endpoints, fdesc, tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import AlreadyListened
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from aiproxy._twisted import (
    port_from_descriptor,
    server_address,
    ssl_context_factory,
    unix_port_from_descriptor,
)
from aiproxy.config import ConfigError

__all__ = [
    "LISTEN_BACKLOG",
    "OneAcceptPort",
    "OneAcceptUNIXPort",
    "SharedSocketEndpoint",
    "inherited",
    "server_endpoint",
    "shared_if_inherited",
    "with_backlog",
]

LISTEN_BACKLOG = 1024
"""
Connections the kernel queues for a listening socket before aiproxy accepts them.
Twisted's default of 50 made a burst of 2,000 new connections wait seconds on SYN
retries; the kernel caps the value at ``net.core.somaxconn``.
"""


def with_backlog(description: str) -> str:
    """
    The endpoint string ``description`` with ``backlog=`` :data:`LISTEN_BACKLOG` added
    when it is a ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:`` endpoint that sets none.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6", "ssl", "unix") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


_TCP_KINDS = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
)


def server_endpoint(reactor: object, description: str) -> IStreamServerEndpoint:
    """
    The server endpoint of the ``--port`` string ``description``, with
    :func:`with_backlog`'s backlog.

    @raise ConfigError: ``description`` cannot be parsed, names a file that cannot be
        read (an ``ssl:`` key or certificate), or a TCP port outside 0-65535.
    """
    try:
        endpoint = endpoints.serverFromString(reactor, with_backlog(description))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"--port {description!r} is not a valid endpoint: {e}") from None
    if isinstance(endpoint, _TCP_KINDS) and not 0 <= server_address(endpoint).port <= 65535:
        raise ConfigError(f"--port {description!r}: the port must be from 0 to 65535")
    return endpoint


class _OneAccept:
    """Accepts at most one connection each time the listening socket is readable."""

    @property
    def numberAccepts(self) -> int:
        """Always one (Twisted's port adapts this between 1 and a hundred or more)."""
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted's adaptation is ignored."""


class OneAcceptPort(_OneAccept, tcp.Port):
    """A TCP listening port that accepts one connection each time it is readable."""


class OneAcceptUNIXPort(_OneAccept, unix.Port):
    """A UNIX listening port that accepts one connection each time it is readable."""


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """
    An inherited listening socket (file descriptor ``fileno``, TCP or UNIX), listened
    on with a :class:`OneAcceptPort` (or :class:`OneAcceptUNIXPort`). Like Twisted's
    ``AdoptedStreamServerEndpoint``, it can listen once, and it closes ``fileno`` (the
    port keeps a duplicate).
    """

    def __init__(self, reactor: object, fileno: int, family: socket.AddressFamily) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family
        self._used = False

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Start accepting on the socket."""
        if self._used:
            return fail(AlreadyListened())
        self._used = True
        try:
            fdesc.setNonBlocking(self.fileno)
            port: tcp.Port | unix.Port
            if self.family == socket.AF_UNIX:
                port = unix_port_from_descriptor(
                    OneAcceptUNIXPort, self.reactor, self.fileno, factory
                )
            else:
                port = port_from_descriptor(
                    OneAcceptPort, self.reactor, self.fileno, self.family, factory
                )
            port.startListening()
            os.close(self.fileno)
        except BaseException:
            return fail()
        return succeed(port)


def shared_if_inherited(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    ``endpoint``, or a :class:`SharedSocketEndpoint` in its place if it listens on an
    inherited TCP socket (``systemd:domain=INET...``, as under socket activation, where
    several services may share one socket).
    """
    if isinstance(endpoint, AdoptedStreamServerEndpoint) and endpoint.addressFamily in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return SharedSocketEndpoint(endpoint.reactor, endpoint.fileno, endpoint.addressFamily)
    return endpoint


def inherited(
    reactor: object, fileno: int, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
) -> tuple[IStreamServerEndpoint, IProtocolFactory]:
    """
    How a worker listens for ``endpoint`` (``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:``)
    on the socket its parent opened for it, file descriptor ``fileno``: a
    :class:`SharedSocketEndpoint`, and for ``ssl:`` the ``factory`` wrapped in TLS
    with the endpoint's certificate (and HTTP/2 offered by ALPN, as Twisted's own
    ``ssl:`` listener does for a ``Site``).
    """
    probe = socket.socket(fileno=fileno)
    family = probe.family
    probe.detach()  # the descriptor stays open, for the port
    shared = SharedSocketEndpoint(reactor, fileno, family)
    context = ssl_context_factory(endpoint)
    if context is None:
        return shared, factory
    return shared, TLSMemoryBIOFactory(context, False, factory)
