"""``python -m aiproxy.run.plugin_cache``, as the Dockerfile runs it."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from aiproxy.run.plugin_cache import write_plugin_cache

PLUGIN = Path(__file__).resolve().parents[2] / "twisted" / "plugins" / "aiproxy_plugin.py"


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``twisted/plugins`` directory holding aiproxy's plugin, on ``sys.path``."""
    directory = tmp_path / "twisted" / "plugins"
    directory.mkdir(parents=True)
    (directory / "aiproxy_plugin.py").write_bytes(PLUGIN.read_bytes())
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [str(directory)])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return directory


def test_cache_is_dated_a_whole_second_after_the_newest_plugin(plugins: Path) -> None:
    """A plugin file dated late in the current second: the cache is written, and dated
    at the next whole second, after waiting for the clock to reach it, so that it is
    newer than the plugin even with whole-second times (as in an image layer)."""
    now = 1_800_000_000.25
    os.utime(plugins / "aiproxy_plugin.py", (now, now + 0.7))
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)

    ticks = iter([now, now + 0.76])
    assert write_plugin_cache(clock=lambda: next(ticks), sleep=sleep) == [plugins / "dropin.cache"]
    assert waits == [pytest.approx(0.75)]
    cache = math.floor((plugins / "dropin.cache").stat().st_mtime)
    assert cache == math.floor(now) + 1


def test_a_plugin_dated_far_in_the_future_is_refused(plugins: Path) -> None:
    """A plugin file dated more than two seconds ahead stops the step with one line
    instead of a long wait."""
    os.utime(plugins / "aiproxy_plugin.py", (1e9, 1e9 + 60))
    with pytest.raises(SystemExit, match="dated in the future"):
        write_plugin_cache(clock=lambda: 1e9, sleep=lambda seconds: None)
