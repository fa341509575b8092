"""Prometheus metrics: ``GET /metrics`` (no auth).

Each app owns its ``Metrics`` (a private ``CollectorRegistry``; nothing global), so
tests can build many apps. Job counters are fed from store events, counting the
transitions this node made (with a store shared by several nodes, sum them across
nodes); the pending and processing gauges are read from the store at scrape time
(the same on every node sharing a store).

Hooks for other parts of the server, through ``app[METRICS]`` (``from .metrics import METRICS``):

- ``job_submitted(type)``: the submit handler, once per new job;
- ``webhook_delivered(result)``: the webhook sender, once per delivery attempt, with
  ``result`` one of ``delivered``, ``retry``, ``failed`` (gave up) or ``refused``;
- open Server-Sent Events streams are counted without help: a response prepared with
  ``Content-Type: text/event-stream`` counts in ``mend_sse_clients`` until its
  handler returns (``sse_client_connected()`` / ``sse_client_disconnected()`` exist
  for streams served some other way).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .keys import DISPATCHER, REGISTRY, STORE
from .logs import REQUEST_ID
from .models import TERMINAL, Event
from .pool import Dispatcher

log = logging.getLogger("mendsrv.metrics")


JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WEBHOOK_RESULTS = ("delivered", "retry", "failed", "refused")
UNMATCHED = "unmatched"
SSE_OPEN = web.RequestKey("mend_sse_open", bool)


class Metrics:
    """The metrics of one app, in their own registry."""

    def __init__(self, operation_types: list[str] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        frozen = Gauge(
            "mend_gc_frozen_objects",
            "Objects alive at start-up, moved out of the garbage collector's sight (gc.freeze)",
            registry=r,
        )
        frozen.set_function(gc.get_freeze_count)
        self.info = Gauge("mend_build_info", "mendsrv version", ["version"], registry=r)
        self.info.labels(__version__).set(1)
        self.jobs_submitted = Counter(
            "mend_jobs_submitted", "Jobs accepted (202), by operation type", ["type"], registry=r
        )
        self.jobs_finished = Counter(
            "mend_jobs_finished",
            "Jobs that reached a terminal status (completed, failed, cancelled)",
            ["type", "status"],
            registry=r,
        )
        self.job_duration = Histogram(
            "mend_job_duration_seconds",
            "Time from a job's start (processing) to its terminal status, for jobs that ran",
            ["type"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.jobs_pending = Gauge("mend_jobs_pending", "Jobs waiting for a worker", registry=r)
        self.jobs_processing = Gauge("mend_jobs_processing", "Jobs being processed", registry=r)
        self.webhook_deliveries = Counter(
            "mend_webhook_deliveries",
            "Webhook delivery attempts by result (delivered, retry, failed, refused)",
            ["result"],
            registry=r,
        )
        self.sse_clients = Gauge("mend_sse_clients", "Open Server-Sent Events streams", registry=r)
        self.http_requests = Counter(
            "mend_http_requests",
            "HTTP requests by method, route (its path template) and status code",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mend_http_request_duration_seconds",
            "HTTP request latency by method and route (its path template)",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result)
        for name in operation_types or []:
            self.jobs_submitted.labels(name)
            for status in TERMINAL:
                self.jobs_finished.labels(name, status.value)

    # --- hooks -------------------------------------------------------------------------

    def job_submitted(self, type: str) -> None:
        self.jobs_submitted.labels(type).inc()

    def job_finished(self, type: str, status: str, duration_s: float | None) -> None:
        self.jobs_finished.labels(type, status).inc()
        if duration_s is not None:
            self.job_duration.labels(type).observe(max(duration_s, 0.0))

    def webhook_delivered(self, result: str) -> None:
        """One delivery attempt: ``delivered``, ``retry``, ``failed`` (gave up) or ``refused``."""
        self.webhook_deliveries.labels(result).inc()

    def sse_client_connected(self) -> None:
        self.sse_clients.inc()

    def sse_client_disconnected(self) -> None:
        self.sse_clients.dec()

    @contextlib.contextmanager
    def sse_client(self) -> Iterator[None]:
        """``with metrics.sse_client(): …stream…`` counts the stream while it is open."""
        self.sse_client_connected()
        try:
            yield
        finally:
            self.sse_client_disconnected()

    def observe_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:  # looking the labelled children up costs a lock and a tuple each time
            children = self._request_children[key] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(duration_s)

    # --- store events ------------------------------------------------------------------

    def on_event(self, event: Event, local: Callable[[Event], bool] | None = None) -> None:
        """Store listener: count terminal transitions and time the jobs that ran.

        ``local`` tells whether this node made the transition: with a store shared by
        several nodes, listeners also hear the others' events, which those nodes count.
        """
        if event.kind != "status" or not event.terminal:
            return
        if local is not None and not local(event):
            return
        data = event.data
        started, finished = _ts(data.get("started_at")), _ts(data.get("finished_at"))
        duration = finished - started if started is not None and finished is not None else None
        self.job_finished(str(data.get("type", "")), str(data.get("status", "")), duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


def _ts(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def route_label(request: web.Request) -> str:
    """The route's path template (``/api/v1/jobs/{job_id}``), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def request_done(request: web.Request, status: int, duration_s: float) -> None:
    """Count a finished request; ``http.request_middleware`` calls it once per request."""
    metrics = request.app[METRICS]
    if request.get(SSE_OPEN):
        metrics.sse_client_disconnected()
    metrics.observe_request(request.method, route_label(request), status, duration_s)


async def _count_event_streams(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: an event stream counts as an SSE client until its handler ends."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream") and not request.get(SSE_OPEN):
        request[SSE_OPEN] = True
        request.app[METRICS].sse_client_connected()


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        counts = await request.app[STORE].count_by_status()
        metrics.jobs_pending.set(counts.get("pending", 0))
        metrics.jobs_processing.set(counts.get("processing", 0))
    except Exception:  # the store being down must not hide the other metrics
        log.warning("could not read job counts for /metrics", exc_info=True)
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def _made_here(dispatcher: Dispatcher) -> Callable[[Event], bool]:
    """Whether a terminal transition was made by this node: the job ran here, or it was
    cancelled before it started by a request served here."""

    def local(event: Event) -> bool:
        if dispatcher.runs(event.job_id):
            return True
        return event.data.get("started_at") is None and REQUEST_ID.get() is not None

    return local


async def _listener_ctx(app: web.Application) -> AsyncIterator[None]:
    store, metrics = app[STORE], app[METRICS]
    local = _made_here(app[DISPATCHER])

    def listener(event: Event) -> None:
        metrics.on_event(event, local)

    store.add_listener(listener)
    yield
    store.remove_listener(listener)


def setup(app: web.Application) -> None:
    """Create the app's metrics, feed them from the store and serve ``GET /metrics``.

    ``http.request_middleware`` must be in the app's middleware list: it reports each
    request through ``request_done``.
    """
    app[METRICS] = Metrics(sorted(app[REGISTRY]))
    app.cleanup_ctx.append(_listener_ctx)
    app.on_response_prepare.append(_count_event_streams)
    app.router.add_get("/metrics", handle_metrics)
