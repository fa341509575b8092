"""The EventHub: in-memory fan-out of job events to live subscribers (SSE streams).

The store tells the hub about every committed ``job_events`` row (``store.add_listener``).
Each subscriber has a bounded queue. ``publish`` never waits and never grows memory:
a subscriber whose queue is full has fallen behind, so the hub drops it — its queue is
emptied and its stream told to end. The client reconnects with ``Last-Event-ID`` and
the stream handler replays what it missed from the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .models import Event

log = logging.getLogger("mendsrv.events")


class Subscription:
    """One subscriber's view of one job's events. ``await get()`` → Event, or None at the end."""

    def __init__(self, job_id: str, maxsize: int, on_close: Callable[[Subscription], None]):
        self.job_id = job_id
        self.maxsize = maxsize
        self.dropped = False
        self.closed = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize + 1)  # +1: room for the end marker
        self._on_close = on_close

    @property
    def queued(self) -> int:
        """Events waiting to be read (never more than ``maxsize``)."""
        return max(0, self._queue.qsize() - (1 if self.closed else 0))

    async def get(self) -> Event | None:
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    def _offer(self, event: Event) -> bool:
        """Queue ``event``; False when the queue is full (the caller then drops us)."""
        if self.closed:
            return True
        if self._queue.qsize() >= self.maxsize:
            return False
        self._queue.put_nowait(event)
        return True

    def _end(self, *, dropped: bool) -> None:
        """Stop receiving: free what is queued (when dropped) and wake the reader with None."""
        if self.closed:
            return
        self.closed = True
        self.dropped = dropped
        if dropped:
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(None)

    def close(self) -> None:
        """Unsubscribe (the stream handler calls this when it ends)."""
        self._end(dropped=False)
        self._on_close(self)


class EventHub:
    """Per-job fan-out with bounded queues. Feed it with ``store.add_listener(hub.publish)``."""

    def __init__(self, queue_size: int = 256):
        self.queue_size = queue_size
        self._subs: dict[str, set[Subscription]] = {}
        self.dropped_total = 0
        self._closed = False

    def subscribe(self, job_id: str) -> Subscription:
        sub = Subscription(job_id, self.queue_size, self._remove)
        if self._closed:
            sub._end(dropped=False)
            return sub
        self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    def subscribers(self, job_id: str | None = None) -> int:
        """How many live subscribers (of one job, or in all)."""
        if job_id is not None:
            return len(self._subs.get(job_id, ()))
        return sum(len(s) for s in self._subs.values())

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber of its job. Never blocks."""
        subs = self._subs.get(event.job_id)
        if not subs:
            return
        for sub in list(subs):
            if not sub._offer(event):
                self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        self.dropped_total += 1
        log.warning(
            "event subscriber fell behind and was dropped",
            extra={"job_id": sub.job_id, "queue_size": sub.maxsize},
        )
        sub._end(dropped=True)
        self._remove(sub)

    def close(self) -> None:
        """End every stream (server shutdown); later subscriptions end at once."""
        self._closed = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub._end(dropped=False)
        self._subs.clear()
