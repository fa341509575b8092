"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from contextvars import ContextVar
from typing import Any

import orjson

from .models import iso

# The id of the HTTP request (or job) being served by the current task; the request-id
# middleware sets it, the dispatcher sets it to a job's request_id while running it.
REQUEST_ID: ContextVar[str | None] = ContextVar("mend_request_id", default=None)

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class RequestIdFilter(logging.Filter):
    """Stamp every record with the current request id unless it names one itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = REQUEST_ID.get()
            if rid is not None:
                record.request_id = rid
        return True


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request its parser refused (oversized headers, a bad request line)
    at error level with a traceback; a hostile client could fill the log with them.
    Make it one warning line with the reason, cut short."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed request refused", ()
            record.reason = str(exc.message)[:120]
            record.exc_info, record.exc_text = None, None
        return True


class LineWriter(logging.Handler):
    """Writes each formatted record as one line to a file descriptor (stderr).

    On the thread of the server's event loop (see ``gather_on``), the lines of one loop turn are written
    together by one ``write(2)`` at the start of the next turn: under load the server
    logs two lines per submission, and a system call for each was a measurable part of
    a submission's cost (bench/RESULTS.md). Elsewhere (worker threads, start-up, exit)
    and for ERROR and above, a line is written at once, after any gathered ones.
    ``flush()`` (called by ``logging.shutdown`` at exit) writes what is gathered.
    """

    def __init__(self, fd: int = 2):
        super().__init__()
        self.fd = fd
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop lines are gathered on
        self._loop_thread: int | None = None
        self._flush_scheduled = False

    def gather_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Gather the lines logged on ``loop``'s thread (it must be running on this
        thread), or on no loop (``None``). The thread is compared by id: asking asyncio
        for the running loop costs a system call per record on Python 3.11."""
        with self.lock:  # type: ignore[union-attr]
            self._write_gathered()
            self._loop = loop
            self._loop_thread = threading.get_ident() if loop is not None else None

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        loop = self._loop
        if loop is not None and record.levelno < logging.ERROR and threading.get_ident() == self._loop_thread:
            if not self._flush_scheduled:
                try:
                    loop.call_soon(self.flush)
                    self._flush_scheduled = True
                except RuntimeError:  # the loop is closed
                    self._write_gathered()
            return
        self._write_gathered()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write_gathered()

    def _write_gathered(self) -> None:
        self._flush_scheduled = False
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # stderr closed or full: logging must never take the server down


def setup_logging(level: str = "INFO") -> None:
    # the JSON lines carry none of these: skip collecting them for every record (the
    # process id is a system call per record)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineWriter()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())


def gather_on(loop: asyncio.AbstractEventLoop | None) -> None:
    """Point every ``LineWriter`` of the root logger at ``loop`` (or at none)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineWriter):
            handler.gather_on(loop)
