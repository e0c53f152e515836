"""
Canaries: each private corner of Twisted that :mod:`aiproxy._twisted` names is still
there, in the shape aiproxy uses. A failure here means a Twisted upgrade changed one.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, reactor, tcp, unix
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.web import http

from aiproxy import _twisted


def test_generic_channel_protocol_wraps_a_channel() -> None:
    """twisted.web's HTTP/1.1-or-HTTP/2 switch still wraps a channel given to it."""
    channel = http.HTTPChannel()
    wrapper = _twisted.GenericHTTPChannelProtocol(channel)
    assert wrapper._channel is channel


def test_bad_request_hook_is_what_httpchannel_calls() -> None:
    """HTTPChannel still answers a malformed request through the method aiproxy overrides."""
    method = getattr(http.HTTPChannel, _twisted.BAD_REQUEST_HOOK)
    assert inspect.signature(method).parameters.keys() == {"self"}
    source = inspect.getsource(http.HTTPChannel)
    assert f"self.{_twisted.BAD_REQUEST_HOOK}()" in source


def test_ports_can_be_built_from_listening_descriptors() -> None:
    """tcp.Port and unix.Port still have the constructors adoptStreamPort uses."""
    tcp_args = inspect.signature(tcp.Port._fromListeningDescriptor).parameters
    unix_args = inspect.signature(unix.Port._fromListeningDescriptor).parameters
    assert list(tcp_args) == ["reactor", "fd", "addressFamily", "factory"]
    assert list(unix_args) == ["reactor", "fd", "factory"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        port = _twisted.port_from_descriptor(
            tcp.Port, MemoryReactorClock(), sock.fileno(), socket.AF_INET, None
        )
        assert isinstance(port, tcp.Port)
    finally:
        sock.close()


def test_ssl_endpoints_keep_their_context_factory() -> None:
    """An ssl: endpoint still keeps its TLS context where a worker finds it."""
    reactor = MemoryReactorClock()
    endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, sslContextFactory="ctx")  # type: ignore[arg-type]
    assert _twisted.ssl_context_factory(endpoint) == "ctx"
    assert _twisted.ssl_context_factory(endpoints.TCP4ServerEndpoint(reactor, 0)) is None


def test_server_endpoints_keep_their_addresses() -> None:
    """tcp: and unix: endpoints still keep what they bind, as the parsed string said."""
    reactor = MemoryReactorClock()
    tcp_endpoint = endpoints.serverFromString(reactor, "tcp:8080:interface=127.0.0.1:backlog=77")
    assert _twisted.server_address(tcp_endpoint) == ("127.0.0.1", 8080, 77, 0)
    unix_endpoint = endpoints.serverFromString(reactor, "unix:/tmp/x.sock:mode=600:backlog=9")
    assert _twisted.server_address(unix_endpoint) == ("/tmp/x.sock", 0, 9, 0o600)


def test_a_listener_can_be_made_to_fail_at_start() -> None:
    """StreamServerEndpointService still has the switch that makes startService raise."""
    listener = StreamServerEndpointService(
        endpoints.TCP4ServerEndpoint(MemoryReactorClock(), 0), None
    )
    assert hasattr(listener, "_raiseSynchronously")
    _twisted.fail_if_cannot_listen(listener)
    assert listener._raiseSynchronously is True


@pytest_twisted.ensureDeferred
async def test_write_now_sends_at_once_on_a_tcp_connection() -> None:
    """A plain TCP connection still has the buffers write_now reads, and with nothing
    queued the bytes leave at once, without waiting for the reactor's next turn."""
    received: list[bytes] = []

    class Sink(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    listening = reactor.listenTCP(0, Factory.forProtocol(Sink), interface="127.0.0.1")
    client: Protocol = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port), Protocol()
    )
    try:
        transport: Any = client.transport
        assert isinstance(transport, tcp.Connection)
        for name in ("dataBuffer", "offset", "_tempDataBuffer", "_writeDisconnected", "TLS"):
            assert hasattr(transport, name), name
        _twisted.write_now(transport, b"hello")
        assert transport._tempDataBuffer == [] and transport.dataBuffer == b""
        await deferLater(reactor, 0.05, lambda: None)
        assert b"".join(received) == b"hello"
    finally:
        transport.loseConnection()
        await listening.stopListening()
        await deferLater(reactor, 0.05, lambda: None)
