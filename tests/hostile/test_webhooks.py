"""Untrusted webhook targets: with webhooks.allow_private_networks = false, every
spelling of an internal address is refused (no request reaches it), the refusal is
recorded as a sentence, and it is not retried."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..conftest import AUTH, job_body, wait_for_job
from .conftest import Canary, submit


async def _attempts(client: Any, job_id: str, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(f"/api/v1/jobs/{job_id}/deliveries", headers=AUTH)
        assert resp.status == 200
        attempts = (await resp.json())["deliveries"]
        if attempts:
            return list(attempts)
        assert time.monotonic() < deadline, f"no delivery attempt for {job_id}"
        await asyncio.sleep(0.05)


async def test_webhooks_internal_targets_are_refused(
    canary: Canary, config_factory: Any, client_factory: Any
) -> None:
    client = await client_factory(
        config_factory(webhooks={"allow_private_networks": False, "retry_base_s": 0.05, "timeout_s": 2})
    )
    port = canary.port
    targets = [
        f"http://127.0.0.1:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://127.1:{port}/hook",  # short form
        f"http://2130706433:{port}/hook",  # 127.0.0.1 as one decimal number
        f"http://0x7f000001:{port}/hook",  # and in hex
        f"http://0177.0.0.1:{port}/hook",  # and in octal
        f"http://[::1]:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped IPv6
        f"http://0.0.0.0:{port}/hook",
        f"http://user:pass@127.0.0.1:{port}/hook",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.0.0.1/hook",
        "http://192.168.1.1/hook",
        "http://[fe80::1]/hook",
        "http://224.0.0.1/hook",
    ]
    ids = {}
    for url in targets:
        body = job_body("missing.jpg", width=10, webhook_url=url)
        resp = await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)
        if resp.status == 400:  # refused at submission is fine too
            continue
        assert resp.status == 202, (url, await resp.text())
        ids[url] = (await resp.json())["job_id"]
    for url, job_id in ids.items():
        assert (await wait_for_job(client, job_id))["status"] == "failed"
        attempts = await _attempts(client, job_id)
        first = attempts[0]
        assert first["status_code"] is None, (url, first)
        assert (first["error"] or "").startswith("refused: "), (url, first)
        assert "webhooks.allow_private_networks" in first["error"]
        assert first["next_retry_at"] is None and len(attempts) == 1, (url, attempts)  # not retried
    await asyncio.sleep(0.3)
    assert canary.hits == [], canary.hits
    # a public-looking but unresolvable name fails as unreachable, without reaching anything inside
    job_id = await submit(client, "image/resize", job_body("missing.jpg", width=10, webhook_url="http://mend-no-such-host.invalid/x"))
    attempts = await _attempts(client, job_id)
    assert attempts[0]["status_code"] is None and attempts[0]["error"]
