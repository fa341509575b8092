"""Job states, the job record and its JSON resource."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any


class Status(str, Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
ACTIVE = frozenset({Status.PENDING, Status.PROCESSING})


def now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> '2026-12-03T16:00:00.000Z'."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


@dataclass
class Job:
    id: str
    seq: int
    type: str
    resource: str
    status: Status
    params: dict[str, Any]
    created_at: float
    progress: float = 0.0
    request_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    error: str | None = None
    result: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_style: str = "default"
    run_after: float = 0.0
    node: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resource_dict(self) -> dict[str, Any]:
        """The job resource of the API."""
        return {
            "job_id": self.id,
            "type": self.type,
            "status": self.status.value,
            "progress": int(round(self.progress)),
            "params": self.params,
            "request_id": self.request_id,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempts": self.attempts,
            "error": self.error,
            "result": self.result,
        }


@dataclass(frozen=True)
class Event:
    """One row of job_events, as fanned out to SSE subscribers."""

    id: int
    job_id: str
    kind: str  # "status" | "progress"
    data: dict[str, Any]
    terminal: bool = False
