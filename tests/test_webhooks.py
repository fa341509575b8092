"""Webhook deliveries to a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from mendsrv.webhooks import refusal

from .conftest import AUTH, job_body, wait_for_job, write_jpeg


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver: records every request; answers from ``plan`` (then 200)."""

    server: TestServer | None = None
    requests: list[Received] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: the first request waits for it before answering
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        async with self.arrived:
            self.arrived.notify_all()
        if self.hold is not None and len(self.requests) == 1:
            await self.hold.wait()
        status = self.plan.pop(0) if self.plan else 200
        headers = {"Location": str(self.url("/elsewhere"))} if 300 <= status < 400 else None
        return web.Response(status=status, headers=headers)

    def url(self, path: str = "/hook") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    yield rec
    if rec.hold is not None:
        rec.hold.set()
    await rec.server.close()


async def deliveries(client: Any, job_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/v1/jobs/{job_id}/deliveries", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"deliveries"}
    return body["deliveries"]


async def wait_deliveries(client: Any, job_id: str, done: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll the deliveries endpoint until ``done(attempts)``."""
    async with asyncio.timeout(timeout):
        while True:
            attempts = await deliveries(client, job_id)
            if done(attempts):
                return attempts
            await asyncio.sleep(0.05)


def final(attempts: list[dict[str, Any]]) -> bool:
    """The delivery is settled: delivered, or given up (no next retry)."""
    return bool(attempts) and attempts[-1]["next_retry_at"] is None


async def submit(client: Any, body: dict[str, Any]) -> str:
    resp = await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["job_id"])


@pytest.mark.parametrize("style", ["default", "discord"])
async def test_webhook_completed_and_failed_jobs_each_deliver_once(
    client: Any, buckets: Path, receiver: Receiver, style: str
) -> None:
    write_jpeg(buckets / "media" / "in.jpg", 320, 240)
    hook = {"webhook_style": style}
    ok = await submit(client, job_body(width=100, webhook_url=receiver.url("/hook/ok"), **hook))
    bad = await submit(client, job_body("missing.jpg", width=100, webhook_url=receiver.url("/hook/bad"), **hook))
    jobs = {ok: await wait_for_job(client, ok), bad: await wait_for_job(client, bad)}
    assert jobs[ok]["status"] == "completed" and jobs[bad]["status"] == "failed"
    for job_id in jobs:
        attempts = await wait_deliveries(client, job_id, final)
        assert [(a["attempt"], a["status_code"], a["error"]) for a in attempts] == [(1, 200, None)]
        assert attempts[0]["at"].endswith("Z")
    await asyncio.sleep(0.5)  # longer than the first retry delay: nothing more may arrive
    assert len(receiver.at("/hook/ok")) == 1 and len(receiver.at("/hook/bad")) == 1
    assert len(receiver.requests) == 2

    sent_ok, sent_bad = receiver.at("/hook/ok")[0], receiver.at("/hook/bad")[0]
    for sent in (sent_ok, sent_bad):
        assert sent.headers["Content-Type"] == "application/json"
        assert sent.headers["webhook-id"] and sent.headers["webhook-timestamp"].isdigit()
    if style == "default":
        assert sent_ok.json == {"event": "job.completed", "job": jobs[ok], "timestamp": jobs[ok]["finished_at"]}
        assert sent_bad.json == {"event": "job.failed", "job": jobs[bad], "timestamp": jobs[bad]["finished_at"]}
    else:
        for sent, job, colour, last in ((sent_ok, jobs[ok], 0x2ECC71, "Output"), (sent_bad, jobs[bad], 0xE74C3C, "Error")):
            body = sent.json
            assert isinstance(body["content"], str) and job["job_id"] in body["content"]
            (embed,) = body["embeds"]
            assert isinstance(embed["title"], str) and job["status"] in embed["title"]
            assert embed["color"] == colour
            fields = {f["name"]: f["value"] for f in embed["fields"]}
            assert list(fields) == ["Type", "Status", "Duration", last]
            assert fields["Type"] == "image/resize" and fields["Status"] == job["status"]
            assert fields["Duration"].endswith(" s")
        assert {f["name"]: f["value"] for f in sent_ok.json["embeds"][0]["fields"]}["Output"] == "media/out.jpg"
        assert "missing.jpg" in {f["name"]: f["value"] for f in sent_bad.json["embeds"][0]["fields"]}["Error"]


async def test_webhook_retries_until_2xx_and_lists_every_attempt(client: Any, receiver: Receiver) -> None:
    receiver.plan = [500, 500]
    job_id = await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    attempts = await wait_deliveries(client, job_id, final)
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert [a["error"] for a in attempts] == ["the receiver answered 500"] * 2 + [None]
    assert attempts[0]["next_retry_at"] and attempts[1]["next_retry_at"] and attempts[2]["next_retry_at"] is None
    assert len(receiver.requests) == 3
    # exponential backoff from webhooks.retry_base_s = 0.2: waits of at least 0.2 s, then 0.4 s
    first, second, third = receiver.requests
    assert second.at - first.at >= 0.18 and third.at - second.at >= 0.38
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1  # one stable id per delivery
    assert first.body == third.body


async def test_webhook_gives_up_after_max_attempts(client_factory: Any, config_factory: Any, receiver: Receiver) -> None:
    client = await client_factory(config_factory(webhooks={"max_attempts": 2, "retry_base_s": 0.05}))
    receiver.plan = [503] * 5
    job_id = await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    attempts = await wait_deliveries(client, job_id, final)
    assert [a["status_code"] for a in attempts] == [503, 503]
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 2


async def test_webhook_redirects_are_not_followed(client_factory: Any, config_factory: Any, receiver: Receiver) -> None:
    client = await client_factory(config_factory(webhooks={"max_attempts": 1}))
    receiver.plan = [302]
    job_id = await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    (attempt,) = await wait_deliveries(client, job_id, final)
    assert attempt["status_code"] == 302 and "redirects are not followed" in attempt["error"]
    assert [r.path for r in receiver.requests] == ["/hook"]


async def test_webhook_timeout_is_a_failed_attempt(client_factory: Any, config_factory: Any, receiver: Receiver) -> None:
    client = await client_factory(config_factory(webhooks={"max_attempts": 1, "timeout_s": 0.3}))
    receiver.hold = asyncio.Event()
    job_id = await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    (attempt,) = await wait_deliveries(client, job_id, final)
    assert attempt["status_code"] is None and "no answer within 0.3 s" in attempt["error"]


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """An independent Standard Webhooks verifier (hmac + hashlib + base64 only)."""
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode("utf-8")
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


@pytest.mark.parametrize(
    "secret", ["a plain shared secret", "whsec_" + base64.b64encode(b"\x00\x01binary key bytes\xff").decode()]
)
async def test_webhook_signature_verifies_independently(
    client_factory: Any, config_factory: Any, receiver: Receiver, secret: str
) -> None:
    client = await client_factory(config_factory(webhooks={"secret": secret}))
    job_id = await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    (sent,) = await receiver.wait_for(1)
    assert sent.json["job"]["job_id"] == job_id
    assert verify_standard_webhook(secret, sent.headers, sent.body)
    assert abs(int(sent.headers["webhook-timestamp"]) - time.time()) < 60
    assert not verify_standard_webhook(secret, sent.headers, sent.body + b" ")
    assert not verify_standard_webhook("another secret", sent.headers, sent.body)


async def test_webhook_unsigned_without_secret(client: Any, receiver: Receiver) -> None:
    await submit(client, job_body("missing.jpg", width=10, webhook_url=receiver.url()))
    (sent,) = await receiver.wait_for(1)
    assert "webhook-signature" not in sent.headers


async def test_webhook_private_targets_refused_without_a_request(
    client_factory: Any, config_factory: Any, receiver: Receiver
) -> None:
    client = await client_factory(config_factory(webhooks={"allow_private_networks": False}))
    port = receiver.server.port  # type: ignore[union-attr]
    urls = [f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook", f"http://[::ffff:127.0.0.1]:{port}/hook"]
    jobs = [await submit(client, job_body("missing.jpg", width=10, webhook_url=url)) for url in urls]
    for job_id in jobs:
        (attempt,) = await wait_deliveries(client, job_id, final)
        assert attempt["status_code"] is None and attempt["next_retry_at"] is None
        assert attempt["error"].startswith("refused:") and "allow_private_networks" in attempt["error"]
    await asyncio.sleep(0.5)
    assert receiver.requests == []
    assert "localhost resolves to" in (await deliveries(client, jobs[1]))[0]["error"]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
     "240.0.0.1", "100.64.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
     "::ffff:8.8.8.8", "2002:7f00:1::1"],
)
def test_webhook_refusal_names_non_public_addresses(address: str) -> None:
    assert refusal(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_webhook_refusal_allows_public_addresses(address: str) -> None:
    assert refusal(address) is None


async def test_webhook_no_deliveries_without_webhook_url(client: Any) -> None:
    job_id = await submit(client, job_body("missing.jpg", width=10))
    await wait_for_job(client, job_id)
    assert await deliveries(client, job_id) == []
    resp = await client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000/deliveries", headers=AUTH)
    assert resp.status == 404


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
async def test_webhook_pending_delivery_survives_restart(
    server_process: Any, receiver: Receiver, http: ClientSession, stop: str
) -> None:
    receiver.hold = asyncio.Event()  # the first attempt gets no answer: it is in flight at the kill
    server = server_process(sections={"webhooks": {"retry_base_s": 0.2}}).start()
    resp = await http.post(
        f"{server.url}/api/v1/jobs/image/resize",
        json=job_body("missing.jpg", width=10, webhook_url=receiver.url()),
        headers=AUTH,
    )
    assert resp.status == 202
    job_id = (await resp.json())["job_id"]
    (first,) = await receiver.wait_for(1)
    if stop == "SIGKILL":
        server.kill()
    else:
        assert await asyncio.to_thread(server.terminate) == 0
    assert first.json["job"]["job_id"] == job_id

    server.start()
    second = (await receiver.wait_for(2))[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.json == first.json

    async with asyncio.timeout(30):
        while True:
            resp = await http.get(f"{server.url}/api/v1/jobs/{job_id}/deliveries", headers=AUTH)
            attempts = (await resp.json())["deliveries"]
            if attempts and attempts[-1]["status_code"] == 200:
                break
            await asyncio.sleep(0.05)
    server.terminate()


@pytest.mark.parametrize(
    ("webhooks", "plan", "expected"),
    [
        ({"max_attempts": 3}, [500], ["retry", "delivered"]),
        ({"max_attempts": 1}, [500], ["failed"]),
        ({"allow_private_networks": False}, [], ["refused"]),
    ],
)
async def test_webhook_sender_reports_each_attempt(
    tmp_path: Path, receiver: Receiver, webhooks: dict[str, Any], plan: list[int], expected: list[str]
) -> None:
    from mendsrv.config import WebhooksConfig
    from mendsrv.models import Status
    from mendsrv.store import open_store
    from mendsrv.webhooks import WebhookSender

    receiver.plan = list(plan)
    store = await open_store(str(tmp_path / "hooks.db"))
    results: list[str] = []
    cfg = WebhooksConfig(**{"allow_private_networks": True, "retry_base_s": 0.05, **webhooks})
    sender = WebhookSender(cfg, store, on_attempt=results.append)
    await sender.start()
    try:
        job, _ = await store.insert_job(
            job_id="job-1", type="image/resize", resource="cpu", params=job_body(), request_id=None,
            webhook_url=receiver.url(), webhook_style="default",
        )
        await store.fail(job.id, "it broke", allowed=[Status.PENDING])
        async with asyncio.timeout(20):
            while len(results) < len(expected):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert results == expected
        attempts = await store.list_attempts(job.id)
        assert len(attempts) == len(expected) and attempts[-1]["next_retry_at"] is None
    finally:
        await sender.stop()
        await store.close()


async def test_webhook_many_deliveries_each_sent_once(
    client_factory: Any, config_factory: Any, receiver: Receiver
) -> None:
    client = await client_factory(config_factory(webhooks={"concurrency": 4}))
    receiver.plan = [500] * 10  # the first ten attempts fail and are retried
    jobs = [
        await submit(client, job_body(f"missing-{i}.jpg", width=10, webhook_url=receiver.url(f"/hook/{i}")))
        for i in range(60)
    ]
    attempts = {job_id: await wait_deliveries(client, job_id, final, timeout=60) for job_id in jobs}
    await asyncio.sleep(0.5)
    assert sum(len(a) for a in attempts.values()) >= 70
    for i, job_id in enumerate(jobs):
        sent = receiver.at(f"/hook/{i}")
        # every request is a recorded attempt; only the last one was answered 2xx
        assert [a["status_code"] for a in attempts[job_id]][-1] == 200
        assert len(sent) == len(attempts[job_id])
        assert {r.headers["webhook-id"] for r in sent} == {f"msg_{sent[0].headers['webhook-id'].split('_')[1]}_{job_id}"}


@pytest.mark.parametrize("style", ["default", "discord"])
async def test_webhook_cancelled_job_delivers_once(client: Any, receiver: Receiver, style: str) -> None:
    from mendsrv.keys import STORE

    # a job no worker lane claims, so that it is still pending when cancelled
    job, _ = await client.app[STORE].insert_job(
        job_id="cancel-me", type="image/resize", resource="held", params=job_body(width=10),
        request_id=None, webhook_url=receiver.url(), webhook_style=style,
    )
    resp = await client.post(f"/api/v1/jobs/{job.id}/cancel", headers=AUTH)
    assert resp.status == 200
    cancelled = await resp.json()
    (sent,) = await receiver.wait_for(1)
    await wait_deliveries(client, job.id, final)
    if style == "default":
        assert sent.json == {"event": "job.cancelled", "job": cancelled, "timestamp": cancelled["finished_at"]}
    else:
        (embed,) = sent.json["embeds"]
        assert embed["color"] == 0x95A5A6 and "cancelled" in embed["title"]
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["Status"] == "cancelled" and fields["Duration"] == "not started"
        assert fields["Error"] == "cancelled by request"
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
