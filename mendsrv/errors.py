"""The error hierarchy: one root, HTTP-facing subclasses carry a status."""

from __future__ import annotations

from typing import Any


class MendError(Exception):
    """Something went wrong in mendsrv."""

    status: int = 500

    def __init__(self, message: str | None = None, *, details: list[dict[str, Any]] | None = None):
        super().__init__(message or (self.__doc__ or "error").strip())
        self.details = details

    @property
    def message(self) -> str:
        return str(self.args[0])


class BadRequest(MendError):
    """The request is invalid."""

    status = 400


class Unauthorized(MendError):
    """A valid API key is required: send it as X-API-Key or Authorization: Bearer."""

    status = 401


class NotFound(MendError):
    """Not found."""

    status = 404


class Conflict(MendError):
    """The request conflicts with the current state."""

    status = 409


class PayloadTooLarge(MendError):
    """The request body is too large."""

    status = 413


class QueueFull(MendError):
    """The job queue is full; retry later."""

    status = 429

    @classmethod
    def at(cls, max_queue: int) -> QueueFull:
        return cls(f"the queue is full: {max_queue} jobs are pending (limits.max_queue); retry later")


class Unavailable(MendError):
    """A dependency is unavailable."""

    status = 503


class ConfigError(MendError):
    """The configuration is invalid."""


class JobFailed(MendError):
    """A job failed with a sentence a user can act on.

    Raised by operations and storage; the message is stored as the job's `error`.
    """


class SourceNotFound(JobFailed):
    """The source object does not exist."""


class StorageError(JobFailed):
    """The storage backend failed."""
