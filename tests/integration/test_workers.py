"""
``twist aiproxy --workers 2`` as a real process: two worker processes serve one
listening socket, a killed worker is restarted, and SIGTERM to the parent stops them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from .conftest import Upstream
from .processes import TwistProcess, run_twist
from .support import LOOPBACK, free_port, request, wait_until
from .test_http2 import h2_exchange, request_headers


def _children(parent: int) -> set[int]:
    """The PIDs of the running aiproxy workers whose parent is ``parent``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # The fields after the command name, which is in parentheses: state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == parent and b"--workers=1" in cmdline:
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _all_succeed(url: str, count: int) -> None:
    results = await gatherResults(
        [Deferred.fromCoroutine(request(b"GET", url + "/v1/models")) for _ in range(count)],
        consumeErrors=True,
    )
    assert [response.code for response, _ in results] == [200] * count


@pytest.mark.slow
async def test_two_workers_serve_restart_and_stop(upstream: Upstream, tmp_path: Path) -> None:
    """Two worker processes of the parent serve requests on one port; a worker killed
    with SIGKILL is replaced by a new one while requests keep succeeding; SIGTERM to the
    parent stops every worker and the parent."""
    twist = TwistProcess.start(upstream.url, tmp_path, "--workers=2")
    seen: set[int] = set()
    try:
        await twist.wait_ready()
        parent = twist.process.pid
        await wait_until(lambda: len(_children(parent)) == 2, 20, "two workers running")
        workers = _children(parent)
        seen |= workers

        before = upstream.stats.requests
        for _ in range(4):
            await _all_succeed(twist.url, 10)
        assert upstream.stats.requests == before + 40

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # The other worker serves while the parent restarts the killed one.
        await wait_until(lambda: not _alive(victim), 10, "the killed worker is gone")
        await _all_succeed(twist.url, 10)

        def replaced() -> bool:
            now = _children(parent)
            seen.update(now)
            return len(now) == 2 and victim not in now

        await wait_until(replaced, 20, "the killed worker is replaced", interval=0.05)
        replacement = _children(parent) - workers
        assert len(replacement) == 1, (workers, _children(parent))
        # The replacement serves: with the other first worker gone too, it answers alone
        # (connections wait in the shared socket's backlog while it starts).
        survivor = (workers - {victim}).pop()
        os.kill(survivor, signal.SIGKILL)
        await wait_until(lambda: not _alive(survivor), 10, "the second worker is gone")
        await _all_succeed(twist.url, 20)
        seen.update(_children(parent))
        assert "died unexpectedly (signal 9)" in twist.output.read_text()

        status = await twist.stop(timeout=20)
        assert status in (0, -signal.SIGTERM), twist.log()
        assert "Main loop terminated" in twist.log()
        for pid in seen:
            assert not _alive(pid), f"worker {pid} outlived the parent"
    finally:
        await twist.stop(timeout=20)
        for pid in seen:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_workers_refuse_endpoints_they_cannot_share(tmp_path: Path) -> None:
    """With ``--workers 2``, a ``systemd:`` endpoint fails the start with one line."""
    result = run_twist(["--workers=2", "--port=systemd:domain=INET:index=0"], tmp_path, timeout=30)
    assert result.returncode != 0
    assert "--workers supports only tcp:, ssl: and unix: endpoints" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


async def test_workers_serve_tls_with_http2(upstream: Upstream, tmp_path: Path) -> None:
    """With ``--workers 2``, an ``ssl:`` endpoint is served by the workers over TLS with
    HTTP/2 by ALPN, beside a plain ``tcp:`` one."""
    ca = trustme.CA()
    key = tmp_path / "server.pem"
    ca.issue_cert(LOOPBACK).private_key_and_cert_chain_pem.write_to_path(str(key))
    tls_port = free_port()
    twist = TwistProcess.start(
        upstream.url,
        tmp_path,
        "--workers=2",
        f"--port=ssl:{tls_port}:interface={LOOPBACK}:privateKey={key}",
    )
    try:
        await twist.wait_ready(timeout=30)
        await wait_until(lambda: len(_children(twist.process.pid)) == 2, 20, "two workers")
        workers = _children(twist.process.pid)
        requests = [(request_headers(b"GET", b"/v1/models"), None)] * 4
        protocol, streams = await h2_exchange(tls_port, ca, requests)
        assert protocol == b"h2"
        assert [stream.status for stream in streams] == [200] * 4
        await _all_succeed(twist.url, 10)
        assert await twist.stop(timeout=20) in (0, -signal.SIGTERM), twist.log()
        assert not any(_alive(pid) for pid in workers)
    finally:
        await twist.stop(timeout=20)


def _posts_counted(body: bytes) -> float:
    """``aiproxy_requests_total{method="POST",status="200"}`` in a metrics page."""
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "aiproxy_requests_total" and sample.labels == {
                "method": "POST",
                "status": "200",
            }:
                return float(sample.value)
    return 0.0


async def test_metrics_of_every_worker_are_added_up(upstream: Upstream, tmp_path: Path) -> None:
    """Whichever worker a scrape reaches, ``/api/metrics`` counts the requests served by
    both (within the workers' one-second publishing interval)."""
    twist = TwistProcess.start(upstream.url, tmp_path, "--workers=2")
    try:
        await twist.wait_ready(timeout=30)
        await wait_until(lambda: len(_children(twist.process.pid)) == 2, 20, "two workers")
        worker = min(_children(twist.process.pid))
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        [shared] = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"AIPROXY_METRICS_DIR=")]
        published = Path(shared.decode())
        await wait_until(lambda: len(list(published.glob("*.json"))) == 2, 10, "2 published")
        chats = [
            Deferred.fromCoroutine(request(b"POST", twist.url + "/v1/chat/completions", {}, b"{}"))
            for _ in range(30)
        ]
        assert [r.code for r, _ in await gatherResults(chats)] == [200] * 30

        def published_posts() -> int:
            snapshots = [json.loads(f.read_text()) for f in published.glob("*.json")]
            return sum(s["requests"].get("POST 200", 0) for s in snapshots)

        # Each worker publishes its figures every second.
        await wait_until(lambda: published_posts() == 30, 5, "both workers published")
        for _ in range(10):  # scrapes reach either worker
            response, body = await request(b"GET", twist.url + "/api/metrics")
            assert response.code == 200
            assert _posts_counted(body) == 30
    finally:
        assert await twist.stop(timeout=20) in (0, -signal.SIGTERM), twist.log()
    assert not published.exists()  # the parent removed it


def _get_over_unix(path: str) -> bytes:
    """One ``GET /api/ping`` over a UNIX socket; the whole response (run in a thread)."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return response


async def test_workers_serve_a_unix_socket(upstream: Upstream, tmp_path: Path) -> None:
    """A ``unix:`` endpoint is bound once by the parent and served by the workers; its
    file is gone after the parent stops."""
    path = tmp_path / "aiproxy.sock"
    twist = TwistProcess.start(upstream.url, tmp_path, "--workers=2", f"--port=unix:{path}")
    try:
        await twist.wait_ready(timeout=30)
        for _ in range(4):
            response = await deferToThread(_get_over_unix, str(path))
            assert response.startswith(b"HTTP/1.1 200 ")
            assert response.endswith(b'{"ping": "pong"}')
    finally:
        assert await twist.stop(timeout=20) in (0, -signal.SIGTERM), twist.log()
    assert not path.exists()


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_each_workers_lines_carry_its_number(
    log_format: str, upstream: Upstream, tmp_path: Path
) -> None:
    """With ``--workers 2``, every line a worker logs says which worker wrote it (a
    ``worker`` field in JSON, ``[worker N]`` after the logger in text), so their
    interleaved lines can be told apart; the parent's own lines carry none, and it
    logs the start line once, for the whole process tree."""
    twist = TwistProcess.start(
        upstream.url, tmp_path, "--workers=2", env={"LOG_FORMAT": log_format}
    )
    try:
        await twist.wait_ready(timeout=30)

        def both_started() -> bool:
            return twist.whole_log().count("Starting reactor") == 3  # the parent's too

        await wait_until(both_started, 20, "both workers started")
        await _all_succeed(twist.url, 10)
    finally:
        assert await twist.stop(timeout=20) in (0, -signal.SIGTERM), twist.log()
    lines = twist.whole_log().splitlines()
    starting = [line for line in lines if "Starting reactor" in line]
    assert len(starting) == 3, lines  # the parent and its two workers
    assert len([line for line in lines if " starting: target " in line]) == 1, lines
    if log_format == "json":
        records = [json.loads(line) for line in starting]
        assert sorted(str(record.get("worker")) for record in records) == ["0", "1", "None"]
    else:
        assert sum("[worker 0] - INFO - Starting reactor" in line for line in starting) == 1
        assert sum("[worker 1] - INFO - Starting reactor" in line for line in starting) == 1
        assert sum("[worker" not in line for line in starting) == 1
    served = [line for line in lines if "Request completed: GET /v1/models" in line]
    assert len(served) == 10
    assert all("worker" in line for line in served)
