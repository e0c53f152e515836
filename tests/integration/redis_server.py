"""
A real ``redis-server`` for the tests, on a free loopback port, with nothing saved
to disk; stopped (and restarted on the same port) by its PID.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs
import txredisapi
from twisted.internet import reactor

from .support import LOOPBACK, free_port, sleep, within

REDIS_SERVER = shutil.which("redis-server")


@attrs.define
class RedisServer:
    """One ``redis-server`` process of a test."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its ``REDIS_URL``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    async def start(self) -> None:
        """Start it and wait until it answers."""
        assert REDIS_SERVER is not None, "redis-server is not installed (apt install redis-server)"
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = reactor.seconds() + 5
        while True:
            try:
                client = await txredisapi.Connection(LOOPBACK, self.port, reconnect=False)
            except ValueError:  # txredisapi's "could not connect"
                assert reactor.seconds() < deadline, "redis-server did not start"
                await sleep(0.05)
            else:
                await client.disconnect()
                return

    def stop(self) -> None:
        """Stop it (``SIGTERM``, then ``SIGKILL``) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def start_redis(directory: Path) -> RedisServer:
    """A started ``redis-server`` on a free port, its files under ``directory``."""
    server = RedisServer(free_port(), directory)
    await server.start()
    return server


async def connect(server: RedisServer) -> txredisapi.ConnectionHandler:
    """A client connection to ``server`` that reconnects when it comes back."""
    return await within(
        txredisapi.Connection(LOOPBACK, server.port, reconnect=True, connectTimeout=1), 5
    )


__all__ = ["REDIS_SERVER", "RedisServer", "connect", "start_redis"]
