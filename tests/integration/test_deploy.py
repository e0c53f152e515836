"""
What the deployment files rely on, tested without systemd or a container engine:

- socket activation (``contrib/systemd/aiproxy.socket``): ``twist aiproxy --port
  systemd:domain=INET:index=0`` serves on a listening socket it inherits as fd 3, with
  ``LISTEN_FDS``/``LISTEN_PID`` set as systemd sets them;
- the container image (``Dockerfile``): the wheel installed into a fresh venv, its plugin
  cache generated at install time, ``site-packages`` read-only, run as an unprivileged
  user, starts without plugin-cache warnings, answers ``/api/health``, and the image's
  ``HEALTHCHECK`` command tells a serving proxy from a missing one; and the image's
  plugin cache, in the same layout, stays valid with whole-second file times.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from twisted.internet.threads import deferToThread

from .conftest import Upstream
from .processes import TWIST, TwistProcess, clean_environment
from .support import LOOPBACK, free_port, request, within

REPO = Path(__file__).resolve().parents[2]
"""The project's root: the directory of ``pyproject.toml`` and the ``Dockerfile``."""

PLUGIN_CACHE_WARNINGS = ("dropin.cache", "plugin cache", "Permission denied", "cannot be written")
"""What Twisted writes when it cannot write its plugin cache (and rescans every start)."""

# Started as ``python -c LAUNCHER FD PROGRAM ARGS...``: puts the inherited socket FD at
# fd 3 and sets the variables systemd sets, with LISTEN_PID the PID that PROGRAM will
# have (exec keeps it), then becomes PROGRAM. Twisted's ListenFDs ignores LISTEN_FDS
# unless LISTEN_FDNAMES names as many descriptors (systemd 227 and later set it; its
# default is the socket unit's name).
LAUNCHER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "aiproxy.socket"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def _assert_stops_cleanly(status: int, twist: TwistProcess) -> None:
    """After SIGTERM, ``twist`` drains, then ends by the signal (or with 0)."""
    assert status in (0, -signal.SIGTERM), twist.log()
    assert "Main loop terminated" in twist.log()


def _listening_socket() -> socket.socket:
    """A TCP socket listening on a free loopback port, as ``aiproxy.socket`` makes one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(64)
    return sock


async def test_socket_activation_serves_on_the_inherited_socket(
    upstream: Upstream, tmp_path: Path
) -> None:
    """With a listening socket inherited as fd 3 and ``LISTEN_FDS=1``/``LISTEN_PID`` set,
    ``twist aiproxy --port systemd:domain=INET:index=0`` answers ``/api/ping`` and proxies
    a request on that socket, and stops cleanly on SIGTERM."""
    sock = _listening_socket()
    port = sock.getsockname()[1]
    try:
        twist = TwistProcess.spawn(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                str(sock.fileno()),
                TWIST,
                "aiproxy",
                f"--target={upstream.url}",
                "--port=systemd:domain=INET:index=0",
            ],
            port,
            tmp_path,
            clean_environment(PYTHONUNBUFFERED="1"),
            pass_fds=(sock.fileno(),),
        )
    finally:
        # The child has its own copy; connections now reach only the child.
        sock.close()
    try:
        await twist.wait_ready()
        before = upstream.stats.requests
        response, body = await request(b"GET", twist.url + "/v1/models")
        assert response.code == 200, body
        assert json.loads(body)["data"][0]["id"] == "fake-model"
        assert upstream.stats.requests == before + 1
        _assert_stops_cleanly(await twist.stop(), twist)
    finally:
        await twist.stop()


# --- The container image's runtime, without a container ------------------------------


def _healthcheck_command() -> list[str]:
    """The exec-form command of the Dockerfile's ``HEALTHCHECK``."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, "the Dockerfile has no exec-form HEALTHCHECK"
    command: list[str] = json.loads(match.group(1))
    return command


def _unprivileged() -> dict[str, object]:
    """``subprocess`` arguments that run a command as ``nobody`` when the tests run as
    root (and as the current user otherwise). Not ``runuser``: it would stand between the
    test and the process, and end with SIGTERM itself when that is forwarded."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _run_unprivileged(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` to completion, as ``nobody`` when the tests run as root."""
    unprivileged = _unprivileged()
    return subprocess.run(  # type: ignore[call-overload]
        command, timeout=20, capture_output=True, check=False, **unprivileged
    )


@attrs.frozen
class InstalledVenv:
    """The wheel of this project installed the way the Dockerfile installs it."""

    root: Path
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def twist(self) -> str:
        return str(self.venv / "bin" / "twist")


def _run(command: list[str], timeout: float = 300) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.fixture(scope="module")
def installed_venv() -> Iterator[InstalledVenv]:
    """
    ``pip wheel --no-deps`` of the repository, installed with its dependencies into a
    fresh venv of the system Python (readable by every user), plugin cache generated,
    then the whole venv made read-only. Removed afterwards.
    """
    # Not pytest's tmp_path: its parents are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="aiproxy-deploy-"))
    root.chmod(0o755)
    venv = root / "venv"
    try:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(root), str(REPO)])
        (wheel,) = root.glob("aiproxy-*.whl")
        base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        _run([base, "-m", "venv", str(venv)])
        pip = str(venv / "bin" / "pip")
        _run([pip, "install", "--quiet", "--disable-pip-version-check", str(wheel)])
        _run([str(venv / "bin" / "python"), "-m", "aiproxy.run.plugin_cache"])
        caches = list(venv.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
        assert caches, "the plugin cache was not written"
        _run(["chmod", "-R", "a-w", str(venv)])
        yield InstalledVenv(root, venv)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
async def test_installed_wheel_runs_unprivileged_on_read_only_site_packages(
    installed_venv: InstalledVenv, upstream: Upstream
) -> None:
    """As the image runs it: an unprivileged user, ``site-packages`` read-only, settings
    from the environment only (``TARGET_URL``, ``HOST``, ``PORT``), no ``--port``. It
    starts without plugin-cache warnings, ``/api/health`` answers 200, a request is
    proxied, and the Dockerfile's ``HEALTHCHECK`` command passes against it."""
    port = free_port()
    environment = {
        "PATH": f"{installed_venv.venv / 'bin'}:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TARGET_URL": upstream.url,
        "HOST": LOOPBACK,
        "PORT": str(port),
    }
    command = ["env", "-i", *(f"{k}={v}" for k, v in environment.items())]
    twist = TwistProcess.spawn(
        [*command, installed_venv.twist, "aiproxy"],
        port,
        installed_venv.root,  # not writable by nobody, like the image's /app
        None,
        **_unprivileged(),
    )
    try:
        await twist.wait_ready()
        if os.geteuid() == 0:
            assert twist.status_kb("Uid") == pwd.getpwnam("nobody").pw_uid  # real UID
        response, body = await request(b"GET", twist.url + "/api/health")
        assert response.code == 200, body
        assert json.loads(body)["status"] == "healthy"
        response, body = await request(b"GET", twist.url + "/v1/models")
        assert response.code == 200, body

        healthcheck = _healthcheck_command()
        assert healthcheck[0] == "/opt/aiproxy/bin/python"
        probe = [*command, installed_venv.python, *healthcheck[1:]]
        passed = await within(deferToThread(_run_unprivileged, probe), 25)
        assert passed.returncode == 0, (passed.stdout, passed.stderr)

        _assert_stops_cleanly(await twist.stop(), twist)
        log_text = twist.log()
        for warning in PLUGIN_CACHE_WARNINGS:
            assert warning not in log_text, log_text

        # Nothing listens any more: the same check fails (exit status 1).
        failed = await within(deferToThread(_run_unprivileged, probe), 25)
        assert failed.returncode == 1, (failed.stdout, failed.stderr)
    finally:
        await twist.stop()


# --- The image's plugin cache, in the same layout --------------------------------------


def _as_in_an_image_layer(root: Path) -> None:
    """Cut every file's times under ``root`` to whole seconds, as an image layer (a tar
    archive) keeps them."""
    for path in root.rglob("*"):
        status = path.stat()
        os.utime(path, (math.floor(status.st_atime), math.floor(status.st_mtime)))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its modification time and size."""
    return {
        str(path.relative_to(root)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in root.rglob("*")
    }


async def test_image_plugin_cache_is_valid_so_a_start_writes_nothing_under_site_packages(
    upstream: Upstream, tmp_path: Path
) -> None:
    """
    The image's layout: a ``site-packages`` with ``twisted/plugins/aiproxy_plugin.py``,
    installed in the same second as the Dockerfile's plugin-cache step runs, and its
    ``dropin.cache`` written by that step; then every time cut to whole seconds as in
    an image layer. ``twist aiproxy`` started on it serves and writes nothing under
    ``site-packages`` (an invalid cache would be rewritten at every start, and fail
    with "Unable to write to plugin cache" as the image's unprivileged user).
    """
    command = "/opt/aiproxy/bin/python -m aiproxy.run.plugin_cache"
    assert f"RUN {command}\n" in (REPO / "Dockerfile").read_text()
    site = tmp_path / "site-packages"
    plugins = site / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    # Under another module name: where aiproxy is installed already (CI's venv), its own
    # aiproxy_plugin would shadow this one, and Twisted would write no cache here.
    plugin = plugins / "aiproxy_image_plugin.py"
    shutil.copy(REPO / "twisted" / "plugins" / "aiproxy_plugin.py", plugin)
    # Written late in this second: the cache step below runs within the same second.
    now = time.time()
    os.utime(plugin, (now, math.floor(now) + 0.999))
    python_path = {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    step = subprocess.run(
        [sys.executable, *command.split()[1:]],
        cwd=tmp_path,
        env=clean_environment(**python_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert step.returncode == 0, step.stderr
    assert (plugins / "dropin.cache").exists()
    _as_in_an_image_layer(site)
    before = _snapshot(site)

    twist = TwistProcess.start(upstream.url, tmp_path, env=python_path)
    try:
        await twist.wait_ready()
    finally:
        await twist.stop()
    assert _snapshot(site) == before
    assert "plugin cache" not in twist.whole_log()
