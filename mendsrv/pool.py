"""The dispatcher and the worker pool.

Two lanes claim pending jobs in FIFO order: the ``cpu`` lane runs pyvips operations
in a ``ProcessPoolExecutor`` (spawn context: forking an initialised libvips can hang),
the ``ffmpeg`` lane runs coroutines that drive ffmpeg children. Downloads and uploads
are asyncio steps around the CPU work, so a lane may hold a few more jobs than it has
processes: the next source is fetched while the CPU is busy, and a fetched job goes to
the pool at once, where it waits in the pool's own queue, so a worker that finishes a
job starts the next without a round trip through the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import posixpath
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import JobFailed, StorageError
from .logs import REQUEST_ID
from .models import Event, Job, Status
from .ops.base import Limits, Operation, Resource, RunContext
from .retry import RetryPolicy
from .storage import DISK_FULL, Storage
from .store import TransitionError
from .store_api import JobStore

log = logging.getLogger("mendsrv.pool")

_PID_FILE = ".worker-pid"


# --- worker process side -----------------------------------------------------------------


def _worker_init(vips_concurrency: int = 0) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from .ops.image import block_untrusted

    block_untrusted()
    import pyvips

    # One libvips thread per worker by default: the pool has one process per CPU, and a
    # thread pool per pipeline costs milliseconds on small images (bench/RESULTS.md).
    if vips_concurrency:
        pyvips.concurrency_set(vips_concurrency)
    # No operation cache: every job reads a new temp file, and a cached image would keep
    # the deleted source open (its disk space in use) until evicted.
    pyvips.cache_set_max(0)


def _worker_run(op_name: str, src: str, dst: str, params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Entry point in a worker process: look the operation up and run it."""
    # A job cancelled while it waited in the pool's queue has lost its directory: this
    # raises (to nobody) instead of running it.
    Path(dst).parent.joinpath(_PID_FILE).write_text(str(os.getpid()))
    from .ops import REGISTRY

    op = REGISTRY[op_name]
    model = op.model.model_validate(params)
    result = op.run(src, dst, model, lambda *_: None, ctx)
    assert isinstance(result, dict)
    return result


# --- event-loop side ----------------------------------------------------------------------


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None]
    cancel_reason: str | None = None  # "user" | "shutdown"
    executor: ProcessPoolExecutor | None = None  # the pool its CPU work went to


class JobTimeout(JobFailed):
    """The job ran past workers.job_timeout_s."""


class Dispatcher:
    """Claims pending jobs and runs them; owns every task it starts."""

    def __init__(self, cfg: Config, store: JobStore, storage: Storage, registry: dict[str, Operation], node: str):
        self.cfg = cfg
        self.store = store
        self.storage = storage
        self.registry = registry
        self.node = node
        self.processes = cfg.worker_processes
        self.retry = RetryPolicy(cfg.workers.max_attempts, base=cfg.workers.retry_base_s, factor=2.0, cap=300.0)
        self.limits = Limits(
            max_source_bytes=cfg.limits.max_source_bytes,
            max_input_pixels=cfg.limits.max_input_pixels,
            max_output_pixels=cfg.limits.max_output_pixels,
            max_frames=cfg.limits.max_frames,
            max_duration_s=cfg.limits.max_duration_s,
        )
        self.ffmpeg = cfg.workers.ffmpeg_path or _bundled_ffmpeg()
        self.temp_root = cfg.storage.temp_dir or tempfile.gettempdir()
        self._executor: ProcessPoolExecutor | None = None
        self._ffmpeg = asyncio.Semaphore(cfg.workers.ffmpeg_jobs)
        self._wake = {r.value: asyncio.Event() for r in Resource}
        self._running: dict[str, _Running] = {}
        self._lanes: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        requeued, failed = await self.store.recover(self.cfg.workers.max_attempts, node=None)
        if requeued or failed:
            log.warning("recovered interrupted jobs", extra={"requeued": requeued, "failed": failed})
        self._executor = self._new_executor()
        self.store.add_listener(self._on_event)
        lane_slots = {Resource.CPU: self.processes * 2, Resource.FFMPEG: self.cfg.workers.ffmpeg_jobs}
        for resource, slots in lane_slots.items():
            self._lanes.append(asyncio.create_task(self._lane(resource, slots), name=f"lane-{resource.value}"))

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.cfg.workers.vips_concurrency,),
        )

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let running jobs finish within ``timeout``; requeue the rest."""
        self._stopping = True
        self.store.remove_listener(self._on_event)
        for lane in self._lanes:
            lane.cancel()
        await asyncio.gather(*self._lanes, return_exceptions=True)
        tasks = [r.task for r in self._running.values()]
        if tasks:
            log.info("waiting for running jobs", extra={"jobs": len(tasks), "timeout_s": timeout})
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for running in list(self._running.values()):
                if running.task in pending:
                    running.cancel_reason = "shutdown"
                    running.task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        if self._executor is not None:
            self._kill_workers(self._executor)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _kill_workers(self, executor: ProcessPoolExecutor) -> None:
        for proc in list(getattr(executor, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()

    @property
    def running(self) -> int:
        return len(self._running)

    def runs(self, job_id: str) -> bool:
        """Is this job running on this node now?"""
        return job_id in self._running

    def healthy(self) -> bool:
        return not self._stopping and all(not lane.done() for lane in self._lanes)

    # --- events --------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.kind != "status":
            return
        status = event.data.get("status")
        if status == Status.PENDING.value:
            resource = self.registry.get(event.data.get("type", ""))
            if resource is not None:
                self._wake[resource.resource.value].set()
        elif status == Status.CANCELLED.value:
            running = self._running.get(event.job_id)
            if running is not None and running.cancel_reason is None:
                running.cancel_reason = "user"
                running.task.cancel()

    def wake(self) -> None:
        for event in self._wake.values():
            event.set()

    # --- lanes ---------------------------------------------------------------------

    async def _lane(self, resource: Resource, slots: int) -> None:
        free = asyncio.Semaphore(slots)
        wake = self._wake[resource.value]
        interval = self.cfg.workers.poll_interval_s
        while not self._stopping:
            await free.acquire()
            try:
                job = await self.store.claim(resource.value, self.node)
            except Exception:
                free.release()
                log.exception("claiming a job failed; retrying")
                await asyncio.sleep(interval)
                continue
            if job is None:
                free.release()
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):  # never swallows a cancel, unlike 3.11's wait_for
                        await wake.wait()
                continue
            task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
            self._running[job.id] = _Running(job, task)
            task.add_done_callback(lambda t, job_id=job.id: self._done(job_id, t, free))

    def _done(self, job_id: str, task: asyncio.Task[None], free: asyncio.Semaphore) -> None:
        self._running.pop(job_id, None)
        free.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", exc_info=task.exception(), extra={"job_id": job_id})

    # --- one job -------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        op = self.registry.get(job.type)
        started = time.monotonic()
        extra = {"job_id": job.id, "type": job.type, "request_id": job.request_id, "attempt": job.attempts}
        REQUEST_ID.set(job.request_id)  # this task's own context: its log lines carry the job's id
        log.info("job processing", extra=extra | {"status": "processing"})
        try:
            workdir = await asyncio.to_thread(_make_workdir, f"mend-{job.id[:8]}-", self.temp_root)
        except OSError as exc:
            # a missing, unwritable or full temp directory: retried, then failed with a sentence
            await self._transient(job, self._no_room(exc, "create a working directory in"), extra)
            return
        try:
            if op is None:
                raise JobFailed(f"operation {job.type} is not available on this server")
            result = await asyncio.wait_for(self._work(job, op, workdir), timeout=self.cfg.workers.job_timeout_s)
        except asyncio.CancelledError:
            reason = self._running[job.id].cancel_reason if job.id in self._running else None
            if reason == "shutdown":
                await self._finish(self.store.requeue(job.id, refund=True), extra)
                log.info("job requeued on shutdown", extra=extra | {"status": "pending"})
            elif reason != "user":
                raise
            else:
                log.info("job cancelled", extra=extra | {"status": "cancelled"})
            return
        except TimeoutError:
            self._kill_job_worker(workdir)
            limit = self.cfg.workers.job_timeout_s
            await self._finish(
                self.store.fail(job.id, f"the job ran longer than {limit:g} s and was stopped (workers.job_timeout_s)"),
                extra,
            )
            log.warning("job timed out", extra=extra | {"status": "failed"})
            return
        except BrokenProcessPool:
            await self._worker_died(job, workdir, extra)
            return
        except StorageError as exc:  # transient; a missing source is a SourceNotFound, final
            await self._transient(job, exc.message, extra)
            return
        except JobFailed as exc:
            await self._finish(self.store.fail(job.id, exc.message), extra)
            log.info("job failed", extra=extra | {"status": "failed", "error": exc.message})
            return
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                await self._transient(job, self._no_room(exc, "write the job's files to"), extra)
                return
            log.exception("job crashed", extra=extra)
            await self._finish(
                self.store.fail(job.id, f"internal error while processing the job; the server log has details (job {job.id})"),
                extra,
            )
            return
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        await self._finish(self.store.complete(job.id, result), extra)
        log.info(
            "job completed", extra=extra | {"status": "completed", "duration_s": round(time.monotonic() - started, 3)}
        )

    async def _finish(self, write: Any, extra: dict[str, Any]) -> None:
        """A terminal write that a cancelled request or shutdown cannot interrupt."""
        try:
            await asyncio.shield(write)
        except TransitionError as exc:  # e.g. cancelled by the user meanwhile
            log.info("job state changed meanwhile", extra=extra | {"detail": exc.message})

    def _no_room(self, exc: OSError, doing: str) -> str:
        where = f"the temp directory {self.temp_root} (storage.temp_dir)"
        if exc.filename and not os.path.abspath(str(exc.filename)).startswith(os.path.abspath(self.temp_root)):
            where = "the output storage"
        return f"cannot {doing} {where}: {exc.strerror or exc}"

    async def _transient(self, job: Job, message: str, extra: dict[str, Any]) -> None:
        if job.attempts < self.retry.max_attempts:
            delay = self.retry.delay(job.attempts)
            await self._finish(self.store.requeue(job.id, refund=False, delay_s=delay, error=message), extra)
            log.warning("job will be retried", extra=extra | {"error": message, "delay_s": delay})
            self._wake[self.registry[job.type].resource.value if job.type in self.registry else job.resource].set()
        else:
            await self._finish(self.store.fail(job.id, f"{message} (after {job.attempts} attempts)"), extra)

    async def _worker_died(self, job: Job, workdir: str, extra: dict[str, Any]) -> None:
        running = self._running.get(job.id)
        broken = running.executor if running is not None else None
        if broken is not None and broken is self._executor and not self._stopping:
            self._executor = self._new_executor()
            log.warning("worker process died; pool rebuilt", extra=extra)
        culprit = await self._was_culprit(broken, workdir)
        if not culprit:
            await self._finish(self.store.requeue(job.id, refund=True), extra)
            return
        if job.attempts < self.retry.max_attempts:
            await self._finish(self.store.requeue(job.id, refund=False, delay_s=self.retry.delay(job.attempts)), extra)
        else:
            await self._finish(
                self.store.fail(
                    job.id,
                    f"the worker process died while processing this job {job.attempts} times "
                    "(out of memory or a crash in the decoder); check the input",
                ),
                extra,
            )

    async def _was_culprit(self, executor: ProcessPoolExecutor | None, workdir: str) -> bool:
        """Did this job's own worker die (not one terminated because another died)?

        The pool terminates its other workers with SIGTERM when one dies; any other end
        of this job's worker means it was the one. Its exit code can read as None for a
        moment while the pool's own thread reaps it, so it is read again until known.
        """
        pid = _read_pid(workdir)
        if pid is None:
            return False  # never started: queued behind the crash
        proc = (getattr(executor, "_processes", None) or {}).get(pid)
        if proc is None:
            return True
        for _ in range(100):
            if proc.exitcode is not None:
                return proc.exitcode != -signal.SIGTERM
            await asyncio.sleep(0.05)
        return True  # unknown: count the attempt, so a crashing input cannot loop forever

    def _kill_job_worker(self, workdir: str) -> None:
        """Stop a timed-out CPU job: kill its worker and start a fresh pool at once.

        Jobs running beside it on the old pool get BrokenProcessPool and, their own
        workers having been merely terminated, are requeued without losing an attempt.
        """
        pid = _read_pid(workdir)
        executor = self._executor
        if pid is None or executor is None or pid not in getattr(executor, "_processes", {}):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._stopping:
            self._executor = self._new_executor()
            executor.shutdown(wait=False)

    async def _work(self, job: Job, op: Operation, workdir: str) -> dict[str, Any]:
        p = job.params
        src_dir = Path(workdir, "src")
        out_dir = Path(workdir, "out")
        src = str(src_dir / ("source" + _ext(p["source_key"])))
        dst = str(out_dir / (posixpath.basename(p["dest_key"]) or "output"))
        max_bytes = self.limits.max_source_bytes
        await self.storage.download(p["source_bucket"], p["source_key"], src, max_bytes)
        ctx = RunContext(
            limits=self.limits, ffmpeg=self.ffmpeg, ffmpeg_threads=self.cfg.workers.ffmpeg_threads,
            timeout_s=self.cfg.workers.job_timeout_s,
        )
        for name, (bucket_field, key_field) in op.extra_sources.items():
            if p.get(bucket_field) and p.get(key_field):
                path = str(src_dir / (name + _ext(p[key_field])))
                await self.storage.download(p[bucket_field], p[key_field], path, max_bytes)
                ctx.sources[name] = path
        await self.store.set_progress(job.id, 10, "processing")
        if op.resource is Resource.CPU:
            # no semaphore: the lane's slots bound what waits in the pool's queue
            executor = self._executor
            assert executor is not None
            if job.id in self._running:
                self._running[job.id].executor = executor
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(executor, _worker_run, op.name, src, dst, p, ctx)
        else:
            async with self._ffmpeg:
                model = op.model.model_validate(p)
                reporter = self._progress_reporter(job.id)
                try:
                    result = await op.run(src, dst, model, reporter, ctx)  # type: ignore[misc]
                finally:
                    await reporter.drain()
        await self.store.set_progress(job.id, 90, "uploading")
        return await self._upload(job, result, dst)

    def _progress_reporter(self, job_id: str) -> _ProgressReporter:
        return _ProgressReporter(self.store, job_id)

    async def _upload(self, job: Job, result: dict[str, Any], dst: str) -> dict[str, Any]:
        p = job.params
        bucket, key = p["dest_bucket"], p["dest_key"]
        primary = dict(result.pop("output", {}) or {})
        extras = result.pop("extra_outputs", []) or []
        outputs = []
        # beside-files first, the primary last: a client that sees it sees everything
        for extra_out in extras:
            meta = dict(extra_out)
            name = meta.pop("name")
            extra_key = posixpath.join(posixpath.dirname(key), name)
            path = str(Path(dst).parent / name)
            content_type = meta.pop("content_type", "application/octet-stream")
            size = await self.storage.upload(bucket, extra_key, path, content_type)
            outputs.append({"bucket": bucket, "key": extra_key, "size": size, "content_type": content_type, **meta})
        if not os.path.exists(dst):
            raise RuntimeError(f"operation {job.type} wrote no output")
        content_type = primary.pop("content_type", "application/octet-stream")
        size = await self.storage.upload(bucket, key, dst, content_type)
        outputs.insert(0, {"bucket": bucket, "key": key, "size": size, "content_type": content_type, **primary})
        return {"outputs": outputs, **result}


class _ProgressReporter:
    """The ``progress`` callable of an ffmpeg operation: throttled store writes.

    Values land in the 10-90 band of the job's progress (download before, upload after),
    at least 1 point and 0.5 s apart. Its writes are owned tasks, drained at the end.
    """

    def __init__(self, store: JobStore, job_id: str):
        self.store = store
        self.job_id = job_id
        self.last_value = -1.0
        self.last_at = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()

    def __call__(self, percent: float, phase: str = "processing") -> None:
        value = 10 + max(0.0, min(100.0, percent)) * 0.8
        moment = time.monotonic()
        if value - self.last_value < 1 or moment - self.last_at < 0.5:
            return
        self.last_value, self.last_at = value, moment
        task = asyncio.ensure_future(self.store.set_progress(self.job_id, value, phase))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _ext(key: str) -> str:
    ext = posixpath.splitext(key)[1].lower()
    return ext if ext.isascii() and len(ext) <= 8 and ext[1:].isalnum() else ""


def _make_workdir(prefix: str, root: str) -> str:
    """A job's temp directory with src/ and out/, made off the event loop (three
    directory creations took a few milliseconds of the loop per job under load)."""
    workdir = tempfile.mkdtemp(prefix=prefix, dir=root)
    os.mkdir(os.path.join(workdir, "src"))
    os.mkdir(os.path.join(workdir, "out"))
    return workdir


def _read_pid(workdir: str) -> int | None:
    try:
        return int(Path(workdir, "out", _PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def _bundled_ffmpeg() -> str:
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # pragma: no cover - no bundled binary
        return shutil.which("ffmpeg") or "ffmpeg"


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
