"""What sharing one PostgreSQL store between nodes adds: several PostgresStore
instances (one per node) on one real database, racing for jobs and deliveries,
hearing each other's events, and taking over the jobs of a node that went silent."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from mendsrv.errors import ConfigError, Unavailable
from mendsrv.models import Event, Status
from mendsrv.store import TransitionError
from mendsrv.store_pg import PostgresStore


@pytest_asyncio.fixture
async def open_node(pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Open a PostgresStore as node ``name`` on the test database; all closed at the end."""
    opened: list[PostgresStore] = []

    async def factory(name: str, **settings: Any) -> PostgresStore:
        store = await PostgresStore.open(pg_url, node=name, **settings)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


async def add(store: PostgresStore, **kw: Any) -> Any:
    fields: dict[str, Any] = {
        "job_id": str(uuid.uuid4()), "type": "image/resize", "resource": "cpu", "params": {},
        "request_id": None, "webhook_url": None, "webhook_style": "default",
    } | kw
    job, _ = await store.insert_job(**fields)
    return job


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_store_pg_listener_on_one_node_hears_transitions_of_another(open_node: Any) -> None:
    a = await open_node("a")
    b = await open_node("b")
    heard_a: list[Event] = []
    heard_b: list[Event] = []
    a.add_listener(heard_a.append)
    b.add_listener(heard_b.append)
    job = await add(b)
    await b.claim("cpu", "b")
    for pct in (20, 40, 60):
        await b.set_progress(job.id, pct, "processing")
    await b.complete(job.id, {"outputs": []})
    events = await b.events_after(job.id)
    await until(lambda: len(heard_a) == len(events))
    assert heard_a == events  # same ids, kinds, data and terminal flag, in order
    assert [e.kind for e in heard_a] == ["status", "status", "progress", "progress", "progress", "status"]
    assert heard_a[-1].terminal and heard_a[-1].data["status"] == "completed"
    # and a cancel received by node a reaches node b's listeners (its dispatcher)
    other = await add(b)
    await b.claim("cpu", "b")
    await a.cancel(other.id)
    await until(lambda: any(e.job_id == other.id and e.data.get("status") == "cancelled" for e in heard_b))
    assert heard_b[-1].terminal
    # each node heard its own events once, not again through NOTIFY
    ids_b = [e.id for e in heard_b]
    assert len(ids_b) == len(set(ids_b))


async def test_store_pg_lost_listen_connection_replays_missed_events(open_node: Any) -> None:
    a = await open_node("a", heartbeat_s=0.2, node_timeout_s=5)
    b = await open_node("b")
    heard: list[Event] = []
    a.add_listener(heard.append)
    first = await add(b)
    await until(lambda: len(heard) == 1)
    assert a._listen_conn is not None
    await b.ping()
    await b._execute("SELECT pg_terminate_backend(?)", (a._listen_conn.get_server_pid(),))
    jobs = [first] + [await add(b) for _ in range(5)]
    await until(lambda: {e.job_id for e in heard} == {j.id for j in jobs})
    assert [e.id for e in heard] == sorted(e.id for e in heard)


async def test_store_pg_claims_race_each_job_runs_on_one_node(open_node: Any) -> None:
    nodes = [await open_node(f"n{i}") for i in range(3)]
    ids = {(await add(nodes[0])).id for _ in range(60)}
    claimed: dict[str, list[str]] = {}

    async def worker(store: PostgresStore) -> None:
        while (job := await store.claim("cpu", store.node)) is not None:
            claimed.setdefault(job.id, []).append(store.node)

    await asyncio.gather(*(worker(s) for s in nodes for _ in range(2)))
    assert set(claimed) == ids
    assert all(len(who) == 1 for who in claimed.values())
    assert len({who[0] for who in claimed.values()}) > 1  # the work was actually shared


async def test_store_pg_each_delivery_is_claimed_by_one_node(open_node: Any) -> None:
    a = await open_node("a")
    b = await open_node("b")
    jobs = [await add(a, webhook_url=f"http://127.0.0.1:9/{i}") for i in range(40)]
    while await a.claim("cpu", "a"):
        pass
    for job in jobs:
        await a.complete(job.id, {"outputs": []})
    sent: list[tuple[str, int]] = []

    async def sender(store: PostgresStore) -> None:
        while batch := await store.due_deliveries(limit=3):
            for d in batch:
                sent.append((store.node, d["id"]))
                await asyncio.sleep(0)
                await store.record_attempt(d["id"], status_code=200, error=None, delivered=True, next_retry_at=None)

    await asyncio.gather(sender(a), sender(b))
    delivery_ids = [d for _, d in sent]
    assert len(delivery_ids) == 40 and len(set(delivery_ids)) == 40
    assert {n for n, _ in sent} == {"a", "b"}
    for job in jobs:
        assert [x["attempt"] for x in await a.list_attempts(job.id)] == [1]


async def test_store_pg_leased_delivery_is_not_resent_until_recorded(open_node: Any) -> None:
    a = await open_node("a")
    b = await open_node("b", delivery_lease_s=0.5)
    job = await add(a, webhook_url="http://127.0.0.1:9/x")
    await a.claim("cpu", "a")
    await a.complete(job.id, {"outputs": []})
    (d,) = await b.due_deliveries()
    assert await a.due_deliveries() == []  # b holds it
    assert [x["id"] for x in await b.due_deliveries()] == [d["id"]]  # b itself sees it until recorded
    assert (await a.next_delivery_at()) > time.time()
    await asyncio.sleep(0.7)  # b never reported back: after its lease, another node takes it
    (again,) = await a.due_deliveries()
    assert again["id"] == d["id"]


async def test_store_pg_idempotency_key_race_makes_one_job(open_node: Any) -> None:
    a = await open_node("a")
    b = await open_node("b")
    results = await asyncio.gather(*(
        s.insert_job(job_id=str(uuid.uuid4()), type="image/resize", resource="cpu", params={}, request_id=None,
                     webhook_url=None, webhook_style="default", idempotency_key="same", body_hash="h")
        for s in (a, b, a, b)
    ))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_store_pg_jobs_of_a_silent_node_are_requeued_by_the_others(open_node: Any) -> None:
    survivor = await open_node("survivor", heartbeat_s=0.2, node_timeout_s=1.0, max_attempts=2)
    dying = await open_node("dying", heartbeat_s=0.2, node_timeout_s=1.0)
    heard: list[Event] = []
    survivor.add_listener(heard.append)
    job = await add(dying)
    other = await add(dying)
    await dying.claim("cpu", "dying")
    await dying.claim("cpu", "dying")
    await survivor._execute("UPDATE jobs SET attempts = 2 WHERE id = ?", (other.id,))
    assert sorted(await survivor.live_nodes()) == ["dying", "survivor"]
    for task in dying._tasks:  # it stops beating (a hung or killed process)
        task.cancel()
    started = time.monotonic()
    await until(lambda: any(e.job_id == job.id and e.data["status"] == "pending" and e.data["attempts"] == 1
                            for e in heard) and any(e.job_id == other.id and e.terminal for e in heard), timeout=10)
    took = time.monotonic() - started
    assert took < 1.0 + 1.0  # the timeout + a heartbeat or two (and a loaded machine)
    requeued = await survivor.get_job(job.id)
    assert requeued.status is Status.PENDING and requeued.attempts == 1 and requeued.node is None
    failed = await survivor.get_job(other.id)
    assert failed.status is Status.FAILED
    assert "interrupted 2 times" in failed.error and "workers.max_attempts = 2" in failed.error
    assert await survivor.live_nodes() == ["survivor"]


async def test_store_pg_recover_at_start_leaves_live_nodes_alone(open_node: Any) -> None:
    live = await open_node("live")
    mine = await open_node("restarting")
    running = await add(live)
    await live.claim("cpu", "live")
    orphan = await add(live)
    await mine.claim("cpu", "restarting")  # claimed by this node's previous incarnation
    lost = await add(live)
    await live.claim("cpu", "vanished")  # a node that is no longer registered
    assert await mine.recover(max_attempts=3) == (2, 0)
    assert (await mine.get_job(running.id)).status is Status.PROCESSING
    assert (await mine.get_job(orphan.id)).status is Status.PENDING
    assert (await mine.get_job(lost.id)).status is Status.PENDING


async def test_store_pg_local_storage_refused_with_several_nodes(open_node: Any, pg_url: str) -> None:
    first = await open_node("first", local_storage=False)
    with pytest.raises(ConfigError, match="storage.shared = true"):
        await open_node("second", local_storage=True)
    assert await first.live_nodes() == ["first"]  # the refused node left no trace
    await first.close()
    # a node with local storage alone is fine, and then no other node can join it
    await open_node("alone", local_storage=True)
    with pytest.raises(ConfigError, match=r"live nodes: alone\)"):
        await open_node("s3-node", local_storage=False)


async def test_store_pg_node_timeout_must_exceed_heartbeats(pg_url: str) -> None:
    with pytest.raises(ConfigError, match="node_timeout_s"):
        await PostgresStore.open(pg_url, node="x", heartbeat_s=5, node_timeout_s=6)


async def test_store_pg_database_restart_jobs_finish_requests_get_503(open_node: Any, pg_cluster: Any) -> None:
    a = await open_node("a", heartbeat_s=0.2, node_timeout_s=1.0)
    b = await open_node("b", heartbeat_s=0.2, node_timeout_s=1.0)
    heard: list[Event] = []
    b.add_listener(heard.append)
    job = await add(a)
    await a.claim("cpu", "a")
    pending = await add(a)
    await asyncio.to_thread(pg_cluster.stop)
    try:
        # a client's request fails at once with 503 (a sentence, not a traceback)
        with pytest.raises(Unavailable, match="unreachable"):
            await a.cancel(pending.id)
        # progress is dropped, the job goes on; the worker's outcome waits for the database
        assert await a.set_progress(job.id, 50, "processing") is None
        finishing = asyncio.ensure_future(a.complete(job.id, {"outputs": []}))
        await asyncio.sleep(1.5)  # longer than node_timeout_s
        assert not finishing.done()
    finally:
        await asyncio.to_thread(pg_cluster.start)
    done = await asyncio.wait_for(finishing, 20)
    assert done.status is Status.COMPLETED and done.attempts == 1
    # nobody took the other's jobs for dead meanwhile, and events flow again across nodes
    await asyncio.sleep(1.5)
    assert sorted(await b.live_nodes()) == ["a", "b"]
    await a.cancel(pending.id)
    await until(lambda: any(e.job_id == pending.id and e.data["status"] == "cancelled" for e in heard))


async def test_store_pg_node_taken_for_dead_cannot_finish_a_job_rerun_elsewhere(open_node: Any) -> None:
    a = await open_node("a")
    b = await open_node("b")
    job = await add(a)
    await a.claim("cpu", "a")
    await b.recover(max_attempts=3, node="a")  # as the reaper does once a's heartbeat is stale
    await b.claim("cpu", "b")
    with pytest.raises(TransitionError, match="processing on node b; this node \\(a\\) no longer runs it"):
        await a.complete(job.id, {"outputs": []})
    assert await a.set_progress(job.id, 50, "processing") is None
    assert (await b.complete(job.id, {"outputs": []})).attempts == 2


async def test_store_pg_events_committed_out_of_id_order_are_all_relayed(open_node: Any, pg_url: str) -> None:
    import asyncpg

    a = await open_node("a")
    heard: list[Event] = []
    a.add_listener(heard.append)
    first, second = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    insert = (
        "WITH e AS (INSERT INTO job_events (job_id, kind, data, at, origin) VALUES ($1, 'progress', $2, 0, 'other') "
        "RETURNING id) SELECT id, pg_notify('mend_events', id::text || ' ' || $1 || ' other') FROM e"
    )
    try:
        tx1, tx2 = first.transaction(), second.transaction()
        await tx1.start()
        await tx2.start()
        low = (await first.fetchrow(insert, "job-1", '{"job_id": "job-1", "progress": 10, "phase": "x"}'))[0]
        high = (await second.fetchrow(insert, "job-2", '{"job_id": "job-2", "progress": 20, "phase": "x"}'))[0]
        assert low < high
        await tx2.commit()  # the higher id commits first
        await until(lambda: [e.id for e in heard] == [high])
        await tx1.commit()
        await until(lambda: sorted(e.id for e in heard) == [low, high])
    finally:
        await first.close()
        await second.close()


async def test_store_pg_nodes_starting_together_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(pg_url, node=f"n{i}") for i in range(3)))
    try:
        assert sorted(await stores[0].live_nodes()) == ["n0", "n1", "n2"]
        assert (await stores[1]._fetch("SELECT count(*) FROM schema_version"))[0][0] == 1
        assert [await s.integrity_check() for s in stores] == ["ok"] * 3
    finally:
        for store in stores:
            await store.close()
    reopened = await PostgresStore.open(pg_url, node="n0")
    try:
        assert await reopened.live_nodes() == ["n0"]  # closed nodes left the table
    finally:
        await reopened.close()


async def test_store_pg_a_second_node_with_the_same_name_is_refused(open_node: Any) -> None:
    await open_node("twin", heartbeat_s=0.2, node_timeout_s=2.0)
    with pytest.raises(ConfigError, match="server.node_id 'twin' is already used by a live node"):
        await open_node("twin", heartbeat_s=0.2, node_timeout_s=2.0)


async def test_store_pg_restart_right_after_a_crash_keeps_the_name(open_node: Any) -> None:
    crashed = await open_node("same", heartbeat_s=0.2, node_timeout_s=2.0)
    job = await add(crashed)
    await crashed.claim("cpu", "same")
    for task in crashed._tasks:  # killed: no more heartbeats, its row stays
        task.cancel()
    restarted = await open_node("same", heartbeat_s=0.2, node_timeout_s=2.0)
    assert await restarted.recover(max_attempts=3) == (1, 0)  # its own interrupted job, at once
    assert (await restarted.get_job(job.id)).status is Status.PENDING


@pytest.mark.parametrize("store, message", [
    ({"url": "mysql://db/mend"}, 'store.url must start with "postgresql://"'),
    ({"url": "postgresql://db/mend", "heartbeat_s": 5, "node_timeout_s": 6}, "at least twice store.heartbeat_s"),
])
def test_store_pg_config_errors_name_the_key(store: dict[str, Any], message: str) -> None:
    from mendsrv.config import config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"store": store})
