"""The dispatcher and worker pool: crashes, timeouts, FIFO."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import AUTH, job_body, wait_for_job, write_jpeg


async def _submit(client: Any, **params: Any) -> str:
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(**params), headers=AUTH)
    assert resp.status == 202, await resp.text()
    return (await resp.json())["job_id"]


async def _worker_pid(tmp: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid_file in tmp.glob("mend-*/out/.worker-pid"):
            try:
                return int(pid_file.read_text())
            except (OSError, ValueError):
                pass
        await asyncio.sleep(0.005)
    raise AssertionError("no job reached a worker process")


async def test_pool_worker_death_costs_only_its_job(config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 2, "retry_base_s": 0}))
    write_jpeg(buckets / "media" / "big.jpg", 6000, 6000, Q=98)
    write_jpeg(buckets / "media" / "small.jpg", 64, 64)
    victim = await _submit(client, source_key="big.jpg", dest_key="victim.avif", width=3000)  # seconds of AV1 encoding
    pid = await _worker_pid(tmp_path / "tmp")
    others = [await _submit(client, source_key="small.jpg", dest_key=f"o{i}.jpg", width=10) for i in range(6)]
    os.kill(pid, signal.SIGKILL)
    job = await wait_for_job(client, victim, timeout=60)
    assert job["status"] == "completed" and job["attempts"] == 2, job
    for job_id in others:
        job = await wait_for_job(client, job_id, timeout=60)
        assert job["status"] == "completed" and job["attempts"] == 1, job


async def test_pool_worker_death_past_max_attempts_fails_with_sentence(config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 1, "max_attempts": 1}))
    write_jpeg(buckets / "media" / "big.jpg", 6000, 6000, Q=98)
    victim = await _submit(client, source_key="big.jpg", dest_key="victim.avif", width=3000)  # seconds of AV1 encoding
    os.kill(await _worker_pid(tmp_path / "tmp"), signal.SIGKILL)
    job = await wait_for_job(client, victim, timeout=60)
    assert job["status"] == "failed"
    assert "worker process died" in job["error"]
    # the pool was rebuilt: the next job runs
    write_jpeg(buckets / "media" / "small.jpg", 64, 64)
    job = await wait_for_job(client, await _submit(client, source_key="small.jpg", width=8), timeout=60)
    assert job["status"] == "completed"


async def test_pool_job_timeout_names_the_limit(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 1, "job_timeout_s": 0.2}))
    write_jpeg(buckets / "media" / "big.jpg", 8000, 8000, Q=98)
    job = await wait_for_job(client, await _submit(client, source_key="big.jpg", width=7000, format="png"), timeout=60)
    assert job["status"] == "failed"
    assert job["error"] == "the job ran longer than 0.2 s and was stopped (workers.job_timeout_s)"


async def test_pool_runs_jobs_in_fifo_order(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 1}))
    write_jpeg(buckets / "media" / "in.jpg", 256, 256)
    ids = [await _submit(client, dest_key=f"{i}.jpg", width=16) for i in range(10)]
    jobs = [await wait_for_job(client, job_id) for job_id in ids]
    started = [j["started_at"] for j in jobs]
    assert started == sorted(started)


async def test_pool_after_a_timeout_the_next_job_runs_on_a_fresh_pool(config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 1, "job_timeout_s": 2}))
    write_jpeg(buckets / "media" / "big.jpg", 8000, 8000, Q=98)
    write_jpeg(buckets / "media" / "small.jpg", 64, 64)
    # the first job starts the worker process, so the timed job below is really running
    warm = await wait_for_job(client, await _submit(client, source_key="small.jpg", width=8), timeout=60)
    assert warm["status"] == "completed"
    slow = await _submit(client, source_key="big.jpg", dest_key="slow.avif", width=7900)  # ~10 s of AV1 encoding
    first_pid = await _worker_pid(tmp_path / "tmp")
    job = await wait_for_job(client, slow, timeout=60)
    assert job["status"] == "failed" and "workers.job_timeout_s" in job["error"]
    quick = await wait_for_job(client, await _submit(client, source_key="small.jpg", width=8), timeout=60)
    assert quick["status"] == "completed" and quick["attempts"] == 1
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)  # the timed-out job's worker is gone


async def test_pool_job_cancelled_while_queued_for_a_worker_never_runs(config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path) -> None:
    # one worker busy; the next job is fetched and handed to the pool, where it waits
    client = await client_factory(config_factory(workers={"processes": 1}))
    write_jpeg(buckets / "media" / "big.jpg", 6000, 6000, Q=98)
    write_jpeg(buckets / "media" / "small.jpg", 64, 64)
    busy = await _submit(client, source_key="big.jpg", dest_key="busy.avif", width=3000)  # seconds of AV1 encoding
    await _worker_pid(tmp_path / "tmp")
    queued = await _submit(client, source_key="small.jpg", dest_key="queued.jpg", width=8)
    deadline = time.monotonic() + 20
    while (await (await client.get(f"/api/v1/jobs/{queued}", headers=AUTH)).json())["progress"] < 10:
        assert time.monotonic() < deadline, "the queued job was never fetched"
        await asyncio.sleep(0.01)
    resp = await client.post(f"/api/v1/jobs/{queued}/cancel", headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await wait_for_job(client, busy, timeout=60))["status"] == "completed"
    after = await wait_for_job(client, await _submit(client, source_key="small.jpg", dest_key="after.jpg", width=8))
    assert after["status"] == "completed"
    job = await wait_for_job(client, queued)
    assert job["status"] == "cancelled" and job["result"] is None
    assert not (buckets / "media" / "queued.jpg").exists()
    assert list((tmp_path / "tmp").glob("mend-*")) == []  # no job directory left behind
