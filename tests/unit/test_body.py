"""Request bodies sent upstream from a file: in pieces, again from the start for a retry."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from typing import IO

import pytest

from aiproxy.core.body import FileBody, body_of

from .fakes import CollectingSink

CONTENT = bytes(range(256)) * 400  # 102,400 bytes


@pytest.fixture
def spooled() -> Iterator[IO[bytes]]:
    """A body in a temporary file, positioned at its end as twisted.web leaves it."""
    with tempfile.TemporaryFile() as f:
        f.write(CONTENT)
        yield f


def test_a_body_in_memory_is_its_bytes() -> None:
    """A body twisted.web kept in memory is sent as bytes, in one piece with the head."""
    assert body_of(io.BytesIO(b"hello"), 1000) == b"hello"
    assert body_of(None, 1000) == b""


def test_a_body_in_a_file_has_its_length(spooled: IO[bytes]) -> None:
    """A file body knows its length, so the upstream gets a Content-Length."""
    body = body_of(spooled, 1000)
    assert isinstance(body, FileBody)
    assert body.length == len(CONTENT)
    assert body.replayable()


@pytest.mark.parametrize("read_size", [1000, 8192, 65536])
def test_a_body_in_a_file_is_sent_in_bounded_pieces(spooled: IO[bytes], read_size: int) -> None:
    """The file is read in pieces of at most PROXY_BUFFER_SIZE, never whole."""
    sink = CollectingSink()
    FileBody(spooled.fileno(), read_size).start(sink)
    assert sink.finished
    assert sink.data == CONTENT
    assert max(len(piece) for piece in sink.writes) <= read_size


def test_a_body_in_a_file_is_sent_again_in_full(spooled: IO[bytes]) -> None:
    """A retry sends the whole body again, and the file stays open for it."""
    body = FileBody(spooled.fileno(), 4096)
    first, second = CollectingSink(), CollectingSink()
    body.start(first)
    body.start(second)
    assert first.data == second.data == CONTENT
    assert not spooled.closed


def test_a_stopped_body_writes_nothing_more(spooled: IO[bytes]) -> None:
    """When the upstream request ends early, the body stops where it is."""
    body = FileBody(spooled.fileno(), 1000)
    sink = CollectingSink()
    sink.register_producer = lambda producer, streaming: None  # type: ignore[method-assign]
    body.start(sink)
    body.resumeProducing()
    body.stop()
    body.resumeProducing()
    assert sink.writes == [CONTENT[:1000]]
    assert not sink.finished
