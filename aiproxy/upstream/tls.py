"""
TLS for the upstream connections: who the client says it talks to (SNI) and whether it
checks the certificate.

Both creators send the target's host name as SNI (an IP literal is not a host name:
RFC 6066 forbids it there, so none is sent for one). The verifying one checks the
certificate chain against a trust root (the system's trust store unless told otherwise)
and the certificate's names against the host; the other accepts any certificate, for
``SSL_VERIFY=false``.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from zope.interface import implementer

__all__ = ["UncheckedTLS", "tls_creator"]


def tls_creator(
    host: str, *, verify: bool, trust_root: Certificate | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    The TLS connection creator for an upstream at ``host``, built once per pool.

    @param host: the target's host, a name or an IP literal (without brackets).
    @param verify: check the certificate (chain and name); false for ``SSL_VERIFY=false``.
    @param trust_root: the certificate authority to trust when verifying; L{None}
        means the system's trust store (``platformTrust()``). Tests pass their own CA.
    """
    if verify:
        return optionsForClientTLS(host, trustRoot=trust_root)
    return UncheckedTLS(host)


@implementer(IOpenSSLClientConnectionCreator)
class UncheckedTLS:
    """
    TLS that accepts any certificate (``SSL_VERIFY=false``) but still sends SNI, so that
    a server hosting several names picks the right one.

    @ivar _context: the OpenSSL context, shared by every connection.
    @ivar _server_name: the SNI host name, or L{None} for an IP literal.
    """

    def __init__(self, host: str) -> None:
        self._context = CertificateOptions().getContext()
        self._server_name: bytes | None = (
            None if isIPAddress(host) or isIPv6Address(host) else host.encode("ascii")
        )

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A client-side OpenSSL connection for one TLS connection."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        connection.set_connect_state()
        return connection
