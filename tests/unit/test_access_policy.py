"""The access settings at start-up: which combinations run, and which stop with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiproxy.access.keys import key_digest
from aiproxy.access.policy import access_policy, loopback_only
from aiproxy.config import Config, ConfigError, load_config

KEY_FILE = '[[key]]\nid = "alice"\nsha256 = "' + key_digest("aip-" + "A" * 43) + '"\n'
LOOPBACK = ("tcp:8080:interface=127.0.0.1",)


@pytest.fixture
def keys(tmp_path: Path) -> str:
    """A valid key file of one key."""
    path = tmp_path / "keys.toml"
    path.write_text(KEY_FILE)
    return str(path)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp:8080:interface=127.0.0.1", True),
        ("tcp:8080:interface=127.0.0.2", True),
        ("tcp6:8080:interface=\\:\\:1", True),
        ("tcp:8080:interface=localhost", True),
        ("ssl:8443:privateKey=k.pem:interface=127.0.0.1", True),
        ("unix:/run/aiproxy.sock", True),
        ("tcp:8080", False),
        ("tcp:8080:interface=0.0.0.0", False),
        ("tcp6:8080:interface=\\:\\:", False),
        ("tcp:8080:interface=10.0.0.5", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_loopback_only_listeners(endpoint: str, loopback: bool) -> None:
    """Only loopback interfaces and UNIX sockets count as reachable from this host only."""
    assert loopback_only(endpoint) is loopback


def test_without_any_access_setting_credentials_pass_through() -> None:
    """No access keys and no upstream key: no auth, and the client's credentials are
    the upstream's (today's behaviour)."""
    policy = access_policy(Config())
    assert policy.keys is None and policy.credentials is None and not policy.auth


def test_upstream_key_on_a_public_listener_without_access_keys_stops_the_start() -> None:
    """The proxy will not be an open relay for its upstream key: one line says why and
    how to fix it, without the key."""
    config = load_config({}, {"UPSTREAM_API_KEY": "sk-upstream-secret"}, {})
    with pytest.raises(ConfigError) as caught:
        access_policy(config)
    message = str(caught.value)
    assert "tcp:8080:interface=0.0.0.0" in message and "AUTH=none" in message
    assert "sk-upstream-secret" not in message and "\n" not in message


@pytest.mark.parametrize(
    "settings",
    [{"listen": LOOPBACK}, {"auth": "none"}, {"listen": ("unix:/tmp/a.sock",)}],
)
def test_upstream_key_without_access_keys_runs_on_loopback_or_with_auth_none(
    settings: dict[str, object],
) -> None:
    """On loopback only, or with AUTH=none, the upstream key replaces the client's."""
    policy = access_policy(Config(upstream_api_key="sk-up", **settings))  # type: ignore[arg-type]
    assert not policy.auth
    assert policy.credentials == [(b"Authorization", b"Bearer sk-up")]


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("authorization", (b"Authorization", b"Bearer sk-up")),
        ("x-api-key", (b"x-api-key", b"sk-up")),
        ("api-key", (b"api-key", b"sk-up")),
    ],
)
def test_upstream_auth_header_says_how_the_key_is_sent(
    keys: str, header: str, field: tuple[bytes, bytes]
) -> None:
    """UPSTREAM_AUTH_HEADER picks the one field the upstream key is sent in."""
    config = load_config(
        {},
        {"ACCESS_KEYS_FILE": keys, "UPSTREAM_API_KEY": "sk-up", "UPSTREAM_AUTH_HEADER": header},
        {},
    )
    assert access_policy(config).credentials == [field]


def test_upstream_key_from_a_file(keys: str, tmp_path: Path) -> None:
    """UPSTREAM_API_KEY_FILE is read once, surrounding blank space and newline dropped."""
    secret = tmp_path / "upstream.key"
    secret.write_text("  sk-from-file\n")
    policy = access_policy(Config(access_keys_file=keys, upstream_api_key_file=str(secret)))
    assert policy.auth
    assert policy.credentials == [(b"Authorization", b"Bearer sk-from-file")]


def test_access_keys_without_an_upstream_key_send_no_credentials(keys: str) -> None:
    """Access keys and no upstream key: the client's key is removed and none is sent."""
    assert access_policy(Config(access_keys_file=keys)).credentials == []


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"access_keys_file": "/nonexistent/keys.toml"}, "cannot be read"),
        ({"auth": "none", "access_keys_file": "KEYS"}, "contradict"),
        ({"upstream_api_key": "a", "upstream_api_key_file": "/x", "listen": LOOPBACK}, "both"),
        ({"upstream_api_key_file": "/nonexistent/key", "listen": LOOPBACK}, "cannot be read"),
        ({"upstream_api_key": "two\nlines", "listen": LOOPBACK}, "one line"),
    ],
)
def test_bad_access_settings_stop_the_start(keys: str, settings: dict[str, str], says: str) -> None:
    """Each bad combination is one ConfigError line naming the problem."""
    settings = {k: keys if v == "KEYS" else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=says):
        access_policy(Config(**settings))  # type: ignore[arg-type]


def test_an_invalid_key_file_at_start_names_the_file_and_the_entry(tmp_path: Path) -> None:
    """A key file with a typo stops the start with the file, entry and field named."""
    path = tmp_path / "keys.toml"
    path.write_text(KEY_FILE + "rpn = 60\n")
    with pytest.raises(ConfigError) as caught:
        access_policy(Config(access_keys_file=str(path)))
    assert str(caught.value) == (
        f"ACCESS_KEYS_FILE (--access-keys-file): {path}: key 1 (alice): unknown field(s) rpn"
    )


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [("AUTH", "maybe", r"^AUTH \(--auth\)"), ("UPSTREAM_AUTH_HEADER", "bearer", "^UPSTREAM_AUTH")],
)
def test_unknown_words_are_refused(env: str, value: str, says: str) -> None:
    """AUTH and UPSTREAM_AUTH_HEADER take only their documented words."""
    with pytest.raises(ConfigError, match=says):
        load_config({}, {env: value}, {})


def test_the_upstream_key_is_not_in_the_configurations_repr() -> None:
    """A Config printed in a traceback or a debugger never shows the upstream key."""
    assert "sk-hidden" not in repr(Config(upstream_api_key="sk-hidden"))
