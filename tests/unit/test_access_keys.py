"""The access key file and its keys: what an operator may write, and what a key opens."""

from __future__ import annotations

import datetime
import re

import pytest

from aiproxy.access.keyfile import render_entry
from aiproxy.access.keys import (
    KEY_PREFIX,
    KeyEntry,
    KeyFileError,
    key_digest,
    new_key,
    parse_key_file,
)
from aiproxy.rules.redact import REDACTED, loggable, redact_text

KEY = "aip-" + "A" * 43
DIGEST = key_digest(KEY)
JAN_2027 = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def entry_text(**fields: object) -> str:
    """A key file of one entry with ``fields`` (id and sha256 by default)."""
    table = {"id": "alice", "sha256": DIGEST, **fields}
    return render_entry(table)


def test_new_keys_carry_the_prefix_and_256_random_bits() -> None:
    """A new key is aip- and 43 URL-safe characters, and never the same twice."""
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"aip-[A-Za-z0-9_-]{43}", key)


def test_a_full_entry_is_read_with_every_field() -> None:
    """Every documented field of an entry is read into the key's entry."""
    ring = parse_key_file(
        entry_text(
            models=["gpt-4o*"],
            paths=["/v1/chat/"],
            rpm=60,
            tpm=100_000,
            tpd=2_000_000,
            concurrent=4,
            not_before=datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc),
            not_after=datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc),
            enabled=True,
            note="for Alice",
            created=datetime.datetime(2026, 12, 3, tzinfo=datetime.timezone.utc),
        )
    )
    (entry,) = ring.entries
    assert (entry.id, entry.sha256, entry.models, entry.paths) == (
        "alice",
        DIGEST,
        ("gpt-4o*",),
        ("/v1/chat/",),
    )
    assert (entry.rpm, entry.tpm, entry.tpd, entry.concurrent) == (60, 100_000, 2_000_000, 4)
    assert entry.not_after == JAN_2027
    assert ring.find(KEY.encode()) == entry


def test_an_empty_file_has_no_keys() -> None:
    """A file with nothing (or comments only) is valid and lets no one in."""
    ring = parse_key_file("# nobody yet\n")
    assert ring.entries == ()
    assert ring.find(KEY.encode()) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[key]\n", "not valid TOML"),
        ("[keys]\n", "unknown top-level name(s) keys"),
        (entry_text(id="bad id"), "'id' must be"),
        (entry_text(sha256="abc"), "'sha256' must be 64"),
        (entry_text(sha256=DIGEST.upper()), "'sha256' must be 64"),
        (entry_text(rpm=0), "'rpm' must be a whole number, at least 1"),
        (entry_text(tpm="100"), "'tpm' must be a whole number"),
        (entry_text(rpn=10), "unknown field(s) rpn"),
        (entry_text(enabled="yes"), "'enabled' must be true or false"),
        (entry_text(models="gpt-4o"), "'models' must be a list"),
        (entry_text(paths=["v1/"]), "must begin with '/'"),
        ('[[key]]\nid = "a"\nsha256 = "' + DIGEST + '"\nnot_after = 2027-01-01\n', "time zone"),
        (
            '[[key]]\nid = "a"\nsha256 = "' + DIGEST + '"\nnot_after = 2027-01-01T00:00:00\n',
            "time zone",
        ),
        (
            entry_text(
                not_before=datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc),
                not_after=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
            ),
            "'not_after' must be later",
        ),
        (entry_text() + entry_text(id="bob"), "same sha256 digest"),
    ],
)
def test_invalid_files_are_refused_with_a_reason(text: str, says: str) -> None:
    """Each mistake is named (with the entry's position and id), never silently skipped."""
    with pytest.raises(KeyFileError) as caught:
        parse_key_file(text)
    assert says in str(caught.value)


def test_two_entries_may_share_an_id_for_rotation() -> None:
    """Two keys of one id both open the door while both are valid."""
    other = "aip-" + "B" * 43
    ring = parse_key_file(entry_text() + entry_text(sha256=key_digest(other)))
    first, second = ring.find(KEY.encode()), ring.find(other.encode())
    assert first is not None and second is not None
    assert first.id == second.id == "alice"


def test_a_stored_digest_or_an_unprefixed_string_is_no_key() -> None:
    """Presenting the digest itself (someone read the file), the key without its
    prefix, or another prefix opens nothing."""
    ring = parse_key_file(entry_text())
    for presented in (DIGEST, KEY[len(KEY_PREFIX) :], "sk-" + KEY[4:], KEY + "x"):
        assert ring.find(presented.encode()) is None


@pytest.mark.parametrize(
    ("entry", "now", "refusal"),
    [
        (KeyEntry("a", DIGEST), 0.0, None),
        (KeyEntry("a", DIGEST, enabled=False), 0.0, "disabled"),
        (KeyEntry("a", DIGEST, not_before=100.0), 99.9, "not_yet_valid"),
        (KeyEntry("a", DIGEST, not_before=100.0), 100.0, None),
        (KeyEntry("a", DIGEST, not_after=100.0), 99.9, None),
        (KeyEntry("a", DIGEST, not_after=100.0), 100.0, "expired"),
    ],
)
def test_validity_period_and_enabled(entry: KeyEntry, now: float, refusal: str | None) -> None:
    """A key works from not_before (included) to not_after (excluded), while enabled."""
    assert entry.refusal(now) == refusal


@pytest.mark.parametrize(
    ("paths", "path", "allowed"),
    [
        ((), b"/anything", True),
        (("/v1/chat/",), b"/v1/chat/completions", True),
        (("/v1/chat",), b"/v1/chat/completions", True),
        (("/v1/chat",), b"/v1/chat", True),
        (("/v1/chat",), b"/v1/chatter", False),
        (("/v1/chat/",), b"/v1/embeddings", False),
        (("/v1/messages", "/v1/chat/"), b"/v1/messages", True),
    ],
)
def test_path_prefixes_match_at_a_slash(paths: tuple[str, ...], path: bytes, allowed: bool) -> None:
    """A path prefix covers itself and what is below it, not a longer name."""
    assert KeyEntry("a", DIGEST, paths=paths).allows_path(path) is allowed


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        ((), "anything", True),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o*",), "GPT-4o", False),
        (("claude-?-haiku", "gpt-4o"), "claude-3-haiku", True),
    ],
)
def test_model_globs(models: tuple[str, ...], model: str, allowed: bool) -> None:
    """Model globs are fnmatch patterns, case-sensitive."""
    assert KeyEntry("a", DIGEST, models=models).allows_model(model) is allowed


def test_access_keys_are_redacted_wherever_they_are_logged() -> None:
    """An aiproxy key in a logged path, request ID or message becomes [REDACTED]."""
    key = new_key()
    assert key not in loggable(f"/v1/{key}/x".encode())
    assert REDACTED in loggable(key.encode())
    assert key not in redact_text(f"bad key {key} given")
