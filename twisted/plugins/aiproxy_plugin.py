"""The ``twist aiproxy`` plugin: loads :mod:`aiproxy.run.tap` only when used."""

from twisted.application.service import ServiceMaker

aiproxy = ServiceMaker(
    "aiproxy", "aiproxy.run.tap", "Streaming reverse proxy for OpenAI-compatible APIs", "aiproxy"
)
