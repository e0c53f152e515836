"""The model and token counts the proxy learns from response bodies as they stream by."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from aiproxy.rules import usage as usage_module
from aiproxy.rules.usage import (
    MAX_MODEL_LENGTH,
    MAX_TOKENS,
    OTHER_MODEL,
    Usage,
    UsageMeter,
    usage_meter,
)

JSON = b"application/json"
SSE = b"text/event-stream"


def meter_for(content_type: bytes, **limits: int) -> UsageMeter:
    meter = usage_meter([(b"Content-Type", content_type)], **limits)
    assert meter is not None
    return meter


def read(chunks: Sequence[bytes], content_type: bytes = SSE, **limits: int) -> Usage | None:
    """What a meter learns from a body arriving in ``chunks``."""
    meter = meter_for(content_type, **limits)
    for chunk in chunks:
        meter.feed(chunk)
    return meter.result()


def events(*messages: Any, event_names: Sequence[str] = ()) -> bytes:
    """An event stream of ``messages`` (JSON-encoded unless bytes), with LF line ends."""
    names = list(event_names) or [""] * len(messages)
    stream = b""
    for name, message in zip(names, messages, strict=True):
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        stream += (f"event: {name}\n".encode() if name else b"") + b"data: " + data + b"\n\n"
    return stream


def openai_chunk(text: str | None, usage: Any = None, **extra: Any) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}}]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": choices,
        **({"usage": usage} if usage is not None or extra.pop("usage_null", False) else {}),
        **extra,
    }


OPENAI_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 18,
    "total_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 0},
}

OPENAI_STREAM = events(
    *[openai_chunk(f"word{n} ", usage_null=True) for n in range(18)],
    openai_chunk(None, OPENAI_USAGE),
    b"[DONE]",
)
"""Twenty events, as OpenAI streams with ``stream_options: {"include_usage": true}``."""

ANTHROPIC_STREAM = events(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-20250514",
            "stop_reason": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hé"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
    event_names=[
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ],
)

RESPONSES_STREAM = events(
    {
        "type": "response.created",
        "response": {"id": "resp_1", "model": "gpt-4.1-2025-04-14", "usage": None},
    },
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"},
    {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "status": "completed",
            "model": "gpt-4.1-2025-04-14",
            "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123},
        },
    },
    event_names=["response.created", "response.output_text.delta", "response.completed"],
)

STREAMS = [
    pytest.param(OPENAI_STREAM, Usage("gpt-4o-mini-2024-07-18", 12, 18), id="openai"),
    pytest.param(ANTHROPIC_STREAM, Usage("claude-sonnet-4-20250514", 25, 15), id="anthropic"),
    pytest.param(RESPONSES_STREAM, Usage("gpt-4.1-2025-04-14", 36, 87), id="responses"),
]

JSON_BODIES = [
    pytest.param(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
            "usage": OPENAI_USAGE,
        },
        Usage("gpt-4o-mini-2024-07-18", 12, 18),
        id="openai-chat",
    ),
    pytest.param(
        {
            "object": "text_completion",
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": "Hi", "index": 0}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        },
        Usage("gpt-3.5-turbo-instruct", 5, 7),
        id="openai-completion",
    ),
    pytest.param(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0091]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        },
        Usage("text-embedding-3-small", 8, None),
        id="openai-embeddings",
    ),
    pytest.param(
        {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-4.1-2025-04-14",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
            "usage": {
                "input_tokens": 36,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 87,
                "total_tokens": 123,
            },
        },
        Usage("gpt-4.1-2025-04-14", 36, 87),
        id="openai-responses",
    ),
    pytest.param(
        {
            "id": "msg_1",
            "type": "message",
            "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": "Hi"}],
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 14,
            },
        },
        Usage("claude-sonnet-4-20250514", 25, 14),
        id="anthropic",
    ),
    pytest.param(
        {
            "model": "claude-sonnet-4-20250514",
            "usage": {
                "input_tokens": 3,
                "cache_creation_input_tokens": 20,
                "cache_read_input_tokens": 1000,
                "output_tokens": 14,
            },
        },
        Usage("claude-sonnet-4-20250514", 1023, 14),
        id="anthropic-cached-prompt",
    ),
]


def splits(body: bytes) -> Iterator[list[bytes]]:
    """``body`` cut in two at every position, then one byte at a time."""
    for at in range(len(body) + 1):
        yield [body[:at], body[at:]]
    yield [body[n : n + 1] for n in range(len(body))]


@pytest.mark.parametrize(("message", "expected"), JSON_BODIES)
def test_json_body_gives_model_and_tokens(message: dict[str, Any], expected: Usage) -> None:
    """OpenAI and Anthropic JSON responses give their model and token counts."""
    assert read([json.dumps(message).encode()], JSON) == expected


@pytest.mark.parametrize(("message", "expected"), JSON_BODIES)
def test_json_body_in_any_pieces_gives_the_same(message: dict[str, Any], expected: Usage) -> None:
    """However a JSON body is cut into chunks, the same usage is learned."""
    body = json.dumps(message).encode()
    for chunks in splits(body):
        assert read(chunks, JSON) == expected


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
def test_stream_gives_model_and_tokens(stream: bytes, expected: Usage) -> None:
    """OpenAI (with include_usage), Anthropic and Responses API streams give their usage."""
    assert read([stream]) == expected


@pytest.mark.parametrize(("stream", "expected"), STREAMS)
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_stream_in_any_pieces_with_any_line_end_gives_the_same(
    stream: bytes, expected: Usage, line_end: bytes
) -> None:
    """Cut anywhere (inside CRLF, a field name, a UTF-8 character), a stream reads the same."""
    body = stream.replace(b"\n", line_end)
    for chunks in splits(body):
        assert read(chunks) == expected


def test_openai_stream_without_include_usage_gives_only_the_model() -> None:
    """A stream whose chunks all say ``"usage": null`` gives the model and no counts."""
    stream = events(openai_chunk("Hi", usage_null=True), openai_chunk("!"), b"[DONE]")
    assert read([stream]) == Usage("gpt-4o-mini-2024-07-18", None, None)


def test_anthropic_stream_counts_the_last_totals() -> None:
    """Anthropic's counts are cumulative: the last ``message_delta`` wins, input included."""
    stream = ANTHROPIC_STREAM + events(
        {"type": "message_delta", "usage": {"input_tokens": 30, "output_tokens": 40}},
        {"type": "message_delta", "usage": {"output_tokens": 41}},
    )
    assert read([stream]) == Usage("claude-sonnet-4-20250514", 30, 41)


def test_result_while_streaming_is_what_was_learned_so_far() -> None:
    """Asked mid-stream (a stream cut short), the meter tells what the stream has said."""
    meter = meter_for(SSE)
    first, rest = ANTHROPIC_STREAM.split(b"\n\n", 1)
    meter.feed(first + b"\n\n")
    assert meter.result() == Usage("claude-sonnet-4-20250514", 25, 1)
    assert meter.result() == Usage("claude-sonnet-4-20250514", 25, 1)
    meter.feed(rest)
    assert meter.result() == Usage("claude-sonnet-4-20250514", 25, 15)


def test_event_the_stream_ends_in_the_middle_of_is_not_counted() -> None:
    """An event without its closing blank line is dropped, as the SSE standard says."""
    last = b"data: " + json.dumps(openai_chunk(None, OPENAI_USAGE)).encode() + b"\n"
    stream = events(openai_chunk("Hi")) + last
    assert read([stream]) == Usage("gpt-4o-mini-2024-07-18", None, None)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_multi_line_data_is_joined_with_newlines(line_end: bytes) -> None:
    """The data lines of one event form one JSON text, joined with line feeds."""
    stream = (
        b"data\n"
        b'data: {"model": "m",\n'
        b'data:"usage":\n'
        b'data:  {"prompt_tokens": 1, "completion_tokens": 2}}\n'
        b"\n"
        b'data: {"usage": {"prompt_tokens": 1\n'
        b"data: 0}}\n"
        b"\n"
    ).replace(b"\n", line_end)
    for chunks in splits(stream):
        assert read(chunks) == Usage("m", 1, 2)


def test_comments_and_other_fields_are_ignored() -> None:
    """Comments, ``event``, ``id`` and ``retry`` lines and empty events change nothing."""
    stream = (
        b": keep-alive\n\n"
        b"\n\n"
        b"retry: 1000\n"
        b"id: 7\n"
        b"event: chunk\n"
        b": a comment inside an event\n"
        b'data:{"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n'
        b"\n"
        b": data: {not json}\n\n"
        b"datas: {not json}\n\n"
    )
    assert read([stream]) == Usage("m", 1, 2)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"", None, id="empty"),
        pytest.param(b"{", None, id="truncated"),
        pytest.param(b"not json", None, id="not-json"),
        pytest.param(b"\xff\xfe{}", None, id="not-utf8"),
        pytest.param(b"[1, 2]", None, id="array"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, id="deeply-nested"),
        pytest.param(b'{"error": {"message": "rate limited"}}', None, id="error"),
        pytest.param(b'{"model": "m"}', Usage("m", None, None), id="no-usage"),
        pytest.param(b'{"model": "m", "usage": [1, 2]}', Usage("m", None, None), id="usage-list"),
        pytest.param(b'{"usage": {"prompt_tokens": 3}}', Usage(None, 3, None), id="no-model"),
        pytest.param(
            b'{"model": 5, "usage": {"prompt_tokens": "3", "completion_tokens": 2.0}}',
            None,
            id="wrong-types",
        ),
        pytest.param(
            b'{"model": "m", "usage": {"prompt_tokens": true, "completion_tokens": -1}}',
            Usage("m", None, None),
            id="bool-and-negative",
        ),
        pytest.param(
            b'{"model": "m", "usage": {"prompt_tokens": 1' + b"0" * 9 + b', "completion_tokens": '
            b"1" + b"0" * 5000 + b"}}",
            None,
            id="absurd-counts",
        ),
        pytest.param(
            b'{"model": "", "usage": {"input_tokens": 2, "cache_read_input_tokens": "x"}}',
            Usage(None, 2, None),
            id="empty-model-bad-cache-count",
        ),
        pytest.param(
            b'{"model": "a\\nb"}', Usage(OTHER_MODEL, None, None), id="model-with-newline"
        ),
        pytest.param(
            b'{"model": "\\ud800"}', Usage(OTHER_MODEL, None, None), id="model-lone-surrogate"
        ),
    ],
)
def test_malformed_json_body_gives_what_it_can(body: bytes, expected: Usage | None) -> None:
    """Malformed JSON, missing usage or counts of the wrong type are not counted, never raise."""
    assert read([body], JSON) == expected


def test_largest_believable_count_is_counted() -> None:
    """A count of exactly MAX_TOKENS is counted; one more is not."""
    body = json.dumps(
        {"usage": {"prompt_tokens": MAX_TOKENS, "completion_tokens": MAX_TOKENS + 1}}
    ).encode()
    assert read([body], JSON) == Usage(None, MAX_TOKENS, None)


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-mini",
        "claude-3-5-sonnet-20241022",
        "meta-llama/Llama-3.1-8B-Instruct",
        "anthropic.claude-3-haiku-20240307-v1:0",
        "@cf/meta/llama-3-8b-instruct",
        "m" * MAX_MODEL_LENGTH,
    ],
)
def test_model_names_are_taken_as_they_are(model: str) -> None:
    """Names made of the characters model names use, and not too long, are kept."""
    assert read([json.dumps({"model": model}).encode()], JSON) == Usage(model, None, None)


@pytest.mark.parametrize(
    "model",
    [
        "sk-live-PLANTED0123456789abcdef",
        "sk-ant-api03-PLANTED0123456789abcdef",
        "AIzaPLANTED0123456789abcdefghijklmnopq",
        "m" * (MAX_MODEL_LENGTH + 1),
        "gpt 4",
        "gpt\x1b[31m",
        "mod\u00e8le",
        "-rf",
        'a"b',
    ],
)
def test_names_that_do_not_look_like_models_count_as_other(model: str) -> None:
    """A key-shaped, overlong or oddly spelled model name is recorded as ``other``: an
    upstream cannot put a secret or arbitrary text into metric labels and log lines."""
    assert read([json.dumps({"model": model}).encode()], JSON) == Usage(OTHER_MODEL, None, None)


def test_malformed_events_are_skipped() -> None:
    """Events that are not JSON, or have usage of the wrong shape, do not stop the count."""
    stream = (
        b'data: {"model": "m", "usage": {\n\n'
        b"data: \xff\xfe\n\n"
        b'data: {"usage": {"prompt_tokens": 1.5, "completion_tokens": null}}\n\n'
        b'data: {"usage": {"prompt_tokens": 4, "completion_tokens": 5}}\n\n'
        b'data: {"usage": "lots", "choices": []}\n\n'
        b"data: [DONE]\n\n"
    )
    assert read([stream]) == Usage(None, 4, 5)


def test_json_body_over_the_cap_gives_nothing() -> None:
    """A JSON body longer than its cap is not read at all; one exactly at it is."""
    body = json.dumps({"model": "m", "usage": {"prompt_tokens": 1}}).encode()
    assert read([body[:10], body[10:]], JSON, max_json_body=len(body)) == Usage("m", 1, None)
    assert read([body[:10], body[10:]], JSON, max_json_body=len(body) - 1) is None


def test_json_body_announced_over_the_cap_gets_no_meter() -> None:
    """A JSON body whose Content-Length exceeds the cap is not metered at all."""
    assert (
        usage_meter([(b"Content-Type", JSON), (b"Content-Length", b"101")], max_json_body=100)
        is None
    )
    assert (
        usage_meter([(b"content-length", b"100"), (b"content-type", JSON)], max_json_body=100)
        is not None
    )


def test_json_body_over_the_cap_is_not_kept_in_memory() -> None:
    """Past the cap, a JSON body's chunks are let go: memory stays bounded."""
    meter = meter_for(JSON, max_json_body=64 * 1024)
    tracemalloc.start()
    try:
        for _ in range(2048):
            meter.feed(bytes(4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    assert meter.result() is None


def test_over_long_event_is_skipped_and_later_usage_counted() -> None:
    """An event with a line over the cap is skipped whole, however it is cut into chunks."""
    huge = b'data: {"model": "huge", "usage": {"prompt_tokens": 99}, "pad": "' + b"x" * 1000
    rest_of_event = b'"}\ndata: {"model": "cut", "usage": {"prompt_tokens": 98}}\n\n'
    stream = huge + rest_of_event + events(openai_chunk(None, OPENAI_USAGE))
    for chunks in splits(stream):
        assert read(chunks, max_event_size=1000) == Usage("gpt-4o-mini-2024-07-18", 12, 18)


def test_over_long_event_of_many_lines_is_skipped() -> None:
    """An event whose data lines together exceed the cap is skipped, then reading goes on."""
    lines = b'data: {"model": "huge", "usage": {"prompt_tokens": 99},\n' + b'data: "x",\n' * 200
    stream = lines + b'data: "end": 1}\n\n' + events(openai_chunk(None, OPENAI_USAGE))
    assert read([stream], max_event_size=1000) == Usage("gpt-4o-mini-2024-07-18", 12, 18)


def test_over_long_line_is_not_kept_in_memory() -> None:
    """A line that never ends is dropped past the cap, with its event; later events count."""
    meter = meter_for(SSE, max_event_size=64 * 1024)
    tracemalloc.start()
    try:
        meter.feed(b"data: ")
        for _ in range(2048):
            meter.feed(b"x" * 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    meter.feed(b"\r")
    meter.feed(b'\ndata: {"model": "cut", "usage": {"prompt_tokens": 99}}\r\n\r\n')
    meter.feed(events(openai_chunk(None, OPENAI_USAGE)))
    assert meter.result() == Usage("gpt-4o-mini-2024-07-18", 12, 18)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the meters parse as JSON, from now on."""
    texts: list[str] = []
    parse = json.loads

    def loads(text: str) -> Any:
        texts.append(text)
        return parse(text)

    monkeypatch.setattr(usage_module.json, "loads", loads)
    return texts


def test_stream_parses_only_events_that_tell_something(parsed: list[str]) -> None:
    """Of a 20-event OpenAI stream, only the first event and the usage event are parsed."""
    assert read([OPENAI_STREAM]) == Usage("gpt-4o-mini-2024-07-18", 12, 18)
    assert len(parsed) == 2
    assert "word0" in parsed[0]
    assert '"prompt_tokens"' in parsed[1]


def test_azure_stream_takes_the_model_from_a_later_chunk() -> None:
    """Azure's first chunk names the model ``""`` (prompt filter results); the next names it."""
    azure_first = {"id": "", "model": "", "choices": [], "prompt_filter_results": []}
    stream = events(azure_first, openai_chunk("Hi"), openai_chunk("!"), b"[DONE]")
    assert read([stream]) == Usage("gpt-4o-mini-2024-07-18", None, None)


def test_stream_without_a_valid_model_is_not_parsed_event_after_event(
    parsed: list[str],
) -> None:
    """A stream whose chunks all name an invalid model has only its first few parsed."""
    stream = events(*[openai_chunk("Hi", model="") for _ in range(20)])
    assert read([stream]) is None
    assert len(parsed) == 3


def test_feeding_leaves_the_chunks_untouched() -> None:
    """The chunks fed (even mutable ones) are left as they were, and read as the whole body."""
    for body, content_type in [(OPENAI_STREAM, SSE), (json.dumps({"model": "m"}).encode(), JSON)]:
        chunks = [bytearray(body[n : n + 5]) for n in range(0, len(body), 5)]
        originals = [bytes(chunk) for chunk in chunks]
        meter = meter_for(content_type)
        for chunk in chunks:
            meter.feed(chunk)  # type: ignore[arg-type]
        assert [bytes(chunk) for chunk in chunks] == originals
        assert meter.result() == read([body], content_type)


def test_garbage_never_raises() -> None:
    """Random bytes full of SSE and JSON fragments never make a meter raise."""
    pieces = [b"data:", b" ", b"\n", b"\r", b"\r\n", b"{", b"}", b'"usage"', b'"model"', b":"]
    pieces += [b'"m"', b"1", b"-", b"[", b"]", b",", b'"prompt_tokens"', b"\xff", b"\xc3", b"null"]
    rng = random.Random(7)
    for _ in range(300):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(200)))
        for content_type in (SSE, JSON):
            result = read([body[:50], body[50:]], content_type, max_event_size=64)
            assert result is None or isinstance(result, Usage)


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON; charset=utf-8",
        b"application/problem+json",
        b"text/event-stream",
        b"TEXT/Event-Stream ;charset=UTF-8",
    ],
)
def test_json_and_event_streams_get_a_meter(content_type: bytes) -> None:
    """JSON (``*/*+json`` too) and event streams, in any case, with parameters, are metered."""
    assert (
        usage_meter([(b"Content-Type", content_type), (b"Content-Encoding", b"identity")])
        is not None
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-content-type"),
        pytest.param([(b"Content-Type", b"text/plain")], id="text"),
        pytest.param([(b"Content-Type", b"text/html; charset=utf-8")], id="html"),
        pytest.param([(b"Content-Type", b"application/octet-stream")], id="binary"),
        pytest.param([(b"Content-Type", b"application/x-ndjson")], id="ndjson"),
        pytest.param([(b"Content-Type", b"audio/mpeg")], id="audio"),
        pytest.param([(b"Content-Type", JSON), (b"Content-Encoding", b"gzip")], id="gzip-json"),
        pytest.param([(b"Content-Type", SSE), (b"content-encoding", b"br")], id="brotli-sse"),
        pytest.param(
            [(b"Content-Type", JSON), (b"Content-Encoding", b"identity, gzip")],
            id="identity-then-gzip",
        ),
        pytest.param(
            [
                (b"Content-Encoding", b"identity"),
                (b"Content-Type", JSON),
                (b"CONTENT-ENCODING", b"gzip"),
            ],
            id="identity-and-gzip-fields",
        ),
        pytest.param(
            [(b"Content-Type", b"text/plain"), (b"Content-Type", JSON)], id="first-type-text"
        ),
    ],
)
def test_other_or_compressed_bodies_get_no_meter(headers: list[tuple[bytes, bytes]]) -> None:
    """A body that is not JSON or an event stream (by its first Content-Type), or that is
    compressed, is not metered."""
    assert usage_meter(headers) is None
