"""
Access keys and the key file, pure: what an entry says, how a presented key is looked
up, and the ``ACCESS_KEYS_FILE`` format (TOML).

The file never holds a key, only its SHA-256 digest, one ``[[key]]`` table per key::

    [[key]]
    id = "alice"                     # who holds it: logs and metrics show this
    sha256 = "5e1f...64 hex digits"  # of the whole key, "aip-" included
    models = ["gpt-4o*", "claude-*"] # globs; absent or empty: any model
    paths = ["/v1/"]                 # path prefixes; absent or empty: any path
    rpm = 60                         # limits (absent: none), read by the limiter
    tpm = 100000
    tpd = 2000000
    concurrent = 4
    not_before = 2026-12-01T00:00:00Z  # TOML date-times, with a time zone
    not_after = 2027-01-01T00:00:00Z
    enabled = true
    created = 2026-12-03T12:00:00Z   # written by aiproxy-keys, for people
    note = "anything"

Several entries may share an ``id``: that is how a key is rotated (a new entry, and a
``not_after`` on the old one). Keys look like ``aip-`` and 43 URL-safe characters; a
presented string without that prefix is unknown without being hashed, and so is one
equal to a stored digest (its digest is another one).
"""

from __future__ import annotations

import datetime
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import attrs

from aiproxy.rules.toml import tables_of

__all__ = [
    "DISABLED",
    "EXPIRED",
    "KEY_PREFIX",
    "NOT_YET_VALID",
    "KeyEntry",
    "KeyFileError",
    "KeyRing",
    "key_digest",
    "new_key",
    "parse_key_file",
]

KEY_PREFIX = "aip-"
"""What every aiproxy access key begins with."""

_PREFIX = KEY_PREFIX.encode()

DISABLED = "disabled"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_LIMITS = ("rpm", "tpm", "tpd", "concurrent")
_FIELDS = frozenset(
    {"id", "sha256", "models", "paths", "not_before", "not_after", "enabled", "created", "note"}
) | frozenset(_LIMITS)


class KeyFileError(ValueError):
    """The key file cannot be used; the message says where and why (never a key)."""


def new_key() -> str:
    """A fresh access key: ``aip-`` and 256 random bits, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """The SHA-256 digest of ``key``, as the key file stores it (64 hex digits)."""
    return hashlib.sha256(key.encode()).hexdigest()


@attrs.frozen
class KeyEntry:
    """
    One ``[[key]]`` of the key file. Its limits (L{None}: none) are read by the
    limiter (it provides :class:`aiproxy.access.limits.KeyLimits`).

    @ivar models: model globs (``fnmatch``, case-sensitive); empty: any model.
    @ivar paths: request path prefixes, matched at a ``/``; empty: any path.
    @ivar not_before: seconds since the epoch before which the key is refused.
    @ivar not_after: seconds since the epoch after which the key is refused.
    """

    id: str
    sha256: str
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrent: int | None = None
    not_before: float | None = None
    not_after: float | None = None
    enabled: bool = True

    def refusal(self, now: float) -> str | None:
        """Why the key cannot be used at ``now`` (:data:`DISABLED`, :data:`EXPIRED`,
        :data:`NOT_YET_VALID`); L{None} if it can."""
        if not self.enabled:
            return DISABLED
        if self.not_before is not None and now < self.not_before:
            return NOT_YET_VALID
        if self.not_after is not None and now >= self.not_after:
            return EXPIRED
        return None

    def allows_model(self, model: str) -> bool:
        """Whether the key may ask for ``model``."""
        return not self.models or any(fnmatchcase(model, glob) for glob in self.models)

    def allows_path(self, path: bytes) -> bool:
        """Whether the key may be used on ``path`` (no query)."""
        if not self.paths:
            return True
        text = path.decode("latin-1")
        return any(_under(text, prefix) for prefix in self.paths)


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it (``/v1/chat`` is not below ``/v1/ch``)."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


@attrs.frozen
class KeyRing:
    """Every entry of one version of the key file, by digest; never changed once built."""

    entries: tuple[KeyEntry, ...] = ()
    _by_digest: Mapping[str, KeyEntry] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_digest", {entry.sha256: entry for entry in self.entries})

    def find(self, presented: bytes) -> KeyEntry | None:
        """The entry of the key ``presented`` by a client; L{None} if it is unknown."""
        if not presented.startswith(_PREFIX):
            return None
        return self._by_digest.get(hashlib.sha256(presented).hexdigest())


def parse_key_file(text: str) -> KeyRing:
    """
    The key ring a key file describes.

    @raise KeyFileError: the file is not TOML, or an entry is invalid (the message
        names the entry by its position and id).
    """
    try:
        tables = tables_of(text, "key")
    except ValueError as e:
        raise KeyFileError(str(e)) from None
    entries = tuple(_entry(table, number) for number, table in enumerate(tables, 1))
    _no_twins(entries)
    return KeyRing(entries)


def _no_twins(entries: Iterable[KeyEntry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.sha256 in seen:
            raise KeyFileError(
                f"keys {seen[entry.sha256]!r} and {entry.id!r} have the same sha256 digest"
            )
        seen[entry.sha256] = entry.id


def _entry(table: Any, number: int) -> KeyEntry:
    where = f"key {number}"
    if not isinstance(table, dict):
        raise KeyFileError(f"{where}: must be a table")
    key_id = table.get("id")
    if not isinstance(key_id, str) or not _ID.match(key_id):
        raise KeyFileError(
            f"{where}: 'id' must be 1-64 letters, digits and ._@- (starting with a letter or digit)"
        )
    where = f"key {number} ({key_id})"
    unknown = set(table) - _FIELDS
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    digest = table.get("sha256")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise KeyFileError(f"{where}: 'sha256' must be 64 lower-case hex digits")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise KeyFileError(f"{where}: 'enabled' must be true or false")
    limits = {name: _limit(table, name, where) for name in _LIMITS}
    not_before = _instant(table, "not_before", where)
    not_after = _instant(table, "not_after", where)
    if not_before is not None and not_after is not None and not_after <= not_before:
        raise KeyFileError(f"{where}: 'not_after' must be later than 'not_before'")
    _instant(table, "created", where)
    if not isinstance(table.get("note", ""), str):
        raise KeyFileError(f"{where}: 'note' must be a string")
    return KeyEntry(
        key_id,
        digest,
        _strings(table, "models", where),
        _paths(table, where),
        not_before=not_before,
        not_after=not_after,
        enabled=enabled,
        **limits,
    )


def _limit(table: Mapping[str, Any], name: str, where: str) -> int | None:
    value = table.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise KeyFileError(f"{where}: {name!r} must be a whole number, at least 1")
    return value


def _instant(table: Mapping[str, Any], name: str, where: str) -> float | None:
    value = table.get(name)
    if value is None:
        return None
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        raise KeyFileError(
            f"{where}: {name!r} must be a date-time with a time zone, like 2027-01-01T00:00:00Z"
        )
    return value.timestamp()


def _strings(table: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise KeyFileError(f"{where}: {name!r} must be a list of non-empty strings")
    return tuple(value)


def _paths(table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    paths = _strings(table, "paths", where)
    for path in paths:
        if not path.startswith("/"):
            raise KeyFileError(f"{where}: path prefix {path!r} must begin with '/'")
    return paths
