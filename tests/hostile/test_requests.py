"""Hostile HTTP requests: huge and deeply nested JSON, non-UTF-8 bodies, oversized
headers, traversal in the URL. Each gets a 4xx with a sentence (the JSON error shape
where the app sees the request), and the server keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..conftest import AUTH, job_body, wait_for_job, write_jpeg

SUBMIT = "/api/v1/jobs/image/resize"
JSON = {"Content-Type": "application/json"}


async def _error(resp: Any, status: int) -> str:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


async def _still_serving(client: Any, buckets: Path) -> None:
    """A normal job submitted afterwards completes."""
    write_jpeg(buckets / "media" / "in.jpg", 320, 240)
    resp = await client.post(SUBMIT, json=job_body(width=64), headers=AUTH)
    assert resp.status == 202, await resp.text()
    job = await wait_for_job(client, (await resp.json())["job_id"])
    assert job["status"] == "completed", job


async def test_hostile_json_nested_huge_and_odd(client: Any, buckets: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # 200 KB, far past any parser's depth
    assert "JSON" in await _error(await client.post(SUBMIT, data=deep, headers=AUTH | JSON), 400)
    deep_obj = b'{"a":' * 5000 + b"1" + b"}" * 5000
    await _error(await client.post(SUBMIT, data=deep_obj, headers=AUTH | JSON), 400)
    # nested within the parser's depth, but in a field that wants a string
    nested = orjson.dumps(job_body(width=10) | {"source_key": [[[[[[[[["x"]]]]]]]]]})
    await _error(await client.post(SUBMIT, data=nested, headers=AUTH | JSON), 400)
    for raw in (b'{"width": 1e400}', b'{"width": NaN}', b"\xef\xbb\xbf{}", b'"\\ud800"', b"null", b"123", b"   "):
        await _error(await client.post(SUBMIT, data=raw, headers=AUTH | JSON), 400)
    # huge numbers and strings where the model has bounds
    await _error(await client.post(SUBMIT, json=job_body(width=10**30), headers=AUTH), 400)
    await _error(await client.post(SUBMIT, json=job_body(width=10, request_id="r" * 100_000), headers=AUTH), 400)
    await _error(await client.post(SUBMIT, json=job_body(width=10, source_key="k" * 5000), headers=AUTH), 400)


async def test_hostile_json_many_unknown_fields_get_a_short_answer(client: Any, buckets: Path) -> None:
    body = job_body(width=10) | {f"field_{i}_" + "x" * 40: i for i in range(15_000)}
    raw = orjson.dumps(body)
    assert 700_000 < len(raw) < 1_048_576
    started = time.monotonic()
    resp = await client.post(SUBMIT, data=raw, headers=AUTH | JSON)
    await _error(resp, 400)
    assert time.monotonic() - started < 10
    answer = await resp.read()
    assert len(answer) < 8192  # the details are capped, not 15,000 of them echoed back
    huge_name = job_body(width=10) | {"k" * 500_000: 1}
    resp = await client.post(SUBMIT, json=huge_name, headers=AUTH)
    await _error(resp, 400)
    assert len(await resp.read()) < 8192
    await _still_serving(client, buckets)


async def test_hostile_non_utf8_bodies(client: Any, buckets: Path) -> None:
    latin1 = '{"source_bucket": "media", "source_key": "caf\xe9.jpg"}'.encode("latin-1")
    utf16 = orjson.dumps(job_body(width=10)).decode().encode("utf-16")
    for raw in (latin1, utf16, b"\xff\xfe\xfd", b"\x00" * 64, b'{"a": "\xed\xa0\x80"}'):
        error = await _error(await client.post(SUBMIT, data=raw, headers=AUTH | JSON), 400)
        assert "UTF-8" in error or "JSON" in error
    # a form body or a wrong content type is judged by its bytes: not JSON, 400
    await _error(await client.post(SUBMIT, data={"width": "10"}, headers=AUTH), 400)
    await _still_serving(client, buckets)


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_hostile_oversized_headers_are_refused(client: Any, buckets: Path) -> None:
    port = client.server.port
    head = b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: test-key\r\n"
    for request in (
        head + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # one huge header value
        head + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",  # too many headers
        b"GET /api/v1/jobs?" + b"a=1&" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a huge request line
        head + b"Cookie: " + b"c=" + b"z" * 70_000 + b"\r\n\r\n",
    ):
        answer = await _raw(port, request)
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 413, 414, 431), answer[:200]
    # a long but legal X-Request-ID is not echoed back as is
    resp = await client.get("/api/v1/jobs", headers=AUTH | {"X-Request-ID": "r" * 4000})
    assert resp.status == 200 and len(resp.headers["X-Request-ID"]) <= 200
    await _still_serving(client, buckets)


async def test_hostile_url_traversal_and_odd_ids(client: Any, buckets: Path) -> None:
    for path in (
        "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/jobs/%2e%2e",
        "/api/v1/jobs/%00",
        "/api/v1/jobs/" + "a" * 4000,
        "/api/v1/jobs/%E2%80%AE",
        "/api/v1/jobs/'%20OR%201=1--",
    ):
        resp = await client.get(path, headers=AUTH)
        assert resp.status in (400, 404), (path, resp.status)
        await _error(resp, resp.status)
    for family_op in ("..%2F..%2Fimage/resize", "image/..%2Fresize", "image%2Fresize/x", "%00/%00"):
        resp = await client.post(f"/api/v1/jobs/{family_op}", json=job_body(width=1), headers=AUTH)
        assert resp.status in (400, 404, 405), (family_op, resp.status)
    for query in ("status=%00", "request_id=%ED%A0%80", "cursor=" + "A" * 5000, "limit=1e9", "type=" + "x" * 5000):
        resp = await client.get("/api/v1/jobs?" + query, headers=AUTH)
        assert resp.status in (200, 400), (query, resp.status)
    await _still_serving(client, buckets)


async def test_hostile_auth_headers(client: Any) -> None:
    """Odd or huge credentials are a 401 sentence, never a 500."""
    for headers in (
        {"X-API-Key": "k" * 8000},
        {"Authorization": "Bearer " + "t" * 8000},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer  \t "},
        {"X-API-Key": "test-key\u00e9"},
    ):
        resp = await client.get("/api/v1/jobs", headers=headers)
        await _error(resp, 401)


async def test_hostile_sse_last_event_ids(client: Any, buckets: Path) -> None:
    """Odd Last-Event-ID values never break the stream of a finished job; unknown jobs are 404."""
    write_jpeg(buckets / "media" / "in.jpg", 64, 48)
    resp = await client.post(SUBMIT, json=job_body(width=16), headers=AUTH)
    job_id = (await resp.json())["job_id"]
    await wait_for_job(client, job_id)
    for value in ("-1", "abc", "9" * 400, "9" * 5000, "1e9", "\u0661\u0662", "0", " 3 ", "0x10", "\u00b2"):
        resp = await client.get(f"/api/v1/jobs/{job_id}/stream", headers=AUTH | {"Last-Event-ID": value})
        assert resp.status == 200, (value, resp.status)
        text = await asyncio.wait_for(resp.text(), 10)  # the stream ends after the terminal event
        assert "completed" in text or text.strip() == "", (value[:20], text[:200])
    resp = await client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000/stream", headers=AUTH)
    await _error(resp, 404)


async def test_hostile_compressed_body_bomb_is_413(client: Any, buckets: Path) -> None:
    """A gzip/deflate body is limited by its decompressed size: 100 MB of zeros in ~100 KB."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    bomb = b"".join(comp.compress(b"\0" * 1_048_576) for _ in range(100)) + comp.flush()
    assert len(bomb) < 200_000
    resp = await client.post(SUBMIT, data=bomb, headers=AUTH | JSON | {"Content-Encoding": "gzip"})
    assert resp.status in (400, 413), resp.status
    await _error(resp, resp.status)
    comp = zlib.compressobj(9, zlib.DEFLATED, 15)  # deflate (zlib)
    bomb = b"".join(comp.compress(b"[" * 1_048_576) for _ in range(20)) + comp.flush()
    resp = await client.post(SUBMIT, data=bomb, headers=AUTH | JSON | {"Content-Encoding": "deflate"})
    assert resp.status in (400, 413), resp.status
    await _still_serving(client, buckets)


async def test_hostile_malformed_requests_log_one_warning_line(server_process: Any) -> None:
    """A flood of refused requests does not fill the log with error-level tracebacks."""
    server = server_process().start()
    for _ in range(3):
        answer = await _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert b" 400 " in answer.split(b"\r\n", 1)[0]
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/v1/jobs", headers=AUTH) as resp:
        assert resp.status == 200  # still serving
    server.terminate()
    lines = [orjson.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["msg"] == "malformed request refused"]
    assert len(refused) == 3 and all(line["level"] == "warning" and "exc" not in line for line in refused), refused
    assert not [line for line in lines if line["level"] == "error"]


async def test_hostile_smuggling_and_idempotency_headers(client: Any, buckets: Path) -> None:
    port = client.server.port
    body = b'{"a": 1}'
    both = (
        b"POST /api/v1/jobs/image/resize HTTP/1.1\r\nHost: x\r\nX-API-Key: test-key\r\n"
        b"Content-Length: 8\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n" + body + b"\r\n0\r\n\r\n"
    )
    answer = await _raw(port, both)
    assert int(answer.split(b" ", 2)[1]) == 400, answer[:200]
    twice = (
        b"POST /api/v1/jobs/image/resize HTTP/1.1\r\nHost: x\r\nX-API-Key: test-key\r\n"
        b"Content-Length: 8\r\nContent-Length: 40\r\n\r\n" + body
    )
    answer = await _raw(port, twice)
    assert int(answer.split(b" ", 2)[1]) == 400, answer[:200]
    for key in ("k" * 256, ""):
        resp = await client.post(SUBMIT, json=job_body(width=8), headers=AUTH | {"Idempotency-Key": key})
        assert resp.status in (202, 400), (len(key), resp.status)
        if key:
            await _error(resp, 400)
    await _still_serving(client, buckets)
