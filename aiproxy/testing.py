"""
A fake OpenAI-compatible upstream for tests and demos (no network beyond loopback).

``FakeOpenAI`` is a twisted.web resource; serve it with ``Site(FakeOpenAI(clock))``.
Endpoints:

- ``POST /v1/chat/completions``: a ``chat.completion`` JSON, or with ``"stream": true``
  an SSE stream of ``chat.completion.chunk`` events and ``data: [DONE]``; the
  ``x-fake-chunks`` and ``x-fake-interval-ms`` request headers set the number of
  events (default 5) and their spacing (default 0). Each event carries ``fake_ts``,
  the upstream clock's time when it was written. With ``"stream_options":
  {"include_usage": true}``, as OpenAI does, a last chunk with no choices carries the
  usage (3 prompt tokens, one completion token per event).
- ``GET /v1/models``: a model list.
- ``POST /v1/messages``: an Anthropic ``message`` JSON (not streamed).
- ``GET /sse/COUNT/INTERVAL_MS``: the same event stream as a streamed chat
  completion, ``COUNT`` events ``INTERVAL_MS`` milliseconds apart.
- ``/echo...`` (any method): what the upstream received, as JSON: method, raw request
  target, HTTP version, every header value in order, body length and SHA-256.
- ``GET /bytes/N``: ``N`` bytes with ``Content-Length``, written with flow control.
- ``POST /sink``: the body's length and SHA-256, ``{"received": N, "sha256": HEX}``,
  read in pieces (never into memory whole).
- ``GET /status/CODE``: that status with a small JSON body.
- ``GET /hop-by-hop``: a response whose ``Connection`` header names
  ``X-Upstream-Private``, with that header, ``Keep-Alive``, ``Proxy-Authenticate`` and
  an end-to-end ``X-End-To-End: kept``.
- ``/hang``: never answers (until the client closes).
- ``/slow-headers/SECONDS``: answers with a small JSON body after ``SECONDS``.
- ``GET /truncated/N`` and ``GET /truncated-chunked/N``: start an ``N``-byte body
  (declared with ``Content-Length``, or chunked), send half, then drop the connection.

Paths are matched below the point where the resource is mounted, so it can also be
served under a prefix (``root.putChild(b"prefix", FakeOpenAI(clock))``).

:class:`UpstreamStats` counts what happened, including streams the client aborted.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any, cast

import attrs
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from aiproxy.rules.target import local_target

__all__ = ["FakeOpenAI", "UpstreamStats", "chat_completion", "sse_event"]


@attrs.define
class UpstreamStats:
    """
    What the fake upstream has seen and done.

    @ivar requests: requests received, on any path.
    @ivar hangs_aborted: ``/hang`` and ``/slow-headers`` requests whose client went
        away before the answer.
    @ivar bytes_served: body bytes written by ``/bytes/N``.
    @ivar last_echo: what the last ``/echo`` request looked like.
    @ivar credentials: every ``Authorization``, ``x-api-key`` and ``api-key`` value
        received, as ``name: value`` with the name in lower case.
    """

    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0
    hangs_aborted: int = 0
    bytes_served: int = 0
    last_echo: dict[str, Any] | None = None
    credentials: list[bytes] = attrs.Factory(list)


def chat_completion(model: str, content: str) -> dict[str, Any]:
    """A minimal OpenAI ``chat.completion`` object."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _message(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic ``message`` answering ``body``."""
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake-model"),
        "content": [{"type": "text", "text": "Hello there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (JSON unless it is a string)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return b"data: " + text.encode() + b"\n\n"


class FakeOpenAI(Resource):
    """The fake upstream; see the module docstring for its endpoints."""

    isLeaf = True

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.stats = UpstreamStats()

    def render(self, request: Request) -> bytes | int:
        """Dispatch on the path."""
        self.stats.requests += 1
        for name in (b"authorization", b"x-api-key", b"api-key"):
            for value in request.requestHeaders.getRawHeaders(name, []):
                self.stats.credentials.append(name + b": " + value)
        path = local_target(request.path, len(request.prepath or ()))
        if path == b"/v1/chat/completions" and request.method == b"POST":
            return self._chat(request)
        if path == b"/v1/messages" and request.method == b"POST":
            return _json(request, _message(json.loads(_body(request).read() or b"{}")))
        if path == b"/v1/models":
            return _json(request, {"object": "list", "data": [{"id": "fake-model"}]})
        if path.startswith(b"/sse/"):
            count, interval_ms = path[5:].split(b"/")
            return self._stream(request, "fake-model", int(count), float(interval_ms) / 1000)
        if path.startswith(b"/echo"):
            return self._echo(request)
        if path.startswith(b"/bytes/"):
            _BodyWriter(request, int(path[7:]), self.clock, self.stats).start()
            return NOT_DONE_YET
        if path == b"/sink":
            return self._sink(request)
        if path.startswith(b"/status/"):
            code = int(path[8:])
            request.setResponseCode(code)
            return _json(request, {"status": code})
        if path == b"/hop-by-hop":
            return self._hop_by_hop(request)
        if path == b"/hang":
            request.notifyFinish().addErrback(self._hang_aborted)
            return NOT_DONE_YET
        if path.startswith(b"/slow-headers/"):
            return self._slow_headers(request, float(path[14:]))
        if path.startswith(b"/truncated"):
            chunked = path.startswith(b"/truncated-chunked/")
            return self._truncated(request, int(path.rsplit(b"/", 1)[1]), chunked)
        request.setResponseCode(404)
        return _json(request, {"error": {"message": "no such fake endpoint"}})

    def _hang_aborted(self, reason: Failure) -> None:
        self.stats.hangs_aborted += 1

    def _chat(self, request: Request) -> bytes | int:
        body = json.loads(_body(request).read() or b"{}")
        model = body.get("model", "fake-model")
        if not body.get("stream"):
            return _json(request, chat_completion(model, "Hello there"))
        count = int(request.getHeader(b"x-fake-chunks") or 5)
        interval = float(request.getHeader(b"x-fake-interval-ms") or 0) / 1000
        options = body.get("stream_options") or {}
        return self._stream(request, model, count, interval, bool(options.get("include_usage")))

    def _stream(
        self, request: Request, model: str, count: int, interval: float, usage: bool = False
    ) -> int:
        _EventStream(request, model, count, interval, self.clock, self.stats, usage).start()
        return NOT_DONE_YET

    def _echo(self, request: Request) -> bytes:
        body = _body(request).read()
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "version": request.clientproto.decode(),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        self.stats.last_echo = seen
        return _json(request, seen)

    def _sink(self, request: Request) -> bytes:
        received = 0
        digest = hashlib.sha256()
        while piece := _body(request).read(65536):
            received += len(piece)
            digest.update(piece)
        return _json(request, {"received": received, "sha256": digest.hexdigest()})

    def _hop_by_hop(self, request: Request) -> bytes:
        headers = request.responseHeaders
        headers.setRawHeaders(b"Connection", [b"X-Upstream-Private"])
        headers.setRawHeaders(b"X-Upstream-Private", [b"secret"])
        headers.setRawHeaders(b"Keep-Alive", [b"timeout=5, max=100"])
        headers.setRawHeaders(b"Proxy-Authenticate", [b'Basic realm="upstream"'])
        headers.setRawHeaders(b"X-End-To-End", [b"kept"])
        return _json(request, {"hop_by_hop": True})

    def _slow_headers(self, request: Request, seconds: float) -> int:
        def answer() -> None:
            request.write(_json(request, {"slept": seconds}))
            request.finish()

        timer = self.clock.callLater(seconds, answer)

        def aborted(reason: Failure) -> None:
            if timer.active():
                timer.cancel()
                self.stats.hangs_aborted += 1

        request.notifyFinish().addErrback(aborted)
        return NOT_DONE_YET

    def _truncated(self, request: Request, size: int, chunked: bool) -> int:
        if not chunked:
            request.setHeader(b"Content-Length", b"%d" % size)
        request.write(b"x" * (size // 2))
        transport = cast(ITCPTransport, request.transport)
        self.clock.callLater(0.05, transport.abortConnection)
        return NOT_DONE_YET


def _body(request: Request) -> IO[bytes]:
    assert request.content is not None, "twisted.web always sets the body"
    return request.content


def _json(request: Request, document: object) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document).encode()


class _EventStream:
    """Writes ``count`` chat chunks ``interval`` seconds apart, then ``[DONE]``."""

    def __init__(
        self,
        request: Request,
        model: str,
        count: int,
        interval: float,
        clock: IReactorTime,
        stats: UpstreamStats,
        usage: bool,
    ) -> None:
        self.request = request
        self.model = model
        self.usage = usage
        self.remaining = count
        self.sent = 0
        self.interval = interval
        self.clock = clock
        self.stats = stats
        self.timer: IDelayedCall | None = None
        self.aborted = False

    def start(self) -> None:
        self.stats.streams_started += 1
        self.request.setHeader(b"Content-Type", b"text/event-stream")
        self.request.notifyFinish().addErrback(self._aborted)
        self._next()

    def _next(self) -> None:
        self.timer = None
        if self.aborted:
            return
        if self.remaining == 0:
            if self.usage:
                tokens = {"prompt_tokens": 3, "completion_tokens": self.sent}
                tokens["total_tokens"] = 3 + self.sent
                last = {"object": "chat.completion.chunk", "model": self.model, "choices": []}
                self.request.write(sse_event({**last, "usage": tokens}))
            self.request.write(sse_event("[DONE]"))
            self.request.finish()
            self.stats.streams_completed += 1
            return
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": self.model,
            "choices": [{"index": 0, "delta": {"content": f"tok{self.sent} "}}],
            "fake_seq": self.sent,
            "fake_ts": self.clock.seconds(),
        }
        self.request.write(sse_event(chunk))
        self.sent += 1
        self.remaining -= 1
        self.timer = self.clock.callLater(self.interval, self._next)

    def _aborted(self, reason: Failure) -> None:
        self.aborted = True
        self.stats.streams_aborted += 1
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


@implementer(IPushProducer)
class _BodyWriter:
    """Writes ``size`` bytes, pausing when the client's connection is backed up."""

    piece = b"x" * 65536

    def __init__(
        self, request: Request, size: int, clock: IReactorTime, stats: UpstreamStats
    ) -> None:
        self.request = request
        self.remaining = size
        self.clock = clock
        self.stats = stats
        self.paused = False
        self.stopped = False
        self.scheduled = False

    def start(self) -> None:
        self.request.setHeader(b"Content-Length", b"%d" % self.remaining)
        self.request.setHeader(b"Content-Type", b"application/octet-stream")
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._write_some()

    def _write_some(self) -> None:
        self.scheduled = False
        budget = 16
        while self.remaining and not self.paused and not self.stopped and budget:
            piece = self.piece[: self.remaining]
            self.request.write(piece)
            self.remaining -= len(piece)
            self.stats.bytes_served += len(piece)
            budget -= 1
        if self.stopped:
            return
        if not self.remaining:
            self.request.unregisterProducer()
            self.request.finish()
        elif not self.paused:
            self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.clock.callLater(0, self._write_some)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
