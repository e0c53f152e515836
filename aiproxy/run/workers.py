"""
``--workers N``: several worker processes serving the same listening sockets.

The parent (the ``twist aiproxy`` process) opens the socket of every listening endpoint
(``tcp:``, ``tcp6:``, ``ssl:``, ``unix:``) once and never accepts on it. It starts N
workers, each a ``twist aiproxy --workers 1 --port ...`` with the parent's own endpoint
strings, that inherits the sockets as file descriptors 3, 4, ... and, told so by
:data:`INHERITED_PORTS`, listens on them instead of binding (adding TLS for ``ssl:``,
with HTTP/2 by ALPN). A tiny launcher asks Linux to end a worker whose parent has died.
Each worker accepts one connection per wake-up (:mod:`aiproxy.run.listening`), so new
connections go to the workers that are free.

The workers get every setting through their environment (the parent's validated
configuration, exported as the documented variables), so they run exactly the
parent's configuration.

The parent forwards shutdown (SIGTERM to every worker, which drains, then SIGKILL after
``GRACEFUL_TIMEOUT`` and a few seconds), restarts a worker that dies unexpectedly after
an exponential backoff, and gives up, exiting non-zero, when workers keep dying right
after they start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import attrs
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure

from aiproxy._twisted import server_address
from aiproxy.config import Config, ConfigError, format_value, settings
from aiproxy.run.drain import ABORT_GRACE
from aiproxy.run.listening import server_endpoint

__all__ = [
    "LAUNCHER",
    "WORKER",
    "ListenSocket",
    "WorkerSupervisor",
    "child_environment",
    "listen_sockets",
    "tag_worker_lines",
]

log = Logger(namespace="aiproxy")

LAUNCHER = """\
import os, sys
try:
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except Exception:
    pass
os.execv(sys.executable, [sys.executable, "-m", "twisted", *sys.argv[1:]])
"""
"""Run as ``python -c LAUNCHER ARGS...``: asks Linux to send it SIGTERM if the parent
dies, and becomes ``twist ARGS...``."""

METRICS_DIR = "AIPROXY_METRICS_DIR"
"""In a worker's environment: the directory where the workers publish their metrics
for one another (see :class:`aiproxy.ops.metrics.SharedMetrics`)."""

INHERITED_PORTS = "AIPROXY_INHERITED_PORTS"
"""Set to ``1`` in a worker's environment: its ``--port`` endpoints are open already, as
file descriptors 3, 4, ... in their order (see :func:`aiproxy.run.listening.inherited`)."""

WORKER = "AIPROXY_WORKER"
"""In a worker's environment: its number (0, 1, ...), which every line it logs carries."""

FIRST_FD = 3
"""The first inherited socket's descriptor in a worker (as systemd passes them too)."""

BACKOFF_FIRST = 0.5
"""Seconds before restarting a worker that died for the first time in a row."""

BACKOFF_MAX = 30.0
"""The longest wait before restarting a worker."""

EARLY_WINDOW = 10.0
"""Seconds: a worker that dies within this time of its start died early; a worker that
ran longer starts again at the first backoff."""

EARLY_DEATHS = 5
"""This many early deaths within ``EARLY_WINDOW`` seconds make the parent give up."""

KILL_GRACE = 5.0
"""Seconds the parent waits, beyond the workers' own drain, before SIGKILL."""


@attrs.frozen
class ListenSocket:
    """
    The socket of one endpoint of the configuration, as the parent opens it: a TCP
    socket on ``(interface, port)``, or a UNIX socket at ``interface`` (a path) with the
    file mode ``mode``.
    """

    description: str
    family: socket.AddressFamily
    interface: str
    port: int
    backlog: int
    mode: int = 0o666

    def open(self) -> socket.socket:
        """A listening socket bound as the endpoint says (``SO_REUSEADDR``, like Twisted).

        @raise CannotListenError: the address cannot be bound.
        """
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_UNIX:
                sock.bind(self.interface)
                os.chmod(self.interface, self.mode)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
        except OSError as e:
            sock.close()
            raise CannotListenError(self.interface, self.port, e) from None
        return sock

    def close(self, sock: socket.socket) -> None:
        """Close ``sock``, and remove a UNIX socket's file, as Twisted does."""
        sock.close()
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(self.interface)


_SHARED_KINDS = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
    endpoints.UNIXServerEndpoint,
)


def listen_sockets(descriptions: Sequence[str], reactor: Any) -> tuple[ListenSocket, ...]:
    """
    The sockets that the ``tcp:``, ``tcp6:``, ``ssl:`` and ``unix:`` endpoints among
    ``descriptions`` listen on (for ``ssl:``, each worker adds the TLS).

    @raise ConfigError: an endpoint is of another kind, or cannot be parsed.
    """
    result = []
    for description in descriptions:
        refused = ConfigError(
            f"--workers supports only tcp:, ssl: and unix: endpoints, not --port {description!r}"
        )
        if description.split(":", 1)[0].strip().lower() not in ("tcp", "tcp6", "ssl", "unix"):
            raise refused
        endpoint = server_endpoint(reactor, description)
        if not isinstance(endpoint, _SHARED_KINDS):
            raise refused
        address = server_address(endpoint)
        if isinstance(endpoint, endpoints.UNIXServerEndpoint):
            path = os.path.abspath(address.interface)
            listen = ListenSocket(
                description, socket.AF_UNIX, path, 0, address.backlog, address.mode
            )
            result.append(listen)
            continue
        interface = address.interface
        six = isinstance(endpoint, endpoints.TCP6ServerEndpoint) or ":" in interface
        if six and not interface:
            interface = "::"
        family = socket.AF_INET6 if six else socket.AF_INET
        result.append(ListenSocket(description, family, interface, address.port, address.backlog))
    return tuple(result)


def child_environment(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with every setting of ``config`` exported as its variable,
    ``MAX_WORKERS=1`` and :data:`INHERITED_PORTS`."""
    env = dict(environ)
    for setting in settings():
        value = getattr(config, setting.attribute)
        env[setting.env] = repr(value) if isinstance(value, float) else format_value(value)
    env["MAX_WORKERS"] = "1"
    env[INHERITED_PORTS] = "1"
    return env


def _hard_exit(status: int) -> None:
    """End the process with ``status`` once the reactor has shut down."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"signal {value.signal}"
        return f"exit status {value.exitCode}"
    return str(value)


class _Worker(ProcessProtocol):
    """One worker process of slot ``slot``; tells the supervisor when it ends."""

    def __init__(self, supervisor: WorkerSupervisor, slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def signal(self, name: str) -> None:
        with contextlib.suppress(Exception):  # it has already exited
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


Spawn = Callable[..., Any]


class WorkerSupervisor(Service):
    """
    Opens the listening sockets and keeps ``config.max_workers`` workers serving them.

    @param reactor: provides ``IReactorTime`` and ``IReactorCore`` (and
        ``IReactorProcess`` unless ``spawn`` is given).
    @param spawn: ``reactor.spawnProcess`` or a stand-in.
    @param exit: ends the process with a status, once the reactor has shut down.
    @param environ: the environment the workers inherit, besides the settings.

    @raise ConfigError: an endpoint is not ``tcp:``.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        spawn: Spawn | None = None,
        exit: Callable[[int], None] = _hard_exit,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.listen = listen_sockets(config.endpoints, reactor)
        self.config = config
        self.reactor = reactor
        self.spawn: Spawn = reactor.spawnProcess if spawn is None else spawn
        self.exit = exit
        self.env = child_environment(config, os.environ if environ is None else environ)
        self.sockets: list[socket.socket] = []
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, IDelayedCall] = {}
        self.failures: dict[int, int] = {}
        self.early_deaths: list[float] = []
        self.stopping = False
        self.gave_up = False
        self.metrics_dir: str | None = None

    # --- start ---------------------------------------------------------------------

    def startService(self) -> None:
        """
        Open every socket (L{CannotListenError} if one cannot be), make the directory
        where the workers share their metrics (removed once they have stopped), and
        start the workers.
        """
        self.stopping = False
        if self.config.enable_metrics and self.metrics_dir is None:
            self.metrics_dir = tempfile.mkdtemp(prefix="aiproxy-metrics-")
            self.env[METRICS_DIR] = self.metrics_dir
        for listen in self.listen:
            try:
                self.sockets.append(listen.open())
            except CannotListenError:
                self._close_sockets()
                raise
        super().startService()
        log.info(
            "Starting {workers} worker processes on {endpoints}",
            workers=self.config.max_workers,
            endpoints=", ".join(listen.description for listen in self.listen),
        )
        for slot in range(self.config.max_workers):
            self._start(slot)

    def arguments(self) -> list[str]:
        """The launcher's command line, for a worker: the parent's own endpoints."""
        ports = [f"--port={listen.description}" for listen in self.listen]
        return [sys.executable, "-c", LAUNCHER, "aiproxy", "--workers=1", *ports]

    def _start(self, slot: int) -> None:
        self.restarts.pop(slot, None)
        if self.stopping:
            return
        worker = _Worker(self, slot, self.reactor.seconds())
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        for index, sock in enumerate(self.sockets):
            child_fds[FIRST_FD + index] = sock.fileno()
        self.workers[slot] = worker
        try:
            self.spawn(
                worker,
                sys.executable,
                self.arguments(),
                env={**self.env, WORKER: str(slot)},
                childFDs=child_fds,
            )
        except Exception:
            del self.workers[slot]
            log.failure("Cannot start worker {slot}", slot=slot)
            self._schedule(slot, worker.started)
            return
        log.info("Started worker {slot} (pid {pid})", slot=slot, pid=worker.pid)

    # --- deaths and restarts -------------------------------------------------------

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self.stopping:
            log.info(
                "Worker {slot} (pid {pid}) stopped ({status})",
                slot=worker.slot,
                pid=worker.pid,
                status=_describe(reason),
            )
            return
        self._schedule(worker.slot, worker.started, worker.pid, _describe(reason))

    def _schedule(
        self, slot: int, started: float, pid: int | None = None, status: str = "failed to start"
    ) -> None:
        now = self.reactor.seconds()
        if now - started < EARLY_WINDOW:
            self.early_deaths = [t for t in self.early_deaths if now - t < EARLY_WINDOW]
            self.early_deaths.append(now)
            failures = self.failures.get(slot, 0) + 1
        else:
            failures = 1
        self.failures[slot] = failures
        if len(self.early_deaths) >= EARLY_DEATHS:
            self._give_up(
                f"aiproxy: workers keep dying right after they start ({len(self.early_deaths)}"
                f" deaths within {EARLY_WINDOW:g}s, last: {status}); stopping"
            )
            return
        delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
        log.error(
            "Worker {slot} (pid {pid}) died unexpectedly ({status}); restarting in {delay:g}s",
            slot=slot,
            pid=pid,
            status=status,
            delay=delay,
        )
        self.restarts[slot] = self.reactor.callLater(delay, self._start, slot)

    def _give_up(self, message: str) -> None:
        if self.gave_up:
            return
        self.gave_up = True
        log.critical("{message}", message=message)
        self.reactor.addSystemEventTrigger("after", "shutdown", self.exit, 1)
        self.reactor.stop()

    # --- stop ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker and wait for them to drain; SIGKILL what is left after
        ``GRACEFUL_TIMEOUT`` and a few seconds. Never fails."""
        super().stopService()
        self.stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        # The workers keep their own copies; the parent never accepts.
        self._close_sockets()
        workers = list(self.workers.values())
        if workers:
            log.info("Stopping {count} worker(s)", count=len(workers))
        for worker in workers:
            worker.signal("TERM")
        return Deferred.fromCoroutine(self._wait(workers))

    async def _wait(self, workers: list[_Worker]) -> None:
        timeout = self.config.graceful_timeout + ABORT_GRACE + KILL_GRACE
        await self._ended_within(workers, timeout)
        left = [w for w in workers if not w.ended.called]
        for worker in left:
            log.warn("Worker {slot} (pid {pid}) did not stop; killing it", **_fields(worker))
            worker.signal("KILL")
        await self._ended_within(left, KILL_GRACE)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
            del self.env[METRICS_DIR]

    def _ended_within(self, workers: list[_Worker], timeout: float) -> Deferred[None]:
        """Fires when every one of ``workers`` has ended, or after ``timeout`` seconds."""
        done: Deferred[None] = Deferred()
        remaining = set(workers)

        def finish() -> None:
            if not done.called:
                if timer.active():
                    timer.cancel()
                done.callback(None)

        def one_ended(result: None, worker: _Worker) -> None:
            remaining.discard(worker)
            if not remaining:
                finish()

        timer = self.reactor.callLater(timeout, finish)
        if not remaining:
            finish()
        for worker in workers:
            worker.ended.addCallback(one_ended, worker)
        return done

    def _close_sockets(self) -> None:
        for listen, sock in zip(self.listen, self.sockets, strict=False):
            listen.close(sock)
        self.sockets.clear()


def tag_worker_lines(
    observer_factory: Callable[[IO[str]], ILogObserver], worker: int, log_format: str
) -> Callable[[IO[str]], ILogObserver]:
    """
    ``observer_factory`` (``twist``'s log file observer factory) with every line marked
    as worker ``worker``'s, so that the workers' interleaved lines can be told apart:
    a ``"worker"`` field in JSON lines, ``[worker N]`` after the logger in text lines.
    """

    def tagged(out: IO[str]) -> ILogObserver:
        observer = observer_factory(out)
        if log_format == "json":

            def observe(event: LogEvent) -> None:
                observer({**event, "worker": worker})

        else:

            def observe(event: LogEvent) -> None:
                namespace = event.get("log_namespace", "-")
                observer({**event, "log_namespace": f"{namespace}[worker {worker}]"})

        return observe  # type: ignore[return-value]

    return tagged


def _fields(worker: _Worker) -> dict[str, Any]:
    return {"slot": worker.slot, "pid": worker.pid}
