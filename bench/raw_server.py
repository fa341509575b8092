"""The raw baseline server: bare aiohttp + aiosqlite + orjson, no mendsrv code.

``python -m bench.raw_server --port P --db FILE``:

- ``POST /api/v1/jobs/image/resize`` parses the JSON body and commits one INSERT
  (SQLite in WAL mode, synchronous=NORMAL, as mendsrv runs it) before answering 202:
  the least a durable submit can do.
- ``GET /stream`` holds a Server-Sent Events response open; ``POST /fire`` writes one
  event to every open stream: the least an SSE fan-out can do.
"""

from __future__ import annotations

import argparse
import time
import uuid

import aiosqlite
import orjson
from aiohttp import web

DB = web.AppKey("db", aiosqlite.Connection)
STREAMS = web.AppKey("streams", set)


async def submit(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    job_id = str(uuid.uuid4())
    await request.app[DB].execute(
        "INSERT INTO jobs (id, status, params, created_at) VALUES (?, 'pending', ?, ?)",
        (job_id, orjson.dumps(body), time.time()),
    )
    return web.Response(
        body=orjson.dumps({"job_id": job_id, "status": "pending", "message": "Job queued for processing"}),
        status=202, content_type="application/json",
    )


async def stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b": open\n\n")
    done = request.app[STREAMS]
    entry = (resp, request.loop.create_future())
    done.add(entry)
    try:
        await entry[1]
    finally:
        done.discard(entry)
    return resp


async def fire(request: web.Request) -> web.Response:
    data = b"event: status\ndata: " + orjson.dumps({"status": "cancelled", "at": time.time()}) + b"\n\n"
    for resp, fut in list(request.app[STREAMS]):
        await resp.write(data)
        if not fut.done():
            fut.set_result(None)
    return web.Response(status=204)


async def _db(app: web.Application):  # type: ignore[no-untyped-def]
    conn = await aiosqlite.connect(app["path"], isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=NORMAL")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
        "status TEXT NOT NULL, params TEXT NOT NULL, created_at REAL NOT NULL)"
    )
    app[DB] = conn
    yield
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    app = web.Application()
    app["path"] = args.db
    app[STREAMS] = set()
    app.cleanup_ctx.append(_db)
    app.router.add_post("/api/v1/jobs/image/resize", submit)
    app.router.add_get("/stream", stream)
    app.router.add_post("/fire", fire)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
