"""An https upstream: certificates are checked unless SSL_VERIFY is false."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest_twisted
import trustme
from twisted.internet import reactor, ssl
from twisted.web.server import Site

from aiproxy.testing import FakeOpenAI

from .conftest import Proxy
from .support import LOOPBACK, header, request, within


@pytest_twisted.async_yield_fixture
async def tls_upstream() -> AsyncIterator[str]:
    """The fake upstream over TLS, with a certificate from a CA nobody trusts."""
    certificate = trustme.CA().issue_cert(LOOPBACK)
    key_and_chain = certificate.private_key_and_cert_chain_pem.bytes()
    options = ssl.PrivateCertificate.loadPEM(key_and_chain).options()
    port = reactor.listenSSL(0, Site(FakeOpenAI(reactor)), options, interface=LOOPBACK)
    yield f"https://{LOOPBACK}:{port.getHost().port}"
    await within(port.stopListening(), 5)


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_a_502(
    tls_upstream: str, start_proxy: Callable[..., Proxy]
) -> None:
    """With verification on (the default), an untrusted upstream certificate is a 502."""
    proxy = start_proxy(tls_upstream)
    response, body = await request(b"GET", proxy.url + "/v1/models")
    assert response.code == 502
    error = json.loads(body)["error"]
    assert error["type"] == "upstream_unreachable"
    assert error["request_id"] == header(response, b"x-request-id").decode()


@pytest_twisted.ensureDeferred
async def test_ssl_verify_false_accepts_any_certificate(
    tls_upstream: str, start_proxy: Callable[..., Proxy]
) -> None:
    """With SSL_VERIFY=false the same upstream is reached over TLS."""
    proxy = start_proxy(tls_upstream, ssl_verify=False)
    response, body = await request(b"GET", proxy.url + "/v1/models")
    assert response.code == 200
    assert json.loads(body)["data"][0]["id"] == "fake-model"
