"""The job store: all SQL lives here.

SQLite in WAL mode through aiosqlite. One writer connection, serialised by a lock so
that each transaction is whole; one reader connection for GETs and listings. Every
state change is a guarded ``UPDATE … WHERE id=? AND status IN (…)`` that appends a
``job_events`` row in the same transaction; a terminal transition of a job with a
webhook also writes its delivery row there (the outbox). Listeners (the EventHub,
the dispatcher) are told about each event after the commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import orjson

from .errors import Conflict, NotFound, QueueFull
from .models import ACTIVE, TERMINAL, Event, Job, Status, now

log = logging.getLogger("mendsrv.store")

Listener = Callable[[Event], None]

MIGRATIONS: list[str] = [
    # 1: jobs, their events, webhook deliveries and their attempts
    """
    CREATE TABLE jobs (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        id              TEXT NOT NULL UNIQUE,
        type            TEXT NOT NULL,
        resource        TEXT NOT NULL,
        status          TEXT NOT NULL,
        progress        REAL NOT NULL DEFAULT 0,
        params          TEXT NOT NULL,
        request_id      TEXT,
        idempotency_key TEXT UNIQUE,
        body_hash       TEXT,
        created_at      REAL NOT NULL,
        started_at      REAL,
        finished_at     REAL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        error           TEXT,
        result          TEXT,
        webhook_url     TEXT,
        webhook_style   TEXT NOT NULL DEFAULT 'default',
        run_after       REAL NOT NULL DEFAULT 0,
        node            TEXT
    );
    CREATE INDEX jobs_claim ON jobs (status, resource, seq);
    CREATE INDEX jobs_type ON jobs (type, seq);
    CREATE INDEX jobs_request ON jobs (request_id, seq);
    CREATE TABLE job_events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id  TEXT NOT NULL,
        kind    TEXT NOT NULL,
        data    TEXT NOT NULL,
        at      REAL NOT NULL
    );
    CREATE INDEX job_events_job ON job_events (job_id, id);
    CREATE TABLE deliveries (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id          TEXT NOT NULL,
        event_id        INTEGER NOT NULL,
        event           TEXT NOT NULL,
        url             TEXT NOT NULL,
        style           TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at      REAL NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_job ON deliveries (job_id);
    CREATE TABLE delivery_attempts (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery_id   INTEGER NOT NULL,
        job_id        TEXT NOT NULL,
        attempt       INTEGER NOT NULL,
        at            REAL NOT NULL,
        status_code   INTEGER,
        error         TEXT,
        next_retry_at REAL
    );
    CREATE INDEX delivery_attempts_job ON delivery_attempts (job_id, id);
    """,
    # 2: the number of jobs in each status, kept by triggers. A submission checks the
    # pending count against limits.max_queue and /metrics reports the counts; a
    # count(*) over the index costs time in proportion to the jobs counted (2.4 ms at
    # 60,000 pending jobs), and both run often.
    """
    CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO job_counts (status, n)
        SELECT s.status, (SELECT count(*) FROM jobs WHERE jobs.status = s.status)
        FROM (SELECT 'pending' AS status UNION ALL SELECT 'processing' UNION ALL SELECT 'completed'
              UNION ALL SELECT 'failed' UNION ALL SELECT 'cancelled') AS s;
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
    END;
    CREATE TRIGGER job_counts_update AFTER UPDATE OF status ON jobs WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
        UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
    END;
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    END;
    """,
]


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, split at the semicolons that end one (not at
    those inside a trigger's body)."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                yield buffer.strip()
            buffer = ""
    if buffer.strip(" \n;"):
        yield buffer.strip()

_PENDING_COUNT = "SELECT n FROM job_counts WHERE status = 'pending'"  # kept by triggers: migration 2

_JOB_COLUMNS = (
    "seq, id, type, resource, status, progress, params, request_id, created_at, started_at, "
    "finished_at, attempts, error, result, webhook_url, webhook_style, run_after, node"
)


def _loads(value: str | bytes | None) -> Any:
    return None if value is None else orjson.loads(value)


def _job(row: Any) -> Job:
    return Job(
        seq=row[0], id=row[1], type=row[2], resource=row[3], status=Status(row[4]),
        progress=row[5], params=orjson.loads(row[6]), request_id=row[7], created_at=row[8],
        started_at=row[9], finished_at=row[10], attempts=row[11], error=row[12],
        result=_loads(row[13]), webhook_url=row[14], webhook_style=row[15], run_after=row[16],
        node=row[17],
    )


class _Insert(NamedTuple):
    """A submission waiting for its group commit."""

    values: tuple[Any, ...]  # the INSERT's bound values, params as JSON
    params: dict[str, Any]
    max_queue: int | None
    future: asyncio.Future[Job]


class TransitionError(Conflict):
    """The job is not in a state that allows this."""


class UserTransitions:
    """``cancel`` and ``retry``, the transitions a client asks for: the same on every
    backend, which differ only in ``_transition``."""

    _transition: Callable[..., Awaitable[Job]]

    async def cancel(self, job_id: str) -> Job:
        try:
            return await self._transition(
                job_id, ACTIVE, Status.CANCELLED, "finished_at = ?, error = ?", (now(), "cancelled by request")
            )
        except TransitionError as exc:
            raise TransitionError(f"{exc.message.split(';')[0]}; only pending or processing jobs can be cancelled") from None

    async def retry(self, job_id: str) -> Job:
        try:
            return await self._transition(
                job_id, [Status.FAILED, Status.CANCELLED], Status.PENDING,
                "progress = 0, attempts = 0, error = NULL, result = NULL, started_at = NULL, "
                "finished_at = NULL, run_after = 0",
            )
        except TransitionError as exc:
            raise TransitionError(f"{exc.message.split(';')[0]}; only failed or cancelled jobs can be retried") from None


class Store(UserTransitions):
    """SQLite job store. Use ``await Store.open(path)``; ``await store.close()``."""

    def __init__(self, path: str):
        self.path = path
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        # group commit of submissions (see _insert_grouped)
        self._inserts: list[_Insert] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by _open; asking asyncio for it is a system call on 3.11

    # --- life cycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, path: str) -> Store:
        store = cls(path)
        await store._open()
        return store

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._w = await aiosqlite.connect(self.path, isolation_level=None)
        await self._w.execute("PRAGMA journal_mode=WAL")
        await self._w.execute("PRAGMA synchronous=NORMAL")
        await self._w.execute("PRAGMA busy_timeout=5000")
        await self._migrate()
        self._r = await aiosqlite.connect(self.path, isolation_level=None)
        await self._r.execute("PRAGMA busy_timeout=5000")
        await self._r.execute("PRAGMA query_only=1")

    async def _migrate(self) -> None:
        w = self._w
        assert w is not None
        await w.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with w.execute("SELECT version FROM schema_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database {self.path} has schema version {version}, newer than this mendsrv ({len(MIGRATIONS)})"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            await w.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
                    await w.execute(statement)
                await w.execute("DELETE FROM schema_version")
                await w.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
                await w.execute("COMMIT")
            except BaseException:
                await w.execute("ROLLBACK")
                raise
            log.info("store migrated", extra={"schema_version": number})

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher  # write what was accepted before closing
        async with self._lock:  # a shielded transaction still in flight finishes first
            for conn in (self._r, self._w):
                if conn is not None:
                    await conn.close()
            self._r = self._w = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, events: Iterable[Event]) -> None:
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:  # a listener must never break a transition
                    log.exception("event listener failed")

    # --- helpers -------------------------------------------------------------------

    async def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run a query on the reader connection and fetch every row, in one hop.

        Never as execute, then fetch: between the two hops the statement is open, and
        an open statement holds its read snapshot. Other reads queued meanwhile, and
        the next read after a caller cancelled between the hops (aiosqlite's thread
        keeps the last cursor it made), saw the database as it was before it: a job
        accepted a moment earlier answered 404.
        """
        assert self._r is not None, "store is closed"
        return list(await self._r.execute_fetchall(sql, args))

    async def _write(self, fn: Callable[[aiosqlite.Connection], Any]) -> Any:
        """Run ``fn(conn)`` (a coroutine function) as one IMMEDIATE transaction.

        ``fn`` returns ``(value, events)``; listeners hear of the events after the commit.

        Shielded: a caller that is cancelled gets CancelledError, but the transaction
        still runs to its COMMIT or ROLLBACK, so the connection is never left inside one.
        """
        return await asyncio.shield(self._transaction(fn))

    async def _transaction(self, fn: Callable[[aiosqlite.Connection], Any]) -> Any:
        assert self._w is not None, "store is closed"
        async with self._lock:
            await self._w.execute("BEGIN IMMEDIATE")
            try:
                result = await fn(self._w)
            except BaseException:
                await self._w.execute("ROLLBACK")
                raise
            await self._w.execute("COMMIT")
        value, events = result
        self._notify(events)
        return value

    async def _write_sync(self, fn: Callable[[sqlite3.Connection], tuple[Any, list[Event]]]) -> Any:
        """Like ``_write``, but ``fn`` is a plain function run whole on the writer thread.

        BEGIN, its statements and COMMIT take one hop to aiosqlite's thread instead of one
        hop each. Every hop costs a thread wake-up, a wake-up of the event loop and, under
        load, a wait for the GIL: the per-job transitions (claim, progress, complete) took
        milliseconds of CPU per job that way (bench/RESULTS.md). aiosqlite has no public
        call for this, so it uses its ``_execute`` and ``_conn`` (both there since 0.17).
        """
        assert self._w is not None, "store is closed"
        conn = self._w

        def run() -> tuple[Any, list[Event]]:
            db = conn._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        async def go() -> Any:
            async with self._lock:
                value, events = await conn._execute(run)
            self._notify(events)
            return value

        return await asyncio.shield(go())

    @staticmethod
    def _one_sync(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Any:
        rows = db.execute(sql, args).fetchall()  # fetch all: a pending statement would block COMMIT
        return rows[0] if rows else None

    @staticmethod
    def _add_event_sync(db: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any], terminal: bool = False) -> Event:
        cur = db.execute(
            "INSERT INTO job_events (job_id, kind, data, at) VALUES (?, ?, ?, ?)", (job_id, kind, orjson.dumps(data), now())
        )
        assert cur.lastrowid is not None
        return Event(id=cur.lastrowid, job_id=job_id, kind=kind, data=data, terminal=terminal)

    @staticmethod
    async def _one(conn: aiosqlite.Connection, sql: str, args: tuple[Any, ...]) -> Any:
        # execute_fetchall: one hop to the writer thread (execute + fetchone + close took three,
        # and each hop waits for a turn of a busy event loop while the writer lock is held)
        rows = await conn.execute_fetchall(sql, args)
        return rows[0] if rows else None

    @staticmethod
    async def _add_event(conn: aiosqlite.Connection, job_id: str, kind: str, data: dict[str, Any], terminal: bool = False) -> Event:
        row = await conn.execute_insert(  # one hop: insert and last_insert_rowid together
            "INSERT INTO job_events (job_id, kind, data, at) VALUES (?, ?, ?, ?)",
            (job_id, kind, orjson.dumps(data), now()),
        )
        assert row is not None
        event_id = row[0]
        return Event(id=event_id, job_id=job_id, kind=kind, data=data, terminal=terminal)

    async def _transition(
        self,
        job_id: str,
        allowed: Iterable[Status],
        to: Status,
        sets: str = "",
        args: tuple[Any, ...] = (),
    ) -> Job:
        """``UPDATE jobs SET status=to, … WHERE id=? AND status IN allowed`` + its event."""
        allowed = tuple(allowed)
        marks = ",".join("?" * len(allowed))
        sql = (
            f"UPDATE jobs SET status = ?{', ' + sets if sets else ''} "
            f"WHERE id = ? AND status IN ({marks}) RETURNING {_JOB_COLUMNS}"
        )

        def tx(db: sqlite3.Connection) -> tuple[Job, list[Event]]:  # one hop: see _write_sync
            row = self._one_sync(db, sql, (to.value, *args, job_id, *(s.value for s in allowed)))
            if row is None:
                current = self._one_sync(db, "SELECT status FROM jobs WHERE id = ?", (job_id,))
                if current is None:
                    raise NotFound(f"job {job_id} not found")
                raise TransitionError(f"job {job_id} is {current[0]}; it cannot become {to.value}")
            job = _job(row)
            events = [self._add_event_sync(db, job.id, "status", job.resource_dict(), to in TERMINAL)]
            if to in TERMINAL and job.webhook_url:
                db.execute(
                    "INSERT INTO deliveries (job_id, event_id, event, url, style, next_attempt_at, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job.id, events[0].id, f"job.{to.value}", job.webhook_url, job.webhook_style, now(), now()),
                )
                events = [dataclasses.replace(events[0], delivery=True)]
            return job, events

        return await self._write_sync(tx)

    # --- jobs ----------------------------------------------------------------------

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
    ) -> tuple[Job, bool]:
        """Insert a pending job; returns (job, created). Committed when this returns."""
        created_at = now()
        if idempotency_key is None:
            values = (job_id, type, resource, orjson.dumps(params), request_id, created_at, webhook_url, webhook_style)
            return await self._insert_grouped(values, params, max_queue), True

        async def tx(conn: aiosqlite.Connection) -> tuple[Job, list[Event]]:
            if idempotency_key is not None:
                row = await self._one(
                    conn, f"SELECT {_JOB_COLUMNS}, body_hash FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                )
                if row is not None:
                    if row[-1] != body_hash:
                        raise Conflict("this Idempotency-Key was already used with a different request")
                    return _job(row[:-1]), []
            if max_queue is not None:
                row = await self._one(conn, _PENDING_COUNT, ())
                if row[0] >= max_queue:
                    raise QueueFull.at(max_queue)
            row = await self._one(
                conn,
                "INSERT INTO jobs (id, type, resource, status, params, request_id, idempotency_key, body_hash, "
                "created_at, webhook_url, webhook_style) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {_JOB_COLUMNS}",
                (job_id, type, resource, orjson.dumps(params), request_id, idempotency_key, body_hash,
                 created_at, webhook_url, webhook_style),
            )
            job = _job(row)
            return job, [await self._add_event(conn, job.id, "status", job.resource_dict())]

        async def tx_created(conn: aiosqlite.Connection) -> tuple[tuple[Job, bool], list[Event]]:
            job, events = await tx(conn)
            return (job, bool(events)), events

        return await self._write(tx_created)

    # --- group commit of submissions ---------------------------------------------------
    #
    # Concurrent insert_job calls without an Idempotency-Key are queued and written
    # together in one transaction (one multi-row INSERT … RETURNING for the jobs, one
    # for their events). Every caller still returns only after the COMMIT that holds
    # its row, so an accepted job is durable. One job per transaction took five
    # round trips to the writer thread under the writer lock, and capped submissions
    # near 600/s; a batch is one hop (bench/RESULTS.md).

    _BATCH_MAX = 200  # rows per statement: 8 bound values each, well under SQLite's limit

    async def _insert_grouped(self, values: tuple[Any, ...], params: dict[str, Any], max_queue: int | None) -> Job:
        future: asyncio.Future[Job] = self._loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # caller gone: no warning
        self._inserts.append(_Insert(values, params, max_queue, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush_inserts(), name="store-group-commit")
        # a cancelled caller cancels only its future: the job stays in the batch and is
        # still written (as with _write), and the flusher skips the done future
        return await future

    async def _flush_inserts(self) -> None:
        """Write queued submissions, one transaction per batch, until none are left."""
        while self._inserts:
            batch, self._inserts = self._inserts[: self._BATCH_MAX], self._inserts[self._BATCH_MAX :]
            try:
                outcomes = await self._write_sync(lambda db, batch=batch: self._insert_batch_sync(db, batch))
            except Exception as exc:  # the whole transaction failed: every caller hears of it
                log.exception("writing a batch of submissions failed")
                outcomes = [exc] * len(batch)
            for insert, outcome in zip(batch, outcomes, strict=True):
                if insert.future.done():
                    continue
                if isinstance(outcome, Exception):
                    insert.future.set_exception(outcome)
                else:
                    insert.future.set_result(outcome)

    @staticmethod
    def _insert_batch_sync(db: sqlite3.Connection, batch: list[_Insert]) -> tuple[list[Job | Exception], list[Event]]:
        outcomes: list[Job | Exception | None] = [None] * len(batch)
        pending = None
        accepted: list[tuple[int, _Insert]] = []
        for index, insert in enumerate(batch):
            if insert.max_queue is not None:
                if pending is None:  # one count per batch, not per job
                    pending = db.execute(_PENDING_COUNT).fetchone()[0]
                if pending >= insert.max_queue:
                    outcomes[index] = QueueFull.at(insert.max_queue)
                    continue
                pending += 1
            accepted.append((index, insert))
        events: list[Event] = []
        if accepted:
            # the job is built from what was submitted: only its seq comes back
            marks = ",".join(["(?, ?, ?, 'pending', ?, ?, ?, ?, ?)"] * len(accepted))
            seqs = dict(db.execute(
                "INSERT INTO jobs (id, type, resource, status, params, request_id, created_at, webhook_url, "
                f"webhook_style) VALUES {marks} RETURNING id, seq",
                [v for _, insert in accepted for v in insert.values],
            ).fetchall())
            at = now()
            data = []
            for index, insert in accepted:
                job_id, type_, resource, _, request_id, created_at, webhook_url, webhook_style = insert.values
                job = Job(id=job_id, seq=seqs[job_id], type=type_, resource=resource, status=Status.PENDING,
                          params=insert.params, created_at=created_at, request_id=request_id,
                          webhook_url=webhook_url, webhook_style=webhook_style)
                outcomes[index] = job
                data.append(job.resource_dict())
            marks = ",".join(["(?, 'status', ?, ?)"] * len(data))
            ids = db.execute(
                f"INSERT INTO job_events (job_id, kind, data, at) VALUES {marks} RETURNING id, job_id",
                [v for d in data for v in (d["job_id"], orjson.dumps(d), at)],
            ).fetchall()
            by_job = {d["job_id"]: d for d in data}
            events = sorted((Event(id=r[0], job_id=r[1], kind="status", data=by_job[r[1]]) for r in ids),
                            key=lambda e: e.id)
        return outcomes, events  # type: ignore[return-value]

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        request_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first; page with ``before_seq`` = the last seq seen."""
        where, args = [], []
        for column, value in (("status", status), ("type", type), ("request_id", request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit)
        )
        return [_job(r) for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._read("SELECT status, n FROM job_counts")
        return {status.value: 0 for status in Status} | {r[0]: r[1] for r in rows}

    async def claim(self, resource: str, node: str) -> Job | None:
        """Move the oldest due pending job of ``resource`` to processing."""

        def tx(db: sqlite3.Connection) -> tuple[Job | None, list[Event]]:  # one hop: see _write_sync
            row = self._one_sync(
                db,
                "UPDATE jobs SET status = 'processing', started_at = ?, attempts = attempts + 1, "
                "progress = 0, node = ? WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' "
                "AND resource = ? AND run_after <= ? ORDER BY seq LIMIT 1) AND status = 'pending' "
                f"RETURNING {_JOB_COLUMNS}",
                (now(), node, resource, now()),
            )
            if row is None:
                return None, []
            job = _job(row)
            return job, [self._add_event_sync(db, job.id, "status", job.resource_dict())]

        return await self._write_sync(tx)

    async def next_due(self, resource: str) -> float | None:
        """When the earliest pending job of ``resource`` becomes due (None: none pending)."""
        rows = await self._read(
            "SELECT min(run_after) FROM jobs WHERE status = 'pending' AND resource = ?", (resource,)
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def set_progress(self, job_id: str, progress: float, phase: str) -> Event | None:
        """Record progress of a processing job (no status change)."""

        def tx(db: sqlite3.Connection) -> tuple[Event | None, list[Event]]:  # one hop: see _write_sync
            row = self._one_sync(
                db, "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'processing' RETURNING id", (progress, job_id)
            )
            if row is None:
                return None, []
            data = {"job_id": job_id, "progress": int(round(progress)), "phase": phase}
            event = self._add_event_sync(db, job_id, "progress", data)
            return event, [event]

        return await self._write_sync(tx)

    async def complete(self, job_id: str, result: dict[str, Any]) -> Job:
        return await self._transition(
            job_id, [Status.PROCESSING], Status.COMPLETED,
            "progress = 100, finished_at = ?, result = ?, error = NULL", (now(), orjson.dumps(result)),
        )

    async def fail(self, job_id: str, error: str, *, allowed: Iterable[Status] = (Status.PROCESSING,)) -> Job:
        return await self._transition(
            job_id, allowed, Status.FAILED, "finished_at = ?, error = ?", (now(), error)
        )

    async def requeue(self, job_id: str, *, refund: bool, delay_s: float = 0.0, error: str | None = None) -> Job:
        """processing -> pending: after a transient failure, or on shutdown (refund the attempt)."""
        return await self._transition(
            job_id, [Status.PROCESSING], Status.PENDING,
            f"progress = 0, started_at = NULL, node = NULL, run_after = ?, error = ?"
            f"{', attempts = max(attempts - 1, 0)' if refund else ''}",
            (now() + delay_s, error),
        )

    async def recover(self, max_attempts: int, node: str | None = None) -> tuple[int, int]:
        """Jobs left processing by a crash: back to pending, or failed past max_attempts.

        Returns (requeued, failed).
        """
        clause, args = ("AND node = ?", (node,)) if node else ("", ())
        rows = await self._read(f"SELECT id, attempts FROM jobs WHERE status = 'processing' {clause}", args)
        requeued = failed = 0
        for job_id, attempts in rows:
            try:
                if attempts >= max_attempts:
                    await self.fail(
                        job_id,
                        f"the job was interrupted {attempts} times (server crash or restart while it ran), "
                        f"reaching workers.max_attempts = {max_attempts}; retry it if the input is sound",
                    )
                    failed += 1
                else:
                    await self.requeue(job_id, refund=False, error=None)
                    requeued += 1
            except TransitionError:
                continue
        return requeued, failed

    # --- events --------------------------------------------------------------------

    async def events_after(self, job_id: str, after_id: int = 0) -> list[Event]:
        rows = await self._read(
            "SELECT id, kind, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
        )
        events = []
        for event_id, kind, data in rows:
            payload = orjson.loads(data)
            terminal = kind == "status" and payload.get("status") in {s.value for s in TERMINAL}
            events.append(Event(id=event_id, job_id=job_id, kind=kind, data=payload, terminal=terminal))
        return events

    # --- webhook deliveries ------------------------------------------------------------

    async def due_deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT d.id, d.job_id, d.event, d.url, d.style, d.attempts, e.data FROM deliveries d "
            "JOIN job_events e ON e.id = d.event_id WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
            "ORDER BY d.next_attempt_at LIMIT ?",
            (now(), limit),
        )
        return [
            {"id": r[0], "job_id": r[1], "event": r[2], "url": r[3], "style": r[4], "attempts": r[5],
             "job": orjson.loads(r[6])}
            for r in rows
        ]

    async def next_delivery_at(self) -> float | None:
        rows = await self._read("SELECT min(next_attempt_at) FROM deliveries WHERE state = 'pending'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def record_attempt(
        self,
        delivery_id: int,
        *,
        status_code: int | None,
        error: str | None,
        delivered: bool,
        next_retry_at: float | None,
    ) -> None:
        """Store one delivery attempt; next_retry_at None and not delivered = given up."""

        async def tx(conn: aiosqlite.Connection) -> tuple[None, list[Event]]:
            row = await self._one(
                conn,
                "UPDATE deliveries SET attempts = attempts + 1, state = ?, next_attempt_at = ? "
                "WHERE id = ? AND state = 'pending' RETURNING job_id, attempts",
                ("delivered" if delivered else ("pending" if next_retry_at else "failed"),
                 next_retry_at or now(), delivery_id),
            )
            if row is None:
                return None, []
            await conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, job_id, attempt, at, status_code, error, next_retry_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (delivery_id, row[0], row[1], now(), status_code, error, next_retry_at),
            )
            return None, []

        await self._write(tx)

    async def list_attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT attempt, at, status_code, error, next_retry_at FROM delivery_attempts "
            "WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [
            {"attempt": r[0], "at": r[1], "status_code": r[2], "error": r[3], "next_retry_at": r[4]} for r in rows
        ]

    # --- health --------------------------------------------------------------------

    async def ping(self) -> None:
        await self._read("SELECT 1")

    async def integrity_check(self) -> str:
        rows = await self._read("PRAGMA integrity_check")
        return str(rows[0][0])


async def open_store(url_or_path: str, **options: Any) -> Store:
    """Open the store: ``postgresql://…`` = PostgresStore (``options`` go to its open),
    else SQLite at a path or ``sqlite:///path``."""
    if url_or_path.startswith(("postgresql://", "postgres://")):
        from .store_pg import PostgresStore

        return await PostgresStore.open(url_or_path, **options)  # type: ignore[return-value]
    path = url_or_path.removeprefix("sqlite:///") if url_or_path.startswith("sqlite:///") else url_or_path
    if path != ":memory:":
        path = os.path.abspath(path)
    return await Store.open(path)
