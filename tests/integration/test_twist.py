"""
``twist aiproxy`` as a user runs it: its help, its refusal of bad configuration, and a
real process serving the official OpenAI SDK in front of the fake upstream.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from aiproxy._version import __version__
from aiproxy.config import settings
from aiproxy.testing import FakeOpenAI

from .conftest import KEPT_PORTS, Upstream
from .processes import TwistProcess, run_twist
from .support import LOOPBACK, free_port, request, within


def test_help_lists_every_setting_with_its_environment_variable(tmp_path: Path) -> None:
    """``twist aiproxy --help`` exits 0 and names every setting's flag and environment
    variable, TARGET_URL, REQUEST_TIMEOUT and SSL_VERIFY among them."""
    result = run_twist(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name in ("TARGET_URL", "REQUEST_TIMEOUT", "SSL_VERIFY", "--port"):
        assert name in text
    for setting in settings():
        assert f"[env: {setting.env}]" in text
        assert f"--{setting.flag}=" in text


def _run_expecting_exit(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return run_twist(args, cwd, env, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twist aiproxy {' '.join(args)} started serving instead of exiting")


@pytest.mark.parametrize(
    ("args", "env", "dotenv", "named"),
    [
        (["--request-timeout=-1"], {}, "", "REQUEST_TIMEOUT"),
        (["--target=ftp://x"], {}, "", "TARGET_URL"),
        ([], {"REQUEST_TIMEOUT": "abc"}, "", "REQUEST_TIMEOUT"),
        ([], {}, "SSL_VERIFY=maybe\n", "SSL_VERIFY"),
        (["--log-level=LOUD"], {}, "", "LOG_LEVEL"),
        (["--port=nonsense:1"], {}, "", "--port"),
        (["--listen-port=99999"], {}, "", "PORT"),
        (["--port=tcp:99999"], {}, "", "tcp:99999"),
        (["--workers=2", "--port=tcp:99999"], {}, "", "tcp:99999"),
        (["--port=ssl:0:privateKey=missing.pem"], {}, "", "ssl:0:privateKey=missing.pem"),
        ([], {"CORS_ORIGINS": "not json"}, "", "CORS_ORIGINS"),
        (["--cors-origins=https://app.example/path"], {}, "", "CORS_ORIGINS"),
    ],
    ids=[
        "flag",
        "target-scheme",
        "environment",
        "dotenv",
        "log-level",
        "endpoint",
        "port-range",
        "endpoint-port-range",
        "workers-endpoint-port-range",
        "tls-key-missing",
        "cors-origin-not-json",
        "cors-origin-with-path",
    ],
)
def test_bad_configuration_fails_at_start_with_one_line_naming_the_setting(
    args: list[str], env: dict[str, str], dotenv: str, named: str, tmp_path: Path
) -> None:
    """A bad flag, environment variable or ``.env`` value makes ``twist aiproxy`` exit
    non-zero with a single line on stderr that names the setting, and no traceback."""
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    # Should the configuration be accepted after all, listen on loopback only.
    result = _run_expecting_exit(args, tmp_path, {"HOST": LOOPBACK, "PORT": "0", **env})
    line = _one_line_error(result)
    assert re.search(rf"(^|\W){re.escape(named)}(\W|$)", line), line


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused start printed (and nothing else, no traceback)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_an_invalid_dotenv_value_names_the_file_and_its_line(tmp_path: Path) -> None:
    """A bad value read from ``.env`` is reported with the setting, ``.env`` and the line
    it is on, so the user looks in the right place."""
    (tmp_path / ".env").write_text("# aiproxy\nHOST=127.0.0.1\n\nMAX_WORKERS=0\n")
    line = _one_line_error(_run_expecting_exit([], tmp_path))
    assert "MAX_WORKERS" in line
    assert "from .env, line 4" in line


def test_a_target_url_with_credentials_is_refused_without_showing_the_password(
    tmp_path: Path,
) -> None:
    """``TARGET_URL=https://user:password@host`` stops the start with one line that
    names ``TARGET_URL`` and says why, and the password appears nowhere in the output."""
    result = _run_expecting_exit([], tmp_path, {"TARGET_URL": "https://me:hunter2-pw@api.example"})
    line = _one_line_error(result)
    assert "TARGET_URL" in line
    assert "credentials" in line
    assert "hunter2-pw" not in result.stdout + result.stderr


def test_a_mistyped_flag_prints_the_error_and_a_hint_not_the_help(tmp_path: Path) -> None:
    """``twist aiproxy --graceful-timout=5`` exits with status 64 (usage), prints which
    option it did not recognise and one line pointing at ``--help``, not the whole help."""
    result = _run_expecting_exit(["--graceful-timout=5"], tmp_path)
    assert result.returncode == 64
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert "--graceful-timout" in lines[0]
    assert "twist aiproxy --help" in lines[1]
    assert "--request-timeout" not in result.stdout + result.stderr


def test_version_prints_aiproxys_version(tmp_path: Path) -> None:
    """``twist aiproxy --version`` prints aiproxy's own version (and Twisted's after it)
    and exits 0."""
    result = run_twist(["--version"], tmp_path, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"aiproxy {__version__} (Twisted ")


@pytest.mark.parametrize("problem", ["port in use", "address not on this host"])
def test_a_listener_that_cannot_start_fails_with_one_line(problem: str, tmp_path: Path) -> None:
    """When the listening port is taken, or its address is not on this host,
    ``twist aiproxy`` exits non-zero with one line naming the endpoint, not a
    traceback."""
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        if problem == "port in use":
            named = str(taken.getsockname()[1])
            endpoint = f"tcp:{named}:interface={LOOPBACK}"
        else:
            named = "192.0.2.1"  # TEST-NET-1: no interface has it
            endpoint = f"tcp:0:interface={named}"
        result = _run_expecting_exit(
            ["--target=http://127.0.0.1:9", f"--port={endpoint}"], tmp_path
        )
    assert named in _one_line_error(result)


# --- One twist process for the serving tests of this module ------------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def module_upstream() -> AsyncIterator[Upstream]:
    """The fake upstream, on the test reactor, for the whole module."""
    fake = FakeOpenAI(reactor)
    port = reactor.listenTCP(0, Site(fake), interface=LOOPBACK)
    number = port.getHost().port
    KEPT_PORTS.add(number)
    yield Upstream(fake, port, f"http://{LOOPBACK}:{number}")
    await within(port.stopListening(), 5)
    KEPT_PORTS.discard(number)


@pytest_twisted.async_yield_fixture(scope="module")
async def twist_proxy(
    module_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwistProcess]:
    """``twist aiproxy`` in front of the fake upstream, on a free loopback port."""
    process = TwistProcess.start(module_upstream.url, tmp_path_factory.mktemp("twist"))
    try:
        await process.wait_ready()
        yield process
    finally:
        await process.stop()


@pytest_twisted.ensureDeferred
async def test_twist_process_proxies_to_the_target(
    module_upstream: Upstream, twist_proxy: TwistProcess
) -> None:
    """A ``twist aiproxy`` process answers ``/api/ping`` itself and passes other
    requests to the target, path and query untouched."""
    before = module_upstream.stats.requests
    response, body = await request(b"GET", twist_proxy.url + "/api/ping")
    assert json.loads(body) == {"ping": "pong"}
    response, body = await request(b"GET", twist_proxy.url + "/echo/via%2Ftwist?q=%20x")
    assert response.code == 200
    echo = json.loads(body)
    assert echo["uri"] == "/echo/via%2Ftwist?q=%20x"
    assert ["X-Forwarded-For", "127.0.0.1"] in echo["headers"]
    assert module_upstream.stats.requests == before + 1


def test_start_is_logged_in_one_line_saying_how_aiproxy_is_set_up(
    module_upstream: Upstream, twist_proxy: TwistProcess
) -> None:
    """At start, one INFO line (a JSON line, as the log is not a terminal) names
    aiproxy's version, the target, every listener, the workers, and which of metrics,
    docs, CORS and access keys are on."""
    records = [json.loads(line) for line in twist_proxy.whole_log().splitlines()]
    (start,) = [r for r in records if r["message"].startswith("aiproxy ")]
    assert start["level"] == "INFO"
    assert start["message"] == (
        f"aiproxy {__version__} starting: target {module_upstream.url},"
        f" listening on tcp:{twist_proxy.port}:interface={LOOPBACK}, 1 worker(s),"
        " metrics on, docs on, CORS on, access keys off"
    )
    assert (start["version"], start["workers"]) == (__version__, 1)


def _sdk(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{port}/v1", api_key="sk-test", max_retries=0, timeout=10
    )


def _chat(port: int) -> Any:
    with _sdk(port) as client:
        return client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}]
        )


def _chat_streamed(port: int) -> list[Any]:
    with _sdk(port) as client:
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        return list(stream)


def _models(port: int) -> list[str]:
    with _sdk(port) as client:
        return [model.id for model in client.models.list()]


@pytest_twisted.ensureDeferred
async def test_openai_sdk_chat_completion_through_twist(twist_proxy: TwistProcess) -> None:
    """The official OpenAI SDK pointed at ``twist aiproxy`` gets the upstream's chat
    completion."""
    completion = await within(deferToThread(_chat, twist_proxy.port), 20)
    assert completion.choices[0].message.content == "Hello there"
    assert completion.model == "fake-model"
    assert completion.usage.total_tokens == 5


@pytest_twisted.ensureDeferred
async def test_openai_sdk_streaming_chat_completion_through_twist(
    module_upstream: Upstream, twist_proxy: TwistProcess
) -> None:
    """With ``stream=True`` the SDK receives every chunk of the upstream's stream, in
    order."""
    completed = module_upstream.stats.streams_completed
    chunks = await within(deferToThread(_chat_streamed, twist_proxy.port), 20)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert module_upstream.stats.streams_completed == completed + 1


@pytest_twisted.ensureDeferred
async def test_openai_sdk_lists_models_through_twist(twist_proxy: TwistProcess) -> None:
    """``client.models.list()`` through ``twist aiproxy`` returns the upstream's models."""
    assert await within(deferToThread(_models, twist_proxy.port), 20) == ["fake-model"]


@pytest_twisted.ensureDeferred
async def test_twist_process_exits_cleanly_on_sigterm(
    module_upstream: Upstream, tmp_path: Path
) -> None:
    """
    SIGTERM makes a serving ``twist aiproxy`` shut down in order (listener and
    upstream pool closed, main loop ended) and exit; like every ``twist`` program it
    then re-raises the signal, so the status says "terminated by SIGTERM".
    """
    process = TwistProcess.start(module_upstream.url, tmp_path)
    try:
        await process.wait_ready()
        response, _ = await request(b"GET", process.url + "/v1/models")
        assert response.code == 200
    finally:
        status = await process.stop()
    assert status in (0, -signal.SIGTERM), process.log()
    assert "Main loop terminated" in process.log()
    with pytest.raises(Exception, match="refused"):
        await request(b"GET", process.url + "/api/ping", timeout=5)
    assert free_port()  # the test leaves no listener behind
