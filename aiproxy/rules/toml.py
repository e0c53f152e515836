"""
TOML files of ``[[name]]`` tables (the key file, the upstreams file), read by the
standard library's ``tomllib`` (Python 3.11+) or ``tomli`` before it.
"""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["tables_of", "tomllib"]


def tables_of(text: str, name: str) -> list[Any]:
    """
    The ``[[name]]`` tables of ``text``, a TOML document that holds nothing else.

    @raise ValueError: ``text`` is not TOML, has another top-level name, or its
        ``name`` is not an array of tables; the message says which.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from None
    unknown = set(document) - {name}
    if unknown:
        raise ValueError(f"unknown top-level name(s) {', '.join(sorted(unknown))}; use [[{name}]]")
    tables = document.get(name, [])
    if not isinstance(tables, list):
        raise ValueError(f"{name!r} must be an array of tables: [[{name}]]")
    return tables
