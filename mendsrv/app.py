"""The app factory: ``create_app(config) -> web.Application``.

Resources are opened and closed in ``cleanup_ctx`` generators, in order: store,
storage, event hub, webhook sender, dispatcher. No module-level singletons.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from . import health, http, logs, metrics, swagger
from .config import Config
from .events import EventHub
from .keys import API_KEYS, CONFIG, DISPATCHER, EVENT_HUB, NODE, REGISTRY, STORAGE, STORE, WEBHOOKS
from .metrics import METRICS
from .ops import REGISTRY as ALL_OPERATIONS
from .pool import Dispatcher, default_node_id
from .storage import open_storage
from .store import open_store
from .webhooks import WebhookSender

log = logging.getLogger("mendsrv.app")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    app[STORE] = await open_store(cfg.store.url or cfg.store.path, node=app[NODE], config=cfg)
    yield
    await app[STORE].close()


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORAGE] = await open_storage(app[CONFIG].storage)
    yield
    await app[STORAGE].close()


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    dispatcher = Dispatcher(cfg, app[STORE], app[STORAGE], app[REGISTRY], app[NODE])
    await dispatcher.start()
    app[DISPATCHER] = dispatcher
    yield
    await dispatcher.stop(cfg.server.shutdown_timeout_s)


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = app[EVENT_HUB]
    app[STORE].add_listener(hub.publish)
    yield
    app[STORE].remove_listener(hub.publish)
    hub.close()


async def _end_streams(app: web.Application) -> None:
    """On shutdown, end the event streams before aiohttp waits for open requests."""
    app[EVENT_HUB].close()


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    sender = WebhookSender(app[CONFIG].webhooks, app[STORE], on_attempt=app[METRICS].webhook_delivered)
    await sender.start()
    app[WEBHOOKS] = sender
    yield
    await sender.stop()


async def _gather_logs(app: web.Application) -> None:
    logs.gather_on(asyncio.get_running_loop())  # a log line per request: one write per loop turn


async def _write_logs(app: web.Application) -> None:
    logs.gather_on(None)


def create_app(config: Config) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[http.request_middleware, http.auth_middleware],
    )
    app[CONFIG] = config
    app[API_KEYS] = [k.encode() for k in config.auth.api_keys]
    app[REGISTRY] = ALL_OPERATIONS
    app[NODE] = config.server.node_id or default_node_id()
    app[EVENT_HUB] = EventHub(config.server.sse_queue_size)
    # the dispatcher opens last and so closes first: jobs it drains on shutdown still
    # reach SSE subscribers and the webhook sender
    app.cleanup_ctx.extend([_store_ctx, _storage_ctx, _events_ctx, _webhooks_ctx, _dispatcher_ctx])
    app.on_shutdown.append(_end_streams)
    app.on_startup.append(_gather_logs)
    app.on_cleanup.append(_write_logs)  # after cleanup_ctx: its lines are written too
    http.setup_routes(app)
    app.on_response_prepare.append(http.echo_request_id)
    health.setup(app)
    metrics.setup(app)
    swagger.setup(app)
    return app
