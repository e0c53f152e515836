"""``aiproxy-keys``: what an operator types, what it prints, and what the file then holds."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from aiproxy.access.command import USAGE_ERROR, main
from aiproxy.access.keyfile import read_key_file


def run(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``aiproxy-keys ARGV``: its exit status, standard output and error."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), environ or {}, out, err)
    return status, out.getvalue(), err.getvalue()


def test_create_prints_the_key_once_and_stores_only_its_digest(tmp_path: Path) -> None:
    """The key is the only thing on standard output; the file has its digest, not it,
    with the options given; the proxy's reading of the file opens with the key."""
    path = str(tmp_path / "keys.toml")
    status, out, err = run(
        "--file", path, "create", "--id", "alice", "--rpm", "60", "--tpm", "100000",
        "--model", "gpt-4o*", "--model", "claude-*", "--path", "/v1/",
        "--not-after", "2099-01-01T00:00:00Z",
    )  # fmt: skip
    assert status == 0
    key = out.strip()
    assert re.fullmatch(r"aip-[A-Za-z0-9_-]{43}", key)
    assert "shown this once" in err and key not in err
    text = Path(path).read_text()
    assert key not in text and key[4:] not in text
    entry = read_key_file(path).find(key.encode())
    assert entry is not None
    assert (entry.id, entry.rpm, entry.tpm, entry.models, entry.paths) == (
        "alice",
        60,
        100_000,
        ("gpt-4o*", "claude-*"),
        ("/v1/",),
    )


def test_create_appends_and_keeps_existing_keys(tmp_path: Path) -> None:
    """A second key, even for the same id (rotation), leaves the first one working."""
    path = str(tmp_path / "keys.toml")
    first = run("-f", path, "create", "--id", "alice")[1].strip()
    second = run("-f", path, "create", "--id", "alice")[1].strip()
    ring = read_key_file(path)
    assert ring.find(first.encode()) is not None and ring.find(second.encode()) is not None


def test_list_shows_ids_states_and_limits_but_no_key(tmp_path: Path) -> None:
    """list prints one line per key: id, digest prefix, state, models, paths, limits."""
    path = str(tmp_path / "keys.toml")
    key = run("-f", path, "create", "--id", "alice", "--rpm", "5")[1].strip()
    run("-f", path, "create", "--id", "bob", "--not-before", "2099-01-01T00:00:00+00:00")
    status, out, _ = run("list", environ={"ACCESS_KEYS_FILE": path})
    assert status == 0
    alice, bob = out.splitlines()
    assert alice.split()[0] == "alice" and "active" in alice and "rpm=5" in alice
    assert bob.split()[0] == "bob" and "not_yet_valid" in bob and "no-limits" in bob
    assert key not in out


def test_revoke_disables_an_ids_keys(tmp_path: Path) -> None:
    """revoke sets enabled = false on the id's keys; a proxy reading the file refuses them."""
    path = str(tmp_path / "keys.toml")
    alice = run("-f", path, "create", "--id", "alice")[1].strip()
    bob = run("-f", path, "create", "--id", "bob")[1].strip()
    status, out, _ = run("-f", path, "revoke", "--id", "alice")
    assert status == 0 and "Revoked 1 key(s)" in out
    ring = read_key_file(path)
    now = time.time()
    revoked, kept = ring.find(alice.encode()), ring.find(bob.encode())
    assert revoked is not None and revoked.refusal(now) == "disabled"
    assert kept is not None and kept.refusal(now) is None
    assert "revoked" in run("-f", path, "list")[1].splitlines()[0]


def test_revoke_by_digest_prefix_keeps_the_other_key_of_the_id(tmp_path: Path) -> None:
    """With --sha256, only the key whose digest begins so is revoked (rotation)."""
    path = str(tmp_path / "keys.toml")
    old = run("-f", path, "create", "--id", "alice")[1].strip()
    new = run("-f", path, "create", "--id", "alice")[1].strip()
    ring = read_key_file(path)
    old_entry = ring.find(old.encode())
    assert old_entry is not None
    run("-f", path, "revoke", "--id", "alice", "--sha256", old_entry.sha256[:12])
    ring = read_key_file(path)
    assert ring.find(old.encode()).refusal(0) == "disabled"  # type: ignore[union-attr]
    assert ring.find(new.encode()).refusal(0) is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["create", "--id", "a"], "say which key file"),
        (["-f", "k.toml"], "say what to do"),
        (["-f", "k.toml", "create"], "create needs --id"),
        (["-f", "k.toml", "create", "--id", "a", "--rpm", "0"], "must be at least 1"),
        (["-f", "k.toml", "create", "--id", "a", "--not-after", "2099-01-01"], "time zone"),
        (["-f", "k.toml", "revoke"], "revoke needs --id"),
    ],
)
def test_usage_errors_are_one_line_and_status_64(
    tmp_path: Path, argv: list[str], says: str
) -> None:
    """A command line that cannot be used says why on standard error, with status 64,
    and writes no file."""
    status, out, err = run(*[str(tmp_path / a) if a == "k.toml" else a for a in argv])
    assert status == USAGE_ERROR
    assert says in err and out == ""
    assert not (tmp_path / "k.toml").exists()


def test_file_errors_are_one_line_and_status_1(tmp_path: Path) -> None:
    """Revoking an id that is not there, or listing an invalid file, is status 1 with
    one line, and the file is left as it was."""
    path = tmp_path / "keys.toml"
    run("-f", str(path), "create", "--id", "alice")
    before = path.read_text()
    status, _, err = run("-f", str(path), "revoke", "--id", "bob")
    assert status == 1 and "no key matches" in err and err.count("\n") == 1
    assert path.read_text() == before
    path.write_text("[[key]\n")
    status, _, err = run("-f", str(path), "list")
    assert status == 1 and "not valid TOML" in err
