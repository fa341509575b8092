"""The PostgreSQL job store: several mendsrv nodes sharing one database.

Same public methods and semantics as the SQLite ``store.Store`` (see ``store_api``),
on an asyncpg connection pool. What differs is what sharing needs:

- **Claims** take the oldest due pending job with ``FOR UPDATE SKIP LOCKED``, so a job
  runs on exactly one node; webhook deliveries are claimed the same way with a lease
  (``locked_by``/``locked_until``), so each delivery is sent by one node at a time.
- **Node liveness**: every node has a row in ``nodes`` and refreshes its
  ``heartbeat_at`` every ``store.heartbeat_s`` (database clock). Jobs ``processing`` on
  a node whose heartbeat is older than ``store.node_timeout_s`` are put back to
  ``pending`` by a surviving node (the attempt counts), or failed once they reach
  ``workers.max_attempts``.
- **Cross-node events**: each job_events row is announced with ``NOTIFY mend_events``
  (``"<event id> <job id> <origin>"``, sent on commit). Every node LISTENs on a
  dedicated connection, reads the rows that other nodes wrote and hands them to its
  local listeners (the SSE hub, the dispatcher's cancel watch), in id order. After a
  lost LISTEN connection the node replays the events it missed from the table.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from .errors import ConfigError, Conflict, NotFound, QueueFull, Unavailable
from .models import TERMINAL, Event, Job, Status, now
from .store import TransitionError, UserTransitions

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("mendsrv.store")

Listener = Callable[[Event], None]
CHANNEL = "mend_events"
_DB_NOW = "extract(epoch from clock_timestamp())::float8"
_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
_REPLAY_MARGIN = 1000  # event ids re-read before the last one seen after a LISTEN reconnect
_RELAYED_WINDOW = 50000  # event ids remembered as relayed

MIGRATIONS: list[str] = [
    # 1: jobs, their events, webhook deliveries and their attempts, nodes
    """
    CREATE TABLE jobs (
        seq             BIGSERIAL PRIMARY KEY,
        id              TEXT NOT NULL UNIQUE,
        type            TEXT NOT NULL,
        resource        TEXT NOT NULL,
        status          TEXT NOT NULL,
        progress        DOUBLE PRECISION NOT NULL DEFAULT 0,
        params          TEXT NOT NULL,
        request_id      TEXT,
        idempotency_key TEXT UNIQUE,
        body_hash       TEXT,
        created_at      DOUBLE PRECISION NOT NULL,
        started_at      DOUBLE PRECISION,
        finished_at     DOUBLE PRECISION,
        attempts        INTEGER NOT NULL DEFAULT 0,
        error           TEXT,
        result          TEXT,
        webhook_url     TEXT,
        webhook_style   TEXT NOT NULL DEFAULT 'default',
        run_after       DOUBLE PRECISION NOT NULL DEFAULT 0,
        node            TEXT
    );
    CREATE INDEX jobs_pending ON jobs (resource, seq) WHERE status = 'pending';
    CREATE INDEX jobs_processing ON jobs (node) WHERE status = 'processing';
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE INDEX jobs_type ON jobs (type, seq);
    CREATE INDEX jobs_request ON jobs (request_id, seq);
    CREATE TABLE job_events (
        id      BIGSERIAL PRIMARY KEY,
        job_id  TEXT NOT NULL,
        kind    TEXT NOT NULL,
        data    TEXT NOT NULL,
        at      DOUBLE PRECISION NOT NULL,
        origin  TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events (job_id, id);
    CREATE TABLE deliveries (
        id              BIGSERIAL PRIMARY KEY,
        job_id          TEXT NOT NULL,
        event_id        BIGINT NOT NULL,
        event           TEXT NOT NULL,
        url             TEXT NOT NULL,
        style           TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        created_at      DOUBLE PRECISION NOT NULL,
        locked_by       TEXT,
        locked_until    DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
    CREATE INDEX deliveries_job ON deliveries (job_id);
    CREATE TABLE delivery_attempts (
        id            BIGSERIAL PRIMARY KEY,
        delivery_id   BIGINT NOT NULL,
        job_id        TEXT NOT NULL,
        attempt       INTEGER NOT NULL,
        at            DOUBLE PRECISION NOT NULL,
        status_code   INTEGER,
        error         TEXT,
        next_retry_at DOUBLE PRECISION
    );
    CREATE INDEX delivery_attempts_job ON delivery_attempts (job_id, id);
    CREATE TABLE nodes (
        id            TEXT PRIMARY KEY,
        started_at    DOUBLE PRECISION NOT NULL,
        heartbeat_at  DOUBLE PRECISION NOT NULL,
        local_storage BOOLEAN NOT NULL DEFAULT false
    );
    """,
]

_JOB_COLUMNS = (
    "seq, id, type, resource, status, progress, params, request_id, created_at, started_at, "
    "finished_at, attempts, error, result, webhook_url, webhook_style, run_after, node"
)

# errors that mean "the database cannot be reached right now" (rendered as 503)
_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
)


@lru_cache(maxsize=256)
def _q(sql: str) -> str:
    """Write SQL with ``?`` marks (as in store.py); number them ``$1 … $n`` for asyncpg."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _loads(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _job(row: Any) -> Job:
    return Job(
        seq=row[0], id=row[1], type=row[2], resource=row[3], status=Status(row[4]),
        progress=row[5], params=orjson.loads(row[6]), request_id=row[7], created_at=row[8],
        started_at=row[9], finished_at=row[10], attempts=row[11], error=row[12],
        result=_loads(row[13]), webhook_url=row[14], webhook_style=row[15], run_after=row[16],
        node=row[17],
    )


def _event(event_id: int, job_id: str, kind: str, data: str) -> Event:
    payload = orjson.loads(data)
    terminal = kind == "status" and payload.get("status") in _TERMINAL_VALUES
    return Event(id=event_id, job_id=job_id, kind=kind, data=payload, terminal=terminal)


class PostgresStore(UserTransitions):
    """PostgreSQL job store. Use ``await PostgresStore.open(url, node=…)``; ``await store.close()``."""

    def __init__(
        self,
        url: str,
        *,
        node: str,
        heartbeat_s: float = 2.0,
        node_timeout_s: float = 10.0,
        max_attempts: int = 3,
        pool_size: int = 10,
        delivery_lease_s: float = 60.0,
        local_storage: bool = False,
    ):
        if node_timeout_s < 2 * heartbeat_s:
            raise ConfigError(
                f"store.node_timeout_s ({node_timeout_s:g}) must be at least twice store.heartbeat_s "
                f"({heartbeat_s:g}), or live nodes would be taken for dead"
            )
        self.url = url
        self.node = node
        self.heartbeat_s = heartbeat_s
        self.node_timeout_s = node_timeout_s
        self.max_attempts = max_attempts
        self.pool_size = pool_size
        self.delivery_lease_s = delivery_lease_s
        self.local_storage = local_storage
        self.path = _redact(url)  # for messages, as Store.path; never the password
        self._origin = uuid.uuid4().hex[:12]  # this store instance, to skip our own NOTIFYs
        self._pool: asyncpg.Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listeners: list[Listener] = []
        self._incoming: list[int] = []
        self._incoming_ready = asyncio.Event()
        self._last_seen = 0  # highest event id of another node handed to listeners
        # ids already relayed: transactions commit out of id order, so a lower id can
        # arrive after a higher one; this window keeps each event relayed once
        self._relayed: set[int] = set()
        self._relayed_order: collections.deque[int] = collections.deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy_since: float | None = None
        self._registered = False
        self._closing = False

    # --- life cycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, node: str | None = None, config: Config | None = None, **settings: Any) -> PostgresStore:
        """Connect, migrate, register this node and start the heartbeat and LISTEN tasks.

        Settings come from ``config`` ([store] heartbeat_s, node_timeout_s, pool_size;
        workers.max_attempts; the storage backend) unless given as keyword arguments.
        """
        if config is not None:
            local = config.storage.backend == "local" and not config.storage.shared
            settings = {
                "heartbeat_s": config.store.heartbeat_s,
                "node_timeout_s": config.store.node_timeout_s,
                "pool_size": config.store.pool_size,
                "max_attempts": config.workers.max_attempts,
                "delivery_lease_s": max(60.0, 3 * config.webhooks.timeout_s),
                "local_storage": local,
            } | settings
        store = cls(url, node=node or f"node-{uuid.uuid4().hex[:8]}", **settings)
        try:
            await store._open()
        except BaseException:
            await store.close()
            raise
        return store

    async def _open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, command_timeout=60, timeout=5,
            )
        except _DOWN as exc:
            raise Unavailable(f"cannot connect to the PostgreSQL job store: {exc}") from None
        async with self._acquire() as conn:
            await self._migrate(conn)
        await self._register()
        await self._check_storage()
        await self._listen()
        # no grace at start: recover() at start-up takes the jobs of stale nodes anyway
        self._healthy_since = time.monotonic() - self.node_timeout_s
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="store-heartbeat"),
            asyncio.create_task(self._relay_loop(), name="store-relay"),
        ]

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            # one node migrates at a time; the others wait here, then see the new version
            await conn.execute("SELECT pg_advisory_xact_lock(7468651)")
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT version FROM schema_version") or 0
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"database has schema version {version}, newer than this mendsrv ({len(MIGRATIONS)})"
                )
            for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(sql)
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
                log.info("store migrated", extra={"schema_version": number, "backend": "postgresql"})

    async def _register(self) -> None:
        await self._refuse_live_twin()
        async with self._acquire() as conn:
            await conn.execute(
                _q(
                    f"INSERT INTO nodes (id, started_at, heartbeat_at, local_storage) VALUES (?, ?, {_DB_NOW}, ?) "
                    f"ON CONFLICT (id) DO UPDATE SET started_at = EXCLUDED.started_at, "
                    f"heartbeat_at = EXCLUDED.heartbeat_at, local_storage = EXCLUDED.local_storage"
                ),
                self.node, now(), self.local_storage,
            )
        self._registered = True

    async def _refuse_live_twin(self) -> None:
        """A fresh row under our name is our previous incarnation (killed moments ago) or
        another live node with the same ``server.node_id``: tell them apart by whether its
        heartbeat still advances."""
        sql = f"SELECT heartbeat_at, {_DB_NOW} - heartbeat_at FROM nodes WHERE id = ?"
        rows = await self._fetch(sql, (self.node,))
        if not rows or rows[0][1] >= self.node_timeout_s:
            return
        await asyncio.sleep(2.5 * self.heartbeat_s)
        again = await self._fetch(sql, (self.node,))
        if again and again[0][0] > rows[0][0]:
            raise ConfigError(
                f"server.node_id {self.node!r} is already used by a live node of this PostgreSQL store; "
                "give every node its own server.node_id"
            )

    async def _check_storage(self) -> None:
        """Refuse local, unshared storage when other live nodes share this store."""
        others = await self._fetch(
            f"SELECT id, local_storage FROM nodes WHERE id <> ? AND heartbeat_at >= {_DB_NOW} - ?",
            (self.node, self.node_timeout_s),
        )
        if not others or not (self.local_storage or any(r[1] for r in others)):
            return
        names = ", ".join(sorted(r[0] for r in others))
        raise ConfigError(
            f'storage.backend = "local" cannot be used when several nodes share one PostgreSQL store '
            f"(live nodes: {names}): each node would see only its own directory. Use "
            f'storage.backend = "s3", or set storage.shared = true on every node if storage.root is '
            f"one mount shared by all of them"
        )

    async def close(self) -> None:
        self._closing = True
        pending = set(self._tasks)
        for _ in range(10):
            # cancelled again while still running: Python 3.11's wait_for can swallow a
            # cancellation that arrives as its inner call completes
            for task in pending:
                task.cancel()
            if not pending:
                break
            _, pending = await asyncio.wait(pending, timeout=1)
        if pending:
            log.error("job store background tasks did not stop", extra={"tasks": len(pending)})
        self._tasks = []
        if self._registered and self._pool is not None:
            # a clean leave: this node's jobs were requeued by the dispatcher's stop
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.execute("DELETE FROM nodes WHERE id = $1", self.node), 5)
            self._registered = False
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listen_conn.close(), 5)
            self._listen_conn = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10)
            except Exception:
                self._pool.terminate()
            self._pool = None

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

    # --- cross-node events ---------------------------------------------------------

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; after a reconnect, replay what was missed."""
        conn = await asyncpg.connect(self.url, timeout=5)
        await conn.add_listener(CHANNEL, self._on_notification)
        old, self._listen_conn = self._listen_conn, conn
        if old is not None:
            with contextlib.suppress(Exception):
                old.terminate()
            # from a little before the last id seen: transactions in flight then commit later
            missed = await self._fetch(
                "SELECT id FROM job_events WHERE id > ? AND origin <> ? ORDER BY id LIMIT 100000",
                (max(0, self._last_seen - _REPLAY_MARGIN), self._origin),
            )
            missed = [r for r in missed if r[0] not in self._relayed]
            if missed:
                log.warning("replaying events missed while the LISTEN connection was down",
                            extra={"events": len(missed)})
                self._incoming.extend(r[0] for r in missed)
                self._incoming_ready.set()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            event_id, _job_id, origin = payload.split(" ", 2)
        except ValueError:
            return
        if origin == self._origin:
            return  # ours: the listeners heard of it at commit
        self._incoming.append(int(event_id))
        self._incoming_ready.set()

    async def _relay_loop(self) -> None:
        """Hand events written by other nodes to the local listeners, in id order."""
        while not self._closing:
            await self._incoming_ready.wait()
            self._incoming_ready.clear()
            ids = sorted(set(self._incoming) - self._relayed)
            self._incoming.clear()
            if not ids:
                continue
            try:
                rows = await self._fetch(
                    "SELECT id, job_id, kind, data FROM job_events WHERE id = ANY(?::bigint[]) ORDER BY id", (ids,)
                )
            except Exception:
                log.warning("reading events of other nodes failed; will retry", exc_info=True)
                self._incoming.extend(ids)
                await asyncio.sleep(self.heartbeat_s)
                self._incoming_ready.set()
                continue
            events = [_event(*r) for r in rows]
            if events:
                self._last_seen = max(self._last_seen, events[-1].id)
            for event in events:
                self._relayed.add(event.id)
                self._relayed_order.append(event.id)
            while len(self._relayed_order) > _RELAYED_WINDOW:
                self._relayed.discard(self._relayed_order.popleft())
            self._notify(events)

    # --- liveness ------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        failing = False
        while not self._closing:
            await asyncio.sleep(self.heartbeat_s)
            try:
                try:
                    await self._beat()
                except Exception:  # the LISTEN connection is gone (or the database)
                    await self._listen()
                    await self._beat()
                if failing:
                    log.info("job store reachable again", extra={"node": self.node})
                    failing = False
                    self._healthy_since = time.monotonic()
                # reap only after beating for a whole timeout: after an outage, the other
                # nodes get the time to beat again before anyone takes their jobs
                if self._healthy_since is not None and time.monotonic() - self._healthy_since >= self.node_timeout_s:
                    await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.error("job store heartbeat failed", extra={"node": self.node, "error": str(exc)})
                failing = True
                self._healthy_since = None

    async def _beat(self) -> None:
        """Stamp this node's heartbeat. It runs on the LISTEN connection: it never waits
        behind a busy pool, and it proves that connection alive (a silently dropped TCP
        connection would otherwise look open while no notification arrives)."""
        conn = self._listen_conn
        if conn is None or conn.is_closed():
            raise ConnectionError("the LISTEN connection is closed")
        gap = await asyncio.wait_for(
            conn.fetchval(
                _q(
                    "WITH prev AS (SELECT heartbeat_at FROM nodes WHERE id = ?) "
                    f"INSERT INTO nodes (id, started_at, heartbeat_at, local_storage) VALUES (?, ?, {_DB_NOW}, ?) "
                    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at "
                    "RETURNING nodes.heartbeat_at - (SELECT heartbeat_at FROM prev)"
                ),
                self.node, self.node, now(), self.local_storage,
            ),
            max(1.0, self.heartbeat_s),
        )
        if gap is None or gap > self.node_timeout_s:
            log.warning(
                "this node was silent longer than store.node_timeout_s; other nodes may have taken it for dead "
                "and re-run jobs it was running (its own late results for those are refused)",
                extra={"node": self.node, "silent_s": None if gap is None else round(gap, 1)},
            )

    async def live_nodes(self) -> list[str]:
        rows = await self._fetch(
            f"SELECT id FROM nodes WHERE heartbeat_at >= {_DB_NOW} - ? ORDER BY id", (self.node_timeout_s,)
        )
        return [r[0] for r in rows]

    async def reap(self) -> tuple[int, int]:
        """Requeue (or fail) the jobs of nodes whose heartbeat is stale; returns (requeued, failed)."""
        result = await self._recover_where(
            self.max_attempts,
            f"NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = j.node AND n.heartbeat_at >= {_DB_NOW} - ?)",
            (self.node_timeout_s,),
        )
        if any(result):
            log.warning("requeued the jobs of dead nodes", extra={"requeued": result[0], "failed": result[1]})
        # forget nodes dead for long (their jobs are handled above)
        await self._execute(
            f"DELETE FROM nodes WHERE heartbeat_at < {_DB_NOW} - ?", (max(3600.0, 10 * self.node_timeout_s),)
        )
        return result

    # --- helpers -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        assert self._pool is not None, "store is closed"
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DOWN as exc:
            raise Unavailable(f"the job store (PostgreSQL) is unreachable: {exc.__class__.__name__}") from exc

    async def _fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        async with self._acquire() as conn:
            return list(await conn.fetch(_q(sql), *args))

    async def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        async with self._acquire() as conn:
            await conn.execute(_q(sql), *args)

    async def _write(
        self, fn: Callable[[asyncpg.Connection], Awaitable[tuple[Any, list[Event]]]], *, persist: bool = False
    ) -> Any:
        """Run ``fn(conn)`` as one transaction; ``fn`` returns ``(value, events)``.

        Shielded as in store.py: a cancelled caller does not cut the transaction short.
        ``persist``: the write is retried on a lost connection until it lands or the
        store closes (a job's progress and outcome outlive a short database outage;
        requests from clients fail at once with 503 instead).
        """
        return await asyncio.shield(self._persistent(fn) if persist else self._transaction(fn))

    async def _persistent(self, fn: Callable[[asyncpg.Connection], Awaitable[tuple[Any, list[Event]]]]) -> Any:
        delay = 0.1
        warned = False
        while True:
            try:
                return await self._transaction(fn)
            except Unavailable as exc:
                if self._closing:
                    raise
                if not warned:
                    log.warning("job store unreachable; retrying a job update", extra={"error": exc.message})
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[tuple[Any, list[Event]]]]) -> Any:
        async with self._acquire() as conn, conn.transaction():
            value, events = await fn(conn)
        self._notify(events)
        return value

    async def _add_event(
        self, conn: asyncpg.Connection, job_id: str, kind: str, data: dict[str, Any], terminal: bool = False
    ) -> Event:
        """Append a job_events row and announce it (NOTIFY is delivered at commit)."""
        event_id = await conn.fetchval(
            _q(
                "WITH e AS (INSERT INTO job_events (job_id, kind, data, at, origin) VALUES (?, ?, ?, ?, ?) RETURNING id) "
                "SELECT id FROM e, LATERAL (SELECT pg_notify(?, e.id::text || ' ' || ? || ' ' || ?)) n"
            ),
            job_id, kind, _dumps(data), now(), self._origin, CHANNEL, job_id, self._origin,
        )
        return Event(id=event_id, job_id=job_id, kind=kind, data=data, terminal=terminal)

    async def _transition(
        self,
        job_id: str,
        allowed: Iterable[Status],
        to: Status,
        sets: str = "",
        args: tuple[Any, ...] = (),
        guard: str = "",
        guard_args: tuple[Any, ...] = (),
        owned: bool = False,
    ) -> Job:
        """``UPDATE jobs SET status=to, … WHERE id=? AND status = ANY(allowed)`` + its event.

        ``owned`` (the dispatcher's writes): a processing job must be processing on this
        node, so a node that was taken for dead cannot finish a job another node re-ran.
        """
        allowed_values = [s.value for s in allowed]
        if owned:
            guard, guard_args = " AND (status <> 'processing' OR node IS NOT DISTINCT FROM ?)", (self.node,)
        sql = _q(
            f"UPDATE jobs SET status = ?{', ' + sets if sets else ''} "
            f"WHERE id = ? AND status = ANY(?::text[]){guard} RETURNING {_JOB_COLUMNS}"
        )

        async def tx(conn: asyncpg.Connection) -> tuple[Job, list[Event]]:
            row = await conn.fetchrow(sql, to.value, *args, job_id, allowed_values, *guard_args)
            if row is None:
                current = await conn.fetchrow("SELECT status, node FROM jobs WHERE id = $1", job_id)
                if current is None:
                    raise NotFound(f"job {job_id} not found")
                if owned and current[0] in allowed_values and current[1] != self.node:
                    raise TransitionError(
                        f"job {job_id} is {current[0]} on node {current[1]}; this node ({self.node}) no longer runs it"
                    )
                raise TransitionError(f"job {job_id} is {current[0]}; it cannot become {to.value}")
            job = _job(row)
            events = [await self._add_event(conn, job.id, "status", job.resource_dict(), to in TERMINAL)]
            if to in TERMINAL and job.webhook_url:
                await conn.execute(
                    "INSERT INTO deliveries (job_id, event_id, event, url, style, next_attempt_at, created_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    job.id, events[0].id, f"job.{to.value}", job.webhook_url, job.webhook_style, now(), now(),
                )
                events = [dataclasses.replace(events[0], delivery=True)]
            return job, events

        return await self._write(tx, persist=owned)

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
        existing_sql = _q(f"SELECT {_JOB_COLUMNS}, body_hash FROM jobs WHERE idempotency_key = ?")

        def same(row: Any) -> Job:
            if row[-1] != body_hash:
                raise Conflict("this Idempotency-Key was already used with a different request")
            return _job(row)

        async def tx(conn: asyncpg.Connection) -> tuple[tuple[Job, bool], list[Event]]:
            if idempotency_key is not None:
                row = await conn.fetchrow(existing_sql, idempotency_key)
                if row is not None:
                    return (same(row), False), []
            if max_queue is not None:
                pending = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'pending'")
                if pending >= max_queue:
                    raise QueueFull.at(max_queue)
            row = await conn.fetchrow(
                _q(
                    "INSERT INTO jobs (id, type, resource, status, params, request_id, idempotency_key, body_hash, "
                    "created_at, webhook_url, webhook_style) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?) "
                    f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_JOB_COLUMNS}"
                ),
                job_id, type, resource, _dumps(params), request_id, idempotency_key, body_hash,
                created_at, webhook_url, webhook_style,
            )
            if row is None:  # another node inserted this key meanwhile (committed: we waited for it)
                return (same(await conn.fetchrow(existing_sql, idempotency_key)), False), []
            job = _job(row)
            return (job, True), [await self._add_event(conn, job.id, "status", job.resource_dict())]

        return await self._write(tx)

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
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
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("status", status), ("type", type), ("request_id", request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [_job(r) for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) FROM jobs GROUP BY status")
        return {status.value: 0 for status in Status} | {r[0]: r[1] for r in rows}

    async def claim(self, resource: str, node: str) -> Job | None:
        """Move the oldest due pending job of ``resource`` to processing; other nodes skip it."""
        sql = _q(
            "UPDATE jobs SET status = 'processing', started_at = ?, attempts = attempts + 1, progress = 0, node = ? "
            "WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' AND resource = ? AND run_after <= ? "
            "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) AND status = 'pending' "
            f"RETURNING {_JOB_COLUMNS}"
        )

        async def tx(conn: asyncpg.Connection) -> tuple[Job | None, list[Event]]:
            moment = now()
            row = await conn.fetchrow(sql, moment, node, resource, moment)
            if row is None:
                return None, []
            job = _job(row)
            return job, [await self._add_event(conn, job.id, "status", job.resource_dict())]

        return await self._write(tx)

    async def next_due(self, resource: str) -> float | None:
        """When the earliest pending job of ``resource`` becomes due (None: none pending)."""
        rows = await self._fetch("SELECT min(run_after) FROM jobs WHERE status = 'pending' AND resource = ?", (resource,))
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def set_progress(self, job_id: str, progress: float, phase: str) -> Event | None:
        """Record progress of a processing job (no status change).

        Best effort while the database is unreachable: the step is dropped (None), the
        job goes on, and its outcome waits for the database instead.
        """

        async def tx(conn: asyncpg.Connection) -> tuple[Event | None, list[Event]]:
            found = await conn.fetchval(
                "UPDATE jobs SET progress = $1 WHERE id = $2 AND status = 'processing' AND node = $3 RETURNING 1",
                progress, job_id, self.node,
            )
            if found is None:
                return None, []
            data = {"job_id": job_id, "progress": int(round(progress)), "phase": phase}
            event = await self._add_event(conn, job_id, "progress", data)
            return event, [event]

        try:
            return await self._write(tx)
        except Unavailable:
            log.debug("progress not recorded: job store unreachable", extra={"job_id": job_id})
            return None

    async def complete(self, job_id: str, result: dict[str, Any]) -> Job:
        return await self._transition(
            job_id, [Status.PROCESSING], Status.COMPLETED,
            "progress = 100, finished_at = ?, result = ?, error = NULL", (now(), _dumps(result)), owned=True,
        )

    async def fail(self, job_id: str, error: str, *, allowed: Iterable[Status] = (Status.PROCESSING,)) -> Job:
        return await self._transition(
            job_id, allowed, Status.FAILED, "finished_at = ?, error = ?", (now(), error), owned=True
        )

    async def requeue(
        self, job_id: str, *, refund: bool, delay_s: float = 0.0, error: str | None = None, _node: Any = ...
    ) -> Job:
        """processing -> pending: after a transient failure, or on shutdown (refund the attempt)."""
        guard, guard_args = ("", ()) if _node is ... else (" AND node IS NOT DISTINCT FROM ?", (_node,))
        return await self._transition(
            job_id, [Status.PROCESSING], Status.PENDING,
            f"progress = 0, started_at = NULL, node = NULL, run_after = ?, error = ?"
            f"{', attempts = greatest(attempts - 1, 0)' if refund else ''}",
            (now() + delay_s, error), guard, guard_args, owned=_node is ...,
        )

    async def recover(self, max_attempts: int, node: str | None = None) -> tuple[int, int]:
        """Jobs left processing by a node that is gone: back to pending, or failed past max_attempts.

        ``node`` given: that node's processing jobs. ``None`` (at start-up): the jobs of
        nodes without a fresh heartbeat, and of this node's own earlier incarnation;
        never those of live nodes. Returns (requeued, failed).
        """
        if node is not None:
            return await self._recover_where(max_attempts, "j.node = ?", (node,))
        return await self._recover_where(
            max_attempts,
            f"(j.node = ? OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = j.node AND n.heartbeat_at >= {_DB_NOW} - ?))",
            (self.node, self.node_timeout_s),
        )

    async def _recover_where(self, max_attempts: int, condition: str, args: tuple[Any, ...]) -> tuple[int, int]:
        rows = await self._fetch(
            f"SELECT j.id, j.attempts, j.node FROM jobs j WHERE j.status = 'processing' AND {condition}", args
        )
        requeued = failed = 0
        for job_id, attempts, node in rows:
            guard = (" AND node IS NOT DISTINCT FROM ?", (node,))  # not if another node claimed it meanwhile
            try:
                if attempts >= max_attempts:
                    await self._transition(
                        job_id, [Status.PROCESSING], Status.FAILED, "finished_at = ?, error = ?",
                        (now(), f"the job was interrupted {attempts} times (its node crashed, restarted or stopped "
                                f"sending heartbeats while it ran), reaching workers.max_attempts = {max_attempts}; "
                                "retry it if the input is sound"),
                        *guard,
                    )
                    failed += 1
                else:
                    await self.requeue(job_id, refund=False, error=None, _node=node)
                    requeued += 1
            except TransitionError:
                continue
        return requeued, failed

    # --- events --------------------------------------------------------------------

    async def events_after(self, job_id: str, after_id: int = 0) -> list[Event]:
        rows = await self._fetch(
            "SELECT id, job_id, kind, data FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
        )
        return [_event(*r) for r in rows]

    # --- webhook deliveries ----------------------------------------------------------

    async def due_deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        """Claim due deliveries for this node: locked rows are skipped, and each row is
        leased (``delivery_lease_s``) so no other node sends it until this node records
        the attempt or the lease runs out. Within this node, as on SQLite, a due delivery
        comes back until its attempt is recorded (the sender skips those in flight)."""
        rows = await self._fetch(
            "WITH due AS (SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ? "
            f"AND (locked_until < {_DB_NOW} OR locked_by = ?) ORDER BY next_attempt_at LIMIT ? "
            "FOR UPDATE SKIP LOCKED), "
            f"leased AS (UPDATE deliveries d SET locked_by = ?, locked_until = {_DB_NOW} + ? FROM due "
            "WHERE d.id = due.id RETURNING d.id, d.job_id, d.event, d.url, d.style, d.attempts, d.event_id, "
            "d.next_attempt_at) "
            "SELECT l.id, l.job_id, l.event, l.url, l.style, l.attempts, e.data FROM leased l "
            "JOIN job_events e ON e.id = l.event_id ORDER BY l.next_attempt_at, l.id",
            (now(), self.node, limit, self.node, self.delivery_lease_s),
        )
        return [
            {"id": r[0], "job_id": r[1], "event": r[2], "url": r[3], "style": r[4], "attempts": r[5],
             "job": orjson.loads(r[6])}
            for r in rows
        ]

    async def next_delivery_at(self) -> float | None:
        rows = await self._fetch(
            "SELECT min(greatest(next_attempt_at, locked_until)) FROM deliveries WHERE state = 'pending'"
        )
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
        """Store one delivery attempt and release the lease (``locked_by`` keeps the node
        that sent it last); next_retry_at None and not delivered = given up."""

        async def tx(conn: asyncpg.Connection) -> tuple[None, list[Event]]:
            row = await conn.fetchrow(
                "UPDATE deliveries SET attempts = attempts + 1, state = $1, next_attempt_at = $2, "
                "locked_until = 0 WHERE id = $3 AND state = 'pending' RETURNING job_id, attempts",
                "delivered" if delivered else ("pending" if next_retry_at else "failed"),
                next_retry_at or now(), delivery_id,
            )
            if row is None:
                return None, []
            await conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, job_id, attempt, at, status_code, error, next_retry_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                delivery_id, row[0], row[1], now(), status_code, error, next_retry_at,
            )
            return None, []

        await self._write(tx)

    async def list_attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT attempt, at, status_code, error, next_retry_at FROM delivery_attempts WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [
            {"attempt": r[0], "at": r[1], "status_code": r[2], "error": r[3], "next_retry_at": r[4]} for r in rows
        ]

    # --- health --------------------------------------------------------------------

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def integrity_check(self) -> str:
        """"ok" when the database answers with the schema this mendsrv expects."""
        version = (await self._fetch("SELECT version FROM schema_version"))[0][0]
        if version != len(MIGRATIONS):
            return f"schema version {version}, expected {len(MIGRATIONS)}"
        return "ok"
