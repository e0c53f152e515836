"""
Who may use the proxy and with which upstream credential, as the settings say:
``ACCESS_KEYS_FILE``, ``UPSTREAM_API_KEY`` (or ``UPSTREAM_API_KEY_FILE``),
``UPSTREAM_AUTH_HEADER`` and ``AUTH``. Checked once at start, where a bad combination
stops start-up with one line.

No open relay: a proxy that holds the upstream key and takes no access keys spends it
for anyone who reaches it, so that is refused on any listener that is not loopback-only
(or a UNIX socket), unless ``AUTH=none`` says it is meant.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from aiproxy.access.keyfile import read_key_file
from aiproxy.access.keys import KeyFileError, KeyRing
from aiproxy.access.limits import has_limits
from aiproxy.config import Config, ConfigError
from aiproxy.core.interfaces import RawHeaders

__all__ = ["AccessKeys", "AccessPolicy", "access_policy", "loopback_only"]


class AccessKeys:
    """
    The key file and the key ring last read from it. Reloading swaps :attr:`ring` for
    a new immutable one, so a request in flight keeps the entry it was admitted with.
    """

    def __init__(self, path: str, ring: KeyRing) -> None:
        self.path = path
        self.ring = ring

    def read(self) -> KeyRing:
        """The key ring in the file now (not yet in use).

        @raise KeyFileError: the file cannot be read or is invalid."""
        return read_key_file(self.path)


@attrs.frozen
class AccessPolicy:
    """
    @ivar keys: the access keys clients must present; L{None} when there are none.
    @ivar credentials: the headers sent upstream instead of every client credential
        (the upstream key, or nothing); L{None} to pass the client's own through.
    """

    keys: AccessKeys | None
    credentials: RawHeaders | None

    @property
    def auth(self) -> bool:
        """Whether clients must present an access key."""
        return self.keys is not None


def access_policy(config: Config, upstream_keys: bool = False) -> AccessPolicy:
    """
    The policy ``config`` describes, with the key file read.

    @param upstream_keys: ``UPSTREAMS_FILE`` gives keys for its upstreams (an open
        relay would spend them as it would ``UPSTREAM_API_KEY``).

    @raise ConfigError: contradictory settings, a key file or upstream key file that
        cannot be read or is invalid, or an open relay.
    """
    if config.auth == "none" and config.access_keys_file:
        raise ConfigError("AUTH=none and ACCESS_KEYS_FILE contradict each other; choose one")
    keys = None
    if config.access_keys_file:
        try:
            keys = AccessKeys(config.access_keys_file, read_key_file(config.access_keys_file))
        except KeyFileError as e:
            raise ConfigError(f"ACCESS_KEYS_FILE (--access-keys-file): {e}") from None
    upstream_key = _upstream_key(config)
    if (upstream_key or upstream_keys) and keys is None and config.auth != "none":
        public = [e for e in config.endpoints if not loopback_only(e)]
        if public:
            held = "UPSTREAM_API_KEY is set" if upstream_key else "UPSTREAMS_FILE has keys"
            raise ConfigError(
                f"{held} and no ACCESS_KEYS_FILE, so anyone reaching"
                f" {public[0]} could spend it: set ACCESS_KEYS_FILE, listen on loopback"
                f" only, or set AUTH=none"
            )
    if keys is not None and config.max_workers > 1 and not config.redis_url:
        limited = [entry.id for entry in keys.ring.entries if has_limits(entry)]
        if limited:
            raise ConfigError(
                f"key {limited[0]!r} has limits and MAX_WORKERS is {config.max_workers}:"
                " set REDIS_URL so that the workers share them (each would count alone)"
            )
    credentials: RawHeaders | None = None
    if upstream_key:
        credentials = [_credential(config.upstream_auth_header, upstream_key)]
    elif keys is not None:
        credentials = []
    return AccessPolicy(keys, credentials)


def _upstream_key(config: Config) -> str:
    if config.upstream_api_key and config.upstream_api_key_file:
        raise ConfigError("UPSTREAM_API_KEY and UPSTREAM_API_KEY_FILE are both set; choose one")
    if not config.upstream_api_key_file:
        key, source = config.upstream_api_key.strip(), "UPSTREAM_API_KEY"
    else:
        path = config.upstream_api_key_file
        source = f"UPSTREAM_API_KEY_FILE: {path}"
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"{source} cannot be read ({why})") from None
        if not key:
            raise ConfigError(f"{source} is empty")
    if key and not (key.isascii() and key.isprintable()):
        raise ConfigError(f"{source} must hold one key of printable ASCII on one line")
    return key


def _credential(header: str, key: str) -> tuple[bytes, bytes]:
    if header == "authorization":
        return b"Authorization", b"Bearer " + key.encode()
    return header.encode(), key.encode()


_ARGUMENT_SEPARATOR = re.compile(r"(?<!\\):")
_TCP_KINDS = frozenset({"tcp", "tcp6", "ssl"})


def loopback_only(endpoint: str) -> bool:
    """
    Whether the ``--port`` string ``endpoint`` only takes connections from this host: a
    ``tcp:``, ``tcp6:`` or ``ssl:`` endpoint whose ``interface`` is a loopback address
    (or ``localhost``), or a ``unix:`` socket.
    """
    kind, *arguments = _ARGUMENT_SEPARATOR.split(endpoint)
    kind = kind.strip().lower()
    if kind == "unix":
        return True
    if kind not in _TCP_KINDS:
        return False
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if equals and name.strip() == "interface":
            return _is_loopback(value.replace("\\:", ":").strip("[] "))
    return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
