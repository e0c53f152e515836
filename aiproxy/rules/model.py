"""The model a request names: the ``model`` of its JSON body."""

from __future__ import annotations

import json

__all__ = ["requested_model"]


def requested_model(body: bytes) -> str | None:
    """The ``model`` named by a JSON object body; L{None} if there is none."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None
