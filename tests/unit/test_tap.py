"""The ``twist aiproxy`` command line and the composition root."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection

from aiproxy._version import __version__
from aiproxy.config import Config, ConfigError, settings
from aiproxy.run.service import PoolService
from aiproxy.run.tap import Options, build_service, read_dotenv
from aiproxy.server.http1 import HTTP11Factory
from aiproxy.upstream.pool import UpstreamPool


def parse(
    args: list[str], environ: dict[str, str] | None = None, dotenv: str | None = None, *, tmp: Path
) -> Config:
    """Parse ``args`` with ``environ`` and a .env file holding ``dotenv``; return the Config."""
    path = tmp / ".env"
    if dotenv is not None:
        path.write_text(dotenv)
    options = Options(environ=environ or {}, dotenv_path=str(path))
    options.parseOptions(args)
    config: Config = options["config"]
    return config


@pytest.mark.parametrize(
    ("args", "environ", "dotenv", "expected"),
    [
        ([], {}, None, 300.0),
        ([], {}, "REQUEST_TIMEOUT=40\n", 40.0),
        ([], {"REQUEST_TIMEOUT": "30"}, "REQUEST_TIMEOUT=40\n", 30.0),
        (["--request-timeout", "20"], {"REQUEST_TIMEOUT": "30"}, "REQUEST_TIMEOUT=40\n", 20.0),
        (["--request-timeout=20"], {}, "REQUEST_TIMEOUT=40\n", 20.0),
        ([], {}, '# comment\nexport REQUEST_TIMEOUT="45"\n', 45.0),
    ],
    ids=["default", "dotenv", "environ-over-dotenv", "flag-over-all", "flag-equals", "quoted"],
)
def test_options_precedence(
    args: list[str], environ: dict[str, str], dotenv: str | None, expected: float, tmp_path: Path
) -> None:
    """A flag wins over the environment, which wins over the .env file, then the default."""
    assert parse(args, environ, dotenv, tmp=tmp_path).request_timeout == expected


def test_options_read_every_setting_from_each_source(tmp_path: Path) -> None:
    """Settings from flags, the environment and .env are combined into one Config."""
    config = parse(
        ["--target", "http://127.0.0.1:9000/v1", "--ssl-verify", "no", "--log-level", "debug"],
        {"CONNECT_TIMEOUT": "3", "CORS_METHODS": '["GET","POST"]'},
        "PORT=9090\nHOST=127.0.0.1\nMAX_WORKERS=4\nSSL_VERIFY=yes\n",
        tmp=tmp_path,
    )
    assert config.target_url == "http://127.0.0.1:9000/v1"
    assert config.ssl_verify is False
    assert config.log_level == "DEBUG"
    assert config.connect_timeout == 3.0
    assert config.cors_methods == ("GET", "POST")
    assert config.endpoints == ("tcp:9090:interface=127.0.0.1",)
    assert config.max_workers == 4


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    """Without a .env file the environment and defaults apply."""
    assert parse([], {"PORT": "1234"}, None, tmp=tmp_path).port == 1234


def test_port_is_repeatable(tmp_path: Path) -> None:
    """--port and -p take endpoint strings, each one a listener, in order."""
    config = parse(
        ["--port", "tcp:8001", "-p", "tcp:8002:interface=127.0.0.1", "--port=unix:/tmp/a.sock"],
        tmp=tmp_path,
    )
    assert config.endpoints == ("tcp:8001", "tcp:8002:interface=127.0.0.1", "unix:/tmp/a.sock")


def test_port_replaces_host_and_port(tmp_path: Path) -> None:
    """With --port given, HOST and PORT no longer make a listener."""
    config = parse(["--port", "tcp:8001"], {"PORT": "9000", "HOST": "127.0.0.1"}, tmp=tmp_path)
    assert config.endpoints == ("tcp:8001",)


def test_options_instances_do_not_share_ports(tmp_path: Path) -> None:
    """Each Options starts with no --port values of its own."""
    parse(["--port", "tcp:8001"], tmp=tmp_path)
    assert parse([], tmp=tmp_path).listen == ()


@pytest.mark.parametrize(
    ("args", "environ", "dotenv", "named"),
    [
        (["--request-timeout", "-1"], {}, None, "REQUEST_TIMEOUT"),
        ([], {"CONNECT_TIMEOUT": "abc"}, None, "CONNECT_TIMEOUT"),
        ([], {}, "SSL_VERIFY=perhaps\n", "SSL_VERIFY"),
        (["--target", "ftp://x.example"], {}, None, "TARGET_URL"),
        (["--listen-port", "eighty"], {}, None, "PORT"),
        ([], {"LOG_LEVEL": "chatty"}, None, "LOG_LEVEL"),
    ],
)
def test_bad_values_exit_with_one_line_naming_the_setting(
    args: list[str], environ: dict[str, str], dotenv: str | None, named: str, tmp_path: Path
) -> None:
    """A bad value stops the program with one line naming the setting, no traceback."""
    with pytest.raises(SystemExit) as caught:
        parse(args, environ, dotenv, tmp=tmp_path)
    message = caught.value.code
    assert isinstance(message, str)
    assert message.startswith(f"aiproxy: invalid configuration: {named} (--")
    assert "\n" not in message


def test_usage_mentions_every_environment_variable_and_default() -> None:
    """--help shows each option with its environment variable and its default."""
    usage = " ".join(str(Options(environ={})).split())
    for setting in settings():
        assert f"--{setting.flag}=" in usage
        assert f"[env: {setting.env}]" in usage
        assert f"[default: {setting.show_default()}]" in usage
    assert "--port=" in usage
    assert "[default: tcp:$PORT:interface=$HOST]" in usage


def test_build_service_listens_once_per_endpoint() -> None:
    """Each endpoint string becomes one listener of aiproxy's HTTP/1.1 server, with a
    listen backlog of 1024 (not Twisted's 50)."""
    reactor = MemoryReactorClock()
    config = Config(listen=("tcp:8081:interface=127.0.0.1", "tcp:8082"))
    service = build_service(config, reactor)
    assert reactor.tcpServers == []
    service.startService()
    listening = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listening == [(8081, "127.0.0.1"), (8082, "")]
    assert [backlog for _, _, backlog, _ in reactor.tcpServers] == [1024, 1024]
    factories = [factory for _, factory, _, _ in reactor.tcpServers]
    assert all(isinstance(factory, HTTP11Factory) for factory in factories)
    service.stopService()


def test_build_service_default_listener() -> None:
    """Without --port, the service listens on HOST:PORT."""
    reactor = MemoryReactorClock()
    service = build_service(Config(host="127.0.0.1", port=9999), reactor)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9999, "127.0.0.1")
    ]
    service.stopService()


def idle_upstream_connection(
    reactor: MemoryReactorClock, pool: UpstreamPool
) -> StringTransportWithDisconnection:
    """Make ``pool`` hold one idle kept-alive connection; its transport."""
    d = pool.request(b"GET", b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n", b"")
    host, port, factory, _, _ = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    d.addCallback(lambda response: response.deliver(_Discard()))
    assert pool.idle_connections == 1
    return transport


class _Discard:
    def body_received(self, pieces: list[bytes], raw: bytes | None) -> None:
        pass

    def body_done(self) -> None:
        pass

    def body_failed(self, reason: Exception) -> None:
        pass


def test_stop_service_closes_the_upstream_pool() -> None:
    """Stopping the service closes idle upstream connections and cancels their timers."""
    reactor = MemoryReactorClock()
    service = build_service(Config(listen=("tcp:8081",), target_url="http://192.0.2.1"), reactor)
    service.startService()
    [pool_service] = [s for s in service if isinstance(s, PoolService)]
    transport = idle_upstream_connection(reactor, pool_service.pool)
    assert reactor.getDelayedCalls()
    stopped = service.stopService()
    assert not transport.connected
    assert reactor.getDelayedCalls() == []
    assert stopped.called


@pytest.mark.parametrize("endpoint", ["nonsense:1", "tcp:notaport", "tcp"])
def test_invalid_endpoint_is_a_config_error(endpoint: str) -> None:
    """An unparsable --port value fails as a ConfigError quoting it."""
    with pytest.raises(ConfigError, match="--port"):
        build_service(Config(listen=(endpoint,)), MemoryReactorClock())


def test_read_dotenv_gives_each_variables_line(tmp_path: Path) -> None:
    """``read_dotenv`` returns the values of ``.env`` and the line each is on, blank
    lines, comments and ``export`` included."""
    path = tmp_path / ".env"
    path.write_text('# aiproxy\nHOST=127.0.0.1\n\n\nexport PORT="9000"\n# end\nLOG_LEVEL=debug\n')
    values, lines = read_dotenv(str(path))
    assert values == {"HOST": "127.0.0.1", "PORT": "9000", "LOG_LEVEL": "debug"}
    assert lines == {"HOST": 2, "PORT": 5, "LOG_LEVEL": 7}
    assert read_dotenv(str(tmp_path / "missing")) == ({}, {})


def test_options_name_dotenv_and_the_line_of_a_bad_value(tmp_path: Path) -> None:
    """Options reading a bad value from ``.env`` exit with one line naming ``.env`` and
    the line."""
    (tmp_path / ".env").write_text("HOST=127.0.0.1\nREQUEST_TIMEOUT=soon\n")
    options = Options(environ={}, dotenv_path=str(tmp_path / ".env"))
    with pytest.raises(SystemExit) as caught:
        options.parseOptions([])
    assert str(caught.value).endswith("'soon' is not a number (from .env, line 2)")


def test_a_mistyped_option_exits_with_a_hint_not_the_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown option exits with status 64, the error and a one-line hint to
    ``--help``."""
    options = Options(environ={}, dotenv_path=str(tmp_path / ".env"))
    with pytest.raises(SystemExit) as caught:
        options.parseOptions(["--max-retires=2"])
    assert caught.value.code == 64
    assert capsys.readouterr().err == (
        "aiproxy: option --max-retires not recognized\n"
        "Run 'twist aiproxy --help' for the options.\n"
    )


def test_version_option_prints_aiproxys_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` prints aiproxy's version, then Twisted's and Python's, and exits 0."""
    with pytest.raises(SystemExit) as caught:
        Options(environ={}).parseOptions(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith(f"aiproxy {__version__} (Twisted ")


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("tcp:99999", "'tcp:99999': the port must be from 0 to 65535"),
        ("tcp6:-1", "'tcp6:-1': the port must be from 0 to 65535"),
        ("ssl:8443:privateKey=/nonexistent/k.pem", "is not a valid endpoint: [Errno 2]"),
    ],
)
def test_an_impossible_endpoint_is_a_config_error(endpoint: str, says: str) -> None:
    """A ``--port`` with a TCP port outside 0-65535, or a TLS key file that does not
    exist, is refused when the service is built, with a message naming the endpoint."""
    config = Config(listen=(endpoint,))
    with pytest.raises(ConfigError) as caught:
        build_service(config, MemoryReactorClock())
    assert says in str(caught.value)
