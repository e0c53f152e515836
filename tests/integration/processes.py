"""
Running ``twist aiproxy`` as a real process: started with an explicit loopback port,
waited for by polling ``/api/ping``, stopped with SIGTERM by its own PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from aiproxy.config import settings

from .support import LOOPBACK, free_port, request, sleep, within

TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
"""The ``twist`` script of the Python running the tests."""


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any aiproxy setting or HTTP proxy, plus
    ``extra``."""
    names = {s.env for s in settings()}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in names and not key.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def run_twist(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``twist aiproxy ARGS`` to completion (for commands that exit by themselves)."""
    return subprocess.run(
        [TWIST, "aiproxy", *args],
        cwd=cwd,
        env=clean_environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@attrs.define
class TwistProcess:
    """A running ``twist aiproxy`` listening on ``127.0.0.1:port``."""

    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @classmethod
    def start(
        cls, target_url: str, directory: Path, *args: str, env: dict[str, str] | None = None
    ) -> TwistProcess:
        """Start ``twist aiproxy`` in front of ``target_url``, logging to a file, with
        ``env`` added to a clean environment."""
        port = free_port()
        command = [
            TWIST,
            "aiproxy",
            f"--target={target_url}",
            f"--port=tcp:{port}:interface={LOOPBACK}",
            *args,
        ]
        environment = clean_environment(PYTHONUNBUFFERED="1", **(env or {}))
        return cls.spawn(command, port, directory, environment)

    @classmethod
    def spawn(
        cls,
        command: list[str],
        port: int,
        directory: Path,
        env: dict[str, str] | None,
        **popen: Any,
    ) -> TwistProcess:
        """Run ``command``, a ``twist aiproxy`` that listens on ``127.0.0.1:port``, in
        ``directory`` with the environment ``env`` (this one's if L{None}) and the other
        ``subprocess.Popen`` arguments ``popen``; its output goes to a log file there."""
        output = directory / f"twist-{port}.log"
        with output.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, **popen
            )
        return cls(process, port, output)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        """Everything the process wrote so far (its last 4000 characters)."""
        return self.whole_log()[-4000:]

    def whole_log(self) -> str:
        """Everything the process wrote so far."""
        return self.output.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20) -> None:
        """Poll ``/api/ping`` until it answers."""
        start = reactor.seconds()
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"twist exited with {self.process.returncode}:\n{self.log()}")
            try:
                response, _ = await request(b"GET", self.url + "/api/ping", timeout=2)
            except Exception:
                pass
            else:
                if response.code == 200:
                    return
            if reactor.seconds() - start > timeout:
                raise AssertionError(f"twist did not answer within {timeout}s:\n{self.log()}")
            await sleep(0.05)

    async def stop(self, timeout: float = 10) -> int:
        """SIGTERM this process (by its PID) and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            await within(deferToThread(self.process.wait, timeout), timeout + 1)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            await within(deferToThread(self.process.wait, timeout), timeout + 1)
        return self.process.returncode

    def status_kb(self, field: str) -> int:
        """A memory figure from ``/proc/PID/status``, such as ``VmHWM``, in kB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)
