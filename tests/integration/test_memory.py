"""
Large bodies through a real ``twist aiproxy`` process leave its memory flat: bodies
are streamed (downloads) or spooled to disk (uploads), never held whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.web.client import ResponseDone

from .conftest import Upstream
from .processes import TwistProcess
from .support import (
    BodyReceiver,
    client_agent,
    pattern_producer,
    pattern_sha256,
    request,
    within,
)

DOWNLOAD = 200_000_000
UPLOAD = 100_000_000
MAX_GROWTH_KB = 30 * 1024


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_proxy_memory_stays_flat_for_a_200_mb_download_and_a_100_mb_upload(
    upstream: Upstream, tmp_path: Path
) -> None:
    """
    Downloading 200 MB and uploading 100 MB through ``twist aiproxy`` raises the
    process's peak resident memory (VmHWM) by less than 30 MB, and both bodies arrive
    whole.
    """
    proxy = TwistProcess.start(upstream.url, tmp_path)
    try:
        await proxy.wait_ready()
        # Warm up both directions, so that the figures compare like with like.
        await request(b"GET", proxy.url + "/bytes/1000000")
        await request(b"POST", proxy.url + "/sink", body=pattern_producer(1_000_000))
        before = proxy.status_kb("VmHWM")

        response = await within(
            client_agent().request(b"GET", proxy.url.encode() + b"/bytes/%d" % DOWNLOAD), 10
        )
        receiver = BodyReceiver(keep=False)
        response.deliverBody(receiver)
        await within(receiver.finished, 60)
        assert receiver.reason is not None and receiver.reason.check(ResponseDone)
        assert receiver.length == DOWNLOAD
        after_download = proxy.status_kb("VmHWM")

        response, body = await request(
            b"POST", proxy.url + "/sink", body=pattern_producer(UPLOAD), timeout=60
        )
        assert response.code == 200
        assert json.loads(body) == {"received": UPLOAD, "sha256": pattern_sha256(UPLOAD)}
        after_upload = proxy.status_kb("VmHWM")
    finally:
        await proxy.stop()
    print(
        f"\nproxy VmHWM: {before / 1024:.1f} MB before, {after_download / 1024:.1f} MB after"
        f" the 200 MB download, {after_upload / 1024:.1f} MB after the 100 MB upload"
        f" (growth {(after_upload - before) / 1024:.1f} MB)"
    )
    assert after_upload - before < MAX_GROWTH_KB
