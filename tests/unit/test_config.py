"""Parsing, merging and validating aiproxy's settings."""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel

from aiproxy.config import (
    Config,
    ConfigError,
    Setting,
    load_config,
    parse_bool,
    parse_float,
    parse_int,
    parse_list,
    parse_log_level,
    settings,
)

DOCUMENTED_ENV_VARS = [
    "TARGET_URL",
    "HOST",
    "PORT",
    "REQUEST_TIMEOUT",
    "CONNECT_TIMEOUT",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "MAX_WORKERS",
    "ENABLE_CORS",
    "CORS_ORIGINS",
    "CORS_METHODS",
    "CORS_HEADERS",
    "PROXY_BUFFER_SIZE",
    "MAX_RETRIES",
    "RETRY_BACKOFF_FACTOR",
    "SSL_VERIFY",
    "RETRY_ON_STATUS",
    "STREAM_IDLE_TIMEOUT",
    "TOTAL_TIMEOUT",
    "TUNNEL_IDLE_TIMEOUT",
    "HEADER_TIMEOUT",
    "BODY_MIN_RATE",
    "BODY_TIMEOUT",
    "MAX_BODY_SIZE",
    "MAX_CONCURRENT_REQUESTS",
    "GRACEFUL_TIMEOUT",
    "TRUSTED_PROXIES",
    "ENABLE_METRICS",
    "ENABLE_DOCS",
    "ACCESS_KEYS_FILE",
    "AUTH",
    "UPSTREAM_API_KEY",
    "UPSTREAM_API_KEY_FILE",
    "UPSTREAM_AUTH_HEADER",
    "DEFAULT_MAX_TOKENS",
    "REDIS_URL",
    "RATE_LIMIT_ON_REDIS_ERROR",
    "UPSTREAMS_FILE",
    "FAILOVER_ON_STATUS",
    "MAX_FAILOVERS",
    "STICKY_UPSTREAMS",
    "UPSTREAM_NAME_HEADER",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("on", True),
        (" On ", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("No", False),
        ("off", False),
        ("OFF ", False),
    ],
)
def test_parse_bool_accepts_every_spelling(text: str, expected: bool) -> None:
    """Booleans may be true/false, 1/0, yes/no or on/off, in any case, with spaces."""
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "2", "maybe", "enabled", "truee", "-1"])
def test_parse_bool_rejects_other_words(text: str) -> None:
    """Anything else is refused with a message quoting the value."""
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["a","b"]', ("a", "b")),
        ('["https://x.example", "https://y.example"]', ("https://x.example", "https://y.example")),
        ('["*"]', ("*",)),
        ("[]", ()),
        ('  ["a"]  ', ("a",)),
        ("a, b", ("a", "b")),
        ("a,b,c", ("a", "b", "c")),
        ("*", ("*",)),
        (" GET , POST ,", ("GET", "POST")),
        ("", ()),
    ],
)
def test_parse_list_reads_json_and_comma_lists(text: str, expected: tuple[str, ...]) -> None:
    """Lists may be JSON lists of strings or comma-separated, blanks dropped."""
    assert parse_list(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('["a",', "not a JSON list"),
        ("[1, 2]", "not a list of strings"),
        ('["a", null]', "not a list of strings"),
    ],
)
def test_parse_list_rejects_bad_json(text: str, message: str) -> None:
    """A value that starts like a JSON list must be a valid JSON list of strings."""
    with pytest.raises(ValueError, match=message):
        parse_list(text)


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("8080", 8080), (" 42 ", 42), ("-3", -3)])
def test_parse_int_reads_whole_numbers(text: str, expected: int) -> None:
    """Whole numbers are read, surrounding spaces ignored."""
    assert parse_int(text) == expected


@pytest.mark.parametrize("text", ["", "1.5", "eight", "0x10", "1e3"])
def test_parse_int_rejects_other_text(text: str) -> None:
    """Fractions and words are not whole numbers."""
    with pytest.raises(ValueError, match="not a whole number"):
        parse_int(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("300", 300.0), ("0.5", 0.5), (" 2.25 ", 2.25), ("1e2", 100.0), ("-1", -1.0)],
)
def test_parse_float_reads_numbers(text: str, expected: float) -> None:
    """Integers, decimals and exponents are numbers."""
    assert parse_float(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a number"),
        ("five", "not a number"),
        ("1,5", "not a number"),
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("-Infinity", "not a finite number"),
    ],
)
def test_parse_float_rejects_non_finite_and_words(text: str, message: str) -> None:
    """Words, NaN and infinities are refused."""
    with pytest.raises(ValueError, match=message):
        parse_float(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DEBUG", "DEBUG"),
        ("debug", "DEBUG"),
        ("Info", "INFO"),
        ("warning", "WARNING"),
        ("WARN", "WARNING"),
        ("warn", "WARNING"),
        ("error", "ERROR"),
        (" critical ", "CRITICAL"),
    ],
)
def test_parse_log_level_any_case_and_warn_alias(text: str, expected: str) -> None:
    """Log levels are read in any case, and WARN means WARNING."""
    assert parse_log_level(text) == expected


@pytest.mark.parametrize("text", ["", "TRACE", "verbose", "5"])
def test_parse_log_level_rejects_unknown_names(text: str) -> None:
    """An unknown level is refused, listing the known ones."""
    with pytest.raises(ValueError, match="DEBUG, INFO"):
        parse_log_level(text)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("DEBUG", LogLevel.debug),
        ("INFO", LogLevel.info),
        ("WARNING", LogLevel.warn),
        ("ERROR", LogLevel.error),
        ("CRITICAL", LogLevel.critical),
    ],
)
def test_log_level_maps_to_twisted_level(level: str, expected: LogLevel) -> None:
    """Each level name selects the matching twisted log level."""
    assert Config(log_level=level).twisted_log_level is expected


@pytest.mark.parametrize(
    ("flags", "environ", "dotenv", "expected"),
    [
        ({}, {}, {}, 300.0),
        ({}, {}, {"REQUEST_TIMEOUT": "40"}, 40.0),
        ({}, {"REQUEST_TIMEOUT": "30"}, {"REQUEST_TIMEOUT": "40"}, 30.0),
        ({"request_timeout": "20"}, {"REQUEST_TIMEOUT": "30"}, {"REQUEST_TIMEOUT": "40"}, 20.0),
        ({"request_timeout": "20"}, {}, {"REQUEST_TIMEOUT": "40"}, 20.0),
        ({"request_timeout": "20"}, {"REQUEST_TIMEOUT": "30"}, {}, 20.0),
        ({"request_timeout": None}, {"REQUEST_TIMEOUT": "30"}, {}, 30.0),
        ({}, {}, {"REQUEST_TIMEOUT": None}, 300.0),
        ({}, {"request_timeout": "30"}, {}, 300.0),
    ],
    ids=[
        "default",
        "dotenv",
        "environ-over-dotenv",
        "flag-over-all",
        "flag-over-dotenv",
        "flag-over-environ",
        "unset-flag-falls-through",
        "dotenv-key-without-value",
        "environ-names-are-exact",
    ],
)
def test_load_config_precedence(
    flags: dict[str, str | None],
    environ: dict[str, str],
    dotenv: dict[str, str | None],
    expected: float,
) -> None:
    """A flag wins over the environment, which wins over .env, which wins over the default."""
    assert load_config(flags, environ, dotenv).request_timeout == expected


def test_load_config_merges_settings_from_different_sources() -> None:
    """Each setting is looked up on its own, so sources can be mixed."""
    config = load_config(
        {"target_url": "http://flag.example"},
        {"SSL_VERIFY": "off", "CORS_ORIGINS": "https://a.example, https://b.example"},
        {"PORT": "9000", "LOG_LEVEL": "warn", "SSL_VERIFY": "on"},
        listen=("tcp:1234",),
    )
    assert config.target_url == "http://flag.example"
    assert config.ssl_verify is False
    assert config.cors_origins == ("https://a.example", "https://b.example")
    assert config.port == 9000
    assert config.log_level == "WARNING"
    assert config.listen == ("tcp:1234",)


def test_defaults_are_the_documented_ones() -> None:
    """With nothing set, aiproxy uses the product's documented defaults."""
    config = load_config({}, {}, {})
    assert config == Config()
    assert (config.target_url, config.host, config.port) == (
        "https://ai.megallm.io",
        "0.0.0.0",
        8080,
    )
    assert (config.request_timeout, config.connect_timeout) == (300.0, 10.0)
    assert (config.log_level, config.max_workers, config.enable_cors) == ("INFO", 1, True)
    assert config.cors_origins == config.cors_methods == config.cors_headers == ("*",)
    assert (config.proxy_buffer_size, config.max_retries) == (8192, 3)
    assert (config.retry_backoff_factor, config.ssl_verify) == (0.5, True)


@pytest.mark.parametrize(
    ("environ", "named", "says"),
    [
        ({"REQUEST_TIMEOUT": "-1"}, "REQUEST_TIMEOUT", "greater than 0"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT", "greater than 0"),
        ({"REQUEST_TIMEOUT": "soon"}, "REQUEST_TIMEOUT", "not a number"),
        ({"CONNECT_TIMEOUT": "-0.5"}, "CONNECT_TIMEOUT", "greater than 0"),
        ({"CONNECT_TIMEOUT": "ten"}, "CONNECT_TIMEOUT", "not a number"),
        ({"PORT": "-1"}, "PORT", "from 0 to 65535"),
        ({"PORT": "http"}, "PORT", "not a whole number"),
        ({"MAX_WORKERS": "0"}, "MAX_WORKERS", "at least 1"),
        ({"PROXY_BUFFER_SIZE": "0"}, "PROXY_BUFFER_SIZE", "at least 1"),
        ({"MAX_RETRIES": "-2"}, "MAX_RETRIES", "at least 0"),
        ({"RETRY_BACKOFF_FACTOR": "-0.1"}, "RETRY_BACKOFF_FACTOR", "at least 0"),
        ({"SSL_VERIFY": "sometimes"}, "SSL_VERIFY", "not a boolean"),
        ({"ENABLE_CORS": "maybe"}, "ENABLE_CORS", "not a boolean"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "not one of"),
        ({"CORS_ORIGINS": "[1]"}, "CORS_ORIGINS", "not a list of strings"),
        ({"TARGET_URL": "not a url"}, "TARGET_URL", "http:// or https://"),
        ({"TARGET_URL": "ftp://files.example"}, "TARGET_URL", "http:// or https://"),
        ({"TARGET_URL": "https://"}, "TARGET_URL", "no host"),
        ({"TARGET_URL": "https://user:pw@api.example"}, "TARGET_URL", "credentials"),
        ({"TARGET_URL": "https://api.example:99999"}, "TARGET_URL", "invalid port"),
    ],
)
def test_invalid_values_name_the_environment_variable(
    environ: dict[str, str], named: str, says: str
) -> None:
    """A bad value fails with a ConfigError naming the env var, its flag and the problem."""
    with pytest.raises(ConfigError) as caught:
        load_config({}, environ, {})
    message = str(caught.value)
    assert message.startswith(f"{named} (--")
    assert says in message
    assert "\n" not in message


def test_flag_errors_name_the_flag_too() -> None:
    """An error from a command-line value names both the variable and the flag."""
    with pytest.raises(ConfigError, match=r"REQUEST_TIMEOUT \(--request-timeout\)"):
        load_config({"request_timeout": "-5"}, {}, {})


def test_port_above_65535_is_rejected() -> None:
    """PORT=70000 is refused at start, naming PORT, instead of failing when listening."""
    with pytest.raises(ConfigError, match="PORT"):
        load_config({}, {"PORT": "70000"}, {})


@pytest.mark.parametrize("url", [" https://api.example", "http://[zz]/", "http://\u2100/"])
def test_malformed_target_url_is_a_config_error(url: str) -> None:
    """Every unusable TARGET_URL gives a ConfigError naming it, never another exception."""
    with pytest.raises(ConfigError, match="TARGET_URL"):
        load_config({}, {"TARGET_URL": url}, {})


def test_config_built_directly_validates_log_level() -> None:
    """Config(log_level=...) built directly (embedding) refuses an unknown level too."""
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        Config(log_level="loud")


def test_config_built_directly_validates_numbers() -> None:
    """Config(...) built directly checks ranges and names the env var."""
    with pytest.raises(ConfigError, match="REQUEST_TIMEOUT"):
        Config(request_timeout=-1)


def test_config_built_directly_validates_the_target() -> None:
    """Config(target_url=...) built directly refuses an unusable upstream URL."""
    with pytest.raises(ConfigError, match="TARGET_URL"):
        Config(target_url="ftp://files.example")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (Config(), ("tcp:8080:interface=0.0.0.0",)),
        (Config(host="127.0.0.1", port=9000), ("tcp:9000:interface=127.0.0.1",)),
        (Config(host="::1", port=8443), ("tcp:8443:interface=\\:\\:1",)),
        (Config(host="::"), ("tcp:8080:interface=\\:\\:",)),
        (Config(port=0), ("tcp:0:interface=0.0.0.0",)),
        (
            Config(listen=("tcp:1", "unix:/run/aiproxy.sock"), port=9000),
            ("tcp:1", "unix:/run/aiproxy.sock"),
        ),
        (Config(listen=["tcp:2"]), ("tcp:2",)),
    ],
    ids=[
        "default",
        "host-and-port",
        "ipv6",
        "ipv6-any",
        "port-zero",
        "listen-list",
        "list-to-tuple",
    ],
)
def test_endpoints(config: Config, expected: tuple[str, ...]) -> None:
    """Listen on HOST:PORT (IPv6 colons escaped) unless endpoint strings were given."""
    assert config.endpoints == expected


def test_target_property_parses_the_url() -> None:
    """Config.target is TARGET_URL parsed."""
    target = Config(target_url="http://127.0.0.1:9000/openai/").target
    assert (target.scheme, target.host, target.port, target.prefix) == (
        "http",
        "127.0.0.1",
        9000,
        b"/openai",
    )


def test_settings_lists_every_documented_environment_variable() -> None:
    """settings() names every documented variable, once each, in the documented order."""
    assert [s.env for s in settings()] == DOCUMENTED_ENV_VARS


def test_settings_describe_each_setting() -> None:
    """Each setting has a flag, help text and a default written as the environment spells it."""
    shown = {s.env: s.show_default() for s in settings()}
    assert shown["TARGET_URL"] == "https://ai.megallm.io"
    assert shown["REQUEST_TIMEOUT"] == "300"
    assert shown["RETRY_BACKOFF_FACTOR"] == "0.5"
    assert shown["SSL_VERIFY"] == "true"
    assert shown["CORS_ORIGINS"] == '["*"]'
    for setting in settings():
        assert setting.flag
        assert setting.help
        assert setting.label == f"{setting.env} (--{setting.flag})"


@pytest.mark.parametrize("setting", list(settings()), ids=lambda s: s.env)
def test_each_default_survives_a_round_trip(setting: Setting) -> None:
    """Writing a default the way --help shows it and reading it back gives the default."""
    assert setting.parse(setting.show_default()) == setting.default


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", ()), ("502,503", (502, 503)), (" 429 , 503 ", (429, 503)), ("[502, 503]", (502, 503))],
)
def test_retry_on_status_parses_status_lists(text: str, expected: tuple[int, ...]) -> None:
    """RETRY_ON_STATUS takes comma-separated or JSON lists of statuses."""
    assert load_config({}, {"RETRY_ON_STATUS": text}, {}).retry_on_status == expected


@pytest.mark.parametrize("text", ["99", "600", "abc", "[502", "{}"])
def test_retry_on_status_rejects_non_statuses(text: str) -> None:
    """A value that is not a list of HTTP statuses is a one-line error naming the setting."""
    with pytest.raises(ConfigError, match="RETRY_ON_STATUS"):
        load_config({}, {"RETRY_ON_STATUS": text}, {})


def test_target_url_credentials_are_refused_without_the_password() -> None:
    """A TARGET_URL with ``user:password@`` is refused, and the message names the
    problem but never the password."""
    with pytest.raises(ConfigError) as caught:
        load_config({}, {"TARGET_URL": "https://me:s3cr3t-pw@api.example"}, {})
    assert "credentials" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value)


@pytest.mark.parametrize(
    "origins",
    [
        "*",
        "https://app.example",
        "http://localhost:3000",
        '["https://a.example", "https://b.example:8443/"]',
        "http://[::1]:8080,https://xn--bcher-kva.example",
    ],
)
def test_cors_origins_accept_star_and_scheme_host_port(origins: str) -> None:
    """``*`` and ``scheme://host[:port]`` origins (IPv6 and punycode hosts, a trailing
    ``/``) are accepted."""
    assert load_config({}, {"CORS_ORIGINS": origins}, {}).cors_origins


@pytest.mark.parametrize(
    "origins",
    ["not json", "app.example", "https://app.example/path", "https://", '["https://a.b", "null"]'],
)
def test_cors_origins_that_are_not_origins_stop_the_start(origins: str) -> None:
    """Anything else in CORS_ORIGINS (a JSON typo read as one origin, a bare host, a
    path, ``null``) is a ConfigError naming CORS_ORIGINS, not a silently failing
    preflight."""
    with pytest.raises(ConfigError, match=r"^CORS_ORIGINS \(--cors-origins\): .* is not an origin"):
        load_config({}, {"CORS_ORIGINS": origins}, {})


@pytest.mark.parametrize(
    ("dotenv", "says"),
    [
        ({"MAX_WORKERS": "abc"}, "is not a whole number (from .env, line 7)"),
        ({"MAX_WORKERS": "0"}, "must be at least 1, got 0 (from .env, line 7)"),
    ],
)
def test_an_invalid_value_from_dotenv_says_so_with_its_line(
    dotenv: dict[str, str], says: str
) -> None:
    """A value from ``.env`` that cannot be parsed or is out of range is reported with
    ``.env`` and its line; the same value from the environment is not."""
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, dotenv, dotenv_lines={"MAX_WORKERS": 7})
    assert str(caught.value).startswith("MAX_WORKERS (--workers): ")
    assert str(caught.value).endswith(says)
    with pytest.raises(ConfigError) as caught:
        load_config({}, dotenv, {})
    assert ".env" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://cache",
        "rediss://:pw@cache:6380/2",
        "redis://[::1]:6379",
    ],
)
def test_redis_url_takes_redis_urls(url: str) -> None:
    """``redis://`` and ``rediss://`` URLs, with a password, port and database or not."""
    assert Config(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    "url",
    ["http://cache", "redis://cache:port/0", "redis://cache/zero", "redis://:hunter2@cache/x"],
)
def test_a_redis_url_that_is_not_one_stops_the_start_without_its_password(url: str) -> None:
    """Anything else is one line naming REDIS_URL, the password never in it."""
    with pytest.raises(ConfigError, match="REDIS_URL") as raised:
        Config(redis_url=url)
    assert "hunter2" not in str(raised.value)
    assert "hunter2" not in repr(Config(redis_url="redis://:hunter2@cache/0"))
