"""Typed application keys: the resources the app factory opens and the handlers use."""

from __future__ import annotations

from aiohttp import web

from .config import Config
from .events import EventHub
from .ops.base import Operation
from .pool import Dispatcher
from .storage import Storage
from .store_api import JobStore
from .webhooks import WebhookSender

CONFIG = web.AppKey("config", Config)
API_KEYS = web.AppKey("api_keys", list[bytes])
REGISTRY = web.AppKey("registry", dict[str, Operation])
STORE = web.AppKey("store", JobStore)
STORAGE = web.AppKey("storage", Storage)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
NODE = web.AppKey("node", str)
EVENT_HUB = web.AppKey("event_hub", EventHub)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
