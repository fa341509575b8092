"""Job states, the job record and its JSON resource."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
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


@lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> '2026-12-03T16:00:00.000Z' (milliseconds, truncated)."""
    if ts is None:
        return None
    seconds, ms = divmod(int(ts * 1000), 1000)
    return f"{_iso_seconds(seconds)}.{ms:03d}Z"


class _RandomIds:
    """Random bytes from the OS's random source, read 4 KiB at a time.

    ``uuid.uuid4()`` makes one ``getrandom`` system call per id; a submission needs
    two ids (the job's and the request's), and on a virtual machine a system call is
    not cheap (bench/RESULTS.md).
    """

    CHUNK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._reset)  # a child never reuses the parent's bytes

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(self.CHUNK), 0
            self._pos += n
            return self._buf[self._pos - n : self._pos]


_RANDOM = _RandomIds()


def _uuid7() -> bytearray:
    """A version 7 UUID (RFC 9562): 48 bits of Unix time in milliseconds, then 74
    random bits. Ids made one after the other sort together, so a new job's entries
    in the store's indexes (by id, by request id, its events by job id) land on the
    same few pages instead of one random page each: with random ids a commit wrote
    about six pages per job (bench/RESULTS.md)."""
    b = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + _RANDOM.take(10))
    b[6] = (b[6] & 0x0F) | 0x70  # version 7
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 9562 variant
    return b


def new_uuid() -> str:
    """A new job id: a time-ordered (version 7) UUID in its canonical text form."""
    h = _uuid7().hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_hex_id() -> str:
    """A new request id: 32 hex digits, time-ordered like ``new_uuid``."""
    return _uuid7().hex()


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
    delivery: bool = False  # a webhook delivery was written with it (this node's own write)
