"""5. SSE fan-out: 1,000 subscribers on one job; transition → each subscriber's receipt.

The job is held in ``processing`` (its S3 download waits on an endpoint that never
answers), 1,000 streams subscribe from a separate process, then the job is cancelled.
Latency per subscriber = receipt time − the moment the cancel request was sent (the
transition happens inside that request). The raw baseline is a bare aiohttp server
that writes one event to 1,000 open StreamResponses.
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
    child_env,
    cpu_seconds,
    percentile,
    raw_server,
    s3_section,
    submit,
)

SUBSCRIBERS = 1000


async def fan_out(port: int, path: str, headers: list[str], fire, pid: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Per-subscriber latencies (ms) and the server's CPU time (ms) from the transition to the last receipt."""
    argv = [sys.executable, "-m", "bench.sse_clients", "--port", str(port), "--path", path, "--n", str(SUBSCRIBERS)]
    for h in headers:
        argv += ["--header", h]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 180)
    if line.strip() != b"READY":
        err = await proc.stderr.read() if proc.stderr else b""
        raise RuntimeError(f"subscribers did not connect: {line!r} {err.decode()[-1500:]}")
    await asyncio.sleep(0.5)  # let the server settle
    cpu = cpu_seconds(pid)
    sent = time.time()
    await fire()
    out, err = await proc.communicate()
    cpu_ms = (cpu_seconds(pid) - cpu) * 1000
    times = json.loads(out)
    if len(times) < SUBSCRIBERS:
        raise RuntimeError(f"only {len(times)} of {SUBSCRIBERS} subscribers got the event: {err.decode()[-800:]}")
    return [(t - sent) * 1000 for t in times], cpu_ms


async def _ours_round(session: aiohttp.ClientSession, server: Server) -> tuple[list[float], float] | int:
    job_id = await submit(session, server.url, "image/resize", {
        "source_bucket": "media", "source_key": "a.jpg", "dest_bucket": "media", "dest_key": "o.jpg", "width": 10})
    async with session.get(f"{server.url}/api/v1/jobs/{job_id}/stream", headers={"X-API-Key": API_KEY}) as resp:
        if resp.status != 200:
            return resp.status
    for _ in range(100):  # wait until a worker holds it (processing)
        async with session.get(f"{server.url}/api/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}) as r:
            if (await r.json())["status"] == "processing":
                break
        await asyncio.sleep(0.05)

    async def cancel() -> None:
        async with session.post(f"{server.url}/api/v1/jobs/{job_id}/cancel", headers={"X-API-Key": API_KEY}) as r:
            assert r.status == 200, await r.text()

    return await fan_out(server.port, f"/api/v1/jobs/{job_id}/stream", [f"X-API-Key: {API_KEY}"], cancel, server.pid)


def _median_round(rounds: list[tuple[list[float], float]]) -> tuple[list[float], float]:
    return sorted(rounds, key=lambda r: percentile(r[0], 0.99))[len(rounds) // 2]


async def run(ctx: Context) -> list[Row]:
    rounds = 1 if ctx.quick else 3
    ours_rounds: list[tuple[list[float], float]] = []
    raw_rounds: list[tuple[list[float], float]] = []
    stall = StalledEndpoint()
    try:
        server = Server(ctx.work / "sse", {
            "storage": s3_section(stall.url) | {"read_timeout_s": 600.0, "connect_timeout_s": 60.0},
            "workers": {"processes": 1},
        })
        with server, raw_server(ctx.work / "sse-raw") as raw:
            async with aiohttp.ClientSession() as session:

                async def fire() -> None:
                    async with session.post(f"http://127.0.0.1:{raw.port}/fire") as r:
                        assert r.status == 204

                for _ in range(rounds):  # alternate: the machine is shared, its load drifts
                    got = await _ours_round(session, server)
                    if isinstance(got, int):
                        return [Row(f"SSE fan-out to {SUBSCRIBERS:,}, p99", "ms", target="<= 100",
                                    note=f"not measured: GET …/stream answered {got} (SSE not in this build)")]
                    ours_rounds.append(got)
                    raw_rounds.append(await fan_out(raw.port, "/stream", [], fire, raw.pid))
    finally:
        stall.close()
    (ours, ours_cpu), (base, base_cpu) = _median_round(ours_rounds), _median_round(raw_rounds)
    p99s = f"p99 per round: mendsrv {[round(percentile(r[0], 0.99)) for r in ours_rounds]}, " \
        f"raw {[round(percentile(r[0], 0.99)) for r in raw_rounds]} ms"
    return [
        Row(f"SSE fan-out to {SUBSCRIBERS:,}, p99", "ms", percentile(ours, 0.99), percentile(base, 0.99), "<= 100",
            note=f"median of {rounds} alternating rounds ({p99s}); from the cancel request being sent to each "
            "subscriber's receipt; subscribers in their own process; raw = bare aiohttp writing one event to every "
            "open StreamResponse",
            extra={"mendsrv_ms": sorted(ours), "raw_ms": sorted(base)}),
        Row(f"SSE fan-out to {SUBSCRIBERS:,}, last receipt", "ms", max(ours), max(base), ""),
        Row(f"SSE fan-out to {SUBSCRIBERS:,}, p50", "ms", percentile(ours, 0.5), percentile(base, 0.5), ""),
        Row(f"SSE fan-out to {SUBSCRIBERS:,}, server CPU", "ms", ours_cpu, base_cpu, "",
            note="CPU time of the server process from the transition until every stream has closed "
            "(robust to a shared machine's load)"),
    ]
