"""Which headers cross the proxy in each direction, and what the proxy adds."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.web.http_headers import Headers

from aiproxy.rules.headers import (
    HOP_BY_HOP,
    choose_request_id,
    client_response_headers,
    end_to_end,
    original_client,
    upstream_request_headers,
)

HOP_BY_HOP_NAMES = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
]


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers with each (name, value) added in order, repeats kept."""
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def forward(incoming: Headers, request_id: bytes = b"req-1") -> Headers:
    return upstream_request_headers(
        incoming, client_ip=b"203.0.113.7", scheme=b"https", request_id=request_id
    )


def respond(upstream: Headers) -> Headers:
    result = Headers()
    for name, values in client_response_headers(upstream):
        result.setRawHeaders(name, values)
    return result


def test_hop_by_hop_set_is_rfc_9110() -> None:
    """The hop-by-hop set is exactly RFC 9110's, in lower case."""
    assert {name.lower() for name in HOP_BY_HOP_NAMES} == HOP_BY_HOP


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES)
def test_hop_by_hop_headers_are_not_sent_upstream(name: bytes) -> None:
    """A hop-by-hop request header never reaches the upstream."""
    sent = forward(headers((name, b"value"), (b"Accept", b"*/*")))
    assert not sent.hasHeader(name)
    assert sent.getRawHeaders(b"accept") == [b"*/*"]


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES)
def test_hop_by_hop_headers_are_not_sent_to_the_client(name: bytes) -> None:
    """A hop-by-hop response header never reaches the client."""
    returned = respond(headers((name, b"value"), (b"Content-Type", b"application/json")))
    assert not returned.hasHeader(name)
    assert returned.getRawHeaders(b"content-type") == [b"application/json"]


@pytest.mark.parametrize(
    "connection",
    [
        [b"X-Secret"],
        [b"x-secret"],
        [b"X-SECRET, keep-alive"],
        [b"close,X-Secret"],
        [b"close", b"X-Secret"],
        [b" foo ,  x-secret ,bar"],
    ],
)
def test_headers_named_in_connection_are_dropped_both_ways(connection: list[bytes]) -> None:
    """Headers that Connection names are dropped: any case, comma lists, repeated Connection."""
    incoming = Headers({b"Connection": connection, b"X-Secret": [b"s"], b"X-Kept": [b"k"]})
    for result in (forward(incoming), respond(incoming)):
        assert not result.hasHeader(b"x-secret")
        assert not result.hasHeader(b"connection")
        assert result.getRawHeaders(b"x-kept") == [b"k"]


def test_end_to_end_also_drops_the_names_given() -> None:
    """end_to_end leaves out the extra lower-case names it is given."""
    kept = dict(end_to_end(headers((b"A", b"1"), (b"B", b"2")), frozenset({b"a"})))
    assert {name.lower(): values for name, values in kept.items()} == {b"b": [b"2"]}


def test_repeated_headers_keep_every_value_in_order() -> None:
    """Repeated headers reach the other side with every value, in order, both ways."""
    incoming = headers(
        (b"Accept", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Accept", b"application/json")
    )
    incoming.addRawHeader(b"Set-Cookie", b"b=2")
    for result in (forward(incoming), respond(incoming)):
        assert result.getRawHeaders(b"accept") == [b"text/plain", b"application/json"]
        assert result.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]


def test_x_forwarded_for_starts_a_chain() -> None:
    """Without an incoming X-Forwarded-For, the upstream sees the client's address."""
    assert forward(Headers()).getRawHeaders(b"x-forwarded-for") == [b"203.0.113.7"]


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        ([b"198.51.100.1"], b"198.51.100.1, 203.0.113.7"),
        ([b"198.51.100.1, 10.0.0.1"], b"198.51.100.1, 10.0.0.1, 203.0.113.7"),
        ([b"198.51.100.1", b"10.0.0.1"], b"198.51.100.1, 10.0.0.1, 203.0.113.7"),
    ],
)
def test_x_forwarded_for_appends_to_the_chain(incoming: list[bytes], expected: bytes) -> None:
    """The client's address is appended to an existing X-Forwarded-For chain, as one header."""
    sent = forward(Headers({b"X-Forwarded-For": incoming}))
    assert sent.getRawHeaders(b"x-forwarded-for") == [expected]


def test_x_forwarded_proto_and_host() -> None:
    """The upstream learns the scheme and Host the client used, replacing any it sent."""
    sent = forward(
        Headers(
            {
                b"Host": [b"proxy.example:8080"],
                b"X-Forwarded-Proto": [b"gopher"],
                b"X-Forwarded-Host": [b"spoofed.example"],
            }
        )
    )
    assert sent.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert sent.getRawHeaders(b"x-forwarded-host") == [b"proxy.example:8080"]


def test_no_x_forwarded_host_without_host() -> None:
    """Without a Host header there is no X-Forwarded-Host."""
    assert not forward(Headers()).hasHeader(b"x-forwarded-host")


@pytest.mark.parametrize("name", [b"Host", b"Content-Length", b"Expect"])
def test_client_framing_headers_are_not_forwarded(name: bytes) -> None:
    """Host, Content-Length and Expect are the HTTP client's to set, not copied from the client."""
    sent = forward(headers((name, b"100-continue" if name == b"Expect" else b"5")))
    assert not sent.hasHeader(name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Authorization", b"Bearer sk-test"),
        (b"Content-Type", b"application/json"),
        (b"Accept-Encoding", b"gzip"),
        (b"OpenAI-Organization", b"org-1"),
        (b"User-Agent", b"openai-python/1.0"),
        (b"Cookie", b"a=1"),
    ],
)
def test_end_to_end_request_headers_pass_unchanged(name: bytes, value: bytes) -> None:
    """Authorization and other end-to-end headers reach the upstream unchanged."""
    assert forward(headers((name, value))).getRawHeaders(name) == [value]


def test_request_id_header_is_the_chosen_one() -> None:
    """The upstream gets exactly one X-Request-ID: the proxy's chosen one."""
    sent = forward(Headers({b"X-Request-ID": [b"a", b"b"]}), request_id=b"chosen")
    assert sent.getRawHeaders(b"x-request-id") == [b"chosen"]


@pytest.mark.parametrize(
    "incoming",
    [
        [b"abc"],
        [b"7f3c9a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"],
        [b"req_123.456:789@host+x=y/z-1"],
        [b"A" * 200],
        [b"0"],
    ],
)
def test_sane_request_id_is_kept(incoming: list[bytes]) -> None:
    """One sane token (1-200 letters, digits and ._:@+=/-) is used as the request ID."""
    assert choose_request_id(incoming, new_id=lambda: b"new") == incoming[0]


@pytest.mark.parametrize(
    "incoming",
    [
        None,
        [],
        [b""],
        [b"has space"],
        [b"tab\there"],
        [b"line\nbreak"],
        [b"trailing\n"],
        [b"nul\x00"],
        [b"bell\x07"],
        [b"\xc3\xa9t\xc3\xa9"],
        [b'quote"d'],
        [b"<script>"],
        [b"-starts-with-dash"],
        [b"A" * 201],
        [b"one", b"two"],
    ],
)
def test_insane_request_id_is_replaced(incoming: list[bytes] | None) -> None:
    """A missing, empty, too long, repeated or oddly-charactered ID is replaced by a new one."""
    assert choose_request_id(incoming, new_id=lambda: b"new") == b"new"


def test_new_request_ids_are_unique_sane_tokens() -> None:
    """Generated request IDs differ from each other and would themselves be accepted."""
    ids = {choose_request_id(None) for _ in range(1000)}
    assert len(ids) == 1000
    for request_id in ids:
        assert choose_request_id([request_id], new_id=lambda: b"new") == request_id


@pytest.mark.parametrize(
    "content_type",
    [b"text/event-stream", b"text/event-stream; charset=utf-8", b"Text/Event-Stream"],
)
def test_event_streams_get_anti_buffering_headers(content_type: bytes) -> None:
    """An SSE response gets X-Accel-Buffering: no and Cache-Control: no-cache."""
    returned = respond(Headers({b"Content-Type": [content_type]}))
    assert returned.getRawHeaders(b"x-accel-buffering") == [b"no"]
    assert returned.getRawHeaders(b"cache-control") == [b"no-cache"]
    assert returned.getRawHeaders(b"content-type") == [content_type]


def test_event_stream_headers_set_upstream_are_kept() -> None:
    """The upstream's own X-Accel-Buffering and Cache-Control on an SSE response win."""
    returned = respond(
        Headers(
            {
                b"Content-Type": [b"text/event-stream"],
                b"X-Accel-Buffering": [b"yes"],
                b"Cache-Control": [b"private, max-age=0"],
            }
        )
    )
    assert returned.getRawHeaders(b"x-accel-buffering") == [b"yes"]
    assert returned.getRawHeaders(b"cache-control") == [b"private, max-age=0"]


@pytest.mark.parametrize(
    "upstream",
    [
        Headers({b"Content-Type": [b"application/json"]}),
        Headers({b"Content-Type": [b"text/plain"], b"X-Note": [b"text/event-stream"]}),
        Headers(),
    ],
)
def test_other_responses_get_no_added_headers(upstream: Headers) -> None:
    """A non-SSE response gets neither X-Accel-Buffering nor Cache-Control."""
    returned = respond(upstream)
    assert not returned.hasHeader(b"x-accel-buffering")
    assert not returned.hasHeader(b"cache-control")
    assert sorted(returned.getAllRawHeaders()) == sorted(upstream.getAllRawHeaders())


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        (headers(), None),
        (headers((b"X-Forwarded-For", b"198.51.100.1")), [b"198.51.100.1"]),
    ],
)
def test_peer_without_an_ip_adds_nothing_to_x_forwarded_for(
    incoming: Headers, expected: list[bytes] | None
) -> None:
    """A UNIX-socket peer has no address to add; an existing chain passes as it is."""
    sent = upstream_request_headers(incoming, client_ip=None, scheme=b"http", request_id=b"req-1")
    assert sent.getRawHeaders(b"x-forwarded-for") == expected


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # Without a trusted peer, X-Forwarded-For is whatever the client wrote.
        ("192.0.2.1", [b"198.51.100.9"], "192.0.2.1"),
        ("10.0.0.5", [], "10.0.0.5"),
        # A trusted peer: the first untrusted address from the right.
        ("10.0.0.5", [b"198.51.100.9"], "198.51.100.9"),
        ("10.0.0.5", [b"203.0.113.1, 198.51.100.9, 10.1.1.1"], "198.51.100.9"),
        ("10.0.0.5", [b"203.0.113.1", b"198.51.100.9,10.1.1.1"], "198.51.100.9"),
        # Everything trusted: the leftmost address.
        ("10.0.0.5", [b"10.3.3.3, 10.2.2.2"], "10.3.3.3"),
        # Garbage stops the walk at the proxy that passed it on.
        ("10.0.0.5", [b"198.51.100.9, unknown"], "10.0.0.5"),
        ("10.0.0.5", [b"garbage, 10.1.1.1"], "10.1.1.1"),
        ("10.0.0.5", [b" , 198.51.100.9"], "198.51.100.9"),
        # IPv6, and IPv4 peers seen through an IPv6 socket.
        ("fd00::1", [b"2001:db8::7"], "2001:db8::7"),
        ("::ffff:10.0.0.5", [b"198.51.100.9"], "198.51.100.9"),
        # A UNIX socket peer has no address.
        (None, [b"198.51.100.9"], None),
    ],
)
def test_original_client(
    peer: str | None, forwarded_for: list[bytes], expected: str | None
) -> None:
    """X-Forwarded-For names the client only through proxies listed as trusted."""
    assert original_client(peer, forwarded_for, TRUSTED) == expected


def test_original_client_trusts_nobody_by_default() -> None:
    """With no trusted proxies, the peer's address is the client's."""
    assert original_client("10.0.0.5", [b"198.51.100.9"], ()) == "10.0.0.5"
