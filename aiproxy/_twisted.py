"""
Every private corner of Twisted that aiproxy still uses, named here once, each with a
canary test (``tests/unit/test_twisted_corners.py``) that fails if Twisted changes it.

None of them is on the HTTP/1.1 hot path: aiproxy's own HTTP/1.1 server and upstream
client use public Twisted APIs only.

- ``twisted.web.http._GenericHTTPChannelProtocol``: twisted.web's switch between
  HTTP/1.1 and HTTP/2, used by :func:`aiproxy.server.web.build_site` for embedders.
- ``HTTPChannel._respondToBadRequestAndDisconnect``, overridden by
  :class:`aiproxy.server.web_channel.ProxyChannel` so that twisted.web's bare ``400``
  is aiproxy's JSON one.
- ``tcp.Port._fromListeningDescriptor`` and ``unix.Port._fromListeningDescriptor``
  (how ``reactor.adoptStreamPort`` builds its ports; :mod:`aiproxy.run.listening`
  builds ports that accept one connection per wake-up the same way), and an ``ssl:``
  endpoint's ``_sslContextFactory`` (a worker wraps its inherited socket in the same
  TLS).
- ``StreamServerEndpointService._raiseSynchronously``: a listener that cannot open its
  port fails ``startService`` instead of logging and running on without it.
- A TCP (or UNIX) connection's write buffers (``dataBuffer``, ``offset``,
  ``_tempDataBuffer``, ``_writeDisconnected``) and ``socket``, read by
  :func:`write_now` to send at once when nothing is queued.
- A server endpoint's ``_interface``, ``_port``, ``_backlog`` (TCP, ``ssl:``) and
  ``_address``, ``_backlog``, ``_mode`` (UNIX): what the parent of worker processes
  binds itself, exactly as the endpoint string says.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet import tcp, unix
from twisted.web.http import _GenericHTTPChannelProtocol as GenericHTTPChannelProtocol

__all__ = [
    "BAD_REQUEST_HOOK",
    "GenericHTTPChannelProtocol",
    "ServerAddress",
    "fail_if_cannot_listen",
    "port_from_descriptor",
    "server_address",
    "ssl_context_factory",
    "unix_port_from_descriptor",
    "write_now",
]

BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"
"""The ``HTTPChannel`` method twisted.web calls when its parser refuses a request."""


def port_from_descriptor(
    port_class: type[tcp.Port], reactor: object, fileno: int, family: int, factory: Any
) -> tcp.Port:
    """A TCP port of ``port_class`` listening on the open socket ``fileno``."""
    port: tcp.Port = port_class._fromListeningDescriptor(reactor, fileno, family, factory)
    return port


def unix_port_from_descriptor(
    port_class: type[unix.Port], reactor: object, fileno: int, factory: Any
) -> unix.Port:
    """A UNIX port of ``port_class`` listening on the open socket ``fileno``."""
    port: unix.Port = port_class._fromListeningDescriptor(reactor, fileno, factory)
    return port


def ssl_context_factory(endpoint: object) -> Any:
    """The TLS context factory of an ``ssl:`` server endpoint; L{None} for another kind."""
    return getattr(endpoint, "_sslContextFactory", None)


class ServerAddress(NamedTuple):
    """Where a TCP or UNIX server endpoint listens, as its endpoint string said."""

    interface: str
    """The interface (TCP) or the socket file's path (UNIX)."""
    port: int
    backlog: int
    mode: int
    """The socket file's mode (UNIX)."""


def server_address(endpoint: Any) -> ServerAddress:
    """The address a ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:`` server endpoint binds."""
    if hasattr(endpoint, "_address"):  # UNIX
        return ServerAddress(endpoint._address, 0, endpoint._backlog, endpoint._mode)
    return ServerAddress(endpoint._interface, endpoint._port, endpoint._backlog, 0)


def fail_if_cannot_listen(listener: Any) -> None:
    """Make a ``StreamServerEndpointService`` raise from ``startService`` when its port
    cannot be opened."""
    listener._raiseSynchronously = True


_DIRECT_SEND = (tcp.Connection,)
"""Transports whose socket :func:`write_now` may write to itself (TCP and UNIX ones,
not TLS, whose bytes must go through OpenSSL)."""


def write_now(transport: Any, data: bytes) -> None:
    """
    Write ``data`` to ``transport``, sending it at once when nothing is queued.

    ``transport.write`` queues the bytes and sends them on the reactor's next turn,
    registering the socket for writability and unregistering it again: two
    ``epoll_ctl`` calls and a loop turn for every small write (a response, an event).
    When the transport is a plain TCP or UNIX connection with an empty buffer, this
    sends what the socket takes now and queues only the rest, through
    ``transport.write``, so flow control and error handling stay Twisted's.
    """
    if (
        isinstance(transport, _DIRECT_SEND)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted reports on its own write
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
