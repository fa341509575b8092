"""6. Memory: mendsrv's RSS idle, with 10,000 jobs queued, and while streaming 1 GB.

RSS is the server process's (from /proc); its worker processes are reported in the
notes. Baselines: the raw aiohttp + aiosqlite server idle and after the same 10,000
inserts; and aiobotocore alone streaming the same 1 GB object.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp

from .harness import (
    API_KEY,
    Context,
    Row,
    Server,
    StalledEndpoint,
    boto_client,
    child_env,
    children_rss_mb,
    get_job,
    moto_server,
    raw_server,
    rss_mb,
    s3_section,
    submit,
)

QUEUED = 10_000
GB = 1024**3


async def fill(url: str, count: int, headers: dict[str, str]) -> None:
    body = {"source_bucket": "media", "source_key": "missing.jpg", "dest_bucket": "media", "dest_key": "o.jpg",
            "width": 800, "height": 600}
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                async with session.post(url, json=body, headers=headers) as resp:
                    if resp.status != 202:
                        raise RuntimeError(f"submit answered {resp.status}: {await resp.text()}")

        await asyncio.gather(*(worker() for _ in range(32)))


async def settle(pid: int, seconds: float = 2.0) -> float:
    await asyncio.sleep(seconds)
    return rss_mb(pid)


async def queued(ctx: Context) -> list[Row]:
    stall = StalledEndpoint()
    try:
        server = Server(ctx.work / "mem", {
            "storage": s3_section(stall.url) | {"read_timeout_s": 600.0, "connect_timeout_s": 60.0},
        })
        with server:
            async with aiohttp.ClientSession() as session:  # one request so routes and auth are warm
                async with session.get(f"{server.url}/api/v1/jobs", headers={"X-API-Key": API_KEY}):
                    pass
            idle = await settle(server.pid)
            workers_idle = children_rss_mb(server.pid)
            t0 = time.monotonic()
            await fill(f"{server.url}/api/v1/jobs/image/resize", QUEUED, {"X-API-Key": API_KEY})
            fill_s = time.monotonic() - t0
            full = await settle(server.pid)
    finally:
        stall.close()
    with raw_server(ctx.work / "mem-raw") as raw:
        raw_idle = await settle(raw.pid)
        await fill(f"http://127.0.0.1:{raw.port}/api/v1/jobs/image/resize", QUEUED, {})
        raw_full = await settle(raw.pid)
    return [
        Row("RSS idle", "MB", idle, raw_idle, "<= 120",
            note=f"server process after start and one request; its worker processes add {workers_idle:.0f} MB "
            "(spawned on first use)"),
        Row(f"RSS with {QUEUED:,} jobs queued", "MB", full, raw_full, "<= 250",
            note=f"filled in {fill_s:.1f} s by 32 connections; workers stalled on an unanswering S3 endpoint"),
    ]


async def streaming(ctx: Context) -> list[Row]:
    work = ctx.work / "stream"
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big.bin"
    with open(big, "wb") as fh:  # sparse: 1 GB of zeros that costs no disk
        fh.truncate(GB)
    with moto_server(work / "moto") as moto:
        endpoint = f"http://127.0.0.1:{moto.port}"
        client = boto_client(endpoint)
        client.create_bucket(Bucket="media")
        client.put_object(Bucket="media", Key="small", Body=b"x")
        t0 = time.monotonic()
        client.upload_file(str(big), "media", "big.jpg")
        upload_s = time.monotonic() - t0
        big.unlink()
        server = Server(work / "srv", {"storage": s3_section(endpoint), "workers": {"processes": 1}})
        with server:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{server.url}/api/v1/jobs", headers={"X-API-Key": API_KEY}):
                    pass
                before = await settle(server.pid, 1.0)
                job_id = await submit(session, server.url, "image/resize", {
                    "source_bucket": "media", "source_key": "big.jpg", "dest_bucket": "media",
                    "dest_key": "o.jpg", "width": 100})
                peak = before
                t0 = time.monotonic()
                while time.monotonic() - t0 < 300:
                    peak = max(peak, rss_mb(server.pid))
                    job = await get_job(session, server.url, job_id)
                    if job["status"] in ("completed", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.02)
                took = time.monotonic() - t0
        out = subprocess.run(
            [sys.executable, "-m", "bench.stream_raw", endpoint, "media", "big.jpg", str(work / "raw.bin")],
            capture_output=True, text=True, env=child_env(), timeout=600, check=True,
        )
        raw = json.loads(out.stdout)
        (work / "raw.bin").unlink(missing_ok=True)
    return [Row(
        "RSS growth streaming a 1 GB S3 source", "MB", peak - before, raw["peak_mb"] - raw["before_mb"], "<= 100",
        note=f"job ran {took:.1f} s ({job['status']}: {job.get('error') or 'ok'}); RSS {before:.0f}→{peak:.0f} MB; "
        f"raw = aiobotocore alone, 1 MB chunks to a file; upload to moto took {upload_s:.0f} s",
    )]


async def run(ctx: Context) -> list[Row]:
    rows = await queued(ctx)
    try:
        rows += await streaming(ctx)
    except Exception as exc:
        rows.append(Row("RSS growth streaming a 1 GB S3 source", "MB", note=f"not measured: {type(exc).__name__}: {exc}"))
    return rows
