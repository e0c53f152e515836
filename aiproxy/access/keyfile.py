"""
Reading and writing ``ACCESS_KEYS_FILE`` (its format: :mod:`aiproxy.access.keys`).

Writes replace the file atomically (a new file renamed over the old), so that a proxy
watching it never reads half of one.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from aiproxy.access.keys import KeyFileError, KeyRing, parse_key_file
from aiproxy.rules.toml import tomllib

__all__ = ["HEADER", "read_key_file", "read_tables", "render_entry", "replace_key_file"]

HEADER = (
    "# aiproxy access keys (ACCESS_KEYS_FILE), managed with aiproxy-keys. Each [[key]]\n"
    "# holds the SHA-256 digest of a key, never the key itself.\n"
)


def read_key_file(path: str) -> KeyRing:
    """
    The key ring in the file at ``path``.

    @raise KeyFileError: it cannot be read or is invalid; the message names ``path``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot be read ({_why(e)})") from None
    try:
        return parse_key_file(text)
    except KeyFileError as e:
        raise KeyFileError(f"{path}: {e}") from None


def read_tables(path: str) -> list[dict[str, Any]]:
    """The ``[[key]]`` tables of a valid key file as written (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    read_key_file(path)
    with open(path, "rb") as f:
        tables: list[dict[str, Any]] = tomllib.load(f).get("key", [])
    return tables


def _why(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def render_entry(table: Mapping[str, Any]) -> str:
    """One ``[[key]]`` table as TOML text (strings, whole numbers, booleans, lists of
    strings and date-times)."""
    lines = ["[[key]]"]
    for name, value in table.items():
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to a key file")


def replace_key_file(path: str, tables: Iterable[Mapping[str, Any]]) -> None:
    """
    Make the file at ``path`` hold exactly ``tables``, atomically.

    @raise KeyFileError: the result would not be a valid key file (nothing is written).
    """
    text = HEADER + "".join("\n" + render_entry(table) for table in tables)
    parse_key_file(text)
    directory = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(dir=directory, prefix=".aiproxy-keys-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        if os.path.exists(path):
            os.chmod(partial, os.stat(path).st_mode & 0o777)
        else:
            os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
