"""``GET /health`` (no auth): the server's dependencies, checked and cached briefly.

Answer ``200`` with ``{"status": "ok", "checks": {...}, "version": ...}`` when every
check passes; ``503`` with ``"status": "unhealthy"`` and an ``error`` sentence naming
the failing checks otherwise. Each check is ``{"status": "ok"}`` or
``{"status": "fail", "error": "<why>"}``:

- ``database``: the job store answers a query;
- ``storage``: the storage backend is reachable (local: the root is a writable
  directory; S3: the endpoint answers ``ListBuckets``);
- ``ffmpeg``: the configured (or bundled) ffmpeg binary exists and is executable;
- ``workers``: the dispatcher's lanes are running and it is not shutting down.

Results are cached for ``CACHE_S`` seconds and concurrent requests share one probe,
so a load balancer polling often costs nearly nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__
from .errors import MendError
from .http import json_response
from .keys import DISPATCHER, STORAGE, STORE

CACHE_S = 1.5
CHECK_TIMEOUT_S = 5.0
CHECKS = ("database", "storage", "ffmpeg", "workers")


def ffmpeg_problem(path: str) -> str | None:
    """None if ``path`` (or, without a slash, the name on PATH) is an executable file."""
    resolved = path if os.sep in path else shutil.which(path)
    if not resolved or not os.path.isfile(resolved):
        return f"ffmpeg binary {path} not found (workers.ffmpeg_path)"
    if not os.access(resolved, os.X_OK):
        return f"ffmpeg binary {resolved} is not executable"
    return None


class HealthChecker:
    """Runs the checks of one app; caches the report for ``ttl`` seconds."""

    def __init__(self, app: web.Application, ttl: float = CACHE_S):
        self.app = app
        self.ttl = ttl
        self._report: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def report(self) -> dict[str, Any]:
        async with self._lock:
            if self._report is None or time.monotonic() - self._at >= self.ttl:
                self._report = await self._run()
                self._at = time.monotonic()
            return self._report

    async def _run(self) -> dict[str, Any]:
        probes: dict[str, Callable[[], Awaitable[str | None]]] = {
            "database": self._database,
            "storage": self._storage,
            "ffmpeg": self._ffmpeg,
            "workers": self._workers,
        }
        names = list(probes)
        outcomes = await asyncio.gather(*(self._guarded(name, probes[name]) for name in names))
        checks = {
            name: {"status": "ok"} if problem is None else {"status": "fail", "error": problem}
            for name, problem in zip(names, outcomes, strict=True)
        }
        failing = [name for name in names if checks[name]["status"] != "ok"]
        report: dict[str, Any] = {
            "status": "unhealthy" if failing else "ok",
            "checks": checks,
            "version": __version__,
        }
        if failing:
            report["error"] = "unhealthy: " + "; ".join(f"{n}: {checks[n]['error']}" for n in failing)
        return report

    @staticmethod
    async def _guarded(name: str, probe: Callable[[], Awaitable[str | None]]) -> str | None:
        try:
            return await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"{name} check did not answer within {CHECK_TIMEOUT_S:g} s"
        except MendError as exc:
            return exc.message
        except Exception as exc:
            return f"{name} check failed: {type(exc).__name__}: {exc}"

    async def _database(self) -> str | None:
        await self.app[STORE].ping()
        return None

    async def _storage(self) -> str | None:
        await self.app[STORAGE].check()
        return None

    async def _ffmpeg(self) -> str | None:
        return ffmpeg_problem(self.app[DISPATCHER].ffmpeg)

    async def _workers(self) -> str | None:
        if not self.app[DISPATCHER].healthy():
            return "the job dispatcher is not running (stopping, or a lane has died; see the log)"
        return None


HEALTH = web.AppKey("health", HealthChecker)


async def handle_health(request: web.Request) -> web.Response:
    report = await request.app[HEALTH].report()
    status = 200 if report["status"] == "ok" else 503
    return json_response(report, status=status, headers={"Cache-Control": "no-store"})


def setup(app: web.Application) -> None:
    app[HEALTH] = HealthChecker(app)
    app.router.add_get("/health", handle_health)
