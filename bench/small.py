"""3. Small-job overhead: 64×64 JPEG → 32×32, the cost of everything but the pixels.

Steady rate: jobs submitted at a fixed rate; latency = the job's ``finished_at``
(server clock) minus the moment the client sent the request (same machine, same
clock), so no polling is needed and none disturbs the server. Burst: many jobs at
once; jobs/s = jobs / (last finished_at − first send). The raw baseline runs the same
pyvips call in a bare 2-process pool at the same rate (latency = future done − submit).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from .harness import Context, Row, Server, iso_to_epoch, percentile, submit, wait_all
from .media import photo
from .rawpool import noop, pool, thumbnail

PROCESSES = 2
BODY = {"source_bucket": "media", "source_key": "small.jpg", "dest_bucket": "media", "width": 32, "height": 32}


async def _paced(count: int, rate: float, start: float, fn) -> list:  # type: ignore[no-untyped-def]
    """Start fn(i) at start + i/rate; gather the results."""
    tasks = []
    for i in range(count):
        delay = start + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fn(i)))
    return list(await asyncio.gather(*tasks))


async def mend(base: str, count: int, rate: float, burst: int) -> tuple[list[float], float]:
    async with aiohttp.ClientSession() as session:
        warm = [await submit(session, base, "image/resize", BODY | {"dest_key": f"warm-{i}.jpg"}) for i in range(4)]
        await wait_all(session, base, warm)

        async def one(i: int) -> tuple[str, float]:
            sent = time.time()
            return await submit(session, base, "image/resize", BODY | {"dest_key": f"s-{i}.jpg"}), sent

        pairs = await _paced(count, rate, time.time() + 0.1, one)
        done = await wait_all(session, base, [p[0] for p in pairs], interval=0.2)
        latencies = [(iso_to_epoch(j["finished_at"]) - sent) * 1000 for j, (_, sent) in zip(done, pairs, strict=True)]
        bad = [j for j in done if j["status"] != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} small jobs did not complete: {bad[0].get('error')}")
        t0 = time.time()
        ids = await asyncio.gather(*(
            submit(session, base, "image/resize", BODY | {"dest_key": f"b-{i}.jpg"}) for i in range(burst)
        ))
        done = await wait_all(session, base, list(ids), interval=0.2)
        rate_burst = burst / (max(iso_to_epoch(j["finished_at"]) for j in done) - t0)
    return latencies, rate_burst


async def raw(src: Path, out: Path, count: int, rate: float, burst: int) -> tuple[list[float], float]:
    out.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    with pool(PROCESSES) as executor:
        await asyncio.gather(*(loop.run_in_executor(executor, noop) for _ in range(PROCESSES * 2)))
        await loop.run_in_executor(executor, thumbnail, str(src), str(out / "warm.jpg"), 32, 32)

        async def one(i: int) -> float:
            sent = time.time()
            await loop.run_in_executor(executor, thumbnail, str(src), str(out / f"s-{i}.jpg"), 32, 32)
            return (time.time() - sent) * 1000

        latencies = await _paced(count, rate, time.time() + 0.1, one)
        t0 = time.time()
        await asyncio.gather(*(
            loop.run_in_executor(executor, thumbnail, str(src), str(out / f"b-{i}.jpg"), 32, 32) for i in range(burst)
        ))
        return latencies, burst / (time.time() - t0)


async def run(ctx: Context) -> list[Row]:
    rate = 20.0
    count = 60 if ctx.quick else 200
    burst = 100 if ctx.quick else 300
    src = photo(ctx.media / "small.jpg", 64, 64, seed=7)
    server = Server(ctx.work / "small", {"workers": {"processes": PROCESSES}})
    (server.buckets / "media").mkdir(parents=True, exist_ok=True)
    (server.buckets / "media" / "small.jpg").write_bytes(src.read_bytes())
    with server:
        ours, ours_rate = await mend(server.url, count, rate, burst)
    base, base_rate = await raw(src, ctx.work / "small-raw", count, rate, burst)
    steady = f"{count} jobs at {rate:g}/s"
    return [
        Row("small job 64×64, p50 submit→completed", "ms", percentile(ours, 0.5), percentile(base, 0.5), "<= 20",
            note=steady + "; raw = pyvips call in a bare pool (no HTTP, no store, no storage)",
            extra={"mendsrv_ms": ours, "raw_ms": base}),
        Row("small job 64×64, p99 submit→completed", "ms", percentile(ours, 0.99), percentile(base, 0.99), "",
            note=steady),
        Row("small job 64×64, burst throughput", "jobs/s", ours_rate, base_rate, "",
            note=f"{burst} jobs submitted at once"),
    ]
