"""
Pure: the model and token counts of a response, learned from its body as it streams.

:func:`usage_meter` picks a meter from the response headers: a JSON body is kept (up to
a size cap) and read once it has ended; an event stream (SSE) is split into events as
it arrives, and only the few events that can tell something are parsed. A meter only
reads the chunks it is fed; what the client gets is never touched.

Understood: OpenAI chat completions, completions, embeddings and the Responses API,
and Anthropic messages, each as a JSON body or as a stream. The model is the first one
named; token counts are the last ones reported (streams report them cumulatively).
Anything missing, malformed or absurd is simply not counted.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from aiproxy.rules.redact import is_key_shaped

if TYPE_CHECKING:
    from aiproxy.core.interfaces import RawHeaders

__all__ = [
    "MAX_EVENT_SIZE",
    "MAX_JSON_BODY",
    "MAX_MODEL_LENGTH",
    "MAX_TOKENS",
    "OTHER_MODEL",
    "Usage",
    "UsageMeter",
    "usage_meter",
]

MAX_JSON_BODY = 1024 * 1024
"""The largest JSON body that is read, in bytes; a longer one yields no usage."""

MAX_EVENT_SIZE = 256 * 1024
"""The largest stream event (or line) that is read, in bytes; a longer one is skipped."""

MAX_MODEL_LENGTH = 128
"""The longest model name taken as it is; a longer one counts as :data:`OTHER_MODEL`."""

OTHER_MODEL = "other"
"""What a model name that does not look like one is recorded as."""

_MODEL_NAME = re.compile(r"[A-Za-z0-9@][A-Za-z0-9._:/@+-]*")
"""
The characters of model names (``gpt-4o-mini``, ``meta-llama/Llama-3.1-8B-Instruct``,
``anthropic.claude-3-haiku-20240307-v1:0``, ``@cf/meta/llama-3-8b``).
"""

MAX_TOKENS = 10**9
"""The largest token count believed; a larger one is not counted."""

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
"""A ``"usage"`` key with an object for value: not the ``"usage": null`` of most chunks."""

_MODEL_TRIES = 3
"""How many events naming a ``"model"`` a stream's meter parses to find a valid one."""


@attrs.frozen
class Usage:
    """
    What a response said about itself; each field is L{None} when it did not say.

    @ivar model: the model that answered, if its name looks like a model's: at most
        :data:`MAX_MODEL_LENGTH` letters, digits and ``._:/@+-``, nothing shaped like an
        API key; any other name is :data:`OTHER_MODEL`, so that an upstream cannot put
        arbitrary text into metric labels and log lines.
    @ivar prompt_tokens: tokens read: OpenAI's ``prompt_tokens`` or ``input_tokens``;
        for Anthropic, ``input_tokens`` plus the tokens written to and read from its
        prompt cache, so that it counts the whole prompt as OpenAI's does.
    @ivar completion_tokens: tokens generated: ``completion_tokens`` or
        ``output_tokens``; L{None} for embeddings, which generate none.
    """

    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


class UsageMeter(Protocol):
    """Learns a response's :class:`Usage` from the chunks of its body."""

    def feed(self, data: bytes) -> None:
        """Read the next chunk of the body; ``data`` is left as it is."""

    def result(self) -> Usage | None:
        """What was learned so far (all of it once the body has ended); L{None} if nothing."""


def usage_meter(
    headers: RawHeaders,
    *,
    max_json_body: int = MAX_JSON_BODY,
    max_event_size: int = MAX_EVENT_SIZE,
) -> UsageMeter | None:
    """
    A meter for a response body with ``headers``; L{None} if its usage cannot be read.

    Only an uncompressed (no ``Content-Encoding`` but ``identity``) body of type
    ``application/json``, ``*/*+json`` or ``text/event-stream`` can be read. A JSON body
    that announces a ``Content-Length`` over ``max_json_body`` gets no meter either.
    """
    content_type: bytes | None = None
    length: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-type":
            if content_type is None:
                content_type = value
        elif lower == b"content-length":
            if length is None:
                length = value
        elif lower == b"content-encoding" and any(
            coding.strip().lower() not in (b"", b"identity") for coding in value.split(b",")
        ):
            return None
    if content_type is None:
        return None
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type == b"text/event-stream":
        return _EventStream(max_event_size)
    if media_type == b"application/json" or media_type.endswith(b"+json"):
        if length is not None and length.isdigit() and int(length) > max_json_body:
            return None
        return _JsonBody(max_json_body)
    return None


def _model(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    if (
        len(value) <= MAX_MODEL_LENGTH
        and _MODEL_NAME.fullmatch(value) is not None
        and not is_key_shaped(value)
    ):
        return value
    return OTHER_MODEL


def _tokens(value: object) -> int | None:
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


class _Tally:
    """What the parsed parts of one body have said so far."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def learn(self, message: object) -> None:
        """
        Take the model and usage from a parsed JSON body or event.

        They are at its top level (OpenAI, Anthropic JSON and ``message_delta``), in
        its ``message`` (Anthropic ``message_start``) or in its ``response`` (OpenAI
        Responses stream events).
        """
        if not isinstance(message, dict):
            return
        for part in (message, message.get("message"), message.get("response")):
            if isinstance(part, dict):
                if self.model is None:
                    self.model = _model(part.get("model"))
                usage = part.get("usage")
                if isinstance(usage, dict):
                    self._count(usage)

    def _count(self, usage: dict[str, Any]) -> None:
        prompt = _tokens(usage.get("prompt_tokens"))
        if prompt is None:
            prompt = _tokens(usage.get("input_tokens"))
            if prompt is not None:
                for cached in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                    prompt += _tokens(usage.get(cached)) or 0
        if prompt is not None:
            self.prompt_tokens = prompt
        completion = _tokens(usage.get("completion_tokens"))
        if completion is None:
            completion = _tokens(usage.get("output_tokens"))
        if completion is not None:
            self.completion_tokens = completion

    def learn_json(self, text: bytes) -> None:
        """:meth:`learn` from UTF-8 JSON text; text that is not that says nothing."""
        try:
            message = json.loads(text.decode())
        except (ValueError, RecursionError):
            return
        self.learn(message)

    def result(self) -> Usage | None:
        """What was learned; L{None} if nothing."""
        if self.model is None and self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return Usage(self.model, self.prompt_tokens, self.completion_tokens)


class _JsonBody:
    """A JSON body, kept as its chunks until it is read, unless it grows too big."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] | None = []

    def feed(self, data: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = None
        else:
            self._chunks.append(data)

    def result(self) -> Usage | None:
        if not self._chunks:
            return None
        tally = _Tally()
        tally.learn_json(b"".join(self._chunks))
        return tally.result()


class _EventStream:
    """
    An event stream, framed as the WHATWG HTML standard says (section 9.2.6).

    Lines end in ``\\n``, ``\\r\\n`` or ``\\r``; ``data:`` lines (one space after the
    colon is dropped) are joined with ``\\n`` into the event's data; a blank line ends
    the event; other fields and comments are ignored, as is an event the stream ends in
    the middle of. The data of an event is parsed only if it has a ``"usage"`` object,
    or mentions a ``"model"`` while none is known (in at most :data:`_MODEL_TRIES`
    events: Azure's first chunk names the model ``""``). An event or a line over
    ``limit`` bytes is skipped.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tally = _Tally()
        self._model_tries = _MODEL_TRIES
        self._partial_line: list[bytes] = []
        self._partial_size = 0
        self._in_long_line = False
        self._skip_lf = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._skipping_event = False

    def feed(self, data: bytes) -> None:
        if self._can_skip(data):
            return
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\n" not in data and b"\r" not in data:
            if data and not self._in_long_line:
                self._extend_line(data)
            return
        if self._partial_line:
            self._partial_line.append(data)
            data = b"".join(self._partial_line)
            self._partial_line = []
            self._partial_size = 0
        lines = data.splitlines()
        last = data[-1:]
        self._skip_lf = last == b"\r"
        tail = b"" if last in (b"\r", b"\n") else lines.pop()
        if self._in_long_line:
            self._in_long_line = False
            del lines[0]
        for line in lines:
            if not line:
                self._dispatch()
            elif line.startswith(b"data") and not self._skipping_event:
                self._add_data(line)
        if tail:
            self._extend_line(tail)

    def _can_skip(self, data: bytes) -> bool:
        """
        Whether ``data`` can tell nothing, so framing it can be skipped: it holds whole
        events only (it starts where an event starts and ends with a blank line), the
        model is settled, and it has no ``"usage"`` object. Most chunks of a stream are
        like that: this keeps the meter's cost per chunk to a few byte searches.
        """
        return (
            (data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n"))
            and not self._partial_line
            and not self._data
            and not self._skip_lf
            and not self._in_long_line
            and not self._skipping_event
            and (self._tally.model is not None or self._model_tries == 0)
            and _USAGE_OBJECT.search(data) is None
        )

    def _extend_line(self, piece: bytes) -> None:
        """Keep ``piece`` of a line not yet ended, unless the line grows too long."""
        self._partial_line.append(piece)
        self._partial_size += len(piece)
        if self._partial_size > self._limit:
            self._partial_line = []
            self._partial_size = 0
            self._in_long_line = True
            self._skip_event()

    def _add_data(self, line: bytes) -> None:
        """Add the value of ``line`` to the event's data if its field is ``data``."""
        if line[4:5] == b":":
            value = line[6:] if line[5:6] == b" " else line[5:]
        elif len(line) == 4:
            value = b""
        else:
            return
        self._data_size += len(value) + 1
        if self._data_size > self._limit:
            self._skip_event()
        else:
            self._data.append(value)

    def _skip_event(self) -> None:
        self._skipping_event = True
        self._data = []

    def _dispatch(self) -> None:
        data, self._data = self._data, []
        self._data_size = 0
        if self._skipping_event:
            self._skipping_event = False
            return
        if not data:
            return
        text = data[0] if len(data) == 1 else b"\n".join(data)
        seeks_model = self._model_tries > 0 and self._tally.model is None and b'"model"' in text
        if seeks_model:
            self._model_tries -= 1
        if seeks_model or (b'"usage"' in text and _USAGE_OBJECT.search(text)):
            self._tally.learn_json(text)

    def result(self) -> Usage | None:
        return self._tally.result()
