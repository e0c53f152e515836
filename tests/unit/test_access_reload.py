"""
Reloading the key file while the proxy runs: on a change seen by polling (fake clock),
and on SIGHUP; an invalid file keeps the keys in use and warns once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from aiproxy.access.keyfile import read_key_file
from aiproxy.access.keys import key_digest
from aiproxy.access.policy import AccessKeys
from aiproxy.access.watch import reload_keys
from aiproxy.run.watch import WATCH_INTERVAL, FileWatcher, OnHangup

OLD = "aip-" + "o" * 43
NEW = "aip-" + "n" * 43

Watched = tuple[Path, AccessKeys, FileWatcher, Clock]


def key_file(*keys: str) -> str:
    """A key file text with one entry per key (ids k0, k1...)."""
    return "".join(
        f'[[key]]\nid = "k{n}"\nsha256 = "{key_digest(key)}"\n' for n, key in enumerate(keys)
    )


def change(path: Path, text: str) -> None:
    """Write ``text`` and move the modification time on (a second edit in the same tick)."""
    path.write_text(text)
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    """A key file with OLD, its keys, and a started watcher on a fake clock."""
    path = tmp_path / "keys.toml"
    path.write_text(key_file(OLD))
    keys = AccessKeys(str(path), read_key_file(str(path)))
    clock = Clock()
    watcher = FileWatcher(keys.path, partial(reload_keys, keys), clock)
    watcher.startService()
    yield path, keys, watcher, clock
    watcher.stopService()


def test_a_changed_file_is_used_within_the_interval(watched: Watched) -> None:
    """Replacing OLD by NEW in the file: after one interval NEW opens, OLD does not."""
    path, keys, _, clock = watched
    before = keys.ring
    change(path, key_file(NEW))
    assert keys.ring is before
    with capturedLogs() as events:
        clock.advance(WATCH_INTERVAL)
    assert keys.ring.find(NEW.encode()) is not None
    assert keys.ring.find(OLD.encode()) is None
    assert [e["log_format"] for e in events] == ["Access keys reloaded from {path}: {count} key(s)"]
    assert before.find(OLD.encode()) is not None  # a request admitted before keeps its entry


def test_an_invalid_file_keeps_the_keys_and_warns_once(watched: Watched) -> None:
    """A broken edit is not used; one warning names the problem; fixing it reloads."""
    path, keys, _, clock = watched
    before = keys.ring
    with capturedLogs() as events:
        change(path, key_file(OLD) + "rpn = 1\n")
        for _ in range(5):
            clock.advance(WATCH_INTERVAL)
    assert keys.ring is before
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert "unknown field(s) rpn" in warnings[0]["error"]
    change(path, key_file(NEW))
    clock.advance(WATCH_INTERVAL)
    assert keys.ring.find(NEW.encode()) is not None


def test_a_file_removed_while_it_is_replaced_keeps_the_keys(watched: Watched) -> None:
    """A moment without the file (an editor's rename) keeps the keys in use."""
    path, keys, _, clock = watched
    before = keys.ring
    path.unlink()
    clock.advance(WATCH_INTERVAL)
    assert keys.ring is before


def test_sighup_reloads_at_once(tmp_path: Path) -> None:
    """SIGHUP reloads even when the file's time and size did not change; stopping
    gives SIGHUP back to its previous handler."""
    path = tmp_path / "keys.toml"
    path.write_text(key_file(OLD))
    keys = AccessKeys(str(path), read_key_file(str(path)))
    previous = signal.getsignal(signal.SIGHUP)
    called: list[Callable[[], None]] = []

    def call_from_signal(f: Callable[[], None]) -> None:
        called.append(f)
        f()

    hangup = OnHangup(partial(reload_keys, keys), call_from_signal)
    hangup.startService()
    try:
        assert signal.getsignal(signal.SIGHUP) == hangup._hangup
        status = path.stat()
        path.write_text(key_file(NEW))
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        os.kill(os.getpid(), signal.SIGHUP)
        assert keys.ring.find(NEW.encode()) is not None
        assert len(called) == 1
    finally:
        hangup.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous
