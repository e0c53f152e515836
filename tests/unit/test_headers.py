"""Which headers cross the proxy in each direction, and what the proxy adds."""

from __future__ import annotations

import ipaddress

import pytest

from aiproxy.core.interfaces import RawHeaders
from aiproxy.rules.headers import (
    HOP_BY_HOP,
    choose_request_id,
    client_response_headers,
    connection_tokens,
    end_to_end,
    has_header,
    header_values,
    is_event_stream,
    original_client,
    request_head,
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


def headers(*pairs: tuple[bytes, bytes]) -> RawHeaders:
    """Header fields: each (name, value) in order, repeats kept."""
    return list(pairs)


def forward(incoming: RawHeaders, request_id: bytes = b"req-1") -> RawHeaders:
    return upstream_request_headers(
        incoming, client_ip=b"203.0.113.7", scheme=b"https", request_id=request_id
    )


def respond(upstream: RawHeaders) -> RawHeaders:
    return client_response_headers(upstream)


FORWARDING = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}


def passed(fields: RawHeaders) -> RawHeaders:
    """The fields but those the proxy adds upstream."""
    return [field for field in fields if field[0].lower() not in FORWARDING]


def test_hop_by_hop_set_is_rfc_9110() -> None:
    """The hop-by-hop set is exactly RFC 9110's, in lower case."""
    assert {name.lower() for name in HOP_BY_HOP_NAMES} == HOP_BY_HOP


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES)
def test_hop_by_hop_headers_are_not_sent_upstream(name: bytes) -> None:
    """A hop-by-hop request header never reaches the upstream."""
    sent = forward(headers((name, b"value"), (b"Accept", b"*/*")))
    assert not has_header(sent, name.lower())
    assert header_values(sent, b"accept") == [b"*/*"]


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES)
def test_hop_by_hop_headers_are_not_sent_to_the_client(name: bytes) -> None:
    """A hop-by-hop response header never reaches the client."""
    returned = respond(headers((name, b"value"), (b"Content-Type", b"application/json")))
    assert not has_header(returned, name.lower())
    assert header_values(returned, b"content-type") == [b"application/json"]


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
    incoming = [
        (b"X-Secret", b"s"),
        *((b"Connection", value) for value in connection),
        (b"X-Kept", b"k"),
    ]
    for result in (forward(incoming), respond(incoming), end_to_end(incoming)):
        assert not has_header(result, b"x-secret")
        assert not has_header(result, b"connection")
        assert header_values(result, b"x-kept") == [b"k"]


def test_end_to_end_also_drops_the_names_given() -> None:
    """end_to_end leaves out the extra lower-case names it is given."""
    kept = end_to_end(headers((b"A", b"1"), (b"B", b"2"), (b"a", b"3")), frozenset({b"a"}))
    assert kept == [(b"B", b"2")]


def test_repeated_headers_keep_every_value_in_order() -> None:
    """Repeated headers reach the other side with every value, in order, both ways."""
    incoming = headers(
        (b"Accept", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Accept", b"application/json"),
        (b"Set-Cookie", b"b=2"),
    )
    for result in (forward(incoming), respond(incoming)):
        assert header_values(result, b"accept") == [b"text/plain", b"application/json"]
        assert header_values(result, b"set-cookie") == [b"a=1", b"b=2"]


def test_x_forwarded_for_starts_a_chain() -> None:
    """Without an incoming X-Forwarded-For, the upstream sees the client's address."""
    assert header_values(forward([]), b"x-forwarded-for") == [b"203.0.113.7"]


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
    sent = forward([(b"X-Forwarded-For", value) for value in incoming])
    assert header_values(sent, b"x-forwarded-for") == [expected]


def test_x_forwarded_proto_and_host() -> None:
    """The upstream learns the scheme and Host the client used, replacing any it sent."""
    sent = forward(
        [
            (b"Host", b"proxy.example:8080"),
            (b"X-Forwarded-Proto", b"gopher"),
            (b"X-Forwarded-Host", b"spoofed.example"),
            (b"host", b"second.example"),
        ]
    )
    assert header_values(sent, b"x-forwarded-proto") == [b"https"]
    assert header_values(sent, b"x-forwarded-host") == [b"proxy.example:8080"]


def test_no_x_forwarded_host_without_host() -> None:
    """Without a Host header there is no X-Forwarded-Host."""
    assert not has_header(forward([]), b"x-forwarded-host")


@pytest.mark.parametrize("name", [b"Host", b"Content-Length", b"Expect"])
def test_client_framing_headers_are_not_forwarded(name: bytes) -> None:
    """Host, Content-Length and Expect are the HTTP client's to set, not copied from the client."""
    sent = forward(headers((name, b"100-continue" if name == b"Expect" else b"5")))
    assert not has_header(sent, name.lower())


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
    assert passed(forward(headers((name, value)))) == [(name, value)]


def test_request_id_header_is_the_chosen_one() -> None:
    """The upstream gets exactly one X-Request-ID: the proxy's chosen one."""
    sent = forward([(b"X-Request-ID", b"a"), (b"x-request-id", b"b")], request_id=b"chosen")
    assert header_values(sent, b"x-request-id") == [b"chosen"]


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
    returned = respond([(b"Content-Type", content_type)])
    assert returned == [
        (b"Content-Type", content_type),
        (b"X-Accel-Buffering", b"no"),
        (b"Cache-Control", b"no-cache"),
    ]


def test_event_stream_headers_set_upstream_are_kept() -> None:
    """The upstream's own X-Accel-Buffering and Cache-Control on an SSE response win."""
    upstream = [
        (b"content-type", b"text/event-stream"),
        (b"x-accel-buffering", b"yes"),
        (b"cache-control", b"private, max-age=0"),
    ]
    assert respond(upstream) == upstream


@pytest.mark.parametrize(
    "upstream",
    [
        [(b"Content-Type", b"application/json")],
        [(b"Content-Type", b"text/plain"), (b"X-Note", b"text/event-stream")],
        [(b"Content-Type", b"application/json"), (b"Content-Type", b"text/event-stream")],
        [],
    ],
)
def test_other_responses_get_no_added_headers(upstream: RawHeaders) -> None:
    """A non-SSE response (by its first Content-Type) gets the upstream's fields only."""
    assert respond(upstream) == upstream


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        (headers(), []),
        (headers((b"X-Forwarded-For", b"198.51.100.1")), [b"198.51.100.1"]),
    ],
)
def test_peer_without_an_ip_adds_nothing_to_x_forwarded_for(
    incoming: RawHeaders, expected: list[bytes]
) -> None:
    """A UNIX-socket peer has no address to add; an existing chain passes as it is."""
    sent = upstream_request_headers(incoming, client_ip=None, scheme=b"http", request_id=b"req-1")
    assert header_values(sent, b"x-forwarded-for") == expected


@pytest.mark.parametrize(
    ("fields", "name", "expected"),
    [
        ([], b"accept", []),
        ([(b"Accept", b"a")], b"accept", [b"a"]),
        (
            [(b"ACCEPT", b"a"), (b"X", b"x"), (b"accept", b"b"), (b"Accept", b"")],
            b"accept",
            [b"a", b"b", b""],
        ),
        ([(b"Accept-Encoding", b"gzip"), (b"Accep", b"no")], b"accept", []),
    ],
)
def test_header_values_are_every_value_in_order_in_any_case(
    fields: RawHeaders, name: bytes, expected: list[bytes]
) -> None:
    """header_values finds a field by its lower-case name in any case, every value in order."""
    assert header_values(fields, name) == expected
    assert has_header(fields, name) is bool(expected)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], frozenset()),
        ([(b"Connection", b"close")], {b"close"}),
        (
            [(b"connection", b" Keep-Alive , X-Secret,,"), (b"CONNECTION", b"te")],
            {b"keep-alive", b"x-secret", b"te"},
        ),
        ([(b"X-Connection", b"x-secret")], frozenset()),
    ],
)
def test_connection_tokens(fields: RawHeaders, expected: frozenset[bytes]) -> None:
    """The names Connection lists, lower-case, from every Connection field."""
    assert connection_tokens(fields) == expected


def test_end_to_end_keeps_order_and_case() -> None:
    """end_to_end passes the remaining fields in their order and case, repeats kept."""
    fields = [
        (b"x-b", b"1"),
        (b"Connection", b"x-gone"),
        (b"X-A", b"2"),
        (b"X-GONE", b"3"),
        (b"transfer-encoding", b"chunked"),
        (b"x-b", b"4"),
    ]
    assert end_to_end(fields) == [(b"x-b", b"1"), (b"X-A", b"2"), (b"x-b", b"4")]


def test_upstream_request_headers_keep_order_and_case_and_add_after() -> None:
    """The client's fields go upstream in their order and case; the proxy's come after them."""
    incoming = [
        (b"host", b"proxy.example"),
        (b"user-agent", b"ua"),
        (b"X-Forwarded-For", b"198.51.100.1"),
        (b"AUTHORIZATION", b"Bearer sk"),
        (b"Content-Length", b"2"),
        (b"Connection", b"keep-alive"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"Accept", b"*/*"),
        (b"x-request-id", b"client-id"),
        (b"accept", b"text/plain"),
    ]
    assert forward(incoming, request_id=b"chosen") == [
        (b"user-agent", b"ua"),
        (b"AUTHORIZATION", b"Bearer sk"),
        (b"Accept", b"*/*"),
        (b"accept", b"text/plain"),
        (b"X-Forwarded-For", b"198.51.100.1, 10.0.0.1, 203.0.113.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"proxy.example"),
        (b"X-Request-ID", b"chosen"),
    ]


def test_connection_cannot_drop_the_forwarding_chain() -> None:
    """A Connection naming X-Forwarded-For or Host still leaves the chain and host intact."""
    sent = forward(
        [
            (b"Host", b"h"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Connection", b"x-forwarded-for, host"),
        ]
    )
    assert passed(sent) == []
    assert header_values(sent, b"x-forwarded-for") == [b"1.2.3.4, 203.0.113.7"]
    assert header_values(sent, b"x-forwarded-host") == [b"h"]


def test_client_response_headers_keep_order_and_case() -> None:
    """The upstream's end-to-end fields reach the client in order and case, Content-Length
    included; Transfer-Encoding and Connection do not."""
    upstream = [
        (b"date", b"Mon"),
        (b"Content-Type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"12"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"set-cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert respond(upstream) == [
        (b"date", b"Mon"),
        (b"Content-Type", b"application/json"),
        (b"content-length", b"12"),
        (b"set-cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]


def test_event_stream_headers_are_added_after_the_upstreams() -> None:
    """An event stream's added fields come after the upstream's, only those it lacks."""
    upstream = [
        (b"content-type", b"text/event-stream"),
        (b"Cache-Control", b"no-store"),
        (b"x-a", b"1"),
    ]
    assert respond(upstream) == [*upstream, (b"X-Accel-Buffering", b"no")]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([(b"content-type", b"text/event-stream")], True),
        ([(b"Content-Type", b"TEXT/EVENT-STREAM;charset=utf-8")], True),
        ([(b"Content-Type", b"text/event-strea")], False),
        ([(b"Content-Type", b"application/json"), (b"Content-Type", b"text/event-stream")], False),
        ([(b"X-Content-Type", b"text/event-stream")], False),
        ([], False),
    ],
)
def test_is_event_stream_reads_the_first_content_type(fields: RawHeaders, expected: bool) -> None:
    """A response is an event stream when its first Content-Type is text/event-stream."""
    assert is_event_stream(fields) is expected


FIELDS = [
    (b"content-type", b"application/json"),
    (b"Authorization", b"Bearer sk"),
    (b"x-a", b"1"),
    (b"X-A", b"2"),
]
FIELD_LINES = b"content-type: application/json\r\nAuthorization: Bearer sk\r\nx-a: 1\r\nX-A: 2\r\n"


@pytest.mark.parametrize(
    ("method", "length", "framing"),
    [
        (b"POST", 42, b"Content-Length: 42\r\n"),
        (b"GET", 7, b"Content-Length: 7\r\n"),
        (b"DELETE", 1, b"Content-Length: 1\r\n"),
        (b"POST", 0, b"Content-Length: 0\r\n"),
        (b"PUT", 0, b"Content-Length: 0\r\n"),
        (b"PATCH", 0, b"Content-Length: 0\r\n"),
        (b"GET", 0, b""),
        (b"HEAD", 0, b""),
        (b"DELETE", 0, b""),
        (b"OPTIONS", 0, b""),
        (b"TRACE", 0, b""),
        (b"POST", None, b"Transfer-Encoding: chunked\r\n"),
        (b"GET", None, b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_request_head_is_the_whole_head_with_the_bodys_framing(
    method: bytes, length: int | None, framing: bytes
) -> None:
    """
    The head is the request line, Host, the fields in order and case, the body's framing
    and an empty line: Content-Length for a known length (0 only for POST, PUT, PATCH),
    chunked for an unknown one.
    """
    head = request_head(method, b"/v1/chat/completions?x=1", b"api.example:8443", FIELDS, length)
    assert head == (
        method
        + b" /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.example:8443\r\n"
        + FIELD_LINES
        + framing
        + b"\r\n"
    )


def test_request_head_without_fields() -> None:
    """With no fields, the head is the request line, Host and the empty line."""
    assert request_head(b"GET", b"/v1/models", b"api.example", [], 0) == (
        b"GET /v1/models HTTP/1.1\r\nHost: api.example\r\n\r\n"
    )


def test_request_head_of_forwarded_headers() -> None:
    """The head sends upstream_request_headers' fields as they are, after Host."""
    sent = forward([(b"Host", b"proxy.example"), (b"content-length", b"2"), (b"Accept", b"*/*")])
    assert request_head(b"POST", b"/v1/x", b"api.example", sent, 2) == (
        b"POST /v1/x HTTP/1.1\r\n"
        b"Host: api.example\r\n"
        b"Accept: */*\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: proxy.example\r\n"
        b"X-Request-ID: req-1\r\n"
        b"Content-Length: 2\r\n"
        b"\r\n"
    )


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
