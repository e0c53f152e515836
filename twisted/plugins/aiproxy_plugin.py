"""The ``twist aiproxy`` plugin: loads :mod:`aiproxy.tap` only when used."""

from twisted.application.service import ServiceMaker

aiproxy = ServiceMaker(
    "aiproxy", "aiproxy.tap", "Streaming reverse proxy for OpenAI-compatible APIs", "aiproxy"
)
