"""
Which requests the proxy takes on: no WebSocket upgrades (not tunnelled yet), and no
more than a set number of proxied requests at once.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from aiproxy.errors import Overloaded, ProxyError, WebSocketNotSupported

__all__ = ["Admission", "is_websocket_upgrade"]


def is_websocket_upgrade(headers: Headers) -> bool:
    """Whether the request asks to switch to the WebSocket protocol (``Upgrade: websocket``)."""
    values = headers.getRawHeaders(b"upgrade")
    if values is None:  # nearly every request
        return False
    return any(
        token.strip().lower() == b"websocket" for value in values for token in value.split(b",")
    )


class Admission:
    """
    Lets proxied requests in, or says why not.

    @ivar max_concurrent: the most requests in flight at once; 0 for no limit.
    @ivar active: the admitted requests whose response has not ended yet (counted only
        when there is a limit).
    """

    def __init__(self, max_concurrent: int = 0) -> None:
        self.max_concurrent = max_concurrent
        self.active = 0

    def admit(self, request: Request) -> ProxyError | None:
        """
        L{None} if ``request`` may go upstream (it is then counted until its response
        ends, or its client goes away); else the error to answer it with.
        """
        if is_websocket_upgrade(request.requestHeaders):
            return WebSocketNotSupported("WebSocket is not supported yet")
        if self.max_concurrent:
            if self.active >= self.max_concurrent:
                return Overloaded(
                    f"the proxy is handling its limit of {self.max_concurrent} requests;"
                    " retry shortly"
                )
            self.active += 1
            request.notifyFinish().addBoth(self._release)
        return None

    def _release(self, result: Failure | None) -> None:
        self.active -= 1
