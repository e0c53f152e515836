"""
Hostile HTTP/2 clients against a real ``twist aiproxy`` process on an ``ssl:`` listener
(a trustme certificate, ``h2`` by ALPN), each attack with a raw h2 client over TLS:
the proxy's memory stays bounded (its RSS, sampled every 20 ms, grows by at most
50 MB), the attacking connection is closed within 5 s of its error or limit, a
bystander on another connection is answered meanwhile, and nothing in the proxy's
log is a traceback or CRITICAL.

The proxy runs in its own process so that its RSS and CPU are its own; the fake
upstream runs in the test process. Every flood is bounded in count and in time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from statistics import median
from typing import Any

import attrs
import pytest
import pytest_twisted
import trustme
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from aiproxy.testing import FakeOpenAI

from .conftest import KEPT_PORTS, Upstream
from .h2client import H2Client, connect_h2
from .processes import TwistProcess
from .support import LOOPBACK, free_port, sleep, wait_until, within

MAX_BODY_SIZE = 1024 * 1024
RSS_BUDGET_KB = 50 * 1024
CLOSE_WITHIN = 5.0


@attrs.define
class Attacked:
    """``twist aiproxy`` on an ``ssl:`` port, in front of the fake upstream."""

    upstream: Upstream
    process: TwistProcess
    tls_port: int
    ca_file: Path
    trust_root: ssl.Certificate
    log_from: int = 0

    async def connect(self) -> H2Client:
        return await connect_h2(self.tls_port, self.trust_root)

    def rss_kb(self) -> int:
        return self.process.status_kb("VmRSS")

    def new_log(self) -> str:
        """What the proxy logged since the test began."""
        return self.process.whole_log()[self.log_from :]


@pytest_twisted.async_yield_fixture(scope="module")
async def attacked(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Attacked]:
    """The proxy under attack, for the whole module; MAX_BODY_SIZE is 1 MiB."""
    directory = tmp_path_factory.mktemp("h2attacks")
    fake = FakeOpenAI(reactor)
    port = reactor.listenTCP(0, Site(fake), interface=LOOPBACK)
    number = port.getHost().port
    KEPT_PORTS.add(number)
    ca = trustme.CA()
    issued = ca.issue_cert(LOOPBACK)
    key, certificate, ca_file = directory / "key.pem", directory / "cert.pem", directory / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(certificate))
    ca.cert_pem.write_to_path(str(ca_file))
    tls_port = free_port()
    process = TwistProcess.start(
        f"http://{LOOPBACK}:{number}",
        directory,
        f"--port=ssl:{tls_port}:interface={LOOPBACK}:privateKey={key}:certKey={certificate}",
        env={"MAX_BODY_SIZE": str(MAX_BODY_SIZE), "LOG_FORMAT": "json"},
    )
    try:
        await process.wait_ready()
        yield Attacked(
            Upstream(fake, port, f"http://{LOOPBACK}:{number}"),
            process,
            tls_port,
            ca_file,
            ssl.Certificate.loadPEM(ca.cert_pem.bytes()),
        )
    finally:
        await process.stop()
        await within(port.stopListening(), 5)
        KEPT_PORTS.discard(number)


@pytest.fixture
def proxy(attacked: Attacked) -> Iterator[Attacked]:
    """The proxy, its log read from this test on; checked clean after the test."""
    attacked.log_from = len(attacked.process.whole_log())
    yield attacked
    log = attacked.new_log()
    assert "Traceback" not in log
    assert "CRITICAL" not in log
    assert attacked.process.process.poll() is None, "the proxy exited"


class MemoryWatch:
    """Samples the proxy's RSS every 20 ms; the peak growth over the first sample."""

    def __init__(self, proxy: Attacked) -> None:
        self.proxy = proxy
        self.base = proxy.rss_kb()
        self.peak = self.base
        self.loop = LoopingCall(self._sample)
        self.loop.start(0.02)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.proxy.rss_kb())

    def stop(self) -> int:
        """Stop sampling; the peak growth in kB."""
        if self.loop.running:
            self.loop.stop()
        self._sample()
        return self.peak - self.base


class Flood:
    """
    Writes ``frame()`` to a client's transport every few milliseconds, as fast as
    its TLS transport takes it, until the connection closes, ``seconds`` pass or
    ``count`` writes are done.
    """

    def __init__(self, client: H2Client, frame: Callable[[int], bytes], count: int) -> None:
        self.client = client
        self.frame = frame
        self.count = count
        self.sent = 0
        self.paused = False
        self.loop = LoopingCall(self._write)
        client.transport.registerProducer(self, True)

    def run(self, seconds: float) -> Any:
        d = self.loop.start(0.002)
        reactor.callLater(seconds, self.stop)
        self.client.closed.addCallback(lambda _: self.stop())
        return d

    def _write(self) -> None:
        if self.client.closed.called or self.client.goaway is not None:
            self.stop()
            return
        if self.paused:
            return
        for _ in range(min(64, self.count - self.sent)):
            self.client.transport.write(self.frame(self.sent))
            self.sent += 1
        if self.sent >= self.count:
            self.stop()

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
            # A TLS transport closes (on the proxy's close_notify) only without a producer.
            self.client.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stop()


async def bystander(proxy: Attacked, requests: int) -> list[float]:
    """``requests`` pings, one after another, on a connection of its own; each latency."""
    client = await proxy.connect()
    client.transport.setTcpNoDelay(True)
    latencies = []
    try:
        for _ in range(requests):
            started = reactor.seconds()
            stream = client.get(b"/api/ping")
            await within(stream.ended, 5)
            assert stream.status == 200
            latencies.append(reactor.seconds() - started)
            await sleep(0.01)
    finally:
        client.transport.abortConnection()
        await within(client.closed, 5)
    return latencies


def assert_answered_normally(quiet: list[float], during: list[float]) -> None:
    """
    The bystander's latencies during the attack are those of a quiet proxy: the median
    within twice the quiet median (and 20 ms, for a loaded test machine), none over
    half a second (the starved proxy of the issue took 1.35 s).
    """
    assert median(during) <= 2 * median(quiet) + 0.02
    assert max(during) < 0.5


async def under_attack(
    proxy: Attacked, attack: Callable[[H2Client], Awaitable[None]], expected: ErrorCodes
) -> H2Client:
    """
    Run ``attack`` on a new connection while a bystander pings on another; check that
    the attacker gets ``GOAWAY`` with ``expected`` and is closed within 5 s, that the
    proxy's RSS grows by at most 50 MB, and that the bystander was answered.
    """
    quiet = await bystander(proxy, 10)
    client = await proxy.connect()
    watch = MemoryWatch(proxy)
    try:
        started = reactor.seconds()
        await attack(client)
        others = Deferred.fromCoroutine(bystander(proxy, 20))
        await within(client.closed, CLOSE_WITHIN)
        took = reactor.seconds() - started
        during = await within(others, 10)
    finally:
        growth = watch.stop()
        if not client.closed.called:
            client.transport.abortConnection()
            await within(client.closed, 5)
    print(
        f"closed after {took:.2f}s, RSS +{growth / 1024:.1f} MB, bystander"
        f" median/max {median(quiet) * 1000:.1f}/{max(quiet) * 1000:.1f} ms quiet,"
        f" {median(during) * 1000:.1f}/{max(during) * 1000:.1f} ms during"
    )
    assert client.goaway == expected
    assert growth <= RSS_BUDGET_KB
    assert len(during) == 20
    assert_answered_normally(quiet, during)
    return client


def raw_frames(client: H2Client, *frames: Any) -> None:
    """Write ``frames`` as they are, past the client's own h2 state machine."""
    client.transport.write(b"".join(frame.serialize() for frame in frames))


async def flood(
    client: H2Client, frame: Callable[[int], bytes], count: int, seconds: float
) -> None:
    """Flood ``client``'s connection (see :class:`Flood`), returning once it has started."""
    Flood(client, frame, count).run(seconds)


def header_block(client: H2Client, path: bytes) -> bytes:
    """An HPACK block for ``GET path``, from the client's encoder."""
    return bytes(
        client.h2.encoder.encode(
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", LOOPBACK.encode()),
                (b":path", path),
            ]
        )
    )


@pytest_twisted.ensureDeferred
async def test_data_on_stream_0_then_a_flood_is_cut_off(proxy: Attacked) -> None:
    """DATA on stream 0 (a connection error), then 16 KiB of garbage every few ms: the
    proxy answers GOAWAY PROTOCOL_ERROR, reads nothing more into memory, and closes."""

    async def attack(client: H2Client) -> None:
        client.transport.write(b"\0\0\1\0\0\0\0\0\0x")  # DATA, 1 byte, stream 0
        await wait_until(lambda: client.goaway is not None, 2, "GOAWAY")
        garbage = b"\0" * 16384
        await flood(client, lambda n: garbage, 4000, 4)

    await under_attack(proxy, attack, ErrorCodes.PROTOCOL_ERROR)


@pytest_twisted.ensureDeferred
async def test_continuation_flood_is_refused(proxy: Attacked) -> None:
    """HEADERS without END_HEADERS, then 16 KB CONTINUATION frames (CVE-2024-27316):
    GOAWAY ENHANCE_YOUR_CALM once the block passes its limit, and the connection closes."""

    async def attack(client: H2Client) -> None:
        raw_frames(client, HeadersFrame(1, data=header_block(client, b"/api/ping")))
        filler = ContinuationFrame(1, data=b"a" * 16384).serialize()
        await flood(client, lambda n: filler, 2000, 4)

    await under_attack(proxy, attack, ErrorCodes.ENHANCE_YOUR_CALM)


@pytest_twisted.ensureDeferred
async def test_rapid_reset_is_refused(proxy: Attacked) -> None:
    """HEADERS then RST_STREAM, over and over (CVE-2023-44487): GOAWAY
    ENHANCE_YOUR_CALM after the reset limit, and the connection closes."""

    async def attack(client: H2Client) -> None:
        h2 = client.h2
        block = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", LOOPBACK.encode()),
            (b":path", b"/api/ping"),
        ]
        pairs = []
        for n in range(1000):  # made before the flood, so that it is all sending
            h2.send_headers(2 * n + 1, block, end_stream=True)
            h2.reset_stream(2 * n + 1, ErrorCodes.CANCEL)
            pairs.append(h2.data_to_send())
        await flood(client, pairs.__getitem__, len(pairs), 4)

    await under_attack(proxy, attack, ErrorCodes.ENHANCE_YOUR_CALM)


@pytest.mark.parametrize(
    "frame",
    [
        SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096}),
        PingFrame(0, opaque_data=b"12345678"),
    ],
    ids=["settings", "ping"],
)
@pytest_twisted.ensureDeferred
async def test_control_frame_flood_is_refused(proxy: Attacked, frame: Any) -> None:
    """A SETTINGS flood or a PING flood: GOAWAY ENHANCE_YOUR_CALM after the limit per
    window, the connection closes, and a bystander is answered as usual."""
    data = frame.serialize()

    async def attack(client: H2Client) -> None:
        await flood(client, lambda n: data, 20000, 4)

    await under_attack(proxy, attack, ErrorCodes.ENHANCE_YOUR_CALM)


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_costs_bounded_memory(proxy: Attacked) -> None:
    """A client opens its windows to 2^31-1, asks for 500 MB on 10 streams and stops
    reading: the proxy pauses the upstream (it stops serving bytes) and its RSS grows
    by at most 50 MB; a bystander is answered meanwhile."""
    upstream = proxy.upstream
    quiet = await bystander(proxy, 5)
    client = await proxy.connect()
    watch = MemoryWatch(proxy)
    try:
        h2 = client.h2
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        h2.increment_flow_control_window(2**31 - 1 - 65535)
        served_before = upstream.stats.bytes_served
        streams = [client.get(b"/bytes/500000000") for _ in range(10)]
        await wait_until(lambda: bool(streams[0].body), 5, "the first bytes")
        client.transport.pauseProducing()  # reads nothing more
        await sleep(2)
        served = upstream.stats.bytes_served
        during = await bystander(proxy, 10)
        await sleep(1)
        stalled = upstream.stats.bytes_served - served
    finally:
        growth = watch.stop()
        client.transport.abortConnection()
        await within(client.closed, 5)
    total = (upstream.stats.bytes_served - served_before) / 1e6
    print(f"upstream served {total:.1f} MB, then {stalled} bytes in 1.2 s; RSS +{growth} kB")
    assert growth <= RSS_BUDGET_KB
    assert stalled < 1_000_000
    assert total < 100
    assert_answered_normally(quiet, during)


@pytest_twisted.ensureDeferred
async def test_connect_without_path_is_the_documented_405(proxy: Attacked) -> None:
    """``CONNECT`` with only ``:authority`` gets the JSON ``405`` on its stream, and
    the connection serves the next request."""
    client = await proxy.connect()
    try:
        stream = client.send([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
        await within(stream.ended, 5)
        after = client.get(b"/api/ping")
        await within(after.ended, 5)
    finally:
        client.transport.loseConnection()
        await within(client.closed, 5)
    assert stream.status == 405
    assert json.loads(stream.body)["error"]["type"] == "method_not_allowed"
    assert after.status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [(b"GE\x01T", b"/v1/models"), (b"GET", b"/v1/\x1b[31mred\x08")],
    ids=["control-byte-in-method", "escape-in-path"],
)
@pytest_twisted.ensureDeferred
async def test_control_bytes_in_the_head_are_a_400_on_the_stream(
    proxy: Attacked, method: bytes, path: bytes
) -> None:
    """A control byte in ``:method`` or ESC and backspace in ``:path``: ``400
    invalid_request`` on that stream only (no traceback, nothing sent upstream), the
    byte never reaches the log, and the connection serves the next request."""
    before = proxy.upstream.stats.requests
    client = await proxy.connect()
    client.h2.config.validate_outbound_headers = False
    try:
        stream = client.request(method, path)
        await within(stream.ended, 5)
        after = client.get(b"/api/ping")
        await within(after.ended, 5)
    finally:
        client.transport.loseConnection()
        await within(client.closed, 5)
    assert stream.status == 400
    assert json.loads(stream.body)["error"]["type"] == "invalid_request"
    assert after.status == 200
    assert proxy.upstream.stats.requests == before
    log = proxy.new_log()
    assert "\\u001b" not in log and "\x1b" not in log and "\\u0001" not in log


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
@pytest_twisted.ensureDeferred
async def test_body_over_max_body_size_is_a_413_at_once(proxy: Attacked, declared: bool) -> None:
    """A body over MAX_BODY_SIZE (declared as 300 MiB, or sent without a length) gets
    its ``413`` as soon as its length or its DATA passes the limit: nothing reaches the
    upstream, at most the limit and a window is read, and the connection is sent GOAWAY
    and closed."""
    before = proxy.upstream.stats.requests
    client = await proxy.connect()
    watch = MemoryWatch(proxy)
    extra = [(b"content-length", b"%d" % (300 * 1024 * 1024))] if declared else []
    try:
        stream = client.request(b"POST", b"/echo", *extra, body=b"x" * (3 * MAX_BODY_SIZE))
        await within(stream.ended, 5)
        await within(client.closed, CLOSE_WITHIN)
    finally:
        growth = watch.stop()
        if not client.closed.called:
            client.transport.abortConnection()
            await within(client.closed, 5)
    assert stream.status == 413
    assert json.loads(stream.body)["error"]["type"] == "request_too_large"
    assert client.goaway == ErrorCodes.NO_ERROR
    assert proxy.upstream.stats.requests == before
    assert growth <= RSS_BUDGET_KB


@pytest_twisted.ensureDeferred
async def test_cut_upstream_response_resets_the_stream(proxy: Attacked) -> None:
    """The upstream dies halfway through a body: the client's stream is reset with
    INTERNAL_ERROR, never ended cleanly, and the connection serves the next request."""
    client = await proxy.connect()
    try:
        stream = client.get(b"/truncated/100000")
        await within(stream.ended, 5)
        after = client.get(b"/api/ping")
        await within(after.ended, 5)
    finally:
        client.transport.loseConnection()
        await within(client.closed, 5)
    assert stream.status == 200
    assert not stream.complete
    assert stream.reset == ErrorCodes.INTERNAL_ERROR
    assert len(stream.body) < 100000
    assert after.status == 200


@pytest_twisted.ensureDeferred
async def test_curl_http2_is_served(proxy: Attacked) -> None:
    """``curl --http2`` (nghttp2) gets its answer over HTTP/2 from the new door."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl")
    url = f"https://{LOOPBACK}:{proxy.tls_port}/echo"
    result = await deferToThread(
        subprocess.run,
        [
            curl,
            "-sS",
            "--http2",
            "--cacert",
            str(proxy.ca_file),
            "-d",
            "hello",
            "-w",
            "\n%{http_version}",
            "--max-time",
            "10",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if "not support" in result.stderr or result.returncode == 1:
        pytest.skip(f"curl cannot do HTTP/2 here: {result.stderr.strip()}")
    body, _, version = result.stdout.rpartition("\n")
    assert result.returncode == 0, result.stderr
    assert version == "2"
    assert json.loads(body)["body_length"] == 5


@pytest_twisted.ensureDeferred
async def test_httpx_with_http2_is_served(proxy: Attacked) -> None:
    """An httpx client (``httpx2``, the fork installed here) with ``http2=True`` gets
    its answers over HTTP/2, a body and an event stream."""
    httpx = pytest.importorskip("httpx2")
    url = f"https://{LOOPBACK}:{proxy.tls_port}"

    def exchange() -> tuple[Any, Any]:
        with httpx.Client(http2=True, verify=str(proxy.ca_file), timeout=10) as client:
            echoed = client.post(url + "/echo", content=b"hello")
            with client.stream("GET", url + "/sse/3/10") as events:
                streamed = (events.http_version, events.read())
            return echoed, streamed

    echoed, (version, events) = await deferToThread(exchange)
    assert echoed.http_version == "HTTP/2"
    assert echoed.json()["body_length"] == 5
    assert version == "HTTP/2"
    assert events.endswith(b"data: [DONE]\n\n")
