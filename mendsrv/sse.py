"""``GET /api/v1/jobs/{job_id}/stream``: a job's events as Server-Sent Events.

Events: ``status`` (data = the job resource) for every transition and ``progress``
(``{"job_id", "progress", "phase"}``) while it runs; each with ``id:`` = its
``job_events`` id. The stream ends after the terminal status event.

- No ``Last-Event-ID``: the stream starts at the job's current state (its latest
  status event and any progress since), so a subscriber that connects after the job
  ended gets the final status event and the end.
- ``Last-Event-ID: N``: every event after N is replayed from the store first
  (``N = 0`` replays the whole history).

Order and no duplicates: subscribe to the EventHub first, then replay from the store,
then pass on live events whose id is above the last one sent. A ``: keep-alive``
comment goes out every ``server.sse_keepalive_s`` seconds. A client that stops
reading is dropped by the hub, and a write that cannot progress for
``server.sse_write_timeout_s`` closes the connection: a stream never holds more than
a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from .errors import NotFound
from .http import REQUEST_ID
from .keys import CONFIG, EVENT_HUB, STORE
from .models import Event

log = logging.getLogger("mendsrv.sse")

KEEP_ALIVE = b": keep-alive\n\n"
_DIRECT_WRITE = 16 * 1024  # well under aiohttp's 64 KiB write-buffer limit, past which a write waits
MAX_EVENT_ID = 2**63 - 1  # SQLite INTEGER


class _ClientGone(Exception):
    """The client went away or stopped reading."""


def encode(event: Event) -> bytes:
    """One SSE message: ``id:``, ``event:`` and a single-line JSON ``data:``."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.kind.encode(), orjson.dumps(event.data))


def last_event_id(request: web.Request) -> int | None:
    """The ``Last-Event-ID`` header as an event id; None when absent or not an id of ours
    (EventSource sends back whatever id it saw last: anything else reads as "no id")."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw.isdecimal() or not raw.isascii():
        return None
    if len(raw) > len(str(MAX_EVENT_ID)):  # int() refuses thousands of digits; past the max anyway
        return MAX_EVENT_ID
    return min(int(raw), MAX_EVENT_ID)


def from_current_state(history: list[Event]) -> list[Event]:
    """The latest status event and whatever followed it."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].kind == "status":
            return history[index:]
    return history


async def stream_job(request: web.Request) -> web.StreamResponse:
    app = request.app
    store, hub, server = app[STORE], app[EVENT_HUB], app[CONFIG].server
    job_id = request.match_info["job_id"]
    after = last_event_id(request)
    if await store.get_job(job_id) is None:
        raise NotFound(f"job {job_id} not found")

    sub = hub.subscribe(job_id)  # first subscribe, then replay: nothing falls in between
    try:
        history = await store.events_after(job_id, after or 0)
        if after is not None and not history:
            everything = await store.events_after(job_id, 0)
            if everything and after > everything[-1].id:
                after = None  # an id this job never had: start from the current state
                history = everything
        if after is None:
            history = from_current_state(history)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Request-ID": request.get(REQUEST_ID, ""),
            }
        )
        await response.prepare(request)
        timeout = server.sse_write_timeout_s

        async def write(data: bytes, last: bool = False) -> None:
            # last: the final event and the end of the chunked body leave in one send
            put = response.write_eof if last else response.write
            try:
                transport = request.transport
                if transport is not None and transport.get_write_buffer_size() == 0 and len(data) < _DIRECT_WRITE:
                    # The common case: nothing queued, so the bytes go straight to the socket and
                    # the write cannot wait for the client. Skipping wait_for (a task and a timer per
                    # write) keeps a fan-out to 1,000 streams inside its budget (bench/RESULTS.md).
                    await put(data)
                    return
                await asyncio.wait_for(put(data), timeout)
            except TimeoutError:
                if request.transport is not None:
                    request.transport.abort()
                raise _ClientGone(f"the client did not read for {timeout:g} s") from None
            except ConnectionError as exc:
                raise _ClientGone(str(exc)) from None

        sent = after or 0
        try:
            for event in history:
                await write(encode(event))
                sent = event.id
            if history and history[-1].terminal:
                return response
            if not history:
                job = await store.get_job(job_id)
                if job is None or job.status.terminal:
                    return response  # the client already has the final event
            while True:
                try:
                    async with asyncio.timeout(server.sse_keepalive_s):  # no extra task per wait, unlike wait_for
                        event = await sub.get()
                except TimeoutError:
                    await write(KEEP_ALIVE)
                    continue
                if event is None:  # dropped for falling behind, or the server is stopping
                    break
                if event.id <= sent:
                    continue
                await write(encode(event), last=event.terminal)
                sent = event.id
                if event.terminal:
                    # Yield once before this stream's teardown (response end, request log) so that
                    # every other stream of the job sends its final event first: with 1,000
                    # subscribers the last receipt then waits for 1,000 sends, not 1,000 teardowns.
                    await asyncio.sleep(0)
                    break
        except _ClientGone as exc:
            log.info("event stream closed", extra={"job_id": job_id, "reason": str(exc)})
        return response
    finally:
        sub.close()

