"""The worker supervisor of ``--workers N``, on a fake clock with a fake ``spawnProcess``."""

from __future__ import annotations

import io
import socket
from typing import Any

import attrs
import pytest
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from aiproxy.config import Config, ConfigError, load_config
from aiproxy.ops.logs import json_log_observer, text_log_observer
from aiproxy.run.tap import Options, makeService
from aiproxy.run.workers import (
    BACKOFF_FIRST,
    EARLY_DEATHS,
    EARLY_WINDOW,
    KILL_GRACE,
    WorkerSupervisor,
    child_environment,
    tag_worker_lines,
)


@attrs.define
class FakeTransport:
    pid: int
    signals: list[str] = attrs.field(factory=list)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        pass


@attrs.define
class FakeSpawn:
    """Records each ``spawnProcess`` call and connects the protocol to a fake transport."""

    calls: list[dict[str, Any]] = attrs.field(factory=list)
    next_pid: int = 1000

    def __call__(self, protocol: Any, executable: str, args: list[str], **kwargs: Any) -> Any:
        self.next_pid += 1
        transport = FakeTransport(self.next_pid)
        protocol.makeConnection(transport)
        self.calls.append({"protocol": protocol, "transport": transport, "args": args, **kwargs})
        return transport

    def live(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if not c["protocol"].ended.called]


def _config(**kwargs: Any) -> Config:
    kwargs.setdefault("max_workers", 2)
    kwargs.setdefault("listen", ("tcp:0:interface=127.0.0.1",))
    return Config(**kwargs)


def _supervisor(
    config: Config | None = None,
) -> tuple[WorkerSupervisor, MemoryReactorClock, FakeSpawn, list[int]]:
    reactor = MemoryReactorClock()
    spawn = FakeSpawn()
    exits: list[int] = []
    supervisor = WorkerSupervisor(
        config or _config(), reactor, spawn=spawn, exit=exits.append, environ={"PATH": "/bin"}
    )
    return supervisor, reactor, spawn, exits


def _die(call: dict[str, Any], code: int = 1) -> None:
    call["protocol"].processEnded(Failure(ProcessTerminated(exitCode=code)))


def test_starts_n_workers_sharing_the_listening_sockets() -> None:
    supervisor, _, spawn, _ = _supervisor(
        _config(listen=("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"))
    )
    supervisor.startService()
    try:
        assert len(spawn.calls) == 2
        for call in spawn.calls:
            fds = call["childFDs"]
            assert fds[3] == supervisor.sockets[0].fileno()
            assert fds[4] == supervisor.sockets[1].fileno()
            assert "--workers=1" in call["args"]
            ports = [arg for arg in call["args"] if arg.startswith("--port=")]
            assert ports == ["--port=tcp:0:interface=127.0.0.1"] * 2
            assert call["env"]["MAX_WORKERS"] == "1"
            assert call["env"]["AIPROXY_INHERITED_PORTS"] == "1"
            assert call["env"]["PATH"] == "/bin"
        assert [call["env"]["AIPROXY_WORKER"] for call in spawn.calls] == ["0", "1"]
        sock = supervisor.sockets[0]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        supervisor.stopService()
    assert supervisor.sockets == []


def test_child_environment_carries_the_configuration() -> None:
    config = _config(target_url="http://upstream.test:8000", graceful_timeout=12.345678901)
    env = child_environment(config, {"HOME": "/root"})
    again = load_config({}, env, {}, config.listen)
    assert attrs.evolve(again, max_workers=config.max_workers) == config
    assert again.max_workers == 1
    assert env["HOME"] == "/root"


def test_restarts_a_dead_worker_with_exponential_backoff() -> None:
    supervisor, reactor, spawn, exits = _supervisor()
    supervisor.startService()
    reactor.advance(EARLY_WINDOW)  # both ran long enough: not early deaths
    _die(spawn.calls[0])
    assert len(spawn.calls) == 2
    reactor.advance(BACKOFF_FIRST - 0.01)
    assert len(spawn.calls) == 2
    reactor.advance(0.01)
    assert len(spawn.calls) == 3
    # Dying again right after its start doubles the wait.
    _die(spawn.calls[2])
    reactor.advance(2 * BACKOFF_FIRST - 0.01)
    assert len(spawn.calls) == 3
    reactor.advance(0.01)
    assert len(spawn.calls) == 4
    _die(spawn.calls[3], code=3)
    reactor.advance(4 * BACKOFF_FIRST)
    assert len(spawn.calls) == 5
    # Once it ran long enough, the next death waits the first backoff again.
    reactor.advance(EARLY_WINDOW)
    _die(spawn.calls[4])
    reactor.advance(BACKOFF_FIRST)
    assert len(spawn.calls) == 6
    assert exits == []
    assert len(spawn.live()) == 2
    supervisor.stopService()


def test_gives_up_when_workers_keep_dying_right_after_start() -> None:
    supervisor, reactor, spawn, exits = _supervisor()
    supervisor.startService()
    for _ in range(EARLY_DEATHS - 1):
        _die(spawn.live()[0])
        reactor.advance(1)
    assert not reactor.triggers.get("after")
    _die(spawn.live()[0])
    assert supervisor.gave_up
    # The reactor stops (which stops the service), then the process exits with 1.
    (trigger,) = reactor.triggers["after"]["shutdown"]
    trigger[0](*trigger[1], **trigger[2])
    assert exits == [1]
    assert reactor.hasStopped


def test_stop_forwards_sigterm_and_waits_for_the_workers() -> None:
    supervisor, reactor, spawn, _ = _supervisor()
    supervisor.startService()
    stopped = supervisor.stopService()
    assert [c["transport"].signals for c in spawn.calls] == [["TERM"], ["TERM"]]
    assert not stopped.called
    spawn.calls[0]["protocol"].processEnded(Failure(ProcessDone(0)))
    assert not stopped.called
    _die(spawn.calls[1], code=0)
    assert stopped.called
    reactor.advance(60)
    assert len(spawn.calls) == 2  # no restart during shutdown


def test_stop_kills_workers_that_outlive_the_drain() -> None:
    config = _config(graceful_timeout=5)
    supervisor, reactor, spawn, _ = _supervisor(config)
    supervisor.startService()
    stopped = supervisor.stopService()
    spawn.calls[0]["protocol"].processEnded(Failure(ProcessDone(0)))
    reactor.advance(config.graceful_timeout + 1)
    assert spawn.calls[1]["transport"].signals == ["TERM"]
    reactor.advance(KILL_GRACE)
    assert spawn.calls[1]["transport"].signals == ["TERM", "KILL"]
    assert spawn.calls[0]["transport"].signals == ["TERM"]
    assert not stopped.called
    _die(spawn.calls[1], code=-9)
    assert stopped.called


def test_a_pending_restart_is_cancelled_by_stop() -> None:
    supervisor, reactor, spawn, _ = _supervisor()
    supervisor.startService()
    _die(spawn.calls[0])
    supervisor.stopService()
    reactor.advance(60)
    assert len(spawn.calls) == 2


@pytest.mark.parametrize("endpoint", ["systemd:domain=INET:index=0", "stdio:"])
def test_refuses_endpoints_other_than_tcp_ssl_and_unix(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="--workers supports only tcp:, ssl: and unix: endpoints"):
        WorkerSupervisor(_config(listen=(endpoint,)), MemoryReactorClock())


def test_twist_refuses_workers_on_other_endpoints_in_one_line(tmp_path: Any) -> None:
    options = Options(environ={}, dotenv_path=str(tmp_path / ".env"))
    options.parseOptions(["--workers=2", "--port=systemd:domain=INET:index=0"])
    with pytest.raises(SystemExit, match="only tcp:, ssl: and unix: endpoints"):
        makeService(options)


def test_a_port_in_use_fails_the_start() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        config = _config(listen=(f"tcp:{port}:interface=127.0.0.1",))
        supervisor, _, spawn, _ = _supervisor(config)
        with pytest.raises(CannotListenError):
            supervisor.startService()
        assert spawn.calls == []
    finally:
        busy.close()


def test_a_unix_socket_is_opened_once_and_its_file_removed_at_stop(tmp_path: Any) -> None:
    """A ``unix:`` endpoint's socket is bound by the parent with the endpoint's mode,
    handed to the workers, and its file removed when the parent stops."""
    path = tmp_path / "aiproxy.sock"
    supervisor, _, spawn, _ = _supervisor(_config(listen=(f"unix:{path}:mode=660",)))
    supervisor.startService()
    try:
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o660
        assert spawn.calls[0]["childFDs"][3] == supervisor.sockets[0].fileno()
        assert f"--port=unix:{path}:mode=660" in spawn.calls[0]["args"]
    finally:
        supervisor.stopService()
    assert not path.exists()


@pytest.mark.parametrize(
    ("log_format", "expected"),
    [
        ("json", '"logger": "aiproxy", "message": "Request started", "worker": 1}\n'),
        ("text", " - aiproxy[worker 1] - INFO - Request started\n"),
    ],
)
def test_worker_lines_carry_the_worker_number(log_format: str, expected: str) -> None:
    """A worker's log lines carry its number: a ``worker`` field in JSON, ``[worker N]``
    after the logger in text; the event other observers see is left unchanged."""
    out = io.StringIO()
    factory = json_log_observer if log_format == "json" else text_log_observer
    observer = tag_worker_lines(factory, 1, log_format)(out)
    event = {
        "log_format": "Request started",
        "log_level": LogLevel.info,
        "log_namespace": "aiproxy",
        "log_time": 0.0,
    }
    observer(event)
    assert out.getvalue().endswith(expected)
    assert event["log_namespace"] == "aiproxy"
    assert "worker" not in event
