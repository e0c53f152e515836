"""Secrets never reach a log line: header values, URL keys and passwords, keys in text."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from aiproxy.rules.redact import (
    is_key_shaped,
    is_secret_name,
    loggable,
    redact_headers,
    redact_text,
    redact_url,
)

KEY = "sk-live-PLANTED0123456789"


def casings(name: str) -> list[str]:
    """``name`` as written, in lower case, in upper case and in title case."""
    return sorted({name, name.lower(), name.upper(), name.title()})


SECRET_PARAMS = [
    "key",
    "api_key",
    "apikey",
    "api-key",
    "apiKey",
    "access_token",
    "refresh_token",
    "token",
    "secret",
    "client_secret",
    "password",
    "pwd",
    "sig",
    "signature",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "subscription-key",
    "code",
    "auth",
]


@pytest.mark.parametrize("name", [casing for name in SECRET_PARAMS for casing in casings(name)])
def test_secret_query_values_are_redacted_in_any_casing(name: str) -> None:
    """A query parameter named like a key has its value replaced, whatever its case."""
    url = f"https://api.example.com/v1/models?alt=sse&{name}={KEY}&limit=5"
    assert redact_url(url) == f"https://api.example.com/v1/models?alt=sse&{name}=[REDACTED]&limit=5"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # No query, no userinfo: returned as it came.
        (
            "https://api.example.com/v1/chat/completions",
            "https://api.example.com/v1/chat/completions",
        ),
        ("/v1/chat/completions", "/v1/chat/completions"),
        # Harmless parameters are kept, in order, with repeats, blanks and bare keys.
        ("/v1/x?api-version=2024-06-01&b=1&b=2", "/v1/x?api-version=2024-06-01&b=1&b=2"),
        (f"/v1/x?b=1&key={KEY}&b=2&key={KEY}", "/v1/x?b=1&key=[REDACTED]&b=2&key=[REDACTED]"),
        ("/v1/x?key=&key&q=", "/v1/x?key=&key&q="),
        # No re-quoting: escapes and "+" are kept as sent.
        (f"/v1/x?q=a%20b+c&%2Fp=%7E&token={KEY}", "/v1/x?q=a%20b+c&%2Fp=%7E&token=[REDACTED]"),
        # A percent-encoded name still names a key.
        (f"/v1/x?api%5Fkey={KEY}", "/v1/x?api%5Fkey=[REDACTED]"),
        # ";" separates parameters too; the fragment is checked as well.
        (f"/v1/x?a=1;key={KEY};b=2", "/v1/x?a=1;key=[REDACTED];b=2"),
        (f"/cb?state=s#access_token={KEY}&type=x", "/cb?state=s#access_token=[REDACTED]&type=x"),
        (f"/cb#access_token={KEY}", "/cb#access_token=[REDACTED]"),
        ("/v1/x?q=1#top", "/v1/x?q=1#top"),
        # ";" in the path is not a query separator.
        ("/v1/a;key=b/c", "/v1/a;key=b/c"),
        # The userinfo password, up to the authority's last "@".
        (f"https://user:{KEY}@host:8443/v1?q=1", "https://user:[REDACTED]@host:8443/v1?q=1"),
        (f"https://user:{KEY}@x@host/", "https://user:[REDACTED]@host/"),
        (f"https://{KEY}@host/", "https://[REDACTED]@host/"),
        # An "@" outside the authority is not a userinfo.
        ("https://host/users/a@example.com?q=1", "https://host/users/a@example.com?q=1"),
        ("/users/a@example.com", "/users/a@example.com"),
    ],
)
def test_urls_keep_everything_but_their_secrets(url: str, shown: str) -> None:
    """A URL is shown as it was, except its secret values and password."""
    assert redact_url(url) == shown
    assert KEY not in redact_url(url)


def test_url_bytes_are_shown_as_text() -> None:
    """A URL given as bytes comes back as text, redacted like a string."""
    url = f"https://h/v1?key={KEY}".encode("ascii")
    assert redact_url(url) == "https://h/v1?key=[REDACTED]"


SECRET_HEADERS = [
    "Api-Key",
    "X-Api-Key",
    "X-Goog-Api-Key",
    "Ocp-Apim-Subscription-Key",
    "Cookie",
    "Set-Cookie",
    "X-Auth-Token",
    "X-Client-Secret",
    "X-Password",
    "X-Amz-Security-Token",
]


@pytest.mark.parametrize("name", [casing for name in SECRET_HEADERS for casing in casings(name)])
def test_secret_header_values_are_redacted_in_any_casing(name: str) -> None:
    """A header named like a secret has each of its values replaced, whatever its case."""
    shown = redact_headers([(name.encode(), [KEY.encode(), b"second"])])
    assert shown == {name: ["[REDACTED]", "[REDACTED]"]}


@pytest.mark.parametrize("name", casings("Authorization") + casings("Proxy-Authorization"))
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (f"Bearer {KEY}", "Bearer [REDACTED]"),
        (f"bearer {KEY}", "bearer [REDACTED]"),
        ("Basic dXNlcjpwYXNz", "Basic [REDACTED]"),
        ('Digest username="u", response="abc"', "Digest [REDACTED]"),
        (KEY, "[REDACTED]"),
        (f"{KEY} more", "[REDACTED]"),
        ("Bearer", "[REDACTED]"),
    ],
)
def test_authorization_keeps_only_a_known_scheme(name: str, value: str, shown: str) -> None:
    """Authorization values show their scheme, never the credentials or an unknown word."""
    assert redact_headers([(name.encode(), [value.encode()])]) == {name: [shown]}


def test_other_headers_are_kept_in_order_with_every_value() -> None:
    """Harmless headers are shown as sent, repeats in order, from twisted's Headers."""
    headers = Headers()
    headers.addRawHeader(b"Accept", b"text/event-stream")
    headers.addRawHeader(b"Content-Type", b"application/json; charset=utf-8")
    headers.addRawHeader(b"X-Thing", b"one")
    headers.addRawHeader(b"X-Thing", b"two")
    headers.addRawHeader(b"Authorization", f"Bearer {KEY}".encode())
    assert redact_headers(headers) == {
        "Accept": ["text/event-stream"],
        "Content-Type": ["application/json; charset=utf-8"],
        "X-Thing": ["one", "two"],
        "Authorization": ["Bearer [REDACTED]"],
    }


def test_urls_in_harmless_headers_lose_their_keys() -> None:
    """A Referer or Location URL is shown without its secret query values."""
    shown = redact_headers(
        [
            (b"Referer", [f"https://app.example/?token={KEY}&page=2".encode()]),
            (b"Location", [f"https://u:{KEY}@h/cb?code={KEY}".encode()]),
        ]
    )
    assert shown == {
        "Referer": ["https://app.example/?token=[REDACTED]&page=2"],
        "Location": ["https://u:[REDACTED]@h/cb?code=[REDACTED]"],
    }


@pytest.mark.parametrize(
    "name",
    ["Content-Type", "Accept", "X-Request-ID", "OpenAI-Organization", "api-version", "q", "alt"],
)
def test_ordinary_names_are_not_secret(name: str) -> None:
    """Ordinary headers and parameters stay readable in the logs."""
    assert not is_secret_name(name)
    assert not is_secret_name(name.encode())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            f"ValueError: bad target b'https://h/v1/models?key={KEY}'",
            "ValueError: bad target b'https://h/v1/models?key=[REDACTED]'",
        ),
        (
            f'cannot connect to "https://user:{KEY}@h:443/v1?a=1&API_KEY={KEY}"',
            'cannot connect to "https://user:[REDACTED]@h:443/v1?a=1&API_KEY=[REDACTED]"',
        ),
        (f"Incorrect API key provided: {KEY}.", "Incorrect API key provided: [REDACTED]."),
        (f"sent Authorization: Bearer {KEY}\n", "sent Authorization: Bearer [REDACTED]\n"),
        (
            "key AIzaSyA1234567890abcdefghijklmnopqrstu rejected",
            "key [REDACTED] rejected",
        ),
        (
            'File "proxy.py", line 12, in fail\n    url=self.url, key=value',
            'File "proxy.py", line 12, in fail\n    url=self.url, key=value',
        ),
        ("https://host:8443/v1?q=1 refused", "https://host:8443/v1?q=1 refused"),
    ],
)
def test_text_loses_urls_secrets_and_key_shaped_words(text: str, shown: str) -> None:
    """Exception messages and tracebacks lose URL secrets and recognisable keys."""
    assert redact_text(text) == shown


@pytest.mark.parametrize(
    "key",
    [
        "sk-proj-PLANTED0123456789abcdef",
        "sk-ant-api03-PLANTED0123456789",
        "sk_live_PLANTED0123456789ab",
        "AIzaSyPLANTED0123456789abcdefghijklmno",
        "ghp_PLANTED0123456789abcdefghijklmnopqr",
        "xoxb-123456789012-PLANTED",
        "AKIAPLANTED012345678",
        "hf_PLANTED0123456789abcdefghijklmnopqr",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.PLANTEDsignature0123",
    ],
)
def test_key_shapes_are_recognised_wherever_they_are(key: str) -> None:
    """A key is found in a path segment, a query value of any name and on its own."""
    for context in (f"/v1/files/{key}", f"/v1/models?k={key}&x=1", key):
        assert is_key_shaped(context)
        assert key not in loggable(context.encode())
        assert key not in redact_url(f"https://api.example/{context.lstrip('/')}")


@pytest.mark.parametrize(
    "text", ["/v1/chat/completions", "/v1/tasks/task-0123456789abcdefghij", "gpt-4o-mini", "req-1"]
)
def test_ordinary_paths_and_ids_are_not_key_shaped(text: str) -> None:
    """Paths, IDs and model names are left alone (``task-...`` is not ``sk-...``)."""
    assert not is_key_shaped(text)
    assert loggable(text.encode()) == text


def test_loggable_escapes_control_and_non_ascii_bytes() -> None:
    """C0 controls, DEL and bytes outside ASCII become ``\\xNN``: one line, no escapes."""
    assert (
        loggable(b"/a\x1b[31mb\r\n\x7f\x00\xc3\xa9") == "/a\\x1b[31mb\\x0d\\x0a\\x7f\\x00\\xc3\\xa9"
    )
