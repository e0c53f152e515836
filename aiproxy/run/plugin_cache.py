"""
``python -m aiproxy.run.plugin_cache``: write Twisted's plugin cache so that it stays
valid where files keep only whole seconds of their modification time.

``twist`` finds ``aiproxy`` through ``twisted/plugins/dropin.cache``, which Twisted treats
as stale, and rewrites, when a plugin file is as new as the cache or newer. A container
image layer (a tar archive) keeps whole seconds only, so a cache written in the same
second as ``aiproxy_plugin.py`` (``pip install`` and then the cache, in one step) is stale
in the image: every start rescans the plugins and, on a read-only or unprivileged
``site-packages``, logs ``Unable to write to plugin cache``. This writes the cache, then
dates it at a whole second after the newest plugin file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from twisted.plugin import IPlugin, getPlugins

__all__ = ["write_plugin_cache"]

CACHE = "dropin.cache"
LONGEST_WAIT = 2.0
"""Seconds to wait at most for the clock to pass a plugin file's modification time."""


def write_plugin_cache(
    clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep
) -> list[Path]:
    """
    Write the cache of every ``twisted/plugins`` directory on ``sys.path`` and date it
    at a later whole second than every plugin file in its directory.

    @return: the caches written.
    @raise SystemExit: no cache was written, or a plugin file is dated too far in the
        future to wait for.
    """
    import twisted.plugins

    list(getPlugins(IPlugin))  # writes each directory's cache where it is stale
    written = []
    for directory in dict.fromkeys(Path(path).resolve() for path in twisted.plugins.__path__):
        cache = directory / CACHE
        if not cache.exists():
            continue
        newest = max((math.floor(p.stat().st_mtime) for p in directory.glob("*.py")), default=0)
        wait = newest + 1 - clock()
        if wait > LONGEST_WAIT:
            raise SystemExit(f"aiproxy: {directory} has a plugin file dated in the future")
        if wait > 0:
            sleep(wait)
        # Dated explicitly: the kernel's file clock may lag a few milliseconds behind.
        when = max(clock(), newest + 1)
        os.utime(cache, (when, when))
        written.append(cache)
    if not written:
        raise SystemExit("aiproxy: no Twisted plugin cache was written")
    return written


if __name__ == "__main__":
    for path in write_plugin_cache():
        print(f"Wrote {path}")
