"""Load within the suite: 2,000 submissions over many connections, mixed with reads,
answered without a single 5xx and within a bounded time; every accepted job is
listed afterwards."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import AUTH, job_body
from .conftest import own_peak_rss_mb

SUBMISSIONS = 2000
CONNECTIONS = 64


async def test_load_2000_submissions_no_5xx(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 1}))
    base = str(client.make_url("/api/v1"))
    statuses: collections.Counter[int] = collections.Counter()
    accepted: list[str] = []
    gate = asyncio.Semaphore(CONNECTIONS)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS, force_close=False)
    peak_before = own_peak_rss_mb()
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one(i: int) -> None:
            async with gate:
                # missing sources: the workers fail them fast, so the queue keeps moving
                body = job_body(f"missing/{i}.jpg", f"out/{i}.jpg", width=10, request_id=f"load-{i % 7}")
                async with http.post(f"{base}/jobs/image/resize", json=body, headers=AUTH) as resp:
                    statuses[resp.status] += 1
                    if resp.status == 202:
                        accepted.append((await resp.json())["job_id"])
                if i % 10 == 0:  # reads interleaved with the writes
                    async with http.get(f"{base}/jobs", params={"limit": "20", "request_id": "load-3"}, headers=AUTH) as resp:
                        statuses[resp.status] += 1
                        await resp.read()

        await asyncio.gather(*(one(i) for i in range(SUBMISSIONS)))
        elapsed = time.monotonic() - started
        assert not [s for s in statuses if s >= 500], statuses
        assert statuses[202] == SUBMISSIONS, statuses
        assert elapsed < 90, f"{SUBMISSIONS} submissions took {elapsed:.1f} s"
        # the server (in this process) did not balloon under the load
        assert own_peak_rss_mb() - peak_before < 250, (peak_before, own_peak_rss_mb())
        # every accepted job is in the store, once
        seen: set[str] = set()
        cursor = None
        while True:
            params = {"limit": "200"} | ({"cursor": cursor} if cursor else {})
            async with http.get(f"{base}/jobs", params=params, headers=AUTH) as resp:
                assert resp.status == 200
                page = await resp.json()
            ids = [j["job_id"] for j in page["jobs"]]
            assert not seen & set(ids)
            seen.update(ids)
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert set(accepted) <= seen and len(accepted) == SUBMISSIONS
