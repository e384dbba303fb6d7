"""How a delivery attempt can fail, as the dispatcher needs to know it:
retry after a backoff, wait as the homeserver asks, or give up at once.
`reason` is short and safe to log and to use as a metric label."""

from __future__ import annotations


class DeliveryError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Transient(DeliveryError):
    """Network trouble or a 5xx: worth retrying with backoff."""


class RateLimited(DeliveryError):
    """429 / M_LIMIT_EXCEEDED: retry once `retry_after` seconds have passed."""

    def __init__(self, retry_after: float, detail: str = ""):
        super().__init__("rate_limited", detail)
        self.retry_after = retry_after


class Permanent(DeliveryError):
    """Retrying cannot help (unknown token, unknown alias, not in the room)."""
