"""The upstream target, and how a client's request target becomes the upstream URL."""

from __future__ import annotations

import pytest

from aiproxy.rules.target import (
    Target,
    TargetError,
    has_dot_segments,
    is_origin_form,
    local_target,
    parse_target,
)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "prefix", "origin"),
    [
        ("https://ai.megallm.io", "https", "ai.megallm.io", 443, b"", b"https://ai.megallm.io"),
        ("http://api.example", "http", "api.example", 80, b"", b"http://api.example"),
        ("http://api.example:80/", "http", "api.example", 80, b"", b"http://api.example"),
        ("https://api.example:443", "https", "api.example", 443, b"", b"https://api.example"),
        (
            "https://api.example:8443",
            "https",
            "api.example",
            8443,
            b"",
            b"https://api.example:8443",
        ),
        ("http://127.0.0.1:9000", "http", "127.0.0.1", 9000, b"", b"http://127.0.0.1:9000"),
        ("http://[::1]:9000", "http", "::1", 9000, b"", b"http://[::1]:9000"),
        ("https://[2001:db8::1]/", "https", "2001:db8::1", 443, b"", b"https://[2001:db8::1]"),
        (
            "https://bücher.example/v1",
            "https",
            "xn--bcher-kva.example",
            443,
            b"/v1",
            b"https://xn--bcher-kva.example",
        ),
        ("http://h.example/openai", "http", "h.example", 80, b"/openai", b"http://h.example"),
        ("http://h.example/openai/", "http", "h.example", 80, b"/openai", b"http://h.example"),
        ("http://h.example/a/b/", "http", "h.example", 80, b"/a/b", b"http://h.example"),
        ("http://h.example/%7Eu/", "http", "h.example", 80, b"/%7Eu", b"http://h.example"),
    ],
)
def test_parse_target(
    url: str, scheme: str, host: str, port: int, prefix: bytes, origin: bytes
) -> None:
    """An http(s) URL gives scheme, ASCII host, port (default by scheme) and path prefix."""
    target = parse_target(url)
    assert (target.scheme, target.host, target.port, target.prefix) == (scheme, host, port, prefix)
    assert target.origin == origin
    assert target.url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://files.example", "http:// or https://"),
        ("ws://api.example", "http:// or https://"),
        ("api.example", "http:// or https://"),
        ("api.example:443", "http:// or https://"),
        ("//api.example/x", "http:// or https://"),
        ("", "http:// or https://"),
        ("https://", "no host"),
        ("http:///path", "no host"),
        ("https://user:secret@api.example", "credentials"),
        ("https://user@api.example", "credentials"),
        ("https://api.example/?key=1", "query or fragment"),
        ("https://api.example/v1?", "query or fragment"),
        ("https://api.example/#top", "query or fragment"),
        ("https://api.example:0", "invalid port"),
        ("https://api.example:65536", "invalid port"),
        ("https://api.example:-1", "invalid port"),
        ("https://api.example:https", "not a URL"),
        ("https://api.example:/", "not a URL"),
        ("http://exa mple.com/", "invalid host"),
        ("http://a..b/", "invalid host"),
        ("http://h.example/ü", "percent-encoded"),
    ],
)
def test_parse_target_rejects(url: str, says: str) -> None:
    """Unusable upstream URLs are refused with a TargetError that explains why."""
    with pytest.raises(TargetError, match=says):
        parse_target(url)


@pytest.mark.parametrize(
    "url", [" https://api.example", "http://[zz]/", "http://\u2100/", "http://h.example/a b"]
)
def test_parse_target_rejects_malformed_urls_with_target_error(url: str) -> None:
    """A malformed URL is a TargetError (never a bare ValueError, never accepted)."""
    with pytest.raises(TargetError):
        parse_target(url)


def test_scheme_is_case_insensitive() -> None:
    """HTTPS://host works like https://host (RFC 3986: schemes are case-insensitive)."""
    target = parse_target("HTTPS://api.example/v1")
    assert (target.scheme, target.origin, target.prefix) == (
        "https",
        b"https://api.example",
        b"/v1",
    )


@pytest.mark.parametrize(
    ("base", "request_target", "url"),
    [
        ("https://api.example", b"/v1/models", b"https://api.example/v1/models"),
        ("https://api.example/", b"/v1/models", b"https://api.example/v1/models"),
        ("https://api.example/openai", b"/v1/chat", b"https://api.example/openai/v1/chat"),
        ("https://api.example/openai/", b"/v1/chat", b"https://api.example/openai/v1/chat"),
        ("https://api.example/openai", b"/", b"https://api.example/openai/"),
        ("http://[::1]:9000/p", b"/x", b"http://[::1]:9000/p/x"),
        ("https://api.example", b"/files/a%2Fb", b"https://api.example/files/a%2Fb"),
        ("https://api.example", b"/%7Euser", b"https://api.example/%7Euser"),
        ("https://api.example", b"/a/../b", b"https://api.example/a/../b"),
        ("https://api.example", b"/a//b", b"https://api.example/a//b"),
        ("https://api.example", b"/u@evil.example", b"https://api.example/u@evil.example"),
        ("https://api.example", b"/x?q=a%20b&q=c", b"https://api.example/x?q=a%20b&q=c"),
        (
            "https://api.example",
            b"/x?next=http://evil/",
            b"https://api.example/x?next=http://evil/",
        ),
    ],
)
def test_url_for_concatenates_bytes(base: str, request_target: bytes, url: bytes) -> None:
    """The upstream URL is origin + prefix + the request target, byte for byte, never re-quoted."""
    assert parse_target(base).url_for(request_target) == url


def test_url_for_always_names_the_target_host() -> None:
    """Whatever the path holds, the upstream URL starts with the configured origin."""
    target = Target("https", "api.example", 443, b"", "https://api.example")
    for request_target in [b"/@evil.example", b"/.evil.example", b"/:80@evil.example/"]:
        assert target.url_for(request_target).startswith(b"https://api.example/")


@pytest.mark.parametrize(
    ("request_target", "proxied"),
    [
        (b"/", True),
        (b"/x", True),
        (b"/v1/chat/completions?stream=true", True),
        (b"/a//b", True),
        (b"/@x", True),
        (b"//x", False),
        (b"//evil.example/x", False),
        (b"@x", False),
        (b"@evil.example/x", False),
        (b"http://evil/", False),
        (b"https://evil.example/x", False),
        (b"evil:443", False),
        (b"*", False),
        (b"", False),
        (b"x/y", False),
        (b"?q=1", False),
    ],
)
def test_is_origin_form(request_target: bytes, proxied: bool) -> None:
    """Only a path starting with exactly one '/' is proxied."""
    assert is_origin_form(request_target) is proxied


@pytest.mark.parametrize(
    ("request_target", "depth", "local"),
    [
        (b"/v1/models?x=/y", 0, b"/v1/models?x=/y"),
        (b"/", 0, b"/"),
        (b"/openai/v1/models?x=/y", 1, b"/v1/models?x=/y"),
        (b"/openai", 1, b"/"),
        (b"/openai/", 1, b"/"),
        (b"/openai?q=/a/b", 1, b"/?q=/a/b"),
        (b"/openai/v1%2Fx", 1, b"/v1%2Fx"),
        (b"/a/b/c/d?q=/e/f", 2, b"/c/d?q=/e/f"),
        (b"/a/b", 2, b"/"),
        (b"/a/b?q=/x/y/z", 2, b"/?q=/x/y/z"),
        (b"/a/b/?k=v", 2, b"/?k=v"),
        (b"/a/b//c", 2, b"//c"),
    ],
)
def test_local_target(request_target: bytes, depth: int, local: bytes) -> None:
    """Below a mount point the rest of the target is kept exactly, query '/'s included."""
    assert local_target(request_target, depth) == local


@pytest.mark.parametrize(
    ("request_target", "dotted"),
    [
        (b"/../secret", True),
        (b"/%2e%2e/secret", True),
        (b"/..%2Fsecret", True),
        (b"/v1/./models", True),
        (b"/v1/..", True),
        (b"/v1/.", True),
        (b"/.%2E/x", True),
        (b"/a\\..\\b", True),
        (b"/a%5c..%5cb", True),
        (b"/v1/models", False),
        (b"/v1/files/file-1.json", False),
        (b"/v1/...", False),
        (b"/v1/.well-known", False),
        (b"/v1/a..b", False),
        (b"/v1/%2e%2e%2e", False),
        (b"/x?a=/../b", False),
    ],
)
def test_has_dot_segments(request_target: bytes, dotted: bool) -> None:
    """``.`` and ``..`` segments are found plain and percent-encoded, only in the path."""
    assert has_dot_segments(request_target) is dotted
