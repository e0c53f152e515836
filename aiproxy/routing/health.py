"""
Passive health of upstreams and of their keys, pure, on the injected clock: nothing
is probed in the background; what requests meet decides.

- A key answered ``429`` cools down for the upstream's ``retry-after-ms`` or
  ``Retry-After`` (capped at :data:`MAX_COOLDOWN`; :data:`DEFAULT_COOLDOWN` when it said
  nothing); a key answered ``401`` or ``403`` is disabled until the file is loaded again.
- An upstream whose requests fail (connect failures, timeouts before headers, ``5xx``)
  :data:`EJECT_AFTER` times in a row is ejected for :data:`FIRST_EJECTION` seconds,
  doubling at each ejection in a row up to :data:`MAX_EJECTION`. When that time is over,
  one request may go as a probe (half-open): its success brings the upstream back, its
  failure ejects it again.
"""

from __future__ import annotations

import attrs

__all__ = [
    "COOLING",
    "DEFAULT_COOLDOWN",
    "DISABLED",
    "EJECTED",
    "EJECT_AFTER",
    "FIRST_EJECTION",
    "HALF_OPEN",
    "HEALTHY",
    "MAX_COOLDOWN",
    "MAX_EJECTION",
    "KeyHealth",
    "UpstreamHealth",
]

HEALTHY, COOLING, DISABLED, EJECTED, HALF_OPEN = (
    "healthy",
    "cooling",
    "disabled",
    "ejected",
    "half_open",
)

DEFAULT_COOLDOWN = 60.0
"""Seconds a key answered ``429`` without a wait cools down."""
MAX_COOLDOWN = 60.0
"""The longest cooldown believed, whatever the upstream asks."""
EJECT_AFTER = 3
"""Failures in a row that eject an upstream."""
FIRST_EJECTION = 5.0
"""Seconds of a first ejection; each ejection in a row doubles it."""
MAX_EJECTION = 300.0
"""The longest ejection."""
PROBE_WAIT = 1.0
"""What to tell clients to wait while a half-open upstream's probe is out."""


@attrs.define
class KeyHealth:
    """Whether one key of an upstream may be used now."""

    cooling_until: float = 0.0
    disabled: bool = False

    def state(self, now: float) -> str:
        """``healthy``, ``cooling`` or ``disabled``."""
        if self.disabled:
            return DISABLED
        return COOLING if now < self.cooling_until else HEALTHY

    def seconds_left(self, now: float) -> float:
        """Seconds until its cooldown is over (0 if it is not cooling)."""
        return max(self.cooling_until - now, 0.0)

    def usable(self, now: float) -> bool:
        """Whether a request may use this key now."""
        return not self.disabled and now >= self.cooling_until

    def cool(self, now: float, wait: float | None) -> None:
        """The key was answered ``429``; ``wait`` is what the upstream asked, if it did."""
        wait = DEFAULT_COOLDOWN if wait is None else min(max(wait, 0.0), MAX_COOLDOWN)
        self.cooling_until = max(self.cooling_until, now + wait)

    def disable(self) -> None:
        """The key was refused (``401``/``403``): never again until the file is reloaded."""
        self.disabled = True


@attrs.define
class UpstreamHealth:
    """Whether an upstream may be sent requests now, from its recent failures."""

    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    probing: bool = False

    def state(self, now: float) -> str:
        """``healthy``, ``ejected`` or ``half_open`` (one probe may go, or is out)."""
        if not self.ejections:
            return HEALTHY
        return EJECTED if now < self.ejected_until else HALF_OPEN

    def usable(self, now: float) -> bool:
        """Whether a request may go now: healthy, or the probe of a half-open upstream."""
        state = self.state(now)
        return state == HEALTHY or (state == HALF_OPEN and not self.probing)

    def sent(self, now: float) -> None:
        """A request is going to it: if half-open, that request is the probe."""
        if self.ejections and self.state(now) == HALF_OPEN:
            self.probing = True

    def succeeded(self) -> None:
        """A request got its response head (a status below 500): healthy again."""
        self.failures = 0
        self.ejections = 0
        self.probing = False

    def failed(self, now: float) -> None:
        """A request failed (connect, timeout before headers, ``5xx``)."""
        self.failures += 1
        if self.probing or self.failures >= EJECT_AFTER:
            self.probing = False
            self.failures = 0
            ejection = min(FIRST_EJECTION * 2**self.ejections, MAX_EJECTION)
            self.ejections += 1
            self.ejected_until = now + ejection

    def abandoned(self) -> None:
        """A request sent to it ended before its outcome was known: if it was the
        probe, another request may be the probe."""
        self.probing = False

    def available_in(self, now: float) -> float:
        """Seconds until it may be tried again: 0 if it may now, 1 while its probe is out."""
        if self.usable(now):
            return 0.0
        return max(self.ejected_until - now, 0.0) or PROBE_WAIT
