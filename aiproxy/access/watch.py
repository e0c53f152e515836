"""
Reloading ``ACCESS_KEYS_FILE`` while the proxy runs (when, see :mod:`aiproxy.run.watch`).

A valid file replaces the key ring at once; requests in flight keep the entry they
were admitted with. An invalid one (or none: a file being replaced) keeps the ring in
use and logs one warning, until the file changes again.
"""

from __future__ import annotations

from aiproxy.access.keys import KeyFileError
from aiproxy.access.policy import AccessKeys
from aiproxy.ops.logger import log

__all__ = ["reload_keys"]


def reload_keys(keys: AccessKeys) -> None:
    """Read the key file and use its keys from now on; if it is invalid, warn and keep
    the keys in use."""
    try:
        ring = keys.read()
    except KeyFileError as e:
        log.warn("Access keys not reloaded, the previous ones stay in use: {error}", error=str(e))
        return
    keys.ring = ring
    log.info(
        "Access keys reloaded from {path}: {count} key(s)",
        path=keys.path,
        count=len(ring.entries),
    )
