"""GET /api/v1/jobs/{id}/stream through a real streaming HTTP client, and the EventHub."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from mendsrv.events import EventHub
from mendsrv.keys import EVENT_HUB, STORE
from mendsrv.models import Event

from .conftest import API_KEY, AUTH, job_body, wait_for_job, write_jpeg


class SSEReader:
    """Parses a text/event-stream response: events (id, event, data) and comments."""

    def __init__(self, resp: aiohttp.ClientResponse):
        self.resp = resp
        self.comments: list[str] = []

    async def next(self, timeout: float = 20.0) -> dict[str, Any] | None:
        """The next event, or None when the stream ended."""
        event: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if "data" in event:
                        event["data"] = orjson.loads(event["data"])
                        event["id"] = int(event["id"])
                        return event
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")

    async def until_end(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        events = []
        async with asyncio.timeout(timeout):
            while (event := await self.next(timeout)) is not None:
                events.append(event)
        return events


async def open_stream(client: Any, job_id: str, last_event_id: int | None = None) -> SSEReader:
    headers = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    resp = await client.get(f"/api/v1/jobs/{job_id}/stream", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return SSEReader(resp)


async def held_job(app: Any, **params: Any) -> str:
    """A pending job of a resource class no worker lane claims: it stays pending until
    the test moves it through the store (the same transitions the dispatcher makes)."""
    job, _ = await app[STORE].insert_job(
        job_id=str(uuid.uuid4()), type="image/resize", resource="held", params=job_body(**params),
        request_id=None, webhook_url=None, webhook_style="default",
    )
    return job.id


async def test_stream_events_arrive_in_order_with_ids(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg")
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=400), headers=AUTH)
    job_id = (await resp.json())["job_id"]
    live = await (await open_stream(client, job_id)).until_end()
    full = await (await open_stream(client, job_id, last_event_id=0)).until_end()

    for events in (live, full):
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids)), ids
        assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "completed"
        assert live[-1]["id"] == events[-1]["id"]
    # the whole history: every transition as a status event with the job resource, progress in between
    assert [(e["event"], e["data"].get("status")) for e in full if e["event"] == "status"] == [
        ("status", "pending"), ("status", "processing"), ("status", "completed")
    ]
    assert all(set(e["data"]) == {"job_id", "progress", "phase"} for e in full if e["event"] == "progress")
    assert any(e["event"] == "progress" for e in full)
    final = full[-1]["data"]
    assert final == await (await client.get(f"/api/v1/jobs/{job_id}", headers=AUTH)).json()
    # what the live stream showed is the tail of the history, with the same ids
    assert [e["id"] for e in full if e["id"] >= live[0]["id"]] == [e["id"] for e in live]


async def test_stream_live_transitions_in_order(client: Any) -> None:
    store = client.app[STORE]
    job_id = await held_job(client.app)
    stream = await open_stream(client, job_id)
    first = await stream.next()
    assert first is not None and first["event"] == "status" and first["data"]["status"] == "pending"

    assert (await store.claim("held", "test-node")) is not None
    for value in (20, 50, 80):
        await store.set_progress(job_id, value, "processing")
    await store.complete(job_id, {"outputs": []})
    rest = await stream.until_end()
    assert [(e["event"], e["data"].get("status") or e["data"]["progress"]) for e in rest] == [
        ("status", "processing"), ("progress", 20), ("progress", 50), ("progress", 80), ("status", "completed")
    ]
    ids = [first["id"]] + [e["id"] for e in rest]
    assert ids == sorted(set(ids))


async def test_stream_resume_with_last_event_id_brings_no_duplicates(client: Any) -> None:
    store = client.app[STORE]
    job_id = await held_job(client.app)
    await store.claim("held", "test-node")

    async def produce() -> None:
        for i in range(150):
            await store.set_progress(job_id, i % 100, f"step {i}")
            await asyncio.sleep(0.002)
        await store.complete(job_id, {"outputs": []})

    producer = asyncio.create_task(produce())
    seen: list[int] = []
    stream = await open_stream(client, job_id)
    reconnects = 0
    try:
        async with asyncio.timeout(60):
            while True:
                take = 1 + reconnects % 7  # read a few events, then drop the connection
                done = False
                for _ in range(take):
                    event = await stream.next()
                    if event is None:
                        done = True
                        break
                    seen.append(event["id"])
                    if event["data"].get("status") == "completed":
                        done = True
                        break
                if done:
                    break
                stream.resp.close()
                reconnects += 1
                stream = await open_stream(client, job_id, last_event_id=seen[-1])
    finally:
        stream.resp.close()
        await producer
    assert reconnects > 10
    assert len(seen) == len(set(seen)), "duplicate events after a resume"
    expected = [e.id for e in await store.events_after(job_id, seen[0] - 1)]
    assert seen == expected, "events missing or out of order after resuming"


async def test_stream_late_subscriber_gets_final_status_and_end(client: Any) -> None:
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body("missing.jpg", width=10), headers=AUTH)
    job_id = (await resp.json())["job_id"]
    job = await wait_for_job(client, job_id)
    assert job["status"] == "failed"
    events = await (await open_stream(client, job_id)).until_end(timeout=10)
    assert len(events) == 1
    assert events[0]["event"] == "status" and events[0]["data"] == job
    # a client that already has the final event gets an empty stream that ends
    assert await (await open_stream(client, job_id, last_event_id=events[0]["id"])).until_end(timeout=10) == []


async def test_stream_keep_alive_comment_and_auth(client_factory: Any, config_factory: Any) -> None:
    client = await client_factory(config_factory(server={"sse_keepalive_s": 0.2}))
    job_id = await held_job(client.app)
    assert (await client.get(f"/api/v1/jobs/{job_id}/stream")).status == 401
    resp = await client.get(f"/api/v1/jobs/{uuid.uuid4()}/stream", headers=AUTH)
    assert resp.status == 404 and "error" in await resp.json()
    # not an id of this job's events: the stream starts from the current state
    for junk in ("abc", "-3", "1e3", "99999999999999999999999999", "12345678"):
        resp = await client.get(f"/api/v1/jobs/{job_id}/stream", headers={**AUTH, "Last-Event-ID": junk})
        assert resp.status == 200
        event = await SSEReader(resp).next()
        assert event is not None and event["data"]["status"] == "pending"
        resp.close()

    stream = await open_stream(client, job_id)
    assert (await stream.next())["data"]["status"] == "pending"  # type: ignore[index]
    async with asyncio.timeout(10):
        while "keep-alive" not in stream.comments:
            line = await stream.resp.content.readline()
            if line.startswith(b":"):
                stream.comments.append(line[1:].decode().strip())
    await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=AUTH)
    rest = await stream.until_end()
    assert rest[-1]["data"]["status"] == "cancelled"


async def test_stream_500_concurrent_subscribers_all_get_terminal_event(client: Any) -> None:
    job_id = await held_job(client.app)
    hub = client.app[EVENT_HUB]
    n = 500
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:
        url = client.make_url(f"/api/v1/jobs/{job_id}/stream")

        async def subscriber(ready: asyncio.Event) -> list[dict[str, Any]]:
            async with session.get(url) as resp:
                assert resp.status == 200
                stream = SSEReader(resp)
                first = await stream.next(timeout=60)
                ready.set()
                return [first] + await stream.until_end(timeout=60)  # type: ignore[list-item]

        readies = [asyncio.Event() for _ in range(n)]
        tasks = [asyncio.create_task(subscriber(r)) for r in readies]
        try:
            async with asyncio.timeout(90):
                await asyncio.gather(*(r.wait() for r in readies))
                assert hub.subscribers(job_id) == n
                resp = await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=AUTH)
                assert resp.status == 200
                results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert len(results) == n
    assert all(r[-1]["event"] == "status" and r[-1]["data"]["status"] == "cancelled" for r in results)
    assert len({r[-1]["id"] for r in results}) == 1
    assert hub.subscribers(job_id) == 0


def test_hub_drops_subscriber_that_does_not_read() -> None:
    hub = EventHub(queue_size=8)

    async def scenario() -> None:
        idle = hub.subscribe("job")
        reader = hub.subscribe("job")
        received = 0
        for i in range(1, 10_001):
            hub.publish(Event(id=i, job_id="job", kind="progress", data={"job_id": "job", "progress": i % 100, "phase": "x"}))
            assert idle.queued <= 8
            event = await reader.get()
            assert event is not None and event.id == i
            received += 1
        assert received == 10_000
        assert idle.dropped and idle.queued == 0
        assert await idle.get() is None  # its stream ends; the client resumes with Last-Event-ID
        assert hub.subscribers("job") == 1 and hub.dropped_total == 1
        reader.close()
        assert hub.subscribers() == 0

    asyncio.run(scenario())


async def test_stream_client_that_never_reads_is_dropped(client_factory: Any, config_factory: Any) -> None:
    client = await client_factory(config_factory(server={"sse_queue_size": 4, "sse_write_timeout_s": 5.0}))
    store, hub = client.app[STORE], client.app[EVENT_HUB]
    job_id = await held_job(client.app, pad="x" * 200_000)  # each status event carries ~200 KB

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(
            f"GET /api/v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: {client.host}\r\nX-API-Key: {API_KEY}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            while hub.subscribers(job_id) == 0:
                await asyncio.sleep(0.01)
        # 80 status events of ~200 KB each: ~16 MB that the client never reads
        for _ in range(40):
            await store.claim("held", "test-node")
            await store.requeue(job_id, refund=True)
            await asyncio.sleep(0)
        async with asyncio.timeout(10):
            while hub.dropped_total == 0:
                await asyncio.sleep(0.01)
        assert hub.subscribers(job_id) == 0
        # the handler, stuck writing to a client that reads nothing, gives up after
        # server.sse_write_timeout_s and closes the connection on its own
        server = client.server.runner.server
        async with asyncio.timeout(20):
            while server.connections:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(20):
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 20):
                    pass
    finally:
        writer.close()
