"""
Graceful drain over real loopback sockets: aiproxy built as ``twist aiproxy`` builds it,
stopped while a stream is in flight; and a real ``twist aiproxy`` sent SIGTERM.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor, ssl
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from .conftest import Proxy, Upstream
from .h2client import connect_h2
from .processes import TwistProcess
from .support import (
    LOOPBACK,
    EventReceiver,
    RawClient,
    client_agent,
    connect_raw,
    parse_response,
    wait_until,
    within,
)

KEEP_ALIVE_PING = b"GET /api/ping HTTP/1.1\r\nHost: proxy.example\r\n\r\n"


async def start_stream(url: str) -> EventReceiver:
    """A streamed response from ``url``, its first event received."""
    response = await within(client_agent().request(b"GET", url.encode(), Headers()), 5)
    assert response.code == 200
    receiver = EventReceiver()
    response.deliverBody(receiver)
    await wait_until(lambda: bool(receiver.events), 5, "the first event")
    return receiver


async def kept_alive(port: int) -> RawClient:
    """A client connection that has had one answer and is kept alive."""
    client = await connect_raw(port)
    client.transport.write(KEEP_ALIVE_PING)
    await client.wait_for(lambda data: parse_response(data) is not None, 5)
    client.received.clear()
    return client


@pytest_twisted.ensureDeferred
async def test_stopping_lets_a_stream_in_flight_finish_and_refuses_new_connections(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """
    Stopping the service while an SSE stream is in flight: new connections are
    refused, an idle keep-alive connection is closed at once, a request that was
    arriving on a kept-alive connection is answered (``/api/health``: ``503``,
    ``draining``, ``Connection: close``), and the stream runs to its ``[DONE]``; the
    stop completes only after that.
    """
    served = start_proxy(upstream.url, graceful_timeout=10)
    idle = await kept_alive(served.port)
    arriving = await kept_alive(served.port)
    arriving.transport.write(b"GET /api/health HTTP/1.1\r\nHost: proxy.example\r\n")
    stream = await start_stream(served.url + "/sse/20/50")

    stopped = served.service.stopService()

    await within(idle.closed, 1)
    with pytest.raises(ConnectionRefusedError):
        await connect_raw(served.port)
    arriving.transport.write(b"\r\n")
    await within(arriving.closed, 2)
    answer = parse_response(bytes(arriving.received))
    assert answer is not None
    assert answer.status == 503
    assert answer.json()["status"] == "draining"
    assert answer.header(b"connection") == [b"close"]
    assert not stream.finished.called
    assert not stopped.called

    await within(stream.finished, 5)
    assert stream.reason is not None and stream.reason.check(ResponseDone)
    assert [data for _, data in stream.events][-1] == b"[DONE]"
    assert len(stream.events) == 21
    await within(stopped, 2)
    assert (upstream.stats.streams_completed, upstream.stats.streams_aborted) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_a_stream_outliving_the_graceful_timeout_is_cut_short(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """
    A stream still running ``GRACEFUL_TIMEOUT`` after the stop is cut: the client's
    response ends incomplete (no ``[DONE]``, not a clean end) and the upstream sees its
    client go away; the stop completes right after.
    """
    served = start_proxy(upstream.url, graceful_timeout=0.3)
    stream = await start_stream(served.url + "/sse/100/50")

    began = reactor.seconds()
    stopped = served.service.stopService()
    await within(stream.finished, 3)
    cut_after = reactor.seconds() - began

    assert stream.reason is not None and not stream.reason.check(ResponseDone)
    assert b"[DONE]" not in [data for _, data in stream.events]
    assert 0.3 <= cut_after < 1.5
    await wait_until(lambda: upstream.stats.streams_aborted == 1, 2, "the upstream sees the abort")
    assert upstream.stats.streams_completed == 0
    await within(stopped, 2)


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_stream_finish_then_twist_exits(
    upstream: Upstream, tmp_path: Path
) -> None:
    """
    ``twist aiproxy`` sent SIGTERM while an SSE stream is in flight logs the drain,
    stops listening, delivers the whole stream, and then exits.
    """
    process = TwistProcess.start(upstream.url, tmp_path, "--graceful-timeout=10")
    try:
        await process.wait_ready()
        stream = await start_stream(process.url + "/sse/20/50")

        os.kill(process.process.pid, signal.SIGTERM)
        await within(stream.finished, 10)
        await within(deferToThread(process.process.wait, 10), 11)
    finally:
        status = await process.stop()

    assert stream.reason is not None and stream.reason.check(ResponseDone), process.log()
    assert [data for _, data in stream.events][-1] == b"[DONE]"
    assert len(stream.events) == 21
    assert status in (0, -signal.SIGTERM), process.log()
    log = process.log()
    assert "Draining: 1 request(s) in flight, 10.0s to finish" in log
    assert "Drained: every request finished" in log
    assert upstream.stats.streams_completed == 1


# --- HTTP/2 -----------------------------------------------------------------------


@attrs.frozen
class TLSFiles:
    """A certificate for 127.0.0.1 and the trust root that signed it."""

    key: Path
    certificate: Path
    trust_root: ssl.Certificate


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    ca = trustme.CA()
    issued = ca.issue_cert(LOOPBACK)
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(certificate))
    return TLSFiles(key, certificate, ssl.Certificate.loadPEM(ca.cert_pem.bytes()))


@pytest_twisted.ensureDeferred
async def test_http2_idle_connections_get_goaway_busy_ones_finish_their_streams(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tls_files: TLSFiles
) -> None:
    """
    Over HTTP/2 (TLS with ALPN): an idle connection is sent ``GOAWAY`` (no error) and
    closed when the drain starts. A connection with a stream in flight is sent
    ``GOAWAY`` (no error) at once too, naming that stream as the last it serves: the
    stream runs to its ``[DONE]``, and then that connection is closed.
    """
    endpoint = (
        f"ssl:{{port}}:interface={LOOPBACK}"
        f":privateKey={tls_files.key}:certKey={tls_files.certificate}"
    )
    served = start_proxy(upstream.url, endpoint=endpoint, graceful_timeout=10)
    idle = await connect_h2(served.port, tls_files.trust_root)
    await within(idle.get(b"/api/ping").ended, 5)
    busy = await connect_h2(served.port, tls_files.trust_root)
    stream = busy.get(b"/sse/20/50")
    await wait_until(lambda: bool(stream.body), 5, "the first event")
    assert busy.transport.negotiatedProtocol == b"h2"

    stopped = served.service.stopService()

    await within(idle.closed, 2)
    assert idle.goaway == 0  # NO_ERROR
    await wait_until(lambda: busy.goaway is not None, 2, "GOAWAY on the busy connection")
    assert busy.goaway == 0
    assert busy.last_stream_id == stream.stream_id
    assert not stream.ended.called

    await within(stream.ended, 5)
    assert not stream.reset
    assert stream.body.endswith(b"data: [DONE]\n\n")
    await within(busy.closed, 2)
    assert busy.goaway == 0
    await within(stopped, 2)


@pytest_twisted.ensureDeferred
async def test_http2_streams_outliving_the_graceful_timeout_are_cut_short(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tls_files: TLSFiles
) -> None:
    """Over HTTP/2, a stream still running at ``GRACEFUL_TIMEOUT`` is cut with its
    connection: it never ends cleanly, and the upstream sees its client go away."""
    endpoint = (
        f"ssl:{{port}}:interface={LOOPBACK}"
        f":privateKey={tls_files.key}:certKey={tls_files.certificate}"
    )
    served = start_proxy(upstream.url, endpoint=endpoint, graceful_timeout=0.3)
    client = await connect_h2(served.port, tls_files.trust_root)
    stream = client.get(b"/sse/100/50")
    await wait_until(lambda: bool(stream.body), 5, "the first event")

    stopped = served.service.stopService()
    await within(client.closed, 3)

    assert not stream.ended.called
    assert b"[DONE]" not in stream.body
    await wait_until(lambda: upstream.stats.streams_aborted == 1, 2, "the upstream sees the abort")
    await within(stopped, 2)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigterm_drain_that_times_out_mid_stream_logs_no_traceback(
    upstream: Upstream, tmp_path: Path
) -> None:
    """
    ``twist aiproxy`` with ``GRACEFUL_TIMEOUT=2`` sent SIGTERM while a 5-second stream is
    in flight cuts the stream at the deadline, logs the timed-out drain as such, and
    exits without a traceback or a ``CRITICAL`` line: a routine shutdown is quiet.
    """
    process = TwistProcess.start(
        upstream.url, tmp_path, "--graceful-timeout=2", env={"LOG_FORMAT": "text"}
    )
    try:
        await process.wait_ready()
        stream = await start_stream(process.url + "/sse/100/50")

        os.kill(process.process.pid, signal.SIGTERM)
        await within(stream.finished, 6)
        await within(deferToThread(process.process.wait, 10), 11)
    finally:
        status = await process.stop()

    log = process.whole_log()
    assert status in (0, -signal.SIGTERM), log
    assert stream.reason is not None and not stream.reason.check(ResponseDone)
    assert "Drain timed out after 2.0s: 1 request(s) aborted" in log
    print(log)
    assert "Traceback" not in log
    assert "CRITICAL" not in log
