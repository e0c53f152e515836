"""
The stream scenario over HTTP/2 against HTTP/1.1, on the same ``ssl:`` listener:
proxy CPU per event delivered.

Starts the fake upstream (``aiproxy.testing.FakeOpenAI``) and ``twist aiproxy`` on a
loopback TLS port (a trustme certificate), each in a process of its own, then opens
``--streams`` SSE streams of ``--events`` events ``--interval-ms`` apart: once as
HTTP/2 (spread over ``--connections`` connections) and once as HTTP/1.1 (a TLS
connection per stream, ALPN ``http/1.1``). For each pass it prints the events
delivered, the proxy's CPU seconds (``/proc/PID/stat``) and the CPU microseconds per
event. Loopback only; every pass is bounded in time; it stops only the processes it
started.

    python bench/h2stream.py --streams 200 --events 50 --interval-ms 20
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h2.events
import trustme
from h2.config import H2Configuration
from h2.connection import H2Connection
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol

LOOPBACK = "127.0.0.1"
UPSTREAM = """
import sys
from twisted.internet import reactor
from twisted.web.server import Site
from aiproxy.testing import FakeOpenAI
reactor.listenTCP(int(sys.argv[1]), Site(FakeOpenAI(reactor)), interface="127.0.0.1")
reactor.run()
"""


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, seconds: float) -> None:
    """Wait until something accepts on ``port``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {seconds}s")


class H2Streams(Protocol):
    """One HTTP/2 connection running ``count`` SSE streams; counts events."""

    transport: Any

    def __init__(self, path: bytes, count: int, done: defer.Deferred[int]) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.path, self.count, self.done = path, count, done
        self.events = 0
        self.open = 0

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        for _ in range(self.count):
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(
                stream_id,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", LOOPBACK.encode()),
                    (b":path", self.path),
                ],
                end_stream=True,
            )
            self.open += 1
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.events += event.data.count(b"\n\n")
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.open -= 1
                if not self.open:
                    self.transport.loseConnection()
        self.transport.write(self.h2.data_to_send())

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(self.events)


class H1Stream(Protocol):
    """One HTTP/1.1 SSE stream on its own connection; counts events."""

    transport: Any

    def __init__(self, path: bytes, done: defer.Deferred[int]) -> None:
        self.path, self.done = path, done
        self.events = 0
        self.tail = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % self.path)

    def dataReceived(self, data: bytes) -> None:
        data = self.tail + data
        self.events += data.count(b"\n\n")
        self.tail = data[-1:]
        if b"data: [DONE]\n\n" in data:
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(self.events)


async def run_pass(
    protocol: str, port: int, trust: ssl.Certificate, args: argparse.Namespace
) -> int:
    """Run every stream of one pass; the events delivered."""
    path = b"/sse/%d/%d" % (args.events, args.interval_ms)
    alpn = [b"h2"] if protocol == "h2" else [b"http/1.1"]
    options = ssl.optionsForClientTLS(LOOPBACK, trust, acceptableProtocols=alpn)
    done: list[defer.Deferred[int]] = []
    if protocol == "h2":
        per = args.streams // args.connections
        for _ in range(args.connections):
            d: defer.Deferred[int] = defer.Deferred()
            done.append(d)
            endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port))
            await connectProtocol(endpoint, H2Streams(path, per, d))
    else:
        for _ in range(args.streams):
            d = defer.Deferred()
            done.append(d)
            endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port))
            await connectProtocol(endpoint, H1Stream(path, d))
    deadline = args.events * args.interval_ms / 1000 + 30
    results = await defer.gatherResults(done).addTimeout(deadline, reactor)
    return sum(results)


async def main(args: argparse.Namespace) -> None:
    """Start upstream and proxy, run both passes, print the figures."""
    work = Path(tempfile.mkdtemp(prefix="h2stream-"))
    ca = trustme.CA()
    issued = ca.issue_cert(LOOPBACK)
    key, cert = work / "key.pem", work / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    trust = ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    upstream_port, tls_port = free_port(), free_port()
    twist = os.path.join(os.path.dirname(sys.executable), "twist")
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(upstream_port)], start_new_session=True
    )
    proxy = subprocess.Popen(
        [
            twist,
            "aiproxy",
            f"--target=http://{LOOPBACK}:{upstream_port}",
            f"--port=ssl:{tls_port}:interface={LOOPBACK}:privateKey={key}:certKey={cert}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(upstream_port, 20)
        wait_listening(tls_port, 20)
        print(
            f"{args.streams} streams x {args.events} events @ {args.interval_ms} ms;"
            f" HTTP/2 over {args.connections} connections"
        )
        figures = {}
        for protocol in args.order.split(","):
            before = cpu_seconds(proxy.pid)
            events = await run_pass(protocol, tls_port, trust, args)
            used = cpu_seconds(proxy.pid) - before
            figures[protocol] = used * 1e6 / max(events, 1)
            print(
                f"{protocol:>8}: {events} events, proxy CPU {used:.2f} s,"
                f" {figures[protocol]:.1f} us/event"
            )
        if "h2" in figures and "http/1.1" in figures:
            print(f"HTTP/2 / HTTP/1.1 per-event CPU: {figures['h2'] / figures['http/1.1']:.2f}")
    finally:
        for process in (proxy, upstream):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval-ms", type=int, default=20)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--order", default="h2,http/1.1,h2")
    arguments = parser.parse_args()
    task.react(lambda _: defer.ensureDeferred(main(arguments)))
