"""Several upstreams, pure: the file, passive health of upstreams and keys, and the
choice of an upstream and a key for each attempt."""

from __future__ import annotations

import collections
import random
import re
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from aiproxy.access.policy import access_policy
from aiproxy.config import Config, ConfigError
from aiproxy.routing.choose import Choice, NotServed, Router, Unavailable
from aiproxy.routing.health import (
    DEFAULT_COOLDOWN,
    EJECT_AFTER,
    FIRST_EJECTION,
    MAX_COOLDOWN,
    MAX_EJECTION,
    KeyHealth,
    UpstreamHealth,
)
from aiproxy.routing.upstreams import (
    UpstreamsFileError,
    configured_upstreams,
    fingerprint,
    parse_upstreams,
)

TWO = """
[[upstream]]
name = "a"
url = "https://a.example/v1"
keys = ["sk-a-one", "sk-a-two"]
weight = 3

[[upstream]]
name = "b"
url = "https://b.example"
key_envs = ["B_KEY"]
auth_header = "x-api-key"
models = ["claude-*"]
priority = 1
"""


def router(text: str = TWO, **environ: str) -> tuple[Router, Clock]:
    clock = Clock()
    entries = parse_upstreams(text, {"B_KEY": "sk-b", **environ})
    return Router(entries, clock, random.Random(7).random), clock


def choice(result: Choice | Unavailable | NotServed) -> Choice:
    assert isinstance(result, Choice), result
    return result


# --- the file ---------------------------------------------------------------------------


def test_the_file_gives_each_upstream_with_its_keys(tmp_path: Path) -> None:
    """Names, URLs, keys from the file, the environment and files, the auth header
    style, weights, priorities, models and connection limits."""
    (tmp_path / "k").write_text("sk-from-file\n")
    [a, b] = parse_upstreams(
        TWO.replace('key_envs = ["B_KEY"]', 'key_envs = ["B_KEY"]\nkey_files = ["k"]'),
        {"B_KEY": "sk-b"},
        tmp_path,
    )
    assert (a.name, a.target.origin, a.target.prefix) == ("a", b"https://a.example", b"/v1")
    assert [k.value for k in a.keys] == ["sk-a-one", "sk-a-two"]
    assert [k.value for k in b.keys] == ["sk-b", "sk-from-file"]
    assert b.keys[0].fingerprint == fingerprint("sk-b") and len(fingerprint("x")) == 8
    assert (a.weight, a.priority, b.priority, b.auth_header) == (3.0, 0, 1, "x-api-key")
    assert a.serves("gpt-4o") and a.serves(None)
    assert b.serves("claude-3-haiku") and not b.serves("gpt-4o") and b.serves(None)
    assert b.keys[0].header("x-api-key") == (b"x-api-key", b"sk-b")
    assert a.keys[0].header("authorization") == (b"Authorization", b"Bearer sk-a-one")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[upstream]]\nurl = 'https://a'", "upstream 1: name:"),
        ("[[upstream]]\nname = 'a'", "upstream 1 (a): url: missing"),
        ("[[upstream]]\nname = 'a'\nurl = 'ftp://a'", "upstream 1 (a): url:"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nweight = 0", "(a): weight:"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\npriority = -1", "(a): priority:"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nauth_header = 'cookie'", "auth_header:"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nmodels = 'gpt'", "(a): models:"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nkey_envs = ['NOPE']", "key_envs: 'NOPE'"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nkeys = ['']", "keys: must be a list"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\nport = 1", "(a): port: unknown field"),
        ("[[upstream]]\nname = 'a'\nurl = 'https://a'\n" * 2, "'a': name: used by more"),
        ("x = 1", "unknown top-level name(s) x; use [[upstream]]"),
        ("", "no [[upstream]] table"),
        ("[[upstream]\n", "not valid TOML"),
    ],
)
def test_an_invalid_file_is_refused_naming_the_entry_and_field(text: str, message: str) -> None:
    """One message that says which upstream and which field is wrong."""
    with pytest.raises(UpstreamsFileError, match=re.escape(message)):
        parse_upstreams(text, {})


def test_a_key_is_never_shown_in_a_message() -> None:
    """Even a malformed entry does not put its literal key into the error."""
    with pytest.raises(UpstreamsFileError) as raised:
        parse_upstreams("[[upstream]]\nname = 'a'\nurl = 'nope'\nkeys = ['sk-secret-123']", {})
    assert "sk-secret-123" not in str(raised.value)


# --- health -----------------------------------------------------------------------------


def test_a_rate_limited_key_cools_for_what_was_asked_within_the_cap() -> None:
    """``429`` with a wait cools the key that long (capped); without one, the default."""
    key = KeyHealth()
    key.cool(100.0, 2.0)
    assert (key.state(101.9), key.usable(101.9), key.state(102.0)) == ("cooling", False, "healthy")
    key.cool(200.0, 10_000)
    assert key.usable(200.0 + MAX_COOLDOWN) and not key.usable(200.0 + MAX_COOLDOWN - 0.1)
    key.cool(300.0, None)
    assert key.usable(300.0 + DEFAULT_COOLDOWN)


def test_a_refused_key_stays_disabled() -> None:
    """``401``/``403`` disables a key for good (until the file is loaded again)."""
    key = KeyHealth()
    key.disable()
    assert key.state(10**9) == "disabled" and not key.usable(10**9)


def test_failures_in_a_row_eject_with_doubling_and_one_half_open_probe() -> None:
    """``EJECT_AFTER`` failures eject; when the ejection is over, one probe may go; its
    failure ejects for twice as long, its success brings the upstream back."""
    health = UpstreamHealth()
    for _ in range(EJECT_AFTER - 1):
        health.failed(0.0)
    assert health.state(0.0) == "healthy"
    health.failed(0.0)
    assert health.state(FIRST_EJECTION - 0.1) == "ejected"
    assert health.available_in(1.0) == FIRST_EJECTION - 1.0
    assert health.state(FIRST_EJECTION) == "half_open" and health.usable(FIRST_EJECTION)
    health.sent(FIRST_EJECTION)
    assert not health.usable(FIRST_EJECTION)  # the probe is out
    health.failed(FIRST_EJECTION)
    assert health.state(FIRST_EJECTION + 2 * FIRST_EJECTION - 0.1) == "ejected"
    now = 3 * FIRST_EJECTION
    health.sent(now)
    health.succeeded()
    assert health.state(now) == "healthy" and health.usable(now)


def test_ejections_do_not_grow_beyond_the_cap() -> None:
    """However often the probe fails, an ejection lasts at most ``MAX_EJECTION``."""
    health = UpstreamHealth()
    now = 0.0
    for _ in range(EJECT_AFTER):
        health.failed(now)
    for _ in range(20):
        now = health.ejected_until
        health.sent(now)
        health.failed(now)
    assert health.ejected_until - now == MAX_EJECTION


# --- choosing ---------------------------------------------------------------------------


def test_weights_share_the_picks() -> None:
    """Two upstreams of the same priority, weights 3:1: about 3 picks in 4 go to the first."""
    clock = Clock()
    text = TWO.replace("priority = 1", "priority = 0").replace('models = ["claude-*"]', "")
    chooser = Router(parse_upstreams(text, {"B_KEY": "k"}), clock, random.Random(1).random)
    picks = (choice(chooser.choose("gpt-4o")).upstream.name for _ in range(4000))
    counts = collections.Counter(picks)
    assert abs(counts["a"] / 4000 - 0.75) <= 0.03


def test_a_request_naming_no_model_goes_to_the_first_available() -> None:
    """No model: the first upstream of the lowest priority in file order, every time;
    the next one while it is ejected."""
    chooser, _ = router(
        TWO.replace("priority = 1", "priority = 0").replace('models = ["claude-*"]', "")
    )
    assert {choice(chooser.choose(None)).upstream.name for _ in range(50)} == {"a"}
    a = choice(chooser.choose(None))
    for _ in range(EJECT_AFTER):
        chooser.failed(a)
    assert choice(chooser.choose(None)).upstream.name == "b"


def test_the_lowest_priority_that_serves_the_model_wins() -> None:
    """a (priority 0) serves ``gpt-*``, b (priority 1) ``claude-*``: each model goes to
    the upstream that serves it; a request naming no model goes to a."""
    chooser, _ = router(TWO.replace("weight = 3", 'weight = 3\nmodels = ["gpt-*"]'))
    assert choice(chooser.choose("claude-3-haiku")).upstream.name == "b"
    assert choice(chooser.choose("gpt-4o")).upstream.name == "a"
    assert choice(chooser.choose(None)).upstream.name == "a"


def test_a_lower_priority_serving_every_model_wins_over_a_specific_one() -> None:
    """An upstream without a model list serves every model, so priority decides."""
    chooser, _ = router()
    assert choice(chooser.choose("claude-3-haiku")).upstream.name == "a"


def test_a_model_nobody_serves_is_not_served() -> None:
    """When every upstream lists its models and none matches: ``NotServed``."""
    chooser, _ = router(
        TWO.replace('keys = ["sk-a-one", "sk-a-two"]', 'keys = ["k"]\nmodels = ["gpt-*"]')
    )
    assert chooser.choose("mistral-large") == NotServed("mistral-large")


def test_an_ejected_upstream_is_skipped_until_its_probe() -> None:
    """a fails three times in a row: its requests go to b until a's ejection is over."""
    chooser, clock = router(TWO.replace('models = ["claude-*"]', ""))
    first = choice(chooser.choose(None))
    for _ in range(EJECT_AFTER):
        chooser.failed(first)
    assert choice(chooser.choose(None)).upstream.name == "b"
    clock.advance(FIRST_EJECTION)
    assert choice(chooser.choose(None)).upstream.name == "a"  # the probe
    assert choice(chooser.choose(None)).upstream.name == "b"  # while it is out


def test_a_cooling_key_is_skipped_and_the_other_key_used() -> None:
    """a's first key answered ``429``: a's other key serves meanwhile."""
    chooser, clock = router()
    picks = {choice(chooser.choose("gpt-4o")).key for _ in range(50)}
    assert {k.value for k in picks if k} == {"sk-a-one", "sk-a-two"}
    one = Choice(chooser.upstreams[0], chooser.upstreams[0].keys[0])
    chooser.rate_limited(one, 2.0)
    assert {choice(chooser.choose("gpt-4o")).key.value for _ in range(50)} == {"sk-a-two"}  # type: ignore[union-attr]
    clock.advance(2)
    assert len({choice(chooser.choose("gpt-4o")).key for _ in range(50)}) == 2


def test_a_refused_key_is_disabled_and_the_other_used() -> None:
    """a's second key answered ``401``: only its first key is used from then on."""
    chooser, _ = router()
    two = Choice(chooser.upstreams[0], chooser.upstreams[0].keys[1])
    chooser.refused_key(two)
    assert {choice(chooser.choose("gpt-4o")).key.value for _ in range(50)} == {"sk-a-one"}  # type: ignore[union-attr]


def test_when_nothing_is_available_the_shortest_wait_is_given() -> None:
    """Every key of every serving upstream cooling: ``Unavailable`` with the wait of the
    first to come back."""
    chooser, _ = router(TWO.replace('models = ["claude-*"]', ""))
    a, b = chooser.upstreams
    for key, wait in ((a.keys[0], 9.0), (a.keys[1], 5.0), (b.keys[0], 7.0)):
        chooser.rate_limited(Choice(a if key in a.keys else b, key), wait)
    assert chooser.choose(None) == Unavailable(5.0)


def test_tried_upstreams_are_skipped() -> None:
    """A failover does not go back to an upstream the request already tried."""
    chooser, _ = router(TWO.replace('models = ["claude-*"]', ""))
    assert choice(chooser.choose(None, tried={"a"})).upstream.name == "b"
    assert isinstance(chooser.choose(None, tried={"a", "b"}), Unavailable)


def test_a_sticky_caller_keeps_its_upstream_and_key() -> None:
    """With the same sticky string, the pick is the same every time."""
    chooser, _ = router(
        TWO.replace("priority = 1", "priority = 0").replace('models = ["claude-*"]', "")
    )
    picks = {choice(chooser.choose("m", sticky="alice")) for _ in range(20)}
    assert len(picks) == 1
    callers = {choice(chooser.choose("m", sticky=f"user-{n}")).upstream.name for n in range(40)}
    assert callers == {"a", "b"}


def test_tried_keys_are_skipped_and_then_the_upstream() -> None:
    """After a key failed a request, the request's next choice is the upstream's other
    key; with both tried, another upstream."""
    chooser, _ = router(TWO.replace('models = ["claude-*"]', ""))
    a = chooser.upstreams[0]
    one, two = (k.fingerprint for k in a.keys)
    assert {choice(chooser.choose("m", tried_keys={one})).key for _ in range(20)} == {a.keys[1]}
    assert choice(chooser.choose("m", tried_keys={one, two})).upstream.name == "b"


def test_answers_move_health() -> None:
    """``429`` cools the key for the wait asked, ``401`` disables it, a ``5xx`` counts
    against the upstream, anything else is a success."""
    chooser, clock = router(TWO.replace('models = ["claude-*"]', ""))
    a = chooser.upstreams[0]
    one, two = (Choice(a, key) for key in a.keys)
    chooser.answered(one, 429, 3.0)
    chooser.answered(two, 401, None)
    assert choice(chooser.choose("m")).upstream.name == "b"
    report = {u["name"]: u for u in chooser.report()}
    assert report["a"]["state"] == "cooling" and report["a"]["seconds_left"] == 3.0
    assert [k["state"] for k in report["a"]["keys"]] == ["cooling", "disabled"]  # type: ignore[index,union-attr]
    clock.advance(3)
    assert {k["state"] for k in chooser.report()[0]["keys"]} == {"healthy", "disabled"}  # type: ignore[union-attr]
    b = choice(chooser.choose("m", tried={"a"}))
    for _ in range(EJECT_AFTER - 1):
        chooser.answered(b, 503, None)
    chooser.answered(b, 200, None)  # a success in between: the count starts again
    chooser.answered(b, 503, None)
    assert chooser.report()[1]["state"] == "healthy"
    for _ in range(EJECT_AFTER):
        chooser.answered(b, 502, None)
    assert chooser.report()[1] == {
        "name": "b",
        "state": "ejected",
        "seconds_left": FIRST_EJECTION,
        "keys": [{"fingerprint": fingerprint("sk-b"), "state": "healthy"}],
    }


def test_every_key_disabled_is_reported_and_waits_forever() -> None:
    """An upstream whose keys are all disabled is ``disabled``; alone, it is unavailable
    with no end."""
    chooser, _ = router(
        TWO.replace('models = ["claude-*"]', "").replace("priority = 1", "priority = 0")
    )
    for upstream in chooser.upstreams:
        for key in upstream.keys:
            chooser.answered(Choice(upstream, key), 403, None)
    assert [u["state"] for u in chooser.report()] == ["disabled", "disabled"]
    assert chooser.choose("m") == Unavailable(float("inf"))


def test_an_abandoned_probe_lets_another_request_probe() -> None:
    """The probe's client left before its answer: the next request is the probe."""
    chooser, clock = router(TWO.replace('models = ["claude-*"]', ""))
    a = choice(chooser.choose(None))
    for _ in range(EJECT_AFTER):
        chooser.failed(a)
    clock.advance(FIRST_EJECTION)
    probe = choice(chooser.choose(None))
    assert probe.upstream.name == "a"
    assert choice(chooser.choose(None)).upstream.name == "b"
    chooser.abandoned(probe)
    assert choice(chooser.choose(None)).upstream.name == "a"


# --- the setting ------------------------------------------------------------------------


def test_upstreams_file_setting(tmp_path: Path) -> None:
    """``UPSTREAMS_FILE`` is read with its keys' files relative to it; an invalid file,
    or ``UPSTREAM_API_KEY`` as well, stops start-up with one line naming the file and
    the field, never a key."""
    (tmp_path / "b.key").write_text("sk-b-secret\n")
    path = tmp_path / "upstreams.toml"
    path.write_text(TWO.replace('key_envs = ["B_KEY"]', 'key_files = ["b.key"]'))
    [_, b] = configured_upstreams(Config(upstreams_file=str(path)))
    assert [k.value for k in b.keys] == ["sk-b-secret"]
    assert configured_upstreams(Config()) == ()
    with pytest.raises(ConfigError, match="UPSTREAM_API_KEY"):
        configured_upstreams(Config(upstreams_file=str(path), upstream_api_key="sk-x"))
    path.write_text(TWO.replace("weight = 3", "weight = -1"))
    with pytest.raises(ConfigError) as error:
        configured_upstreams(Config(upstreams_file=str(path)))
    assert str(error.value) == (
        f"UPSTREAMS_FILE (--upstreams-file): {path}: upstream 1 (a): weight:"
        " must be a number above 0"
    )
    assert "sk-a" not in str(error.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        configured_upstreams(Config(upstreams_file=str(tmp_path / "missing.toml")))


def test_upstream_keys_without_access_keys_are_no_open_relay() -> None:
    """A file holding keys, no access keys, a public listener: start-up stops (as with
    ``UPSTREAM_API_KEY``); on loopback, or with ``AUTH=none``, it may run."""
    public = Config(listen=("tcp:8080",))
    with pytest.raises(ConfigError, match="UPSTREAMS_FILE has keys"):
        access_policy(public, upstream_keys=True)
    assert access_policy(public, upstream_keys=False).credentials is None
    assert access_policy(Config(listen=("tcp:8080:interface=127.0.0.1",)), upstream_keys=True)
    assert access_policy(Config(listen=("tcp:8080",), auth="none"), upstream_keys=True)


def test_an_upstream_without_keys_is_not_skipped_for_tried_keys() -> None:
    """Regression: after a key of ``a`` failed, ``b`` (which has no keys: its clients'
    own credentials pass) is still a choice."""
    chooser, _ = router(
        TWO.replace('key_envs = ["B_KEY"]', "").replace('models = ["claude-*"]', "")
    )
    a = chooser.upstreams[0]
    tried = {k.fingerprint for k in a.keys}
    assert choice(chooser.choose("m", tried_keys=tried)) == Choice(chooser.upstreams[1], None)
