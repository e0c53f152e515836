"""
The ``UPSTREAMS_FILE`` (TOML, like the key file): the upstreams requests may go to,
pure. One ``[[upstream]]`` table per upstream::

    [[upstream]]
    name = "openai"                  # in logs, metrics, /api/health and X-Upstream
    url = "https://api.openai.com"   # a base URL, as TARGET_URL
    keys = ["sk-..."]                # its credentials: literal keys,
    key_envs = ["OPENAI_KEY_2"]      # names of environment variables holding one,
    key_files = ["/run/secrets/k3"]  # or files holding one (all optional; any mix)
    auth_header = "authorization"    # or "x-api-key", "api-key"
    weight = 3                       # share of the picks within its priority (1)
    priority = 0                     # lower is tried first (0)
    models = ["gpt-4o*"]             # globs of the models it serves; absent: all
    max_connections = 50             # absent: no limit

An invalid file is refused whole, with one message naming the entry and the field.
Keys are read here, once per load; they never appear in a message (only their
fingerprint, the first 8 hex digits of their SHA-256).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import attrs

from aiproxy.config import UPSTREAM_AUTH_HEADERS, Config, ConfigError
from aiproxy.rules.target import Target, TargetError, parse_target
from aiproxy.rules.toml import tables_of

__all__ = [
    "AUTH_HEADERS",
    "UpstreamEntry",
    "UpstreamKey",
    "UpstreamsFileError",
    "configured_upstreams",
    "fingerprint",
    "parse_upstreams",
    "read_upstreams",
]

AUTH_HEADERS = UPSTREAM_AUTH_HEADERS
"""How an upstream takes its key: ``Authorization: Bearer KEY``, or the key alone."""

_FIELDS = frozenset(
    {
        "name",
        "url",
        "keys",
        "key_envs",
        "key_files",
        "auth_header",
        "weight",
        "priority",
        "models",
        "max_connections",
    }
)


class UpstreamsFileError(ValueError):
    """The upstreams file cannot be used; the message names the entry and the field."""


def fingerprint(key: str) -> str:
    """What logs and ``/api/health`` show of a key: 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@attrs.frozen
class UpstreamKey:
    """One credential of an upstream."""

    value: str = attrs.field(repr=False)
    fingerprint: str

    def header(self, auth_header: str) -> tuple[bytes, bytes]:
        """The request field that carries this key, as ``auth_header`` says."""
        if auth_header == "authorization":
            return b"Authorization", b"Bearer " + self.value.encode()
        return auth_header.encode(), self.value.encode()


@attrs.frozen
class UpstreamEntry:
    """One upstream of the file."""

    name: str
    target: Target
    keys: tuple[UpstreamKey, ...]
    auth_header: str = "authorization"
    weight: float = 1.0
    priority: int = 0
    models: tuple[str, ...] = ()
    max_connections: int | None = None

    def serves(self, model: str | None) -> bool:
        """Whether this upstream serves ``model`` (L{None}: a request naming no model)."""
        if model is None or not self.models:
            return True
        return any(fnmatchcase(model, pattern) for pattern in self.models)


def parse_upstreams(
    text: str, environ: Mapping[str, str] | None = None, base: Path | None = None
) -> tuple[UpstreamEntry, ...]:
    """
    The upstreams ``text`` lists, in file order.

    @param environ: where ``key_envs`` are looked up (the process environment).
    @param base: what relative ``key_files`` paths are relative to (the file's folder).
    @raise UpstreamsFileError: the file is not valid; the message says where.
    """
    try:
        tables = tables_of(text, "upstream")
    except ValueError as e:
        raise UpstreamsFileError(str(e)) from None
    if not tables:
        raise UpstreamsFileError("no [[upstream]] table")
    env = os.environ if environ is None else environ
    entries = tuple(
        _entry(table, number, env, base or Path()) for number, table in enumerate(tables, 1)
    )
    names = [entry.name for entry in entries]
    for name in names:
        if names.count(name) > 1:
            raise UpstreamsFileError(f"upstream {name!r}: name: used by more than one upstream")
    return entries


def configured_upstreams(config: Config) -> tuple[UpstreamEntry, ...]:
    """
    The upstreams of ``config``'s ``UPSTREAMS_FILE``; none when it is not set.

    @raise ConfigError: the file cannot be read or is invalid, or ``UPSTREAM_API_KEY``
        is set too (the file holds the upstreams' keys).
    """
    path = config.upstreams_file
    if not path:
        return ()
    if config.upstream_api_key or config.upstream_api_key_file:
        raise ConfigError(
            "UPSTREAMS_FILE and UPSTREAM_API_KEY (or UPSTREAM_API_KEY_FILE) are both set;"
            " give each upstream its keys in the upstreams file"
        )
    try:
        return read_upstreams(path)
    except UpstreamsFileError as e:
        raise ConfigError(f"UPSTREAMS_FILE (--upstreams-file): {e}") from None


def read_upstreams(path: str) -> tuple[UpstreamEntry, ...]:
    """
    The upstreams in the file at ``path`` (``key_files`` relative to its folder).

    @raise UpstreamsFileError: it cannot be read or is invalid; the message names ``path``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UpstreamsFileError(f"{path}: cannot be read ({why})") from None
    try:
        return parse_upstreams(text, base=Path(path).parent)
    except UpstreamsFileError as e:
        raise UpstreamsFileError(f"{path}: {e}") from None


def _entry(table: Any, number: int, env: Mapping[str, str], base: Path) -> UpstreamEntry:
    where = f"upstream {number}"
    if not isinstance(table, dict):
        raise UpstreamsFileError(f"{where}: not a table")
    name = table.get("name")
    if isinstance(name, str) and name:
        where = f"upstream {number} ({name})"

    def fail(field: str, problem: str) -> UpstreamsFileError:
        return UpstreamsFileError(f"{where}: {field}: {problem}")

    unknown = set(table) - _FIELDS
    if unknown:
        raise fail(sorted(unknown)[0], "unknown field")
    if (
        not isinstance(name, str)
        or not name
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise fail("name", "must be letters, digits, '-' and '_'")
    url = table.get("url")
    if not isinstance(url, str):
        raise fail("url", "missing, or not a string")
    try:
        target = parse_target(url)
    except TargetError as e:
        raise fail("url", str(e)) from None
    keys = _keys(table, env, base, fail)
    auth_header = table.get("auth_header", "authorization")
    if auth_header not in AUTH_HEADERS:
        raise fail("auth_header", f"must be one of {', '.join(AUTH_HEADERS)}")
    weight = table.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise fail("weight", "must be a number above 0")
    priority = table.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise fail("priority", "must be a whole number, 0 or more")
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise fail("models", "must be a list of model names or globs")
    limit = table.get("max_connections")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise fail("max_connections", "must be a whole number above 0")
    return UpstreamEntry(
        name, target, keys, auth_header, float(weight), priority, tuple(models), limit
    )


def _keys(
    table: dict[str, Any], env: Mapping[str, str], base: Path, fail: Any
) -> tuple[UpstreamKey, ...]:
    found: list[str] = []
    for field, read in (
        ("keys", lambda value: value),
        ("key_envs", lambda value: env.get(value)),
        ("key_files", lambda value: _read_key_file(base / value)),
    ):
        values = table.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise fail(field, "must be a list of strings")
        for value in values:
            key = read(value)
            if not key:  # a variable or file: its name is shown, never a key
                raise fail(field, f"{value!r} gives no key")
            found.append(key.strip())
    return tuple(UpstreamKey(key, fingerprint(key)) for key in found)


def _read_key_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
