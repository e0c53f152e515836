"""
Embed aiproxy in another Twisted program.

Serves a page of its own at ``/``, mounts aiproxy's tree (``/openai/api/health`` and the
proxy for everything else below ``/openai/``) on one site, and closes the upstream pool
on shutdown through the application's service hierarchy.

Run it with ``python examples/embed.py http://127.0.0.1:9000`` (the upstream base URL;
a second argument is the port, 8081 by default), then
``curl http://127.0.0.1:8081/openai/v1/models``.
"""

from __future__ import annotations

import sys

from twisted.application.internet import TCPServer
from twisted.application.service import Application, MultiService
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.static import Data

from aiproxy import Config, PoolService, UpstreamPool, build_resource, build_site


def main(target_url: str, port: int = 8081) -> None:
    """Serve ``/`` and ``/openai/...`` on ``port`` until interrupted."""
    config = Config(target_url=target_url, request_timeout=120)
    pool = UpstreamPool.from_config(reactor, config)

    root = Resource()
    root.putChild(b"", Data(b"my own application\n", "text/plain"))
    root.putChild(b"openai", build_resource(config, pool, reactor))

    services = MultiService()
    PoolService(pool).setServiceParent(services)
    site = build_site(root, reactor, config=config)
    TCPServer(port, site, interface="127.0.0.1").setServiceParent(services)
    application = Application("embedded-aiproxy")
    services.setServiceParent(application)

    services.startService()
    reactor.addSystemEventTrigger("before", "shutdown", services.stopService)
    reactor.run()


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9000",
        int(sys.argv[2]) if len(sys.argv) > 2 else 8081,
    )
