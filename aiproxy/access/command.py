"""
``aiproxy-keys``: create, list and revoke the access keys of ``ACCESS_KEYS_FILE``.

``create`` prints the new key once, on standard output alone (so that
``KEY=$(aiproxy-keys create --id alice)`` works), and adds its digest to the file;
``revoke`` sets ``enabled = false`` on an id's entries. Both replace the file
atomically, and a running proxy picks the change up within a second or two.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from twisted.python import usage

from aiproxy.access.keyfile import read_key_file, read_tables, replace_key_file
from aiproxy.access.keys import KeyEntry, KeyFileError, key_digest, new_key

__all__ = ["KeysOptions", "main"]

USAGE_ERROR = 64
"""The exit status for a command line that cannot be parsed (``EX_USAGE``)."""


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


_count.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


def _instant(text: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("give a time zone, such as 2027-01-01T00:00:00Z")
    return moment


_instant.coerceDoc = "An ISO 8601 date-time with a time zone."  # type: ignore[attr-defined]


class CreateOptions(usage.Options):
    """``aiproxy-keys create``: a new key for ``--id``."""

    synopsis = "--id ID [--model GLOB ...] [--path PREFIX ...] [limits] [validity]"
    optParameters: list[list[Any]] = [
        ["id", None, None, "Who the key is for; logs and metrics show it."],
        ["rpm", None, None, "Requests per minute.", _count],
        ["tpm", None, None, "Tokens per minute.", _count],
        ["tpd", None, None, "Tokens per day.", _count],
        ["concurrent", None, None, "Requests in flight at once.", _count],
        ["not-before", None, None, "Refused before this time.", _instant],
        ["not-after", None, None, "Refused from this time on.", _instant],
        ["note", None, None, "A note for people reading the file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["models"] = []
        self["paths"] = []

    def opt_model(self, glob: str) -> None:
        """A model the key may use (a glob such as gpt-4o*); repeatable. Default: any."""
        self["models"].append(glob)

    def opt_path(self, prefix: str) -> None:
        """A path prefix the key may use (such as /v1/chat/); repeatable. Default: any."""
        self["paths"].append(prefix)

    def postOptions(self) -> None:
        """An id is required."""
        if not self["id"]:
            raise usage.UsageError("create needs --id")


class RevokeOptions(usage.Options):
    """``aiproxy-keys revoke``: disable the keys of ``--id``."""

    synopsis = "--id ID [--sha256 PREFIX]"
    optParameters = [
        ["id", None, None, "Whose keys to revoke."],
        ["sha256", None, None, "Only the key whose digest begins with this (see list)."],
    ]

    def postOptions(self) -> None:
        """An id is required."""
        if not self["id"]:
            raise usage.UsageError("revoke needs --id")


class ListOptions(usage.Options):
    """``aiproxy-keys list``: every key, without the keys themselves."""


class KeysOptions(usage.Options):
    """The command line of ``aiproxy-keys``."""

    synopsis = "aiproxy-keys [--file PATH] create|list|revoke [options]"
    optParameters = [
        ["file", "f", None, "The key file. [default: $ACCESS_KEYS_FILE]"],
    ]
    subCommands = [
        ["create", None, CreateOptions, "Create a key: print it once, add its digest."],
        ["list", None, ListOptions, "List the keys' ids, digests, state and limits."],
        ["revoke", None, RevokeOptions, "Disable an id's keys (enabled = false)."],
    ]

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__()
        self._environ = environ

    def postOptions(self) -> None:
        """A command and a file are required."""
        if self.subCommand is None:
            raise usage.UsageError("say what to do: create, list or revoke")
        self["file"] = self["file"] or self._environ.get("ACCESS_KEYS_FILE")
        if not self["file"]:
            raise usage.UsageError("say which key file: --file or ACCESS_KEYS_FILE")


def create(path: str, options: usage.Options, out: TextIO, err: TextIO) -> None:
    """Add a new key's entry to ``path``; print the key."""
    key = new_key()
    table: dict[str, Any] = {"id": options["id"], "sha256": key_digest(key)}
    if options["models"]:
        table["models"] = options["models"]
    if options["paths"]:
        table["paths"] = options["paths"]
    for name in ("rpm", "tpm", "tpd", "concurrent", "not-before", "not-after", "note"):
        if options[name] is not None:
            table[name.replace("-", "_")] = options[name]
    table["enabled"] = True
    table["created"] = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    replace_key_file(path, [*read_tables(path), table])
    out.write(key + "\n")
    err.write(
        f"Key for {options['id']!r} added to {path}. It is shown this once only:"
        " aiproxy keeps its SHA-256 digest.\n"
    )


def revoke(path: str, options: usage.Options, out: TextIO, err: TextIO) -> None:
    """Set ``enabled = false`` on the entries of ``--id`` (and ``--sha256``)."""
    tables = read_tables(path)
    prefix = options["sha256"] or ""
    revoked = 0
    for table in tables:
        if table["id"] == options["id"] and table["sha256"].startswith(prefix):
            table["enabled"] = False
            revoked += 1
    if not revoked:
        raise KeyFileError(f"{path}: no key matches --id {options['id']!r} {prefix}".rstrip())
    replace_key_file(path, tables)
    out.write(f"Revoked {revoked} key(s) of {options['id']!r} in {path}.\n")


def list_keys(path: str, options: usage.Options, out: TextIO, err: TextIO) -> None:
    """Print one line per key: id, digest prefix, state, models, paths, limits."""
    now = time.time()
    for entry in read_key_file(path).entries:
        out.write(_describe(entry, now) + "\n")


def _describe(entry: KeyEntry, now: float) -> str:
    state = entry.refusal(now) or "active"
    if state == "disabled":
        state = "revoked"
    limits = [
        f"{name}={value}"
        for name, value in (
            ("rpm", entry.rpm),
            ("tpm", entry.tpm),
            ("tpd", entry.tpd),
            ("concurrent", entry.concurrent),
        )
        if value is not None
    ]
    return "  ".join(
        [
            entry.id,
            entry.sha256[:12],
            state,
            "models=" + (",".join(entry.models) or "*"),
            "paths=" + (",".join(entry.paths) or "*"),
            " ".join(limits) or "no-limits",
        ]
    )


_COMMANDS: dict[str, Callable[[str, usage.Options, TextIO, TextIO], None]] = {
    "create": create,
    "list": list_keys,
    "revoke": revoke,
}


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run ``aiproxy-keys``; its exit status (0, 1 for a file error, 64 for usage)."""
    options = KeysOptions(os.environ if environ is None else environ)
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        err.write(f"aiproxy-keys: {e}\nRun 'aiproxy-keys --help' for the options.\n")
        return USAGE_ERROR
    assert options.subCommand is not None
    try:
        _COMMANDS[options.subCommand](options["file"], options.subOptions, out, err)
    except KeyFileError as e:
        err.write(f"aiproxy-keys: {e}\n")
        return 1
    except OSError as e:
        err.write(f"aiproxy-keys: {options['file']}: {e.strerror or e}\n")
        return 1
    return 0


def run() -> None:
    """The ``aiproxy-keys`` console script."""
    raise SystemExit(main())
