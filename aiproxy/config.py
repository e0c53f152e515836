"""
One frozen, validated configuration, merged from flags, the environment and ``.env``.

Every setting is an attribute of :class:`Config` whose metadata names its environment
variable, its command-line flag and its help text, so the option parser, the ``--help``
output and the README table all come from this one place.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import attrs
from twisted.logger import LogLevel

from aiproxy.rules.redact import redact_text
from aiproxy.rules.target import Target, TargetError, parse_target

__all__ = [
    "Config",
    "ConfigError",
    "IPNetwork",
    "Setting",
    "load_config",
    "log_level_name",
    "settings",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An address range of ``TRUSTED_PROXIES``."""


class ConfigError(ValueError):
    """A setting has a value aiproxy cannot use; the message names the setting."""


@attrs.frozen
class Setting:
    """How one :class:`Config` attribute is named, parsed and described."""

    attribute: str
    env: str
    flag: str
    help: str
    parse: Callable[[str], Any]
    default: Any

    @property
    def label(self) -> str:
        """The names a user knows this setting by, for error messages."""
        return f"{self.env} (--{self.flag})"

    def show_default(self) -> str:
        """The default as it would be written in the environment."""
        return format_value(self.default)


def format_value(value: object) -> str:
    """Write a setting's value the way the environment spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_bool(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` in any case."""
    word = text.strip().lower()
    if word in {"1", "true", "yes", "on"}:
        return True
    if word in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _list_items(text: str) -> list[Any]:
    """The items of a JSON list (``["a", "b"]``) or of a comma-separated list (``a,b``)."""
    text = text.strip()
    if not text.startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{text!r} is not a JSON list: {e.msg}") from None
    if not isinstance(items, list):
        raise ValueError(f"{text!r} is not a list")
    return items


def parse_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings (``["a", "b"]``) or a comma-separated list (``a,b``)."""
    items = _list_items(text)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{text.strip()!r} is not a list of strings")
    return tuple(items)


def parse_int(text: str) -> int:
    """A whole number."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_float(text: str) -> float:
    """A number, such as ``300`` or ``0.5``."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_status_list(text: str) -> tuple[int, ...]:
    """HTTP status codes, as ``502,503`` or ``[502, 503]``; empty means none."""
    statuses = tuple(parse_int(str(item)) for item in _list_items(text))
    for status in statuses:
        if not 100 <= status <= 599:
            raise ValueError(f"{status} is not an HTTP status code")
    return statuses


LOG_LEVELS: Mapping[str, LogLevel] = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARNING": LogLevel.warn,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "CRITICAL": LogLevel.critical,
}


def parse_networks(text: str) -> tuple[str, ...]:
    """IP addresses or networks (``10.0.0.0/8``), as a JSON or comma-separated list."""
    networks = []
    for item in parse_list(text):
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


LOG_FORMATS = ("auto", "text", "json")


def parse_log_format(text: str) -> str:
    """``auto``, ``text`` or ``json``, in any case."""
    name = text.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_FORMATS)}")
    return name


def log_level_name(level: LogLevel) -> str:
    """The ``LOG_LEVEL`` name of a :class:`twisted.logger.LogLevel`."""
    return next(name for name, known in LOG_LEVELS.items() if known is level)


def parse_log_level(text: str) -> str:
    """A Python logging level name, in any case; ``WARN`` means ``WARNING``."""
    name = text.strip().upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return "WARNING" if name == "WARN" else name


def _endpoint_strings(endpoints: Iterable[str]) -> tuple[str, ...]:
    return tuple(endpoints)


_CONVERTERS: Mapping[Callable[[str], Any], Callable[[Any], Any]] = {
    parse_float: float,
    parse_list: tuple,
    parse_status_list: tuple,
    parse_networks: tuple,
}


def _setting(
    default: Any,
    env: str,
    flag: str,
    help: str,
    parse: Callable[[str], Any],
    validator: Callable[[Any, attrs.Attribute[Any], Any], None] | None = None,
    secret: bool = False,
) -> Any:
    return attrs.field(
        default=default,
        validator=validator,
        repr=not secret,
        # Values given directly (Config(request_timeout=120)) get the parsed type too.
        converter=_CONVERTERS.get(parse),
        metadata={"setting": Setting("", env, flag, help, parse, default)},
    )


def _setting_of(attribute: attrs.Attribute[Any]) -> Setting:
    setting: Setting = attribute.metadata["setting"]
    return attrs.evolve(setting, attribute=attribute.name)


def _at_least(minimum: float, *, strict: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value < minimum or (strict and value == minimum):
            bound = "greater than" if strict else "at least"
            raise ConfigError(
                f"{_setting_of(attribute).label}: must be {bound} {minimum:g},"
                f" got {format_value(value)}"
            )

    return check


def _in_range(minimum: int, maximum: int) -> Callable[[Any, Any, Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if not minimum <= value <= maximum:
            raise ConfigError(
                f"{_setting_of(attribute).label}: must be from {minimum} to {maximum}, got {value}"
            )

    return check


def _valid_log_level(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError(f"{_setting_of(attribute).label}: {value!r} is not a log level")


def _valid_log_format(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError(f"{_setting_of(attribute).label}: {value!r} is not a log format")


def _valid_networks(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    try:
        parse_networks(json.dumps(list(value)))
    except ValueError as e:
        raise ConfigError(f"{_setting_of(attribute).label}: {e}") from None


def _valid_target(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_target(value)
    except TargetError as e:
        # The message quotes the URL: never with its password.
        raise ConfigError(f"{_setting_of(attribute).label}: {redact_text(str(e))}") from None


_ORIGIN = re.compile(
    r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9-]+(\.[a-z0-9-]+)*)(:[0-9]{1,5})?/?",
    re.IGNORECASE,
)
"""``scheme://host[:port]``, as a browser sends it in ``Origin`` (a trailing ``/`` is
tolerated: origins are compared without it)."""


def _valid_origins(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for origin in value:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"{_setting_of(attribute).label}: {origin!r} is not an origin"
                " (use * or scheme://host[:port], as a JSON list or comma-separated)"
            )


AUTH_MODES = ("auto", "none")
"""``AUTH``: ``none`` lets a proxy that holds ``UPSTREAM_API_KEY`` serve anyone."""

UPSTREAM_AUTH_HEADERS = ("authorization", "x-api-key", "api-key")
"""``UPSTREAM_AUTH_HEADER``: where the upstream key goes (``authorization``: as ``Bearer``)."""


REDIS_ERROR_POLICIES = ("open", "closed")
"""``RATE_LIMIT_ON_REDIS_ERROR``: admit or refuse while Redis does not answer."""


_REDIS_URL = re.compile(
    r"rediss?://([^@/]*@)?(\[[0-9A-Fa-f:.]+\]|[^@/:\[\]]+)(:[0-9]{1,5})?(/[0-9]*)?"
)
"""``redis://[:password@]host[:port][/db]``, or ``rediss://`` for TLS."""


def _valid_redis_url(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not _REDIS_URL.fullmatch(value):
        raise ConfigError(
            f"{_setting_of(attribute).label}: {redact_text(value)!r} is not"
            " redis://host[:port][/db] (or rediss:// for TLS)"
        )


def _word_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        """One of the setting's words, in any case."""
        word = text.strip().lower()
        if word not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return word

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, Any, Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{_setting_of(attribute).label}: {value!r} is not one of {', '.join(choices)}"
            )

    return check


@attrs.frozen(kw_only=True)
class Config:
    """
    Everything aiproxy can be told, with the product's documented defaults.

    Build it with :func:`load_config` to merge flags, environment and ``.env``, or
    directly (``Config(target_url="http://127.0.0.1:9000")``) when embedding.
    """

    target_url: str = _setting(
        "https://ai.megallm.io",
        "TARGET_URL",
        "target",
        "Upstream base URL (http or https, may end in a path prefix)",
        str,
        _valid_target,
    )
    host: str = _setting("0.0.0.0", "HOST", "host", "Interface of the default listener", str)
    port: int = _setting(
        8080,
        "PORT",
        "listen-port",
        "TCP port of the default listener",
        parse_int,
        _in_range(0, 65535),
    )
    request_timeout: float = _setting(
        300.0,
        "REQUEST_TIMEOUT",
        "request-timeout",
        "Seconds to wait for the upstream's response headers (then 504)",
        parse_float,
        _at_least(0, strict=True),
    )
    connect_timeout: float = _setting(
        10.0,
        "CONNECT_TIMEOUT",
        "connect-timeout",
        "Seconds to wait for a TCP and TLS connection to the upstream (then 502)",
        parse_float,
        _at_least(0, strict=True),
    )
    log_level: str = _setting(
        "INFO",
        "LOG_LEVEL",
        "log-level",
        "DEBUG, INFO, WARNING, ERROR or CRITICAL",
        parse_log_level,
        _valid_log_level,
    )
    log_format: str = _setting(
        "auto",
        "LOG_FORMAT",
        "log-format",
        "auto (coloured text on a terminal, JSON lines otherwise), text or json",
        parse_log_format,
        _valid_log_format,
    )
    max_workers: int = _setting(
        1,
        "MAX_WORKERS",
        "workers",
        "Worker processes",
        parse_int,
        _at_least(1),
    )
    enable_cors: bool = _setting(
        True, "ENABLE_CORS", "enable-cors", "Handle CORS preflights and headers", parse_bool
    )
    cors_origins: tuple[str, ...] = _setting(
        ("*",),
        "CORS_ORIGINS",
        "cors-origins",
        "Allowed CORS origins: * or scheme://host[:port]",
        parse_list,
        _valid_origins,
    )
    cors_methods: tuple[str, ...] = _setting(
        ("*",), "CORS_METHODS", "cors-methods", "Allowed CORS methods", parse_list
    )
    cors_headers: tuple[str, ...] = _setting(
        ("*",), "CORS_HEADERS", "cors-headers", "Allowed CORS request headers", parse_list
    )
    proxy_buffer_size: int = _setting(
        8192,
        "PROXY_BUFFER_SIZE",
        "buffer-size",
        "Largest single read of a buffered request body, in bytes",
        parse_int,
        _at_least(1),
    )
    max_retries: int = _setting(
        3,
        "MAX_RETRIES",
        "max-retries",
        "Retries of an upstream request that failed safely",
        parse_int,
        _at_least(0),
    )
    retry_backoff_factor: float = _setting(
        0.5,
        "RETRY_BACKOFF_FACTOR",
        "retry-backoff-factor",
        "Seconds; retry n waits up to this x 2**(n-1)",
        parse_float,
        _at_least(0),
    )
    ssl_verify: bool = _setting(
        True, "SSL_VERIFY", "ssl-verify", "Verify the upstream's TLS certificate", parse_bool
    )
    retry_on_status: tuple[int, ...] = _setting(
        (),
        "RETRY_ON_STATUS",
        "retry-on-status",
        "Upstream statuses to retry, such as 502,503",
        parse_status_list,
    )
    stream_idle_timeout: float = _setting(
        300.0,
        "STREAM_IDLE_TIMEOUT",
        "stream-idle-timeout",
        "Seconds without upstream body bytes before a response is cut off",
        parse_float,
        _at_least(0, strict=True),
    )
    total_timeout: float = _setting(
        0.0,
        "TOTAL_TIMEOUT",
        "total-timeout",
        "Seconds a whole exchange may take, 0 for no limit",
        parse_float,
        _at_least(0),
    )
    tunnel_idle_timeout: float = _setting(
        300.0,
        "TUNNEL_IDLE_TIMEOUT",
        "tunnel-idle-timeout",
        "Seconds a WebSocket tunnel may pass no byte either way before it is closed",
        parse_float,
        _at_least(0, strict=True),
    )
    header_timeout: float = _setting(
        10.0,
        "HEADER_TIMEOUT",
        "header-timeout",
        "Seconds a client may take to send its request head (then 408)",
        parse_float,
        _at_least(0, strict=True),
    )
    body_min_rate: int = _setting(
        500,
        "BODY_MIN_RATE",
        "body-min-rate",
        "Slowest accepted request body upload in bytes per second, 0 for no limit",
        parse_int,
        _at_least(0),
    )
    body_timeout: float = _setting(
        600.0,
        "BODY_TIMEOUT",
        "body-timeout",
        "Seconds a client may take to send a whole request body (then 408), 0 for no limit",
        parse_float,
        _at_least(0),
    )
    max_body_size: int = _setting(
        104_857_600,
        "MAX_BODY_SIZE",
        "max-body-size",
        "Largest accepted request body in bytes (then 413)",
        parse_int,
        _at_least(0),
    )
    max_concurrent_requests: int = _setting(
        0,
        "MAX_CONCURRENT_REQUESTS",
        "max-concurrent-requests",
        "Proxied requests handled at once, 0 for no limit (then 503)",
        parse_int,
        _at_least(0),
    )
    graceful_timeout: float = _setting(
        30.0,
        "GRACEFUL_TIMEOUT",
        "graceful-timeout",
        "Seconds in-flight requests may finish after SIGTERM before they are aborted",
        parse_float,
        _at_least(0),
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (),
        "TRUSTED_PROXIES",
        "trusted-proxies",
        "Addresses or networks of proxies in front whose X-Forwarded-For is believed",
        parse_networks,
        _valid_networks,
    )
    enable_metrics: bool = _setting(
        True,
        "ENABLE_METRICS",
        "enable-metrics",
        "Serve Prometheus metrics at /api/metrics",
        parse_bool,
    )
    enable_docs: bool = _setting(
        True,
        "ENABLE_DOCS",
        "enable-docs",
        "Serve /api/docs, /api/redoc and /api/openapi.json",
        parse_bool,
    )
    access_keys_file: str = _setting(
        "",
        "ACCESS_KEYS_FILE",
        "access-keys-file",
        "TOML file of the access keys clients must present (empty: no access keys)",
        str,
    )
    auth: str = _setting(
        "auto",
        "AUTH",
        "auth",
        "auto, or none to serve clients without keys while holding UPSTREAM_API_KEY",
        _word_of(AUTH_MODES),
        _one_of(AUTH_MODES),
    )
    upstream_api_key: str = _setting(
        "",
        "UPSTREAM_API_KEY",
        "upstream-api-key",
        "The upstream's API key, sent instead of the client's credentials",
        str,
        secret=True,
    )
    upstream_api_key_file: str = _setting(
        "",
        "UPSTREAM_API_KEY_FILE",
        "upstream-api-key-file",
        "File holding the upstream's API key (instead of UPSTREAM_API_KEY)",
        str,
    )
    upstream_auth_header: str = _setting(
        "authorization",
        "UPSTREAM_AUTH_HEADER",
        "upstream-auth-header",
        "How the upstream key is sent: authorization (Bearer), x-api-key or api-key",
        _word_of(UPSTREAM_AUTH_HEADERS),
        _one_of(UPSTREAM_AUTH_HEADERS),
    )
    default_max_tokens: int = _setting(
        4096,
        "DEFAULT_MAX_TOKENS",
        "default-max-tokens",
        "Completion tokens a request that names no max_tokens reserves under a token limit",
        parse_int,
        _at_least(1),
    )
    redis_url: str = _setting(
        "",
        "REDIS_URL",
        "redis-url",
        "Redis (redis://host:port/db) holding the per-key limits for every process; empty: "
        "each process keeps its own",
        str,
        _valid_redis_url,
        secret=True,
    )
    rate_limit_on_redis_error: str = _setting(
        "open",
        "RATE_LIMIT_ON_REDIS_ERROR",
        "rate-limit-on-redis-error",
        "When Redis does not answer: open (admit, with a warning) or closed (refuse, 503)",
        _word_of(REDIS_ERROR_POLICIES),
        _one_of(REDIS_ERROR_POLICIES),
    )
    upstreams_file: str = _setting(
        "",
        "UPSTREAMS_FILE",
        "upstreams-file",
        "TOML file of several upstreams with their keys, weights, priorities and models"
        " (instead of TARGET_URL)",
        str,
    )
    failover_on_status: tuple[int, ...] = _setting(
        (429, 502, 503, 504),
        "FAILOVER_ON_STATUS",
        "failover-on-status",
        "Upstream statuses after which a request moves to another upstream of UPSTREAMS_FILE",
        parse_status_list,
    )
    max_failovers: int = _setting(
        2,
        "MAX_FAILOVERS",
        "max-failovers",
        "Times one request may move to another upstream (or upstream key)",
        parse_int,
        _at_least(0),
    )
    sticky_upstreams: bool = _setting(
        False,
        "STICKY_UPSTREAMS",
        "sticky-upstreams",
        "Keep each access key on one upstream and upstream key while they are available",
        parse_bool,
    )
    upstream_name_header: bool = _setting(
        True,
        "UPSTREAM_NAME_HEADER",
        "upstream-name-header",
        "Name the upstream that answered in an X-Upstream response header",
        parse_bool,
    )
    listen: tuple[str, ...] = attrs.field(default=(), converter=_endpoint_strings)
    """Twisted endpoint strings to listen on; empty means ``tcp:PORT:interface=HOST``."""

    @property
    def target(self) -> Target:
        """The upstream, parsed."""
        return parse_target(self.target_url)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoint strings to listen on."""
        if self.listen:
            return self.listen
        host = self.host.replace(":", "\\:")
        return (f"tcp:{self.port}:interface={host}",)

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        """``trusted_proxies``, parsed."""
        return tuple(ipaddress.ip_network(text) for text in self.trusted_proxies)

    @property
    def twisted_log_level(self) -> LogLevel:
        """``log_level`` as a :class:`twisted.logger.LogLevel`."""
        return LOG_LEVELS[self.log_level]


def settings() -> Iterator[Setting]:
    """Every setting, in the order ``--help`` and the README list them."""
    for attribute in attrs.fields(Config):
        if "setting" in attribute.metadata:
            yield _setting_of(attribute)


def _validate(setting: Setting, value: Any) -> None:
    """Run the checks of ``setting``'s attribute on ``value`` alone, before it is merged
    with the others, so that an error can say where the value came from."""
    field = attrs.fields_dict(Config)[setting.attribute]
    convert = _CONVERTERS.get(setting.parse)
    if field.validator is not None:
        field.validator(None, field, value if convert is None else convert(value))


def load_config(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str | None],
    listen: tuple[str, ...] = (),
    dotenv_lines: Mapping[str, int] | None = None,
) -> Config:
    """
    Merge the sources, first found wins: flag, environment, ``.env``, default.

    @param flags: command-line values by attribute name; L{None} means not given.
    @param environ: the process environment.
    @param dotenv: the values read from a ``.env`` file.
    @param listen: the endpoint strings given with ``--port``.
    @param dotenv_lines: the line of ``.env`` each of its variables is on.
    @raise ConfigError: a value cannot be parsed or is out of range; the message
        names the setting, and says so when the value came from ``.env``.
    """
    values: dict[str, Any] = {}
    for setting in settings():
        source = ""
        text = flags.get(setting.attribute)
        if text is None:
            text = environ.get(setting.env)
        if text is None:
            text = dotenv.get(setting.env)
            line = (dotenv_lines or {}).get(setting.env)
            source = " (from .env)" if line is None else f" (from .env, line {line})"
        if text is None:
            continue
        try:
            value = setting.parse(text)
        except ValueError as e:
            raise ConfigError(f"{setting.label}: {e}{source}") from None
        try:
            _validate(setting, value)
        except ConfigError as e:
            raise ConfigError(f"{e}{source}") from None
        values[setting.attribute] = value
    return Config(listen=listen, **values)
