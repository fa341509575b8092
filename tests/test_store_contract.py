"""The job store's contract, run against both backends: SQLite (store.py) and
PostgreSQL (store_pg.py, on a real server). One suite, parametrised by backend."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mendsrv.errors import Conflict, NotFound, QueueFull
from mendsrv.models import Event, Status
from mendsrv.store import TransitionError, open_store

NODE = "contract-node"


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        s = await open_store(str(tmp_path / "mend.db"))
    else:
        s = await open_store(request.getfixturevalue("pg_url"), node=NODE)
    try:
        yield s
    finally:
        await s.close()


async def add(store: Any, type: str = "image/resize", resource: str = "cpu", **kw: Any) -> Any:
    fields: dict[str, Any] = {
        "job_id": str(uuid.uuid4()), "type": type, "resource": resource, "params": {"width": 10, "b": [1, 2]},
        "request_id": None, "webhook_url": None, "webhook_style": "default",
    } | kw
    job, created = await store.insert_job(**fields)
    assert created
    return job


async def test_store_insert_get_and_resource(store: Any) -> None:
    job = await add(store, request_id="r-1", params={"z": 1, "a": {"b": None}})
    got = await store.get_job(job.id)
    assert got is not None and got.id == job.id and got.status is Status.PENDING
    res = got.resource_dict()
    assert res["params"] == {"z": 1, "a": {"b": None}} and list(res["params"]) == ["z", "a"]
    assert res["request_id"] == "r-1" and res["attempts"] == 0 and res["progress"] == 0
    assert res["created_at"].endswith("Z") and res["started_at"] is None
    assert await store.get_job("no-such-job") is None


async def test_store_list_pages_newest_first_with_filters(store: Any) -> None:
    ids = [(await add(store, type="image/resize" if i % 2 else "image/crop", request_id=f"r{i % 3}")).id for i in range(7)]
    page1 = await store.list_jobs(limit=3)
    assert [j.id for j in page1] == ids[::-1][:3]
    page2 = await store.list_jobs(limit=3, before_seq=page1[-1].seq)
    page3 = await store.list_jobs(limit=3, before_seq=page2[-1].seq)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    assert await store.list_jobs(limit=3, before_seq=page3[-1].seq) == []
    assert [j.id for j in await store.list_jobs(type="image/crop")] == [ids[i] for i in (6, 4, 2, 0)]
    assert [j.id for j in await store.list_jobs(request_id="r1")] == [ids[4], ids[1]]
    await store.cancel(ids[3])
    assert [j.id for j in await store.list_jobs(status="cancelled")] == [ids[3]]
    counts = await store.count_by_status()
    assert counts == {"pending": 6, "processing": 0, "completed": 0, "failed": 0, "cancelled": 1}


async def test_store_idempotency_key_returns_first_job_or_conflicts(store: Any) -> None:
    first = await add(store, idempotency_key="k1", body_hash="h1")
    again, created = await store.insert_job(
        job_id=str(uuid.uuid4()), type="image/resize", resource="cpu", params={}, request_id=None,
        webhook_url=None, webhook_style="default", idempotency_key="k1", body_hash="h1",
    )
    assert not created and again.id == first.id
    with pytest.raises(Conflict):
        await store.insert_job(
            job_id=str(uuid.uuid4()), type="image/resize", resource="cpu", params={}, request_id=None,
            webhook_url=None, webhook_style="default", idempotency_key="k1", body_hash="other",
        )
    assert len(await store.list_jobs()) == 1


async def test_store_queue_full_raises(store: Any) -> None:
    await add(store, max_queue=2)
    await add(store, max_queue=2)
    with pytest.raises(QueueFull):
        await add(store, max_queue=2)


async def test_store_counts_follow_every_transition(store: Any) -> None:
    """count_by_status (and the pending count limits.max_queue is checked against)
    stays right through claim, complete, fail, requeue, cancel and retry."""
    jobs = [await add(store) for _ in range(5)]

    async def counts() -> dict[str, int]:
        real = {s.value: 0 for s in Status}
        for job in await store.list_jobs(limit=100):
            real[job.status.value] += 1
        reported = await store.count_by_status()
        assert reported == real
        return reported

    assert await counts() == {"pending": 5, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}
    claimed = [await store.claim("cpu", NODE) for _ in range(4)]
    await store.complete(claimed[0].id, {"outputs": []})
    await store.fail(claimed[1].id, "broken")
    await store.requeue(claimed[2].id, refund=True)
    await store.cancel(jobs[4].id)
    assert await counts() == {"pending": 1, "processing": 1, "completed": 1, "failed": 1, "cancelled": 1}
    await store.retry(claimed[1].id)
    await store.retry(jobs[4].id)
    assert await counts() == {"pending": 3, "processing": 1, "completed": 1, "failed": 0, "cancelled": 0}
    # the queue limit counts pending jobs only: 3 are pending, so a limit of 4 takes one more
    await add(store, max_queue=4)
    with pytest.raises(QueueFull):
        await add(store, max_queue=4)
    await store.claim("cpu", NODE)
    await add(store, max_queue=4)


async def test_store_guarded_transitions_raise(store: Any) -> None:
    job = await add(store)
    with pytest.raises(TransitionError, match="pending; it cannot become completed"):
        await store.complete(job.id, {"outputs": []})
    with pytest.raises(TransitionError, match="only failed or cancelled jobs can be retried"):
        await store.retry(job.id)
    with pytest.raises(NotFound):
        await store.cancel("no-such-job")
    claimed = await store.claim("cpu", NODE)
    assert claimed.id == job.id and claimed.status is Status.PROCESSING and claimed.attempts == 1
    assert claimed.node == NODE and claimed.started_at is not None
    done = await store.complete(job.id, {"outputs": [{"key": "k"}]})
    assert done.status is Status.COMPLETED and done.progress == 100 and done.result == {"outputs": [{"key": "k"}]}
    with pytest.raises(TransitionError, match="only pending or processing jobs can be cancelled"):
        await store.cancel(job.id)
    with pytest.raises(TransitionError):
        await store.fail(job.id, "nope")
    assert (await store.get_job(job.id)).status is Status.COMPLETED


async def test_store_retry_resets_a_failed_job(store: Any) -> None:
    job = await add(store)
    await store.claim("cpu", NODE)
    failed = await store.fail(job.id, "source object media/a.jpg not found")
    assert failed.error == "source object media/a.jpg not found" and failed.finished_at is not None
    again = await store.retry(job.id)
    assert again.status is Status.PENDING and again.attempts == 0 and again.error is None
    assert again.finished_at is None and again.started_at is None
    assert (await store.claim("cpu", NODE)).id == job.id


async def test_store_claim_is_fifo_per_resource_and_respects_run_after(store: Any) -> None:
    a = await add(store)
    f = await add(store, type="video/transcode", resource="ffmpeg")
    b = await add(store)
    assert (await store.claim("cpu", NODE)).id == a.id
    # a transient failure: back to pending, due in 30 s; b is next
    await store.requeue(a.id, refund=False, delay_s=30, error="storage hiccup")
    requeued = await store.get_job(a.id)
    assert requeued.status is Status.PENDING and requeued.attempts == 1 and requeued.error == "storage hiccup"
    assert (await store.claim("cpu", NODE)).id == b.id
    assert await store.claim("cpu", NODE) is None
    due = await store.next_due("cpu")
    assert due is not None and due > time.time() + 20
    assert (await store.claim("ffmpeg", NODE)).id == f.id
    assert await store.next_due("ffmpeg") is None
    # on shutdown the attempt is refunded
    await store.requeue(b.id, refund=True)
    assert (await store.get_job(b.id)).attempts == 0


async def test_store_progress_only_while_processing(store: Any) -> None:
    job = await add(store)
    assert await store.set_progress(job.id, 50, "processing") is None
    await store.claim("cpu", NODE)
    event = await store.set_progress(job.id, 42.4, "processing")
    assert event is not None and event.kind == "progress"
    assert event.data == {"job_id": job.id, "progress": 42, "phase": "processing"}
    assert (await store.get_job(job.id)).resource_dict()["progress"] == 42


async def test_store_events_after_replays_transitions_in_order(store: Any) -> None:
    heard: list[Event] = []
    store.add_listener(heard.append)
    job = await add(store)
    await store.claim("cpu", NODE)
    await store.set_progress(job.id, 30, "processing")
    await store.complete(job.id, {"outputs": []})
    other = await add(store)
    store.remove_listener(heard.append)
    await store.cancel(other.id)

    events = await store.events_after(job.id)
    kinds = [(e.kind, e.data.get("status")) for e in events]
    assert kinds == [("status", "pending"), ("status", "processing"), ("progress", None), ("status", "completed")]
    assert [e.terminal for e in events] == [False, False, False, True]
    assert events[-1].data == (await store.get_job(job.id)).resource_dict()
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert [e.id for e in await store.events_after(job.id, events[1].id)] == [e.id for e in events[2:]]
    # listeners heard the same events (after each commit), and nothing once removed
    assert [e.id for e in heard if e.job_id == job.id] == [e.id for e in events]
    assert [e.data["status"] for e in heard if e.job_id == other.id] == ["pending"]


async def test_store_terminal_webhook_jobs_get_a_delivery(store: Any) -> None:
    heard: list[Event] = []
    store.add_listener(heard.append)
    plain = await add(store)
    hooked = await add(store, webhook_url="http://127.0.0.1:9/hook", webhook_style="discord")
    for _ in (plain, hooked):
        await store.claim("cpu", NODE)
    await store.complete(plain.id, {"outputs": []})
    await store.fail(hooked.id, "image is too large")
    # the terminal event that wrote a delivery says so (it wakes the webhook sender); no other does
    assert [(e.job_id, e.data["status"]) for e in heard if e.delivery] == [(hooked.id, "failed")]
    assert any(e.terminal and e.job_id == plain.id for e in heard)
    due = await store.due_deliveries()
    assert len(due) == 1
    d = due[0]
    assert (d["job_id"], d["event"], d["url"], d["style"], d["attempts"]) == (
        hooked.id, "job.failed", "http://127.0.0.1:9/hook", "discord", 0,
    )
    assert d["job"]["status"] == "failed" and d["job"]["error"] == "image is too large"
    # a failed attempt with a retry later: not due now
    retry_at = time.time() + 60
    await store.record_attempt(d["id"], status_code=500, error="HTTP 500", delivered=False, next_retry_at=retry_at)
    assert await store.due_deliveries() == []
    assert abs((await store.next_delivery_at()) - retry_at) < 1
    # cancel of a pending job also writes one
    cancelled = await add(store, webhook_url="http://127.0.0.1:9/c")
    await store.cancel(cancelled.id)
    (c,) = await store.due_deliveries()
    assert c["event"] == "job.cancelled"
    assert heard[-1].delivery and heard[-1].job_id == cancelled.id
    await store.record_attempt(c["id"], status_code=204, error=None, delivered=True, next_retry_at=None)
    assert await store.due_deliveries() == []
    assert [a["status_code"] for a in await store.list_attempts(cancelled.id)] == [204]
    attempts = await store.list_attempts(hooked.id)
    assert [(a["attempt"], a["status_code"], a["error"]) for a in attempts] == [(1, 500, "HTTP 500")]
    assert attempts[0]["next_retry_at"] == pytest.approx(retry_at)
    assert await store.list_attempts(plain.id) == []


async def test_store_recover_requeues_then_fails_past_max_attempts(store: Any) -> None:
    job = await add(store)
    await store.claim("cpu", "gone-node")
    assert await store.recover(max_attempts=2) == (1, 0)
    again = await store.get_job(job.id)
    assert again.status is Status.PENDING and again.attempts == 1
    await store.claim("cpu", "gone-node")
    assert await store.recover(max_attempts=2) == (0, 1)
    failed = await store.get_job(job.id)
    assert failed.status is Status.FAILED
    assert "interrupted 2 times" in failed.error and "workers.max_attempts = 2" in failed.error


async def test_store_health(store: Any) -> None:
    await store.ping()
    assert await store.integrity_check() == "ok"


async def test_store_concurrent_claims_take_each_job_once(store: Any) -> None:
    ids = {(await add(store)).id for _ in range(20)}
    claimed: list[str] = []

    async def worker() -> None:
        while (job := await store.claim("cpu", NODE)) is not None:
            claimed.append(job.id)

    await asyncio.gather(*(worker() for _ in range(4)))
    assert sorted(claimed) == sorted(ids)


async def test_sqlite_store_upgrade_counts_the_jobs_already_there(tmp_path: Path) -> None:
    """A database made by the first schema gets its job counts on upgrade, and they
    follow later transitions: nothing has to be recounted by hand."""
    import sqlite3

    from mendsrv.store import MIGRATIONS, _statements

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in _statements(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    for i, status in enumerate(["pending", "pending", "completed", "failed", "processing"]):
        db.execute(
            "INSERT INTO jobs (id, type, resource, status, params, created_at) VALUES (?, 'image/resize', 'cpu', ?, '{}', ?)",
            (f"old-{i}", status, time.time()),
        )
    db.close()
    store = await open_store(str(path))
    try:
        assert await store.count_by_status() == {"pending": 2, "processing": 1, "completed": 1, "failed": 1, "cancelled": 0}
        await store.cancel("old-0")
        await add(store)
        assert await store.count_by_status() == {"pending": 2, "processing": 1, "completed": 1, "failed": 1, "cancelled": 1}
        assert (await store._read("SELECT version FROM schema_version"))[0][0] == len(MIGRATIONS)
    finally:
        await store.close()


async def test_sqlite_store_group_commit_writes_every_submission(tmp_path: Path) -> None:
    """Concurrent submissions share transactions; each caller gets its own job, and a
    caller cancelled while it waits does not take its job out of the batch."""
    store = await open_store(str(tmp_path / "mend.db"))
    try:
        ids = [str(uuid.uuid4()) for _ in range(60)]
        tasks = [asyncio.create_task(add(store, job_id=job_id, request_id=f"r{i}")) for i, job_id in enumerate(ids)]
        await asyncio.sleep(0)  # every task is waiting for its batch
        for task in tasks[::3]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        jobs = [j for j in done if not isinstance(j, BaseException)]
        assert len(jobs) == 40 and all(isinstance(d, asyncio.CancelledError) for d in done[::3])
        assert [j.id for j in jobs] == [job_id for i, job_id in enumerate(ids) if i % 3]
        assert all(j.request_id == f"r{ids.index(j.id)}" and j.params == {"width": 10, "b": [1, 2]} for j in jobs)
        stored = await store.list_jobs(limit=100)
        assert sorted(j.id for j in stored) == sorted(ids)  # the cancelled callers' jobs too
        assert len({j.seq for j in stored}) == 60
        assert (await store.count_by_status())["pending"] == 60
        events = {e.job_id for job_id in ids for e in await store.events_after(job_id)}
        assert events == set(ids)  # each job has its "pending" event
    finally:
        await store.close()


async def test_store_reads_see_every_commit_after_cancelled_reads(store: Any) -> None:
    """A read whose caller was cancelled (a client that went away) must not leave the
    store reading an old snapshot: a job accepted afterwards is found at once."""
    await add(store)
    readers = [asyncio.create_task(store.list_jobs(limit=10)) for _ in range(20)]
    await asyncio.sleep(0)  # every read is on its way to the database
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.sleep(0.05)  # the database side of the cancelled reads has run
    job = await add(store)
    assert await store.get_job(job.id) is not None
    assert job.id in [j.id for j in await store.list_jobs(limit=10)]
