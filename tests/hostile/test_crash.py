"""Crashes and a full disk, on mendsrv as a real process.

- SIGKILL of the server (and its workers) while many clients are submitting: every
  job that got a 202 is in the store after the restart and completes; every output
  decodes fully; SQLite's integrity check passes.
- The temp directory full: the server runs under RLIMIT_FSIZE, so a write past the
  limit fails with EFBIG exactly where a full disk fails with ENOSPC (mid-stream, in
  the server's download and in a worker's encode). This needs no mount, works as
  root and as a user, and leaves the rest of the machine alone. Such a job is
  retried per workers.max_attempts, then fails with a sentence naming
  storage.temp_dir; the server keeps serving.
- The temp directory gone (replaced by a file): the same, in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyvips

from mendsrv.ops import REGISTRY

from ..conftest import AUTH, job_body, wait_for_job, write_jpeg
from .conftest import assert_failed_with_sentence, make_bucket, noise_jpeg, sine_wav

TERMINAL = ("completed", "failed", "cancelled")


async def _job(http: Any, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/jobs/{job_id}", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _wait(http: Any, url: str, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    pending = list(job_ids)
    done: dict[str, dict[str, Any]] = {}
    while pending:
        for job_id in list(pending):
            job = await _job(http, url, job_id)
            if job["status"] in TERMINAL:
                done[job_id] = job
                pending.remove(job_id)
        if pending:
            assert time.monotonic() < deadline, f"{len(pending)} jobs not finished"
            await asyncio.sleep(0.1)
    return [done[j] for j in job_ids]


def _integrity(db_path: Path) -> tuple[str, dict[str, str]]:
    db = sqlite3.connect(db_path)
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        states = dict(db.execute("SELECT id, status FROM jobs").fetchall())
        return check, states
    finally:
        db.close()


async def _states(store: str, tmp_path: Path, pg: str | None) -> tuple[str, dict[str, str]]:
    """(integrity verdict, job id -> status) read straight from the store after a crash."""
    if store == "sqlite":
        return _integrity(tmp_path / "data" / "mend.db")
    import asyncpg

    conn = await asyncpg.connect(pg)
    try:
        rows = await conn.fetch("SELECT id, status FROM jobs")
        # PostgreSQL has no integrity_check; amcheck-free sanity: the primary key index agrees
        count = await conn.fetchval("SELECT count(DISTINCT id) FROM jobs")
        return ("ok" if count == len(rows) else "duplicate ids"), {r["id"]: r["status"] for r in rows}
    finally:
        await conn.close()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_crash_sigkill_under_concurrent_submissions(
    store: str, server_process: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pg = request.getfixturevalue("pg_url") if store == "postgresql" else None
    sections: dict[str, Any] = {"workers": {"processes": 1, "max_attempts": 3}}
    if pg is not None:  # a fixed node id: the restarted server is the same node, not a second one
        sections["store"] = {"url": pg}
        sections["server"] = {"node_id": "crash-node"}
    server = server_process(sections).start()
    media = tmp_path / "data" / "buckets" / "media"
    write_jpeg(media / "in.jpg", 240, 180, Q=90)
    accepted: list[str] = []
    refused = 0
    stop = asyncio.Event()

    async def submitter(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal refused
        i = 0
        while not stop.is_set():
            body = job_body(dest_key=f"out/{n}-{i}.jpg", width=120)
            try:
                async with session.post(f"{server.url}/api/v1/jobs/image/resize", json=body, headers=AUTH) as resp:
                    assert resp.status < 500, await resp.text()
                    if resp.status == 202:
                        accepted.append((await resp.json())["job_id"])
            except (TimeoutError, aiohttp.ClientError):
                refused += 1  # the server died under this request: not accepted
                await asyncio.sleep(0.01)
            i += 1

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32)) as session:
        # a first job warms the worker process up
        async with session.post(f"{server.url}/api/v1/jobs/image/resize", json=job_body(width=120), headers=AUTH) as resp:
            warm = (await resp.json())["job_id"]
        assert (await _wait(session, server.url, [warm], timeout=60))[0]["status"] == "completed"
        tasks = [asyncio.create_task(submitter(n, session)) for n in range(16)]
        # under load: submissions flowing and jobs running, then SIGKILL
        deadline = time.monotonic() + 30
        while len(accepted) < 80:
            assert time.monotonic() < deadline, "the server accepted too little"
            await asyncio.sleep(0.02)
        server.kill()
        await asyncio.sleep(0.3)  # the submitters see the dead server
        stop.set()
        await asyncio.gather(*tasks)

    check, states = await _states(store, tmp_path, pg)
    assert check == "ok"
    assert set(accepted) <= set(states)  # no 202'd job lost
    assert any(s != "completed" for s in states.values())  # it was killed mid-way

    server.start()
    async with aiohttp.ClientSession() as http:
        jobs = await _wait(http, server.url, sorted(states), timeout=120)
    assert [j["status"] for j in jobs] == ["completed"] * len(jobs), [j["error"] for j in jobs if j["error"]]
    for job in jobs:
        key = job["result"]["outputs"][0]["key"]
        image = pyvips.Image.new_from_file(str(media / key), fail=True)
        assert (image.width, image.height) == (120, 90)
        image.avg()  # decodes every pixel: a half-written file would raise
    server.terminate()
    check, after = await _states(store, tmp_path, pg)
    assert check == "ok" and set(after.values()) == {"completed"}


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """RLIMIT_FSIZE for processes started inside the block (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_crash_temp_dir_full_fails_with_a_sentence(
    server_process: Any, tmp_path: Path, s3_config: dict[str, Any], s3_client: Any
) -> None:
    bucket = make_bucket(s3_client, "full")
    s3_client.put_object(Bucket=bucket, Key="huge.bin", Body=b"\1" * (6 * 1024 * 1024))
    noisy = pyvips.Image.gaussnoise(1400, 1100).cast("uchar").bandjoin([pyvips.Image.gaussnoise(1400, 1100).cast("uchar")] * 2)
    s3_client.put_object(Bucket=bucket, Key="noise.jpg", Body=bytes(noisy.jpegsave_buffer(Q=60)))
    s3_client.put_object(Bucket=bucket, Key="small.jpg", Body=noise_jpeg(64, 48))
    s3_client.put_object(Bucket=bucket, Key="long.wav", Body=sine_wav(25.0))  # 400 KB in, 4.8 MB out
    server = server_process({
        "storage": s3_config | {"temp_dir": str(tmp_path / "staging")},
        "workers": {"processes": 1, "max_attempts": 2, "retry_base_s": 0.05},
    })
    (tmp_path / "staging").mkdir()
    with file_size_limit(3 * 1024 * 1024):
        server.start()
    url = server.url
    async with aiohttp.ClientSession() as http:

        async def submit(body: dict[str, Any], op: str = "image/resize") -> str:
            async with http.post(f"{url}/api/v1/jobs/{op}", json=body, headers=AUTH) as resp:
                assert resp.status == 202, await resp.text()
                return str((await resp.json())["job_id"])

        # the source does not fit: the download stops at the limit
        download = await submit(job_body("huge.bin", "a.png", bucket=bucket, width=10))
        # the source fits, the 4.6 MB PNG the worker encodes does not
        encode = await submit(job_body("noise.jpg", "b.png", bucket=bucket, width=1400))
        failing = [download, encode]
        if "audio/transcode" in REGISTRY:  # an ffmpeg child writing past the limit
            failing.append(await submit(
                job_body("long.wav", "d.wav", bucket=bucket, format="wav", sample_rate=48000, channels=2),
                "audio/transcode",
            ))
        for job in await _wait(http, url, failing, timeout=60):
            error = assert_failed_with_sentence(job, names="storage.temp_dir")
            assert "File too large" in error and "(after 2 attempts)" in error, error
            assert job["attempts"] == 2, job
        # the server keeps serving
        ok = await submit(job_body("small.jpg", "c.jpg", bucket=bucket, width=32))
        assert (await _wait(http, url, [ok], timeout=30))[0]["status"] == "completed"
    assert list((tmp_path / "staging").iterdir()) == []  # staged files were cleaned up
    server.terminate()
    check, _ = _integrity(tmp_path / "data" / "mend.db")
    assert check == "ok"


async def test_crash_temp_dir_gone_is_retried_then_a_sentence(
    config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    client = await client_factory(
        config_factory(storage={"temp_dir": str(staging)}, workers={"max_attempts": 2, "retry_base_s": 0.05})
    )
    write_jpeg(buckets / "media" / "in.jpg", 320, 240)
    shutil.rmtree(staging)
    staging.write_text("not a directory")  # the temp directory became unusable
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=32), headers=AUTH)
    job = await wait_for_job(client, (await resp.json())["job_id"])
    error = assert_failed_with_sentence(job, names="storage.temp_dir")
    assert str(staging) in error and "after 2 attempts" in error
    staging.unlink()
    staging.mkdir()  # repaired: the next job runs, and the failed one can be retried
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(dest_key="b.jpg", width=32), headers=AUTH)
    assert (await wait_for_job(client, (await resp.json())["job_id"]))["status"] == "completed"
    resp = await client.post(f"/api/v1/jobs/{job['job_id']}/retry", headers=AUTH)
    assert (await wait_for_job(client, job["job_id"]))["status"] == "completed"


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.add(int(entry.name))
    return out


async def test_crash_worker_killed_in_a_real_server(server_process: Any, tmp_path: Path) -> None:
    """SIGKILL the pool worker running a job (its pid from the job's temp dir, checked
    against the server's /proc children): the pool is rebuilt, that job runs again and
    completes, and no other job is lost."""
    staging = tmp_path / "staging"
    staging.mkdir()
    server = server_process({
        "storage": {"temp_dir": str(staging)},
        "workers": {"processes": 2, "max_attempts": 3, "retry_base_s": 0.05},
    }).start()
    media = tmp_path / "data" / "buckets" / "media"
    write_jpeg(media / "big.jpg", 2000, 2000, Q=95)
    write_jpeg(media / "small.jpg", 200, 150)
    assert server.proc is not None
    async with aiohttp.ClientSession() as http:

        async def submit(body: dict[str, Any]) -> str:
            async with http.post(f"{server.url}/api/v1/jobs/image/resize", json=body, headers=AUTH) as resp:
                assert resp.status == 202, await resp.text()
                return str((await resp.json())["job_id"])

        victim = await submit(job_body("big.jpg", "victim.avif", width=2000))
        others = [await submit(job_body("small.jpg", f"o{i}.jpg", width=50)) for i in range(8)]
        deadline = time.monotonic() + 30
        pid = None
        while pid is None:
            for pid_file in staging.glob(f"mend-{victim[:8]}-*/out/.worker-pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text())
            assert time.monotonic() < deadline, "the job never reached a worker"
            await asyncio.sleep(0.01)
        before = _children(server.proc.pid)
        assert pid in before  # the pid file names a child of the server
        os.kill(pid, signal.SIGKILL)
        jobs = await _wait(http, server.url, [victim, *others], timeout=120)
        assert jobs[0]["status"] == "completed" and jobs[0]["attempts"] >= 2, jobs[0]
        for job in jobs[1:]:
            assert job["status"] == "completed", job
        assert pid not in _children(server.proc.pid)
        assert _children(server.proc.pid) - before  # new worker processes: the pool was rebuilt
    server.terminate()
    check, _ = _integrity(tmp_path / "data" / "mend.db")
    assert check == "ok"
