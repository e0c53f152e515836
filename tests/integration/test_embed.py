"""
``examples/embed.py``, run as its own process: a Twisted program that mounts aiproxy in
its own ``Site`` serves its own page and proxies below ``/openai/`` through aiproxy's core.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from .conftest import Upstream
from .processes import clean_environment
from .support import LOOPBACK, free_port, request, sleep, within

EXAMPLE = Path(__file__).parents[2] / "examples" / "embed.py"


@pytest_twisted.async_yield_fixture
async def embedded(upstream: Upstream, tmp_path: Path) -> AsyncIterator[str]:
    """``examples/embed.py`` in front of the fake upstream; its base URL."""
    port = free_port()
    log = tmp_path / "embed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), upstream.url, str(port)],
            env=clean_environment(PYTHONUNBUFFERED="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        start = reactor.seconds()
        while True:
            assert process.poll() is None, log.read_text()
            try:
                response, _ = await request(b"GET", url + "/", timeout=2)
                if response.code == 200:
                    break
            except Exception:
                pass
            assert reactor.seconds() - start < 20, log.read_text()
            await sleep(0.05)
        yield url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        await within(deferToThread(process.wait, 10), 11)


@pytest_twisted.ensureDeferred
async def test_embedded_proxy_serves_its_host_and_the_upstream(
    upstream: Upstream, embedded: str
) -> None:
    """The host program's page is its own; /openai/api/health is aiproxy's; the rest below
    /openai/ reaches the upstream with the request ID and timing headers of the core."""
    response, body = await request(b"GET", embedded + "/")
    assert (response.code, body) == (200, b"my own application\n")

    response, body = await request(b"GET", embedded + "/openai/api/health")
    assert json.loads(body)["status"] == "healthy"

    response, body = await request(
        b"POST",
        embedded + "/openai/v1/chat/completions",
        body=json.dumps({"model": "m", "messages": []}).encode(),
        headers={b"Content-Type": [b"application/json"], b"X-Request-ID": [b"embed-1"]},
    )
    assert response.code == 200
    assert json.loads(body)["object"] == "chat.completion"
    assert response.headers.getRawHeaders(b"x-request-id") == [b"embed-1"]
    assert response.headers.getRawHeaders(b"x-process-time")
    assert upstream.stats.requests >= 1
