"""The HTTP API of /api/v1 through a real HTTP client against the app."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyvips

from .conftest import AUTH, job_body, wait_for_job, write_jpeg


async def test_submit_reference_body_and_location(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg")
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=800, height=600), headers=AUTH)
    assert resp.status == 202
    body = await resp.json()
    assert set(body) == {"job_id", "status", "message"}
    assert body["status"] == "pending" and body["message"] == "Job queued for processing"
    assert resp.headers["Location"] == f"/api/v1/jobs/{body['job_id']}"
    job = await wait_for_job(client, body["job_id"])
    assert job["status"] == "completed", job
    out = job["result"]["outputs"][0]
    assert (out["bucket"], out["key"], out["width"], out["height"]) == ("media", "out.jpg", 800, 600)
    assert out["content_type"] == "image/jpeg"
    written = buckets / "media" / "out.jpg"
    assert out["size"] == written.stat().st_size
    image = pyvips.Image.new_from_file(str(written))
    assert (image.width, image.height) == (800, 600)
    assert job["progress"] == 100 and job["attempts"] == 1 and job["error"] is None
    assert job["created_at"].endswith("Z") and job["finished_at"] >= job["started_at"] >= job["created_at"]


async def test_job_ids_are_uuids_in_submission_order(client: Any, buckets: Path) -> None:
    """Job ids are version 7 UUIDs: unique, canonical, and later jobs sort after
    earlier ones; a request without X-Request-ID gets a 32-hex-digit one."""
    import re
    import uuid

    ids, request_ids = [], []
    for _ in range(3):
        resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=8), headers=AUTH)
        assert resp.status == 202
        ids.append((await resp.json())["job_id"])
        request_ids.append(resp.headers["X-Request-ID"])
        await asyncio.sleep(0.003)  # the id's clock has millisecond steps
    burst = await asyncio.gather(*(client.post("/api/v1/jobs/image/resize", json=job_body(width=8), headers=AUTH) for _ in range(50)))
    ids += [(await r.json())["job_id"] for r in burst]
    assert len(set(ids)) == 53
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id and parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert ids[:3] == sorted(ids[:3]) and max(ids[:3]) < min(ids[3:])
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in request_ids) and request_ids == sorted(request_ids)
    assert (await (await client.get(f"/api/v1/jobs/{ids[0]}", headers=AUTH)).json())["request_id"] == request_ids[0]


async def test_auth_both_headers_and_401(client: Any) -> None:
    assert (await client.get("/api/v1/jobs", headers=AUTH)).status == 200
    assert (await client.get("/api/v1/jobs", headers={"Authorization": "Bearer test-key"})).status == 200
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-key"}):
        resp = await client.get("/api/v1/jobs", headers=headers)
        assert resp.status == 401
        assert "error" in await resp.json()
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=1))
    assert resp.status == 401


async def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"]
    return body


async def test_errors_have_the_error_shape(client: Any, buckets: Path, config_factory: Any, client_factory: Any) -> None:
    post = client.post
    # 400: bad JSON, not an object, unknown field, invalid value, bad key
    await _error(await post("/api/v1/jobs/image/resize", data=b"{nope", headers=AUTH), 400)
    await _error(await post("/api/v1/jobs/image/resize", data=b"\xff\xfe", headers=AUTH), 400)
    await _error(await post("/api/v1/jobs/image/resize", json=[1, 2], headers=AUTH), 400)
    body = await _error(await post("/api/v1/jobs/image/resize", json=job_body(width=10, colour="red"), headers=AUTH), 400)
    assert body["details"] == [{"field": "colour", "message": "unknown field"}]
    body = await _error(await post("/api/v1/jobs/image/resize", json=job_body(width=-3), headers=AUTH), 400)
    assert body["details"][0]["field"] == "width"
    missing = job_body(width=10)
    del missing["dest_key"]
    body = await _error(await post("/api/v1/jobs/image/resize", json=missing, headers=AUTH), 400)
    assert body["details"][0]["field"] == "dest_key"
    for key in ("../etc/passwd", "/abs.jpg", "a\\b.jpg", "a/../../b.jpg", "ctl\x01.jpg", "a/./b.jpg"):
        body = await _error(await post("/api/v1/jobs/image/resize", json=job_body(source_key=key, width=10), headers=AUTH), 400)
        assert body["details"][0]["field"] == "source_key"
        await _error(await post("/api/v1/jobs/image/resize", json=job_body(dest_key=key, width=10), headers=AUTH), 400)
    await _error(await client.get("/api/v1/jobs?limit=0", headers=AUTH), 400)
    await _error(await client.get("/api/v1/jobs?limit=201", headers=AUTH), 400)
    await _error(await client.get("/api/v1/jobs?cursor=garbage!", headers=AUTH), 400)
    await _error(await client.get("/api/v1/jobs?status=done", headers=AUTH), 400)
    # 401
    await _error(await client.get("/api/v1/jobs/x"), 401)
    # 404: unknown job, unknown operation
    await _error(await client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000", headers=AUTH), 404)
    await _error(await post("/api/v1/jobs/image/explode", json=job_body(), headers=AUTH), 404)
    await _error(await post("/api/v1/jobs/nope/cancel", headers=AUTH), 404)
    # 413: body over server.max_body_bytes
    await _error(await post("/api/v1/jobs/image/resize", data=b"{" + b" " * 2_000_000 + b"}", headers=AUTH), 413)


async def test_cancel_and_retry_conflicts(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg", 64, 64)
    job_id = (await (await client.post("/api/v1/jobs/image/resize", json=job_body(width=32), headers=AUTH)).json())["job_id"]
    await wait_for_job(client, job_id)
    # completed: cannot cancel, cannot retry
    await _error(await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=AUTH), 409)
    await _error(await client.post(f"/api/v1/jobs/{job_id}/retry", headers=AUTH), 409)


async def test_failed_job_names_missing_source_then_retry(client: Any, buckets: Path) -> None:
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(source_key="missing.jpg", width=32), headers=AUTH)
    job_id = (await resp.json())["job_id"]
    job = await wait_for_job(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == "source object media/missing.jpg not found"
    write_jpeg(buckets / "media" / "missing.jpg", 64, 64)
    resp = await client.post(f"/api/v1/jobs/{job_id}/retry", headers=AUTH)
    assert resp.status == 202
    assert (await resp.json())["status"] == "pending"
    job = await wait_for_job(client, job_id)
    assert job["status"] == "completed" and job["error"] is None


async def test_cancel_pending_job(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    # processes=1 and a slow poll: submit many, cancel the last while it is pending
    client = await client_factory(config_factory())
    write_jpeg(buckets / "media" / "in.jpg", 2000, 2000)
    ids = []
    for i in range(6):
        resp = await client.post("/api/v1/jobs/image/resize", json=job_body(dest_key=f"o{i}.jpg", width=100), headers=AUTH)
        ids.append((await resp.json())["job_id"])
    resp = await client.post(f"/api/v1/jobs/{ids[-1]}/cancel", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    for job_id in ids[:-1]:
        assert (await wait_for_job(client, job_id))["status"] == "completed"
    job = await wait_for_job(client, ids[-1])
    assert job["status"] == "cancelled"
    assert not (buckets / "media" / "o5.jpg").exists()


async def test_idempotency_key(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg", 64, 64)
    headers = {**AUTH, "Idempotency-Key": "abc-1"}
    first = await (await client.post("/api/v1/jobs/image/resize", json=job_body(width=32), headers=headers)).json()
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=32), headers=headers)
    assert resp.status == 202
    assert (await resp.json())["job_id"] == first["job_id"]
    await _error(await client.post("/api/v1/jobs/image/resize", json=job_body(width=16), headers=headers), 409)
    listing = await (await client.get("/api/v1/jobs", headers=AUTH)).json()
    assert len(listing["jobs"]) == 1


async def test_queue_full_is_429(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    # a missing source would fail fast, so stop the workers from claiming: no CPU lane slots
    client = await client_factory(config_factory(limits={"max_queue": 3}))
    client.app  # noqa: B018
    from mendsrv.keys import DISPATCHER

    await client.app[DISPATCHER].stop(0)
    for i in range(3):
        resp = await client.post("/api/v1/jobs/image/resize", json=job_body(dest_key=f"{i}.jpg", width=8), headers=AUTH)
        assert resp.status == 202
    body = await _error(await client.post("/api/v1/jobs/image/resize", json=job_body(width=8), headers=AUTH), 429)
    assert "queue is full" in body["error"]


async def test_list_filters_and_request_id(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg", 64, 64)
    a = await (await client.post("/api/v1/jobs/image/resize", json=job_body(width=8, request_id="r-1"), headers=AUTH)).json()
    b = await (await client.post("/api/v1/jobs/image/resize", json=job_body(source_key="nope.jpg", width=8), headers={**AUTH, "X-Request-ID": "hdr-2"})).json()
    await wait_for_job(client, a["job_id"])
    await wait_for_job(client, b["job_id"])
    by_req = await (await client.get("/api/v1/jobs?request_id=r-1", headers=AUTH)).json()
    assert [j["job_id"] for j in by_req["jobs"]] == [a["job_id"]]
    by_hdr = await (await client.get("/api/v1/jobs?request_id=hdr-2", headers=AUTH)).json()
    assert [j["job_id"] for j in by_hdr["jobs"]] == [b["job_id"]]
    failed = await (await client.get("/api/v1/jobs?status=failed", headers=AUTH)).json()
    assert [j["job_id"] for j in failed["jobs"]] == [b["job_id"]]
    typed = await (await client.get("/api/v1/jobs?type=image/resize&limit=200", headers=AUTH)).json()
    assert len(typed["jobs"]) == 2
    none = await (await client.get("/api/v1/jobs?type=video/transcode", headers=AUTH)).json()
    assert none == {"jobs": [], "next_cursor": None}


async def test_500_concurrent_jobs_complete_and_page_once(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(workers={"processes": 2}))
    write_jpeg(buckets / "media" / "in.jpg", 64, 48)

    async def submit(i: int) -> str:
        resp = await client.post("/api/v1/jobs/image/resize", json=job_body(dest_key=f"out/{i}.png", width=16), headers=AUTH)
        assert resp.status == 202
        return (await resp.json())["job_id"]

    ids = await asyncio.gather(*(submit(i) for i in range(500)))
    assert len(set(ids)) == 500
    for job_id in ids:
        job = await wait_for_job(client, job_id, timeout=120)
        assert job["status"] == "completed", job
    assert len(list((buckets / "media" / "out").glob("*.png"))) == 500
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/v1/jobs?limit=73" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url, headers=AUTH)).json()
        seen.extend(j["job_id"] for j in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 500 and set(seen) == set(ids)
