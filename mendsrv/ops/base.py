"""What an operation is: a parameter model, a run function and a resource class."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import JobFailed

# progress(percent 0-100, phase) — called by ffmpeg operations as they run.
Progress = Callable[[float, str], None]


class Resource(str, Enum):
    """Where an operation's work runs."""

    CPU = "cpu"  # the process pool (pyvips)
    FFMPEG = "ffmpeg"  # an ffmpeg child process driven from the event loop


_BAD_KEY = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")  # C0, DEL and C1 controls, backslash


def check_key(value: str) -> str:
    """Reject object keys that could escape a bucket or confuse a backend."""
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode()) > 1024:
        raise ValueError("must be at most 1024 bytes")
    if value.startswith("/"):
        raise ValueError("must not start with '/'")
    if _BAD_KEY.search(value):
        raise ValueError("must not contain a backslash or a control character")
    if any(part in ("..", ".") for part in value.split("/")):
        raise ValueError("must not contain '.' or '..' path segments")
    return value


_BUCKET = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")


def check_bucket(value: str) -> str:
    if not _BUCKET.match(value) or ".." in value:
        raise ValueError("must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


class JobParams(BaseModel):
    """The fields every operation takes. Operation models subclass this."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    source_bucket: str = Field(description="Bucket holding the source object")
    source_key: str = Field(description="Key (path) of the source object")
    dest_bucket: str = Field(description="Bucket for the output")
    dest_key: str = Field(description="Key (path) for the output")
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="URL that receives the terminal-status webhook"
    )
    webhook_style: Literal["default", "discord"] = Field(
        default="default", description="Webhook body format"
    )
    request_id: str | None = Field(
        default=None, max_length=200, description="Your own id for tracing this request"
    )

    @field_validator("source_bucket", "dest_bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_bucket(v)

    @field_validator("source_key", "dest_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_key(v)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/?#]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


COMMON_FIELDS = frozenset(JobParams.model_fields)


@dataclass
class Limits:
    """The safety limits an operation must respect (DESIGN §4)."""

    max_source_bytes: int = 2 * 1024**3
    max_input_pixels: int = 100_000_000
    max_output_pixels: int = 100_000_000
    max_frames: int = 1000
    max_duration_s: float = 14400


@dataclass
class RunContext:
    """What a run function gets besides its source, destination and params.

    It must stay picklable: CPU operations receive it in a worker process.
    """

    limits: Limits = field(default_factory=Limits)
    # extra source objects downloaded for the operation, by name (e.g. "watermark")
    sources: dict[str, str] = field(default_factory=dict)
    ffmpeg: str = "ffmpeg"
    ffmpeg_threads: int = 0
    # set by the pool for FFMPEG operations: the timeout that kills the child
    timeout_s: float = 900.0


# An operation's run function. CPU ones are plain functions run in the process pool;
# FFMPEG ones are coroutines run on the event loop (they await an ffmpeg child).
RunFn = Callable[[str, str, Any, Progress, RunContext], "dict[str, Any] | Awaitable[dict[str, Any]]"]


@dataclass(frozen=True)
class Operation:
    """One registered operation, e.g. image/resize."""

    name: str
    description: str
    model: type[JobParams]
    run: RunFn
    resource: Resource = Resource.CPU
    # names of params holding (bucket, key) pairs of extra sources to download,
    # e.g. {"watermark": ("watermark_bucket", "watermark_key")}
    extra_sources: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]


def output_path(dst_path: str | Path, name: str) -> Path:
    """A path beside the primary output, for operations that write several files."""
    return Path(dst_path).parent / name


__all__ = [
    "COMMON_FIELDS",
    "JobFailed",
    "JobParams",
    "Limits",
    "Operation",
    "Progress",
    "Resource",
    "RunContext",
    "check_key",
    "output_path",
]
