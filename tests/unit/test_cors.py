"""CORS: the pure rules of :mod:`aiproxy.rules.cors`, and the proxy answering with them."""

from __future__ import annotations

import json

import pytest
from twisted.web.http_headers import Headers

from aiproxy.config import Config
from aiproxy.core.interfaces import RawHeaders
from aiproxy.rules.cors import (
    EXPOSED_HEADERS,
    MAX_AGE,
    CorsPolicy,
    add_response_headers,
    allowed_origin,
    is_preflight,
    preflight_headers,
    response_headers,
)

from .test_proxy import Proxy, assert_stamped, error_of, start_proxy

APP = b"https://app.example"
OTHER = b"https://evil.example"
LISTED = {"cors_origins": ("https://app.example", "http://localhost:3000")}


def policy(**settings: object) -> CorsPolicy:
    made = CorsPolicy.from_config(Config(**settings))  # type: ignore[arg-type]
    assert made is not None
    return made


def headers(**values: bytes) -> RawHeaders:
    return [(name.replace("_", "-").encode(), v) for name, v in values.items()]


# --- The pure rules --------------------------------------------------------------------


def test_disabled_config_has_no_policy() -> None:
    assert CorsPolicy.from_config(Config(enable_cors=False)) is None


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, CorsPolicy((b"*",), (b"*",), (b"*",))),
        (
            {
                "cors_origins": ("https://A.example/", "*"),
                "cors_methods": ("GET", "POST"),
                "cors_headers": ("Authorization", "Content-Type"),
            },
            CorsPolicy((b"*",), (b"GET", b"POST"), (b"Authorization", b"Content-Type")),
        ),
        (
            {"cors_origins": ("https://A.example/", "http://b:3000")},
            CorsPolicy((b"https://a.example", b"http://b:3000")),
        ),
        ({"cors_origins": (), "cors_headers": ()}, CorsPolicy((), (b"*",), ())),
    ],
)
def test_policy_from_config(settings: dict[str, object], expected: CorsPolicy) -> None:
    assert policy(**settings) == expected


@pytest.mark.parametrize(
    ("method", "values", "expected"),
    [
        (b"OPTIONS", {"origin": APP, "access_control_request_method": b"POST"}, True),
        (b"OPTIONS", {"origin": APP}, False),
        (b"OPTIONS", {"access_control_request_method": b"POST"}, False),
        (b"OPTIONS", {}, False),
        (b"POST", {"origin": APP, "access_control_request_method": b"POST"}, False),
    ],
)
def test_is_preflight(method: bytes, values: dict[str, bytes], expected: bool) -> None:
    assert is_preflight(method, headers(**values)) is expected


@pytest.mark.parametrize(
    ("settings", "origin", "expected"),
    [
        ({}, APP, b"*"),
        ({}, b"null", b"*"),
        (LISTED, APP, APP),
        (LISTED, b"http://localhost:3000", b"http://localhost:3000"),
        (LISTED, b"HTTPS://App.Example", b"HTTPS://App.Example"),
        (LISTED, OTHER, None),
        (LISTED, b"http://app.example", None),
        (LISTED, b"null", None),
        ({"cors_origins": ()}, APP, None),
    ],
)
def test_allowed_origin(settings: dict[str, object], origin: bytes, expected: bytes | None) -> None:
    assert allowed_origin(policy(**settings), origin) == expected


@pytest.mark.parametrize(
    ("settings", "origin", "expected"),
    [
        (
            {},
            APP,
            [
                (b"Access-Control-Allow-Origin", b"*"),
                (b"Access-Control-Expose-Headers", EXPOSED_HEADERS),
            ],
        ),
        (
            LISTED,
            APP,
            [
                (b"Vary", b"Origin"),
                (b"Access-Control-Allow-Origin", APP),
                (b"Access-Control-Expose-Headers", EXPOSED_HEADERS),
            ],
        ),
        (LISTED, OTHER, [(b"Vary", b"Origin")]),
    ],
)
def test_response_headers(
    settings: dict[str, object], origin: bytes, expected: list[tuple[bytes, bytes]]
) -> None:
    assert response_headers(policy(**settings), origin) == expected


@pytest.mark.parametrize(
    ("settings", "values", "expected"),
    [
        (
            {},
            {"access_control_request_method": b"PUT", "access_control_request_headers": b"a, b"},
            [
                (b"Access-Control-Allow-Methods", b"PUT"),
                (b"Access-Control-Allow-Headers", b"a, b"),
                (b"Access-Control-Max-Age", b"%d" % MAX_AGE),
                (b"Vary", b"Access-Control-Request-Method"),
                (b"Vary", b"Access-Control-Request-Headers"),
            ],
        ),
        (
            {},
            {"access_control_request_method": b"GET"},
            [
                (b"Access-Control-Allow-Methods", b"GET"),
                (b"Access-Control-Max-Age", b"%d" % MAX_AGE),
                (b"Vary", b"Access-Control-Request-Method"),
                (b"Vary", b"Access-Control-Request-Headers"),
            ],
        ),
        (
            {"cors_methods": ("GET", "POST"), "cors_headers": ("Authorization", "Content-Type")},
            {"access_control_request_method": b"PUT", "access_control_request_headers": b"x"},
            [
                (b"Access-Control-Allow-Methods", b"GET, POST"),
                (b"Access-Control-Allow-Headers", b"Authorization, Content-Type"),
                (b"Access-Control-Max-Age", b"%d" % MAX_AGE),
            ],
        ),
    ],
)
def test_preflight_headers(
    settings: dict[str, object], values: dict[str, bytes], expected: list[tuple[bytes, bytes]]
) -> None:
    assert preflight_headers(policy(**settings), headers(**values)) == expected


DATE = (b"Date", b"d")
TYPE = (b"Content-Type", b"application/json")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ([DATE, TYPE], [DATE, TYPE, (b"Vary", b"Origin")]),
        (
            [DATE, (b"Vary", b"Accept-Encoding"), TYPE],
            [DATE, (b"Vary", b"Accept-Encoding, Origin"), TYPE],
        ),
        ([(b"vary", b"accept-encoding, origin")], [(b"vary", b"accept-encoding, origin")]),
        ([(b"Vary", b"*")], [(b"Vary", b"*")]),
        # Several Vary fields: left alone when one names Origin, else joined in the first.
        ([(b"Vary", b"A"), (b"Vary", b"Origin")], [(b"Vary", b"A"), (b"Vary", b"Origin")]),
        (
            [DATE, (b"vary", b"A"), (b"Vary", b" "), TYPE, (b"VARY", b"B")],
            [DATE, (b"vary", b"A, B, Origin"), TYPE],
        ),
    ],
)
def test_vary_is_merged_not_repeated(response: RawHeaders, expected: RawHeaders) -> None:
    add_response_headers(response, [(b"Vary", b"Origin")])
    assert response == expected


def test_several_vary_names_join_in_one_field() -> None:
    response: RawHeaders = [(b"Vary", b"Access-Control-Request-Method")]
    add_response_headers(
        response,
        [
            (b"Vary", b"Origin"),
            (b"Vary", b"Access-Control-Request-Method"),
            (b"Vary", b"Access-Control-Request-Headers"),
        ],
    )
    assert response == [
        (b"Vary", b"Access-Control-Request-Method, Origin, Access-Control-Request-Headers")
    ]


def test_upstream_cors_headers_are_replaced() -> None:
    response = [
        (b"Access-Control-Allow-Origin", b"https://upstream.example"),
        (b"Content-Type", b"application/json"),
        (b"access-control-allow-origin", b"*"),
        (b"ACCESS-CONTROL-ALLOW-CREDENTIALS", b"true"),
        (b"Access-Control-Expose-Headers", b"X-Upstream"),
        (b"x-upstream", b"1"),
    ]
    same = response
    add_response_headers(response, response_headers(policy(), APP))
    assert response is same
    assert response == [
        (b"Content-Type", b"application/json"),
        (b"x-upstream", b"1"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"Access-Control-Expose-Headers", EXPOSED_HEADERS),
    ]


def test_disallowed_origin_drops_upstream_cors_headers() -> None:
    response = [(b"access-control-allow-origin", b"*"), (b"Vary", b"Accept")]
    add_response_headers(response, response_headers(policy(**LISTED), OTHER))
    assert response == [(b"Vary", b"Accept, Origin")]


def test_added_fields_replace_same_named_ones_in_any_case() -> None:
    response = [
        (b"access-control-max-age", b"5"),
        (b"X-A", b"1"),
        (b"Access-Control-Max-Age", b"6"),
    ]
    add_response_headers(response, [(b"Access-Control-Max-Age", b"600")])
    assert response == [(b"X-A", b"1"), (b"Access-Control-Max-Age", b"600")]


def test_preflight_headers_read_request_fields_in_any_case() -> None:
    request = [
        (b"origin", APP),
        (b"ACCESS-CONTROL-REQUEST-METHOD", b" PATCH "),
        (b"access-control-request-headers", b"a"),
        (b"Access-Control-Request-Headers", b"b"),
    ]
    assert is_preflight(b"OPTIONS", request)
    assert preflight_headers(policy(), request)[:2] == [
        (b"Access-Control-Allow-Methods", b"PATCH"),
        (b"Access-Control-Allow-Headers", b"a, b"),
    ]


# --- The proxy, over a fake upstream ---------------------------------------------------

PREFLIGHT = [
    (b"Origin", APP),
    (b"Access-Control-Request-Method", b"POST"),
    (b"Access-Control-Request-Headers", b"authorization, content-type"),
]


def test_preflight_is_answered_and_not_forwarded() -> None:
    proxy = start_proxy()
    proxy.client.request(b"OPTIONS", b"/v1/chat/completions", PREFLIGHT)
    response = proxy.client.response()
    assert response.status == 204
    assert response.body == b""
    assert response.header(b"access-control-allow-origin") == b"*"
    assert response.header(b"access-control-allow-methods") == b"POST"
    assert response.header(b"access-control-allow-headers") == b"authorization, content-type"
    assert response.header(b"access-control-max-age") == b"%d" % MAX_AGE
    assert response.headers.getRawHeaders(b"vary") == [
        b"Access-Control-Request-Method, Access-Control-Request-Headers"
    ]
    assert_stamped(response)
    assert proxy.upstream.calls == []


def test_preflight_at_an_own_endpoint_is_answered_too() -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(b"OPTIONS", b"/api/health", PREFLIGHT)
    response = proxy.client.response()
    assert response.status == 204
    assert response.header(b"access-control-allow-origin") == APP
    assert b"Origin" in (response.header(b"vary") or b"").split(b", ")


def test_preflight_from_a_disallowed_origin_is_403_without_cors_headers() -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(b"OPTIONS", b"/v1/models", [(b"Origin", OTHER), *PREFLIGHT[1:]])
    response = proxy.client.response()
    assert response.status == 403
    assert error_of(response)["type"] == "origin_not_allowed"
    assert not [n for n, _ in response.headers.getAllRawHeaders() if n.startswith(b"Access-")]
    assert response.header(b"vary") == b"Origin"
    assert proxy.upstream.calls == []


@pytest.mark.parametrize(
    "extra",
    [[], [(b"Origin", APP)], [(b"Access-Control-Request-Method", b"POST")]],
    ids=["plain", "origin-only", "method-only"],
)
def test_other_options_requests_are_forwarded(extra: list[tuple[bytes, bytes]]) -> None:
    proxy = start_proxy()
    proxy.client.request(b"OPTIONS", b"/v1/models", extra)
    assert proxy.upstream.last.method == b"OPTIONS"


def _proxied(proxy: Proxy, upstream: dict[bytes, list[bytes]] | None = None) -> Headers:
    proxy.upstream.last.respond(200, upstream or {b"Content-Type": [b"application/json"]}).end()
    return proxy.client.response().headers


def test_allowed_origin_gets_its_origin_back() -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(b"GET", b"/v1/models", [(b"Origin", APP)])
    seen = _proxied(proxy, {b"Vary": [b"Accept-Encoding"]})
    assert seen.getRawHeaders(b"access-control-allow-origin") == [APP]
    assert seen.getRawHeaders(b"access-control-expose-headers") == [EXPOSED_HEADERS]
    assert seen.getRawHeaders(b"vary") == [b"Accept-Encoding, Origin"]


def test_wildcard_origins_answer_star_without_vary() -> None:
    proxy = start_proxy()
    proxy.client.request(b"POST", b"/v1/chat/completions", [(b"Origin", APP)], b"{}")
    seen = _proxied(proxy)
    assert seen.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert not seen.hasHeader(b"vary")


def test_disallowed_origin_gets_no_cors_headers() -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(b"GET", b"/v1/models", [(b"Origin", OTHER)])
    seen = _proxied(proxy, {b"Access-Control-Allow-Origin": [b"*"]})
    assert not seen.hasHeader(b"access-control-allow-origin")
    assert not seen.hasHeader(b"access-control-expose-headers")
    assert seen.getRawHeaders(b"vary") == [b"Origin"]


def test_no_origin_no_cors_headers() -> None:
    proxy = start_proxy()
    proxy.client.request(b"GET", b"/v1/models")
    seen = _proxied(proxy)
    assert not [n for n, _ in seen.getAllRawHeaders() if n.lower().startswith(b"access-")]


def test_upstream_cors_headers_are_not_duplicated() -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(b"GET", b"/v1/models", [(b"Origin", APP)])
    seen = _proxied(
        proxy,
        {
            b"Access-Control-Allow-Origin": [b"*"],
            b"Access-Control-Allow-Credentials": [b"true"],
            b"Access-Control-Expose-Headers": [b"X-Upstream"],
            b"Vary": [b"Origin"],
        },
    )
    assert seen.getRawHeaders(b"access-control-allow-origin") == [APP]
    assert seen.getRawHeaders(b"access-control-expose-headers") == [EXPOSED_HEADERS]
    assert not seen.hasHeader(b"access-control-allow-credentials")
    assert seen.getRawHeaders(b"vary") == [b"Origin"]


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"/api/health", 200),
        (b"GET", b"/api/ping", 200),
        (b"CONNECT", b"evil.example:443", 405),
        (b"GET", b"//evil/x", 400),
    ],
    ids=["health", "ping", "connect", "bad-target"],
)
def test_own_answers_and_errors_get_the_headers(method: bytes, target: bytes, status: int) -> None:
    proxy = start_proxy(**LISTED)
    proxy.client.request(method, target, [(b"Origin", APP)])
    response = proxy.client.response()
    assert response.status == status
    assert response.header(b"access-control-allow-origin") == APP
    assert response.header(b"vary") == b"Origin"


def test_upstream_error_gets_the_headers() -> None:
    proxy = start_proxy()
    proxy.client.request(b"GET", b"/v1/models", [(b"Origin", APP)])
    proxy.clock.advance(31)
    response = proxy.client.response()
    assert response.status == 504
    assert response.header(b"access-control-allow-origin") == b"*"


def test_too_large_body_refusal_gets_the_headers() -> None:
    proxy = start_proxy(max_body_size=10)
    proxy.client.request(b"POST", b"/v1/chat/completions", [(b"Origin", APP)], b"x" * 11)
    response = proxy.client.response()
    assert response.status == 413
    assert response.header(b"access-control-allow-origin") == b"*"


def test_disabled_adds_nothing_and_forwards_preflights() -> None:
    proxy = start_proxy(enable_cors=False)
    proxy.client.request(b"OPTIONS", b"/v1/models", PREFLIGHT)
    call = proxy.upstream.last
    assert call.method == b"OPTIONS"
    assert call.headers.getRawHeaders(b"access-control-request-method") == [b"POST"]
    seen = _proxied(proxy, {b"Access-Control-Allow-Origin": [b"https://upstream.example"]})
    assert seen.getRawHeaders(b"access-control-allow-origin") == [b"https://upstream.example"]
    assert not seen.hasHeader(b"access-control-expose-headers")
    assert not seen.hasHeader(b"vary")


def test_disabled_own_endpoints_get_no_cors_headers() -> None:
    proxy = start_proxy(enable_cors=False)
    proxy.client.request(b"GET", b"/api/ping", [(b"Origin", APP)])
    response = proxy.client.response()
    assert json.loads(response.body) == {"ping": "pong"}
    assert not response.headers.hasHeader(b"access-control-allow-origin")
