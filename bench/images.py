"""2. Image throughput end to end: 4000×3000 JPEG → 800×600, submit → completed.

mendsrv (2 worker processes) on local directory storage and on S3 (moto server in its
own process) against the raw limit: the same ``pyvips.Image.thumbnail`` call in a bare
ProcessPoolExecutor of the same size on the same files, writing the same bytes (the
run checks it: same encoder options, ICC kept, Huffman tables optimised). Both are
warmed first (worker processes spawned, files in the page cache); each side runs
``rounds`` times and the best round counts (the machine is shared).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from .harness import (
    Context,
    Row,
    Server,
    boto_client,
    iso_to_epoch,
    moto_server,
    s3_section,
    submit,
    wait_all,
)
from .media import photo
from .rawpool import noop, pool, thumbnail

PROCESSES = 2
DISTINCT = 4


def sources(ctx: Context) -> list[Path]:
    return [photo(ctx.media / f"photo-{i}.jpg", 4000, 3000, seed=i) for i in range(DISTINCT)]


async def raw_round(files: list[Path], out: Path, jobs: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    with pool(PROCESSES) as executor:
        await asyncio.gather(*(loop.run_in_executor(executor, noop) for _ in range(PROCESSES * 2)))
        await loop.run_in_executor(executor, thumbnail, str(files[0]), str(out / "warm.jpg"), 800, 600)
        t0 = time.time()
        await asyncio.gather(*(
            loop.run_in_executor(executor, thumbnail, str(files[i % len(files)]), str(out / f"o{i}.jpg"), 800, 600)
            for i in range(jobs)
        ))
        return jobs / (time.time() - t0)


async def mend_round(base: str, jobs: int, tag: str) -> float:
    async with aiohttp.ClientSession() as session:
        body = {"source_bucket": "media", "dest_bucket": "media", "width": 800, "height": 600}
        warm = [await submit(session, base, "image/resize", body | {"source_key": "photo-0.jpg", "dest_key": f"warm-{tag}-{i}.jpg"})
                for i in range(PROCESSES)]
        await wait_all(session, base, warm)
        t0 = time.time()
        ids = await asyncio.gather(*(
            submit(session, base, "image/resize",
                   body | {"source_key": f"photo-{i % DISTINCT}.jpg", "dest_key": f"out-{tag}-{i}.jpg"})
            for i in range(jobs)
        ))
        done = await wait_all(session, base, list(ids), interval=0.1)
    failed = [j for j in done if j["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not complete: {failed[0].get('error')}")
    return jobs / (max(iso_to_epoch(j["finished_at"]) for j in done) - t0)


async def run(ctx: Context) -> list[Row]:
    jobs = 16 if ctx.quick else 40
    rounds = 1 if ctx.quick else 2
    files = sources(ctx)
    work = ctx.work / "images"
    raw, local, s3 = [], [], []
    server = Server(work / "local", {"workers": {"processes": PROCESSES}})
    (server.buckets / "media").mkdir(parents=True, exist_ok=True)
    for f in files:
        (server.buckets / "media" / f.name).write_bytes(f.read_bytes())
    with server:
        for r in range(rounds):
            raw.append(await raw_round(files, work / "raw-out", jobs))
            local.append(await mend_round(server.url, jobs, f"r{r}"))
    # the comparison holds only if both sides write the same file
    same = all(
        (server.buckets / "media" / f"out-r{r}-{i}.jpg").read_bytes() == (work / "raw-out" / f"o{i}.jpg").read_bytes()
        for r in range(rounds) for i in range(min(jobs, DISTINCT))
    )
    s3_note = "raw = the local-file pool (moto is a Python S3 server; informational)"
    try:
        with moto_server(work / "moto") as moto:
            endpoint = f"http://127.0.0.1:{moto.port}"
            client = boto_client(endpoint)
            client.create_bucket(Bucket="media")
            for f in files:
                client.upload_file(str(f), "media", f.name)
            with Server(work / "s3", {"workers": {"processes": PROCESSES}, "storage": s3_section(endpoint)}) as server:
                for r in range(rounds):
                    s3.append(await mend_round(server.url, jobs, f"r{r}"))
    except Exception as exc:
        s3_note = f"not measured: {type(exc).__name__}: {exc}"
    note = (f"{jobs} jobs per round, best of {rounds}; {PROCESSES} processes each side; outputs byte for byte "
            f"{'the same' if same else 'DIFFERENT'} on both sides")
    return [
        Row("image 4000×3000→800×600, local storage", "images/s", max(local), max(raw), "ratio >= 0.9",
            note=note + f"; rounds mendsrv {[round(x, 2) for x in local]}, raw {[round(x, 2) for x in raw]}",
            extra={"mendsrv_rounds": local, "raw_rounds": raw}),
        Row("image 4000×3000→800×600, S3 (moto)", "images/s", max(s3) if s3 else None, max(raw), "",
            note=s3_note,
            extra={"mendsrv_rounds": s3}),
    ]
