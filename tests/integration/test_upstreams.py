"""
Several upstreams (``UPSTREAMS_FILE``) end to end: fake upstreams on loopback, aiproxy
built by ``build_service`` in front of them, real HTTP both sides.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import attrs
import openai
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy import build_resource, build_site
from aiproxy.access.keys import key_digest, new_key
from aiproxy.config import Config, ConfigError
from aiproxy.routing.routes import upstream_routes
from aiproxy.routing.upstreams import fingerprint
from aiproxy.testing import FakeOpenAI, sse_event
from aiproxy.upstream.pool import UpstreamPool

from .conftest import Proxy
from .processes import TwistProcess, run_twist
from .support import (
    LOOPBACK,
    BodyReceiver,
    free_port,
    header,
    request,
    sleep,
    wait_until,
    within,
)


class Scripted(FakeOpenAI):
    """The fake OpenAI upstream, unless ``rule`` answers a request first: a rule
    returns what ``render`` would, or L{None} to let the fake answer."""

    def __init__(self) -> None:
        super().__init__(reactor)
        self.rule: Callable[[Request], bytes | int | None] | None = None

    def render(self, request: Request) -> bytes | int:
        rule = self.rule
        if rule is not None:
            answer = rule(request)
            if answer is not None:
                self.stats.requests += 1
                return answer
        return super().render(request)


@attrs.define
class Fake:
    """A scripted upstream, listening on loopback."""

    name: str
    upstream: Scripted
    port: IListeningPort | None

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    @property
    def requests(self) -> int:
        return self.upstream.stats.requests


@pytest_twisted.async_yield_fixture
async def fakes() -> AsyncIterator[dict[str, Fake]]:
    """Three scripted upstreams, ``a``, ``b`` and ``c``."""
    made = {}
    for name in "abc":
        upstream = Scripted()
        made[name] = Fake(name, upstream, reactor.listenTCP(0, Site(upstream), interface=LOOPBACK))
    yield made
    for fake in made.values():
        if fake.port is not None:
            await within(fake.port.stopListening(), 5)


def upstreams_file(path: Path, *tables: dict[str, Any]) -> str:
    """An upstreams file with one ``[[upstream]]`` per table; its path."""
    lines = []
    for table in tables:
        lines.append("[[upstream]]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def route(tmp_path: Path, start_proxy: Callable[..., Proxy]) -> Callable[..., Proxy]:
    """``route(*tables, **settings)``: aiproxy in front of the upstreams ``tables`` list."""

    def start(*tables: dict[str, Any], **settings: Any) -> Proxy:
        path = upstreams_file(tmp_path / "upstreams.toml", *tables)
        return start_proxy("http://unused.invalid", upstreams_file=path, **settings)

    return start


@pytest_twisted.async_yield_fixture
async def agent() -> AsyncIterator[Agent]:
    """An HTTP client keeping up to 16 connections alive, closed after the test."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    yield Agent(reactor, pool=pool)
    await within(pool.closeCachedConnections(), 5)


@attrs.frozen
class Answer:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def upstream(self) -> str | None:
        value = self.header(b"x-upstream")
        return None if value is None else value.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def chat(model: str = "gpt-4o", *, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def send(
    agent: Agent, proxy: Proxy, body: bytes | None = None, path: str = "/v1/chat/completions"
) -> Answer:
    """``POST path`` with ``body`` (a chat request by default); the whole answer."""
    body = chat() if body is None else body
    headers = Headers({b"content-type": [b"application/json"]})
    producer = FileBodyProducer(io.BytesIO(body))
    response = await within(
        agent.request(b"POST", (proxy.url + path).encode(), headers, producer), 10
    )
    receiver = BodyReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, 10)
    assert receiver.reason is not None and receiver.reason.check(ResponseDone), receiver.reason
    return Answer(response.code, response.headers, bytes(receiver.body))


def too_many(seconds: str) -> Callable[[Request], bytes]:
    """A rule: ``429`` with ``Retry-After: seconds``."""

    def answer(request: Request) -> bytes:
        request.setResponseCode(429)
        request.setHeader(b"Retry-After", seconds.encode())
        return b'{"error": {"message": "slow down", "type": "requests"}}'

    return answer


def unavailable(request: Request) -> bytes:
    """A rule: ``503``."""
    request.setResponseCode(503)
    return b'{"error": {"message": "overloaded"}}'


def health(proxy: Proxy) -> dict[str, dict[str, Any]]:
    """The ``upstreams`` of ``/api/health``, by name."""
    routes = proxy.core.routes
    assert routes is not None
    return {cast(str, u["name"]): u for u in routes.router.report()}


# --- choosing ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_weights_3_to_1_over_4000_requests(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """Weights 3 and 1 at the same priority: 75% ± 3% of 4,000 requests go to ``a``; each
    response names its upstream in ``X-Upstream``."""
    a, b = fakes["a"], fakes["b"]
    proxy = route({"name": "a", "url": a.url, "weight": 3}, {"name": "b", "url": b.url})
    gate = DeferredSemaphore(16)
    seen: collections.Counter[str | None] = collections.Counter()

    async def one() -> None:
        answer = await send(agent, proxy)
        assert answer.status == 200
        seen[answer.upstream] += 1

    await within(
        gatherResults([gate.run(lambda: Deferred.fromCoroutine(one())) for _ in range(4000)]),
        120,
    )
    assert seen["a"] + seen["b"] == 4000
    assert abs(seen["a"] / 4000 - 0.75) <= 0.03, seen
    assert (a.requests, b.requests) == (seen["a"], seen["b"])


@pytest_twisted.ensureDeferred
async def test_a_model_goes_only_to_the_upstream_that_serves_it(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` serves ``gpt-*``, ``b`` ``claude-*``: each model reaches its upstream only; a
    model neither serves is ``404 model_not_found`` without reaching either; a request
    naming no model goes to the first upstream."""
    a, b = fakes["a"], fakes["b"]
    proxy = route(
        {"name": "a", "url": a.url, "models": ["gpt-*"]},
        {"name": "b", "url": b.url, "models": ["claude-*"]},
    )
    for _ in range(10):
        assert (await send(agent, proxy, chat("claude-3-haiku"))).upstream == "b"
        assert (await send(agent, proxy, chat("gpt-4o-mini"))).upstream == "a"
    assert (a.requests, b.requests) == (10, 10)
    missing = await send(agent, proxy, chat("mistral-large"))
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert "mistral-large" in missing.json()["error"]["message"]
    models = await send(agent, proxy, b"", "/v1/models")
    assert (models.status, models.upstream) == (200, "a")
    assert (a.requests, b.requests) == (11, 10)


# --- failover ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_refuses_connections_is_never_seen_by_clients(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` refuses connections: every request is answered by ``b``; after three
    failures ``a`` is ejected and no longer tried."""
    b = fakes["b"]
    down = f"http://{LOOPBACK}:{free_port()}"
    proxy = route({"name": "a", "url": down}, {"name": "b", "url": b.url})
    answers = [await send(agent, proxy) for _ in range(30)]
    assert {(x.status, x.upstream) for x in answers} == {(200, "b")}
    assert b.requests == 30
    assert health(proxy)["a"]["state"] == "ejected"
    assert sum(1 for x in answers if x.status != 200) == 0


@pytest_twisted.ensureDeferred
async def test_a_429_cools_that_upstream_for_its_retry_after(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` answers ``429`` with ``Retry-After: 2`` once: that request is served by
    ``b``, and ``a`` gets nothing for 2 seconds, then requests again."""
    a, b = fakes["a"], fakes["b"]
    proxy = route(
        {"name": "a", "url": a.url, "keys": ["sk-a"]}, {"name": "b", "url": b.url, "keys": ["sk-b"]}
    )
    rule = too_many("2")
    a.upstream.rule = rule
    for _ in range(50):  # until a request is sent to a
        answer = await send(agent, proxy)
        assert (answer.status, answer.upstream) == (200, "b")
        if a.requests:
            break
    assert a.requests == 1
    cooled_at = reactor.seconds()
    a.upstream.rule = None
    while reactor.seconds() - cooled_at < 1.8:
        assert (await send(agent, proxy)).upstream == "b"
    assert a.requests == 1
    assert health(proxy)["a"]["state"] == "cooling"
    await sleep(max(0.0, cooled_at + 2.05 - reactor.seconds()))
    answers = {(await send(agent, proxy)).upstream for _ in range(30)}
    assert answers == {"a", "b"}


@pytest_twisted.ensureDeferred
async def test_a_refused_key_is_disabled_and_the_other_key_still_used(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """One of ``a``'s two keys is refused (``401``): the client sees that ``401`` once,
    then the key is disabled and every request goes to ``a`` with its other key."""
    a = fakes["a"]
    good, bad = "sk-good-key", "sk-revoked-key"

    def refuse_bad(request: Request) -> bytes | None:
        if request.getHeader(b"authorization") != f"Bearer {bad}".encode():
            return None
        request.setResponseCode(401)
        return b'{"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}'

    a.upstream.rule = refuse_bad
    proxy = route({"name": "a", "url": a.url, "keys": [good, bad]})
    statuses = []
    for _ in range(50):
        statuses.append((await send(agent, proxy)).status)
        if 401 in statuses:
            break
    assert statuses.count(401) == 1
    keys = {k["fingerprint"]: k["state"] for k in health(proxy)["a"]["keys"]}
    assert keys == {fingerprint(good): "healthy", fingerprint(bad): "disabled"}
    before = len(a.upstream.stats.credentials)
    assert {(await send(agent, proxy)).status for _ in range(20)} == {200}
    assert set(a.upstream.stats.credentials[before:]) == {f"authorization: Bearer {good}".encode()}


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_by_its_upstream_is_not_replayed_elsewhere(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` dies in the middle of an event stream: the client's response is cut off
    (not ended cleanly) and ``b`` receives no copy of the request."""
    a, b = fakes["a"], fakes["b"]

    def die_mid_stream(request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(sse_event({"choices": [{"delta": {"content": "Hel"}}]}))
        reactor.callLater(0.05, cast(ITCPTransport, request.transport).abortConnection)
        return NOT_DONE_YET

    a.upstream.rule = die_mid_stream
    proxy = route({"name": "a", "url": a.url}, {"name": "b", "url": b.url, "priority": 1})
    response = await within(
        agent.request(
            b"POST",
            (proxy.url + "/v1/chat/completions").encode(),
            Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(chat(stream=True))),
        ),
        10,
    )
    assert response.code == 200
    receiver = BodyReceiver()
    response.deliverBody(receiver)
    await within(receiver.finished, 10)
    assert receiver.reason is not None
    assert not receiver.reason.check(ResponseDone, PotentialDataLoss), receiver.reason
    assert b"Hel" in bytes(receiver.body)
    assert b.requests == 0


@pytest_twisted.ensureDeferred
async def test_a_post_whose_connection_reset_after_sending_is_not_replayed(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` takes a ``POST`` whole and drops the connection: it may have started
    generating, so the client gets ``502`` and ``b`` never sees the request."""
    a, b = fakes["a"], fakes["b"]

    def drop(request: Request) -> int:
        cast(ITCPTransport, request.transport).abortConnection()
        return NOT_DONE_YET

    a.upstream.rule = drop
    proxy = route({"name": "a", "url": a.url}, {"name": "b", "url": b.url, "priority": 1})
    answer = await send(agent, proxy)
    assert answer.status == 502
    assert answer.json()["error"]["type"] == "upstream_unreachable"
    assert (a.requests, b.requests) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_when_every_upstream_is_cooling_the_answer_is_503_with_the_shortest_wait(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` and ``b`` answer ``429`` (``Retry-After`` 7 and 3): the first request fails
    over from ``a`` to ``b`` and gets ``b``'s ``429``; the next gets ``503`` with
    ``Retry-After: 3`` without reaching either."""
    a, b = fakes["a"], fakes["b"]
    a.upstream.rule = too_many("7")
    b.upstream.rule = too_many("3")
    proxy = route(
        {"name": "a", "url": a.url, "keys": ["sk-a"]},
        {"name": "b", "url": b.url, "keys": ["sk-b"], "priority": 1},
    )
    first = await send(agent, proxy)
    assert (first.status, first.upstream, first.header(b"retry-after")) == (429, "b", b"3")
    assert (a.requests, b.requests) == (1, 1)
    second = await send(agent, proxy)
    assert second.status == 503
    assert second.header(b"retry-after") == b"3"
    assert second.json()["error"]["type"] == "upstream_unavailable"
    assert (a.requests, b.requests) == (1, 1)
    assert {u["state"] for u in health(proxy).values()} == {"cooling"}


@pytest_twisted.ensureDeferred
async def test_max_failovers_bounds_the_attempts(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """Three upstreams answering ``503`` and ``MAX_FAILOVERS=1``: two attempts, then the
    second upstream's ``503`` reaches the client."""
    for fake in fakes.values():
        fake.upstream.rule = unavailable
    proxy = route(
        *({"name": n, "url": fakes[n].url, "priority": p} for p, n in enumerate("abc")),
        max_failovers=1,
    )
    answer = await send(agent, proxy)
    assert (answer.status, answer.upstream) == (503, "b")
    assert [fakes[n].requests for n in "abc"] == [1, 1, 0]


# --- clients -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_streams_through_a_failover(
    fakes: dict[str, Fake], route: Callable[..., Proxy]
) -> None:
    """``a`` refuses connections, ``b`` serves: the OpenAI SDK with ``stream=True`` sees
    one ordinary stream, and made one request."""
    b = fakes["b"]
    down = f"http://{LOOPBACK}:{free_port()}"
    proxy = route({"name": "a", "url": down}, {"name": "b", "url": b.url, "priority": 1})

    def stream() -> str:
        with openai.OpenAI(
            base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0
        ) as client:
            chunks = client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)

    assert await within(deferToThread(stream), 20) == "tok0 tok1 tok2 tok3 tok4 "
    assert b.requests == 1
    assert b.upstream.stats.streams_completed == 1


# --- reloading ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_reloaded_file_is_used_at_once(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent, tmp_path: Path
) -> None:
    """Replacing ``a`` by ``c`` in the file and reloading: requests go to ``c``; an
    invalid file keeps ``c``."""
    a, c = fakes["a"], fakes["c"]
    proxy = route({"name": "a", "url": a.url})
    assert (await send(agent, proxy)).upstream == "a"
    routes = proxy.core.routes
    assert routes is not None
    upstreams_file(Path(routes.path), {"name": "c", "url": c.url})
    routes.reload()
    assert (await send(agent, proxy)).upstream == "c"
    Path(routes.path).write_text("[[upstream]]\nname = 'broken'\n")
    routes.reload()
    assert (await send(agent, proxy)).upstream == "c"
    assert (a.requests, c.requests) == (1, 2)


@pytest_twisted.ensureDeferred
async def test_a_connection_limit_queues_requests(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``max_connections = 1``: three slow requests at once all succeed, one after the
    other over the one connection, never more."""
    a = fakes["a"]
    proxy = route({"name": "a", "url": a.url, "max_connections": 1})
    routes = proxy.core.routes
    assert routes is not None
    pool = cast(UpstreamPool, routes.routes["a"].client)
    most = 0

    async def one() -> int:
        nonlocal most
        response = await within(
            agent.request(b"GET", (proxy.url + "/slow-headers/0.2").encode()), 10
        )
        most = max(most, pool.open_connections)
        receiver = BodyReceiver()
        response.deliverBody(receiver)
        await within(receiver.finished, 10)
        return response.code

    calls = [Deferred.fromCoroutine(one()) for _ in range(3)]
    await wait_until(lambda: pool.waiting == 2, 5, "two requests waiting")
    assert pool.open_connections == 1
    assert await within(gatherResults(calls), 10) == [200, 200, 200]
    assert most == 1 and a.requests == 3


# --- a twist process ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_upstreams_and_access_keys_in_a_twist_process(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    """A real ``twist aiproxy`` with both files: a change polling cannot see (same size
    and time) is used on ``SIGHUP``, for the upstreams and the access keys alike."""
    a, c = fakes["a"], fakes["c"]
    key = new_key()
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nid = "k"\nsha256 = "{key_digest(key)}"\n')
    path = tmp_path / "upstreams.toml"
    upstreams_file(path, {"name": "a", "url": a.url, "keys": ["sk-upstream-a"]})
    stamp = os.stat(path)
    process = TwistProcess.start(
        "http://unused.invalid",
        tmp_path,
        env={"UPSTREAMS_FILE": str(path), "ACCESS_KEYS_FILE": str(keys)},
    )
    headers = {b"authorization": [f"Bearer {key}".encode()]}
    try:
        await process.wait_ready()
        response, _ = await request(b"POST", process.url + "/v1/chat/completions", headers, chat())
        assert (response.code, header(response, b"x-upstream")) == (200, b"a")
        upstreams_file(path, {"name": "c", "url": c.url, "keys": ["sk-upstream-c"]})
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(path).st_size == stamp.st_size
        os.kill(process.process.pid, signal.SIGHUP)
        await wait_until(lambda: "Upstreams reloaded" in process.whole_log(), 5, "a reload")
        assert "Access keys reloaded" in process.whole_log()
        response, _ = await request(b"POST", process.url + "/v1/chat/completions", headers, chat())
        assert (response.code, header(response, b"x-upstream")) == (200, b"c")
    finally:
        await process.stop()
    assert c.upstream.stats.credentials == [b"authorization: Bearer sk-upstream-c"]
    log = process.whole_log()
    assert "sk-upstream" not in log and key not in log


@pytest_twisted.ensureDeferred
async def test_an_invalid_upstreams_file_stops_the_start(tmp_path: Path) -> None:
    """One line naming the file, the upstream and the field; never a key."""
    path = upstreams_file(
        tmp_path / "upstreams.toml",
        {"name": "a", "url": "https://a.example", "keys": ["sk-secret"], "priority": -1},
    )
    args = ["--port=tcp:0:interface=127.0.0.1", f"--upstreams-file={path}"]
    done = await within(deferToThread(run_twist, args, tmp_path), 30)
    assert done.returncode != 0
    (line,) = (done.stdout + done.stderr).strip().splitlines()
    assert line == (
        f"aiproxy: invalid configuration: UPSTREAMS_FILE (--upstreams-file): {path}:"
        " upstream 1 (a): priority: must be a whole number, 0 or more"
    )


# --- embedded ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_embedded_resource_routes_to_the_upstreams(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    """``build_resource`` refuses a config with ``UPSTREAMS_FILE`` and no routes; given
    ``upstream_routes``, the twisted.web door fails over like the others."""
    down = f"http://{LOOPBACK}:{free_port()}"
    path = upstreams_file(
        tmp_path / "upstreams.toml",
        {"name": "a", "url": down},
        {"name": "b", "url": fakes["b"].url, "priority": 1},
    )
    config = Config(upstreams_file=path)
    pool = UpstreamPool.from_config(reactor, config)
    with pytest.raises(ConfigError, match="UPSTREAMS_FILE is set"):
        build_resource(config, pool, reactor)
    routes = upstream_routes(config, reactor)
    assert routes is not None
    root = Resource()
    root.putChild(b"openai", build_resource(config, pool, reactor, routes=routes))
    port = reactor.listenTCP(0, build_site(root, reactor, config=config), interface=LOOPBACK)
    try:
        url = f"http://{LOOPBACK}:{port.getHost().port}/openai/v1/chat/completions"
        response, body = await request(b"POST", url, body=chat())
        assert (response.code, header(response, b"x-upstream")) == (200, b"b")
        assert json.loads(body)["object"] == "chat.completion"
    finally:
        await within(port.stopListening(), 5)
        await within(routes.close(), 5)
        await within(pool.close(), 5)


@pytest_twisted.ensureDeferred
async def test_failing_over_from_a_429_keeps_the_connection(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent
) -> None:
    """``a`` answers every request ``429`` (``retry-after-ms: 0``): each request fails
    over to ``b``, and ``a``'s small error body is read, not its connection closed: ten
    failovers use one connection to ``a``."""
    a, b = fakes["a"], fakes["b"]
    channels: set[int] = set()  # the proxy's ports, one per connection

    def limited(request: Request) -> bytes:
        channels.add(request.getClientAddress().port)  # type: ignore[attr-defined]
        request.setResponseCode(429)
        request.setHeader(b"retry-after-ms", b"0")
        return b'{"error": {"message": "slow down", "type": "tokens"}}'

    a.upstream.rule = limited
    proxy = route(
        {"name": "a", "url": a.url, "keys": ["sk-a"]},
        {"name": "b", "url": b.url, "keys": ["sk-b"], "priority": 1},
    )
    for _ in range(10):
        answer = await send(agent, proxy)
        assert (answer.status, answer.upstream) == (200, "b")
    assert (a.requests, b.requests) == (10, 10)
    assert len(channels) == 1


@pytest_twisted.ensureDeferred
async def test_sticky_upstreams_keep_each_access_key_on_one_upstream_key(
    fakes: dict[str, Fake], route: Callable[..., Proxy], agent: Agent, tmp_path: Path
) -> None:
    """``STICKY_UPSTREAMS``: every request of one access key reaches the same upstream
    with the same upstream key; twenty access keys spread over both upstreams."""
    a, b = fakes["a"], fakes["b"]
    callers = {f"caller-{n}": new_key() for n in range(20)}
    keys = tmp_path / "keys.toml"
    keys.write_text(
        "".join(f'[[key]]\nid = "{i}"\nsha256 = "{key_digest(k)}"\n' for i, k in callers.items())
    )
    proxy = route(
        {"name": "a", "url": a.url, "keys": ["sk-a-1", "sk-a-2"]},
        {"name": "b", "url": b.url, "keys": ["sk-b-1", "sk-b-2"]},
        access_keys_file=str(keys),
        sticky_upstreams=True,
    )

    async def upstream_key_of(key: str) -> bytes:
        """The upstream key that one request with access key ``key`` reached."""
        headers = {b"authorization": [f"Bearer {key}".encode()]}
        url = proxy.url + "/v1/chat/completions"
        response, _ = await request(b"POST", url, headers, chat())
        assert response.code == 200
        reached = fakes[(header(response, b"x-upstream") or b"?").decode()]
        return reached.upstream.stats.credentials[-1]

    first = callers["caller-0"]
    assert len({await upstream_key_of(first) for _ in range(10)}) == 1
    assert a.requests + b.requests == 10
    for key in callers.values():
        await upstream_key_of(key)
    assert a.requests > 0 and b.requests > 0
