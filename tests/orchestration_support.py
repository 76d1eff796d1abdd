"""What the orchestration tests share: the resource to fetch, a token source that never
changes, and orchestration settings that fetch every event at once (no coalescing, one
attempt, no rate limit to wait for)."""

from __future__ import annotations

from typing import Any

from consumer.config import OrchestrationSettings

RESOURCES = {"Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"}


class Tokens:
    """An application's token source (the orchestrator's view of it): always ``token``."""

    def __init__(self, token: str = "tok-0000") -> None:
        self.token = token

    async def access_token(self) -> str:
        return self.token

    def invalidate(self, rejected: str | None = None) -> None:
        pass


def quick_orchestration(rest_url: str, **over: Any) -> OrchestrationSettings:
    """Orchestration of :data:`RESOURCES` from ``rest_url``: every GET the server sees is one
    made (no answer reused), one attempt each, no rate limit to wait for; ``over`` on top."""
    return OrchestrationSettings(
        **{
            "enabled": True,
            "resources": RESOURCES,
            "base_url": rest_url,
            "coalesce_ms": 0.0,
            "max_attempts": 1,
            "rate_per_s": 1000,
            "burst": 1000,
            **over,
        }
    )
