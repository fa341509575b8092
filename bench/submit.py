"""1. Submit rate: accepted POST /api/v1/jobs/image/resize per second.

The load generator runs in its own process with many keep-alive connections. The
mendsrv under test stores to an S3 endpoint that never answers, so its dispatcher
claims one job per lane slot and waits: the workers are idle, every submission is a
durable insert that stays pending (the queue grows during the run, as in a burst).
The raw baseline is bare aiohttp + aiosqlite committing one INSERT per request.
"""

from __future__ import annotations

from .harness import (
    API_KEY,
    Context,
    Row,
    Server,
    StalledEndpoint,
    loadgen,
    raw_server,
    rss_mb,
    s3_section,
)

PATH = "/api/v1/jobs/image/resize"
BODY = {"source_bucket": "media", "source_key": "missing.jpg", "dest_bucket": "media", "dest_key": "out.jpg",
        "width": 800, "height": 600}
CONNECTIONS = 64


async def run(ctx: Context) -> list[Row]:
    duration = 3.0 if ctx.quick else 8.0
    stall = StalledEndpoint()
    try:
        server = Server(ctx.work / "submit", {
            "storage": s3_section(stall.url) | {"read_timeout_s": 600.0, "connect_timeout_s": 60.0},
            "workers": {"processes": 1},
        })
        with server:
            ours = await loadgen(server.port, PATH, BODY, CONNECTIONS, duration, 1.0, {"X-API-Key": API_KEY})
            rss_after = rss_mb(server.pid)
    finally:
        stall.close()
    with raw_server(ctx.work / "submit-raw") as raw:
        base = await loadgen(raw.port, PATH, BODY, CONNECTIONS, duration, 1.0)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(ours["statuses"].items()))
    return [Row(
        "submit rate (accepted POST/s, 64 conns)", "jobs/s", ours["rate"], base["rate"], ">= 2000",
        note=f"{duration:g} s after 1 s warm-up; mendsrv answers {statuses}; server RSS after {rss_after:.0f} MB; "
        "raw = aiohttp + aiosqlite, one committed INSERT per request",
        extra={"mendsrv": ours, "raw": base},
    )]
