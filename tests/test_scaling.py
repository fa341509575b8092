"""Several ``mendsrv`` processes on one PostgreSQL store and one S3 endpoint (moto):
work is shared, each job runs once, a killed node's jobs finish on the others, and a
cancel received by one node stops the job another node is running."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from .conftest import AUTH, ServerProcess, free_port, job_body

HEARTBEAT_S = 0.5
NODE_TIMEOUT_S = 3.0

pytestmark = pytest.mark.timeout(240)


def jpeg_bytes(width: int, height: int) -> bytes:
    import pyvips

    image = pyvips.Image.xyz(width, height).extract_band(0).cast("uchar").bandjoin([60, 160])
    return bytes(image.jpegsave_buffer(Q=80))


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"scale-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


def start_nodes(server_process: Any, tmp_path: Path, count: int, pg_url: str, s3_config: dict[str, Any],
                shutdown_timeout_s: float = 5, **workers: Any) -> list[ServerProcess]:
    nodes = []
    for i in range(count):
        workdir = tmp_path / f"node{i}"
        workdir.mkdir()
        nodes.append(server_process({
            "server": {"node_id": f"node{i}", "shutdown_timeout_s": shutdown_timeout_s},
            "store": {"url": pg_url, "heartbeat_s": HEARTBEAT_S, "node_timeout_s": NODE_TIMEOUT_S, "pool_size": 4},
            "storage": s3_config,
            "workers": {"processes": 1, "poll_interval_s": 0.5, "retry_base_s": 0.2, **workers},
        }, workdir=workdir))
    for node in nodes:
        node.start(timeout=60)
    return nodes


async def submit(http: Any, node: ServerProcess, body: dict[str, Any]) -> str:
    async with http.post(f"{node.url}/api/v1/jobs/image/resize", json=body, headers=AUTH) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["job_id"])


async def wait_all_done(db: asyncpg.Connection, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = await db.fetchval("SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')")
        if done >= count:
            return
        if time.monotonic() > deadline:
            rows = await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status")
            raise AssertionError(f"only {done} of {count} jobs done after {timeout} s: {rows}")
        await asyncio.sleep(0.2)


async def runs_per_job(db: asyncpg.Connection) -> dict[str, int]:
    """How many times each job went to processing (one status event per run)."""
    rows = await db.fetch(
        "SELECT job_id, count(*) FILTER (WHERE kind = 'status' AND data::jsonb->>'status' = 'processing') "
        "FROM job_events GROUP BY job_id"
    )
    return {r[0]: r[1] for r in rows}


def logged_runs(nodes: list[ServerProcess]) -> dict[str, list[str]]:
    """job id -> the nodes whose log says they started running it."""
    runs: dict[str, list[str]] = {}
    for i, node in enumerate(nodes):
        for line in node.log_path.read_text().splitlines():
            if line.startswith("{"):
                entry = orjson.loads(line)
                if entry.get("msg") == "job processing":
                    runs.setdefault(entry["job_id"], []).append(f"node{i}")
    return runs


async def test_scaling_300_jobs_on_three_nodes_each_run_once(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=jpeg_bytes(64, 64))
    nodes = start_nodes(server_process, tmp_path, 3, pg_url, s3_config)
    limit = asyncio.Semaphore(24)

    async def one(i: int) -> str:
        async with limit:
            body = job_body(dest_key=f"out/{i}.jpg", bucket=bucket, width=32, height=32)
            return await submit(http, nodes[i % 3], body)

    ids = await asyncio.gather(*(one(i) for i in range(300)))
    db = await asyncpg.connect(pg_url)
    try:
        await wait_all_done(db, 300, timeout=150)
        statuses = await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status")
        assert {r[0]: r[1] for r in statuses} == {"completed": 300}
        runs = await runs_per_job(db)
        assert set(runs) == set(ids) and set(runs.values()) == {1}
        by_node = {r[0]: r[1] for r in await db.fetch("SELECT node, count(*) FROM jobs GROUP BY node")}
    finally:
        await db.close()
    assert set(by_node) == {"node0", "node1", "node2"} and sum(by_node.values()) == 300
    # the nodes' own logs agree: 300 runs, one per job
    logged = logged_runs(nodes)
    assert set(logged) == set(ids) and all(len(who) == 1 for who in logged.values())
    # every output is in the bucket, and any node answers for any job
    keys = {o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
            for o in page.get("Contents", [])}
    assert keys == {f"out/{i}.jpg" for i in range(300)}
    async with http.get(f"{nodes[1].url}/api/v1/jobs/{ids[0]}", headers=AUTH) as resp:
        job = await resp.json()
    assert job["status"] == "completed" and job["result"]["outputs"][0]["width"] == 32


async def test_scaling_killed_node_jobs_finish_on_the_others(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=jpeg_bytes(1600, 1600))
    nodes = start_nodes(server_process, tmp_path, 2, pg_url, s3_config)
    db = await asyncpg.connect(pg_url)
    try:
        ids = [await submit(http, nodes[i % 2], job_body(dest_key=f"out/{i}.jpg", bucket=bucket, width=1200))
               for i in range(40)]
        # SIGKILL node1 while it runs jobs
        deadline = time.monotonic() + 30
        while not (victims := [r[0] for r in await db.fetch(
                "SELECT id FROM jobs WHERE status = 'processing' AND node = 'node1'")]):
            assert time.monotonic() < deadline, "node1 never ran a job"
            await asyncio.sleep(0.01)
        nodes[1].kill()
        killed_at = time.time()
        await wait_all_done(db, len(ids), timeout=120)
        statuses = {r[0]: r[1] for r in await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status")}
        assert statuses == {"completed": len(ids)}
        orphans = await db.fetch(
            "SELECT id, attempts, node FROM jobs WHERE status = 'completed' AND attempts > 1"
        )
        # the jobs cut off by the kill (and only those) ran a second time, on node0
        assert set(victims) <= {r[0] for r in orphans}
        assert all(r[1] == 2 and r[2] == "node0" for r in orphans)
        runs = await runs_per_job(db)
        assert all(runs[j] == 1 for j in ids if j not in {r[0] for r in orphans})
        # put back to pending within the heartbeat timeout (+ two heartbeats, + 2 s for a loaded machine)
        requeued_at = await db.fetch(
            "SELECT job_id, min(at) FROM job_events WHERE kind = 'status' AND data::jsonb->>'status' = 'pending' "
            "AND (data::jsonb->>'attempts')::int = 1 AND job_id = ANY($1::text[]) GROUP BY job_id",
            [r[0] for r in orphans],
        )
        assert len(requeued_at) == len(orphans)
        for _, at in requeued_at:
            assert at - killed_at < NODE_TIMEOUT_S + 2 * HEARTBEAT_S + 2.0, at - killed_at
        assert "requeued the jobs of dead nodes" in nodes[0].log_path.read_text()
    finally:
        await db.close()


async def test_scaling_sigterm_hands_running_jobs_to_the_others_at_once(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=jpeg_bytes(5000, 5000))
    nodes = start_nodes(server_process, tmp_path, 2, pg_url, s3_config, shutdown_timeout_s=0.2)
    db = await asyncpg.connect(pg_url)
    try:
        ids = [await submit(http, nodes[i % 2], job_body(dest_key=f"out/{i}.png", bucket=bucket, width=4900))
               for i in range(6)]
        deadline = time.monotonic() + 30
        while not await db.fetch("SELECT id FROM jobs WHERE status = 'processing' AND node = 'node1' AND progress >= 10"):
            assert time.monotonic() < deadline, "node1 never ran a job"
            await asyncio.sleep(0.02)
        stopped_at = time.time()
        assert await asyncio.to_thread(nodes[1].terminate) == 0
        # it left the nodes table, and what it was running went back to pending with the attempt refunded
        assert await db.fetchval("SELECT count(*) FROM nodes WHERE id = 'node1'") == 0
        handed = await db.fetch(
            "SELECT job_id, min(at) FROM job_events WHERE kind = 'status' AND data::jsonb->>'status' = 'pending' "
            "AND (data::jsonb->>'attempts')::int = 0 AND at > $1 GROUP BY job_id", stopped_at,
        )
        assert handed, "node1 finished everything within 0.2 s?"
        assert all(at - stopped_at < NODE_TIMEOUT_S for _, at in handed)
        await wait_all_done(db, len(ids), timeout=120)
        rows = await db.fetch("SELECT id, status, attempts, node FROM jobs WHERE id = ANY($1::text[])",
                              [r[0] for r in handed])
        assert all((r[1], r[2], r[3]) == ("completed", 1, "node0") for r in rows), rows
    finally:
        await db.close()


async def test_scaling_cancel_on_one_node_stops_the_job_running_on_another(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="big.jpg", Body=jpeg_bytes(7000, 7000))
    nodes = start_nodes(server_process, tmp_path, 2, pg_url, s3_config, job_timeout_s=120)
    db = await asyncpg.connect(pg_url)
    try:
        job_id = await submit(http, nodes[0], job_body("big.jpg", "big-out.png", bucket=bucket, width=6900,
                                                       format="png"))
        deadline = time.monotonic() + 30
        while (runner := await db.fetchval(
                "SELECT node FROM jobs WHERE id = $1 AND status = 'processing' AND progress >= 10", job_id)) is None:
            assert time.monotonic() < deadline, "the job never started"
            await asyncio.sleep(0.02)
        other = nodes[1] if runner == "node0" else nodes[0]
        running = nodes[0] if runner == "node0" else nodes[1]
        async with http.post(f"{other.url}/api/v1/jobs/{job_id}/cancel", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "cancelled"
        # the running node's dispatcher heard it and stopped the job (not merely lost the race at the end)
        deadline = time.monotonic() + 20
        while True:
            lines = [orjson.loads(line) for line in running.log_path.read_text().splitlines() if line.startswith("{")]
            if any(e.get("msg") == "job cancelled" and e.get("job_id") == job_id for e in lines):
                break
            assert time.monotonic() < deadline, "the running node never heard of the cancel"
            await asyncio.sleep(0.05)
        assert not any(e.get("msg") == "job completed" and e.get("job_id") == job_id for e in lines)
        async with http.get(f"{running.url}/api/v1/jobs/{job_id}", headers=AUTH) as resp:
            job = await resp.json()
        assert job["status"] == "cancelled"
    finally:
        await db.close()


async def test_scaling_local_storage_refused_with_a_second_node(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any]
) -> None:
    start_nodes(server_process, tmp_path, 1, pg_url, s3_config)
    workdir = tmp_path / "local-node"
    workdir.mkdir()
    node = server_process({
        "server": {"node_id": "local-node"},
        "store": {"url": pg_url, "heartbeat_s": HEARTBEAT_S, "node_timeout_s": NODE_TIMEOUT_S},
        "storage": {"backend": "local"},
    }, workdir=workdir)
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        node.start(timeout=60)
    assert 'storage.backend = "local" cannot be used when several nodes share one PostgreSQL store' in str(info.value)
    assert "storage.shared = true" in str(info.value)



async def read_sse(http: Any, url: str, headers: dict[str, str]) -> list[tuple[int, str, dict[str, Any]]]:
    """Read a Server-Sent Events stream to its end: [(id, event, data)]."""
    events: list[tuple[int, str, dict[str, Any]]] = []
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        fields: dict[str, str] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    events.append((int(fields["id"]), fields.get("event", "message"), orjson.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return events


async def test_scaling_sse_on_one_node_sees_every_event_of_a_job_another_node_runs(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=jpeg_bytes(1600, 1600))
    nodes = start_nodes(server_process, tmp_path, 2, pg_url, s3_config)
    streams: dict[str, asyncio.Task[Any]] = {}
    for i in range(8):  # more work than the nodes do at once: most streams start before their job runs
        job_id = await submit(http, nodes[0], job_body(dest_key=f"out/{i}.jpg", bucket=bucket, width=1200))
        url = f"{nodes[0].url}/api/v1/jobs/{job_id}/stream"
        streams[job_id] = asyncio.ensure_future(read_sse(http, url, {**AUTH, "Last-Event-ID": "0"}))
    received = dict(zip(streams, await asyncio.wait_for(asyncio.gather(*streams.values()), 120), strict=True))
    db = await asyncpg.connect(pg_url)
    try:
        ran_on = {r[0]: r[1] for r in await db.fetch("SELECT id, node FROM jobs")}
        assert "node1" in ran_on.values(), "node1 ran none of the jobs"
        for job_id, events in received.items():
            rows = await db.fetch("SELECT id, kind FROM job_events WHERE job_id = $1 ORDER BY id", job_id)
            assert [(e[0], e[1]) for e in events] == [(r[0], r[1]) for r in rows], ran_on[job_id]
            assert events[-1][1] == "status" and events[-1][2]["status"] == "completed"
            assert [e[2]["status"] for e in events if e[1] == "status"] == ["pending", "processing", "completed"]
    finally:
        await db.close()


async def test_scaling_each_webhook_is_delivered_once_by_several_nodes(
    server_process: Any, tmp_path: Path, pg_url: str, s3_config: dict[str, Any], s3_client: Any, bucket: str, http: Any
) -> None:
    from aiohttp import web

    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.json())["job"]["job_id"])
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=jpeg_bytes(64, 64))
        nodes = start_nodes(server_process, tmp_path, 3, pg_url, s3_config)
        ids = [await submit(http, nodes[i % 3], job_body(dest_key=f"out/{i}.jpg", bucket=bucket, width=32,
                                                         webhook_url=f"http://127.0.0.1:{port}/hook"))
               for i in range(60)]
        db = await asyncpg.connect(pg_url)
        try:
            await wait_all_done(db, len(ids), timeout=90)
            deadline = time.monotonic() + 60
            while await db.fetchval("SELECT count(*) FROM deliveries WHERE state = 'delivered'") < len(ids):
                assert time.monotonic() < deadline, "not every webhook was delivered"
                await asyncio.sleep(0.2)
            senders = {r[0] for r in await db.fetch("SELECT DISTINCT locked_by FROM deliveries")}
        finally:
            await db.close()
        await asyncio.sleep(1.0)  # a duplicate would arrive about now
        assert sorted(received) == sorted(ids)  # each job's webhook once, no more
        assert len(senders) > 1  # and the nodes shared the sending
    finally:
        await runner.cleanup()
