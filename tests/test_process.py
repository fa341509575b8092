"""mendsrv as a real process: crash recovery, graceful shutdown, configuration errors."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyvips

from .conftest import AUTH, REPO, job_body, write_jpeg


async def _submit_many(http: Any, url: str, count: int, **params: Any) -> list[str]:
    ids = []
    for i in range(count):
        async with http.post(
            f"{url}/api/v1/jobs/image/resize", json=job_body(dest_key=f"out/{i}.jpg", **params), headers=AUTH
        ) as resp:
            assert resp.status == 202
            ids.append((await resp.json())["job_id"])
    return ids


async def _job(http: Any, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/jobs/{job_id}", headers=AUTH) as resp:
        assert resp.status == 200
        return await resp.json()


async def _any_processing(http: Any, url: str, ids: list[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for job_id in ids:
            if (await _job(http, url, job_id))["status"] == "processing":
                return
        assert time.monotonic() < deadline, "no job started processing"
        await asyncio.sleep(0.02)


async def _wait_all(http: Any, url: str, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [await _job(http, url, i) for i in ids]
        if all(j["status"] in ("completed", "failed", "cancelled") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"not finished: {[j['status'] for j in jobs]}")
        await asyncio.sleep(0.2)


async def test_process_sigkill_loses_no_job(server_process: Any, tmp_path: Path, http: Any) -> None:
    server = server_process().start()
    write_jpeg(tmp_path / "data" / "buckets" / "media" / "in.jpg", 3000, 3000, Q=95)
    ids = await _submit_many(http, server.url, 16, width=900)
    # wait until a job is processing, then kill the server and its workers
    await _any_processing(http, server.url, ids)
    server.kill()
    db = sqlite3.connect(tmp_path / "data" / "mend.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    states = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    db.close()
    assert set(states) == set(ids)  # every accepted job is in the store
    assert list(states.values()).count("completed") < 16
    server.start()
    jobs = await _wait_all(http, server.url, ids, timeout=120)
    assert [j["status"] for j in jobs] == ["completed"] * 16
    interrupted = [j for j in jobs if j["attempts"] > 1]
    assert interrupted, "the job killed mid-run should have taken a second attempt"
    for i in range(16):
        image = pyvips.Image.new_from_file(str(tmp_path / "data" / "buckets" / "media" / "out" / f"{i}.jpg"), fail=True)
        assert (image.width, image.height) == (900, 900)
        image.avg()  # decodes every pixel: a half-written file would raise


async def test_process_sigterm_drains_and_exits_zero(server_process: Any, tmp_path: Path, http: Any) -> None:
    server = server_process().start()
    write_jpeg(tmp_path / "data" / "buckets" / "media" / "in.jpg", 2000, 2000)
    ids = await _submit_many(http, server.url, 8, width=200)
    await _any_processing(http, server.url, ids)
    assert server.terminate(timeout=60) == 0
    db = sqlite3.connect(tmp_path / "data" / "mend.db")
    states = [r[0] for r in db.execute("SELECT status FROM jobs")]
    db.close()
    assert "processing" not in states  # the running one finished; the rest went back to pending
    assert states.count("completed") >= 1
    server.start()
    jobs = await _wait_all(http, server.url, ids, timeout=60)
    assert all(j["status"] == "completed" and j["attempts"] == 1 for j in jobs)


async def test_process_freezes_its_start_up_heap(server_process: Any, http: Any) -> None:
    """The server process moves what start-up left alive out of the collector's sight
    (full collections walked it all, stopping the event loop for 60-110 ms)."""
    server = server_process().start()
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    frozen = [line for line in text.splitlines() if line.startswith("mend_gc_frozen_objects ")]
    assert frozen, "mend_gc_frozen_objects is missing from /metrics"
    assert float(frozen[0].split()[1]) > 10_000  # modules, models, clients: far more than this


def _mendsrv(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mendsrv", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_unknown_key_names_it(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[server]\nport = 8080\nprot = 1\n")
    result = _mendsrv("--config", "bad.toml", cwd=tmp_path)
    assert result.returncode != 0
    assert "server.prot" in result.stderr
    (tmp_path / "bad2.toml").write_text("[servers]\nport = 1\n")
    result = _mendsrv("--config", "bad2.toml", cwd=tmp_path)
    assert result.returncode != 0 and "[servers]" in result.stderr
    result = _mendsrv("--config", str(REPO / "mend.toml"), "--check", cwd=tmp_path, env={"MEND_WORKERS_PROCESSES": "x"})
    assert result.returncode != 0 and "workers.processes" in result.stderr
    result = _mendsrv("--config", str(REPO / "mend.toml"), "--check", cwd=tmp_path, env={"MEND_SERVER_PROT": "1"})
    assert result.returncode != 0 and "server.prot" in result.stderr


def test_cli_help_and_shipped_config(tmp_path: Path) -> None:
    result = _mendsrv("--help", cwd=tmp_path)
    assert result.returncode == 0 and "--config" in result.stdout and "MEND_" in result.stdout
    result = _mendsrv("--config", str(REPO / "mend.toml"), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


async def test_process_recovery_past_max_attempts_fails_with_sentence(server_process: Any, tmp_path: Path, http: Any) -> None:
    server = server_process({"workers": {"max_attempts": 1}}).start()
    write_jpeg(tmp_path / "data" / "buckets" / "media" / "in.jpg", 6000, 6000, Q=98)
    ids = await _submit_many(http, server.url, 1, width=100)
    await _any_processing(http, server.url, ids)
    server.kill()
    server.start()
    job = (await _wait_all(http, server.url, ids, timeout=30))[0]
    assert job["status"] == "failed"
    assert "workers.max_attempts = 1" in job["error"] and "interrupted" in job["error"]
