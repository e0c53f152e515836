"""
The CPU a proxied request costs in process, without sockets or log lines: aiproxy's
HTTP/1.1 server and core over a fake connection and fake upstream clients (the unit
tests' ``tests/unit/fakes.py``), on a fake clock.

Four set-ups, measured in turns: ``TARGET_URL``; one upstream from ``UPSTREAMS_FILE``;
the same with an upstream key; and two upstreams where the first answers every request
``429`` (``retry-after-ms: 0``), so that each request fails over once. Prints the
median and the least microseconds of process CPU per request over the rounds.

    python bench/route_cost.py --rounds 15 --requests 5000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock

from aiproxy.core.activity import Activity
from aiproxy.core.handler import ProxyCore
from aiproxy.routing.routes import Routes
from aiproxy.routing.upstreams import UpstreamEntry, parse_upstreams
from aiproxy.rules.target import parse_target
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.server.limits import ClientLimits

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from unit.fakes import ClientConnection, FakeUpstream

LIMITS = ClientLimits(max_body_size=2**20, header_timeout=10, body_min_rate=0)
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY

FILES = {
    "file": '[[upstream]]\nname = "u"\nurl = "http://127.0.0.1:9"\n',
    "file+key": '[[upstream]]\nname = "b"\nurl = "http://127.0.0.1:9"\nkeys = ["sk-b"]\n',
    "failover": (
        '[[upstream]]\nname = "a"\nurl = "http://127.0.0.1:8"\nkeys = ["sk-a"]\n'
        '[[upstream]]\nname = "b"\nurl = "http://127.0.0.1:9"\nkeys = ["sk-b"]\npriority = 1\n'
    ),
}


def setup(kind: str) -> tuple[ClientConnection, FakeUpstream | None, FakeUpstream]:
    """A client connection to a proxy of ``kind``; the refusing upstream (if any) and
    the one that answers."""
    clock = Clock()
    pools: dict[str, FakeUpstream] = {}

    def pool_for(entry: UpstreamEntry) -> FakeUpstream:
        pools[entry.name] = pool = FakeUpstream()
        return pool

    routes = None
    if kind in FILES:
        routes = Routes("upstreams.toml", parse_upstreams(FILES[kind]), clock, pool_for)
    target = FakeUpstream()
    core = ProxyCore(
        parse_target("http://127.0.0.1:9"),
        target,
        clock,
        routes=routes,
        failover_on_status=(429, 502, 503, 504),
        max_failovers=2,
        log_requests=False,
    )
    client = ClientConnection(HTTP11Factory(core, clock, Activity(), LIMITS))
    answering = pools.get("b") or pools.get("u") or target
    return client, pools.get("a"), answering


def microseconds_per_request(kind: str, requests: int) -> float:
    """Process CPU per request for ``requests`` requests through a new proxy of ``kind``."""
    client, refusing, answering = setup(kind)
    start = time.process_time()
    for _ in range(requests):
        client.send(REQUEST)
        if refusing is not None:
            refusing.calls.pop().respond(429, {b"retry-after-ms": [b"0"]})
        response = answering.calls.pop().respond(
            200, {b"Content-Type": [b"application/json"], b"Content-Length": [b"2"]}
        )
        response.send(b"{}")
        response.end()
    return (time.process_time() - start) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=5000)
    options = parser.parse_args()
    kinds = ["target", *FILES]
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    gc.disable()
    for _ in range(options.rounds):
        for kind in kinds:
            results[kind].append(microseconds_per_request(kind, options.requests))
    for kind in kinds:
        cost = results[kind]
        print(f"{kind:9s} median {statistics.median(cost):6.1f} µs  least {min(cost):6.1f} µs")


if __name__ == "__main__":
    main()
