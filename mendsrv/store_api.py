"""The job store interface shared by the SQLite store (store.py) and the PostgreSQL
store (store_pg.py). The HTTP layer, the dispatcher and the webhook sender use only
these methods; the semantics are those documented on ``store.Store``.

``recover(max_attempts, node=None)`` puts back jobs left ``processing`` by a node that
is gone: on SQLite (one node) that is every processing job; on PostgreSQL it is the
jobs of nodes whose heartbeat is stale, plus this node's own earlier incarnation, never
the jobs of live nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .models import Event, Job, Status

Listener = Callable[[Event], None]


class JobStore(Protocol):
    async def close(self) -> None: ...

    def add_listener(self, listener: Listener) -> None: ...

    def remove_listener(self, listener: Listener) -> None: ...

    async def insert_job(
        self,
        *,
        job_id: str,
        type: str,
        resource: str,
        params: dict[str, Any],
        request_id: str | None,
        webhook_url: str | None,
        webhook_style: str,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        max_queue: int | None = None,
    ) -> tuple[Job, bool]: ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        request_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[Job]: ...

    async def count_by_status(self) -> dict[str, int]: ...

    async def claim(self, resource: str, node: str) -> Job | None: ...

    async def next_due(self, resource: str) -> float | None: ...

    async def set_progress(self, job_id: str, progress: float, phase: str) -> Event | None: ...

    async def complete(self, job_id: str, result: dict[str, Any]) -> Job: ...

    async def fail(self, job_id: str, error: str, *, allowed: Iterable[Status] = ...) -> Job: ...

    async def cancel(self, job_id: str) -> Job: ...

    async def retry(self, job_id: str) -> Job: ...

    async def requeue(self, job_id: str, *, refund: bool, delay_s: float = 0.0, error: str | None = None) -> Job: ...

    async def recover(self, max_attempts: int, node: str | None = None) -> tuple[int, int]: ...

    async def events_after(self, job_id: str, after_id: int = 0) -> list[Event]: ...

    async def due_deliveries(self, limit: int = 50) -> list[dict[str, Any]]: ...

    async def next_delivery_at(self) -> float | None: ...

    async def record_attempt(
        self,
        delivery_id: int,
        *,
        status_code: int | None,
        error: str | None,
        delivered: bool,
        next_retry_at: float | None,
    ) -> None: ...

    async def list_attempts(self, job_id: str) -> list[dict[str, Any]]: ...

    async def ping(self) -> None: ...

    async def integrity_check(self) -> str: ...
