"""Typed application keys: the resources the app factory opens and the handlers use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import Config
from .ops.base import Operation
from .pool import Dispatcher
from .storage import Storage
from .store import Store

if TYPE_CHECKING:  # these modules use the keys above; typed without an import cycle
    from .health import HealthChecker
    from .metrics import Metrics

CONFIG = web.AppKey("config", Config)
API_KEYS = web.AppKey("api_keys", list[bytes])
REGISTRY = web.AppKey("registry", dict[str, Operation])
STORE = web.AppKey("store", Store)
STORAGE = web.AppKey("storage", Storage)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
NODE = web.AppKey("node", str)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
HEALTH: web.AppKey[HealthChecker] = web.AppKey("health")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
