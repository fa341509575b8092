"""Retry policy as data: one shape for job retries and webhook deliveries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base: float = 5.0
    factor: float = 2.0
    cap: float = 21600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.cap, self.base * self.factor ** max(0, attempt - 1))

    def gives_up_after(self, attempt: int) -> bool:
        return attempt >= self.max_attempts
