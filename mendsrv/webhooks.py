"""Webhook delivery: the sender task, payloads, signatures and the SSRF guard.

The store writes a ``deliveries`` row in the same transaction as a job's terminal
transition (an outbox), so a delivery is never lost, across SIGTERM or SIGKILL. The
sender polls ``store.due_deliveries`` (at start, after each attempt, when this node
commits a terminal event that wrote a delivery, and every few seconds) and POSTs each
due one. Only a 2xx answer counts; anything else is retried with exponential backoff
(``RetryPolicy``) until ``webhooks.max_attempts``. Every attempt is recorded (``store.record_attempt``).

Requests are signed the Standard Webhooks way when ``webhooks.secret`` is set.
Targets whose address is loopback, private, link-local, multicast, reserved,
unspecified or IPv4-mapped are refused (no request, no retry) unless
``webhooks.allow_private_networks``; the check runs on the addresses the connection
actually uses (a resolver that refuses them), and redirects are never followed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from . import __version__
from .config import WebhooksConfig
from .models import Event, iso, now
from .retry import RetryPolicy
from .store_api import JobStore

log = logging.getLogger("mendsrv.webhooks")

POLL_INTERVAL_S = 5.0
STOP_GRACE_S = 2.0

COLOURS = {"completed": 0x2ECC71, "failed": 0xE74C3C, "cancelled": 0x95A5A6}


# --- payloads --------------------------------------------------------------------------------


def default_payload(event: str, job: dict[str, Any]) -> dict[str, Any]:
    """``{"event": "job.completed", "job": <job resource>, "timestamp": <ISO>}``."""
    return {"event": event, "job": job, "timestamp": job.get("finished_at") or iso(now())}


def _parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _duration(job: dict[str, Any]) -> str:
    started, finished = _parse_iso(job.get("started_at")), _parse_iso(job.get("finished_at"))
    if started is None or finished is None:
        return "not started"
    seconds = max(0.0, (finished - started).total_seconds())
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def discord_payload(event: str, job: dict[str, Any]) -> dict[str, Any]:
    """A Discord webhook body: ``content`` and one embed with type, status, duration, outcome."""
    status = job.get("status", event.removeprefix("job."))
    kind = job.get("type", "job")
    fields = [
        {"name": "Type", "value": kind, "inline": True},
        {"name": "Status", "value": status, "inline": True},
        {"name": "Duration", "value": _duration(job), "inline": True},
    ]
    outputs = ((job.get("result") or {}).get("outputs")) or []
    if status == "completed":
        where = "\n".join(f"{o.get('bucket')}/{o.get('key')}" for o in outputs[:10]) or "(no output)"
        fields.append({"name": "Output", "value": _cut(where, 1024), "inline": False})
    else:
        fields.append({"name": "Error", "value": _cut(job.get("error") or status, 1024), "inline": False})
    embed: dict[str, Any] = {
        "title": _cut(f"{kind} {status}", 256),
        "color": COLOURS.get(status, COLOURS["cancelled"]),
        "fields": fields,
        "footer": {"text": f"job {job.get('job_id')}"},
    }
    if job.get("finished_at"):
        embed["timestamp"] = job["finished_at"]
    return {"content": _cut(f"Job {job.get('job_id')} ({kind}) {status}.", 2000), "embeds": [embed]}


def build_body(style: str, event: str, job: dict[str, Any]) -> bytes:
    payload = discord_payload(event, job) if style == "discord" else default_payload(event, job)
    return orjson.dumps(payload)


# --- signatures ------------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` decoded, else the secret's UTF-8 bytes."""
    if secret.startswith("whsec_"):
        raw = secret.removeprefix("whsec_")
        return base64.b64decode(raw + "=" * (-len(raw) % 4))
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --- the SSRF guard --------------------------------------------------------------------------


class RefusedTarget(OSError):
    """The webhook target is an address this server must not call."""


def refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be called, or None when it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and refusal(str(embedded)):
            return "an IPv6 address wrapping a non-public IPv4 address"
    for flag, label in (
        ("is_loopback", "a loopback"),
        ("is_unspecified", "an unspecified"),
        ("is_link_local", "a link-local"),
        ("is_multicast", "a multicast"),
        ("is_private", "a private"),
        ("is_reserved", "a reserved"),
    ):
        if getattr(ip, flag):
            return f"{label} address"
    if not ip.is_global:
        return "not a public address"
    return None


def numeric_ipv4(host: str) -> str | None:
    """The address a loose numeric IPv4 spelling stands for (127.1, 2130706433, 0177.0.0.1)."""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp does, then refuses if any address is not public.

    aiohttp connects only to the addresses a resolver returns, so this guards the
    address actually connected to (a name that resolves to 127.0.0.1 is refused).
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = refusal(result["host"])
            if reason:
                raise RefusedTarget(f"{host} resolves to {result['host']}, {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def _refused_in(exc: BaseException) -> RefusedTarget | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RefusedTarget):
            return current
        nested = getattr(current, "os_error", None)
        if isinstance(nested, RefusedTarget):
            return nested
        current = current.__cause__ or current.__context__
    return None


# --- the sender ------------------------------------------------------------------------------


class WebhookSender:
    """Delivers due webhook deliveries. ``await start()`` / ``await stop()``."""

    def __init__(
        self,
        cfg: WebhooksConfig,
        store: JobStore,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        on_attempt: Callable[[str], None] | None = None,
    ):
        """``on_attempt(result)`` hears of every attempt: ``delivered``, ``retry``,
        ``failed`` (given up) or ``refused`` (a non-public target), e.g. for metrics."""
        self.cfg = cfg
        self.on_attempt = on_attempt
        self.store = store
        self.policy = RetryPolicy(cfg.max_attempts, base=cfg.retry_base_s, factor=2.0, cap=cfg.retry_cap_s)
        self.poll_interval_s = poll_interval_s
        self._key = signing_key(cfg.secret) if cfg.secret else None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._finished_during_read: set[int] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=None if self.cfg.allow_private_networks else GuardedResolver(),
            limit=self.cfg.concurrency,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={"User-Agent": f"mendsrv/{__version__} (webhooks)"},
            trust_env=False,
        )
        self.store.add_listener(self._on_event)
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        """Stop sending. Attempts still in flight after a short grace are abandoned
        unrecorded, so their deliveries stay pending and go out after the next start."""
        self.store.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_event(self, event: Event) -> None:
        if event.delivery:  # other events leave nothing to send: no reads on their account
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._start_due()
                timeout = await self._idle_time()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook sender could not read due deliveries")
                timeout = self.poll_interval_s
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # never swallows a cancel, unlike 3.11's wait_for
                        await self._wake.wait()

    async def _start_due(self) -> None:
        """Start an attempt for every due delivery not already in flight.

        A store shared by several nodes leases the rows it returns to this node, so every
        row returned is started at once; ``_slots`` keeps at most ``webhooks.concurrency``
        requests open, and fetching stops while that many attempts are in flight.
        """
        if len(self._inflight) >= self.cfg.concurrency:
            return
        # An attempt that finishes while the read runs may be missing from its result:
        # its row could still look due. Attempts that finished earlier committed first.
        self._finished_during_read = set()
        due = await self.store.due_deliveries(limit=self.cfg.concurrency)
        for delivery in due:
            if delivery["id"] in self._inflight or delivery["id"] in self._finished_during_read:
                continue
            task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery['id']}")
            self._inflight[delivery["id"]] = task
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        for delivery_id, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[delivery_id]
                self._finished_during_read.add(delivery_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task failed", exc_info=task.exception())
        self.wake()

    async def _idle_time(self) -> float:
        """Seconds until the next delivery is due (a finished attempt or new event wakes us sooner)."""
        next_at = await self.store.next_delivery_at()
        if next_at is None:
            return self.poll_interval_s
        delay = next_at - now()
        if delay <= 0:
            # due but already in flight, or no free slot: a finishing attempt wakes us
            return self.poll_interval_s
        return min(delay, self.poll_interval_s)

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        async with self._slots:
            await self._attempt(delivery)

    async def _attempt(self, delivery: dict[str, Any]) -> None:
        attempt = delivery["attempts"] + 1
        body = build_body(delivery["style"], delivery["event"], delivery["job"])
        msg_id = f"msg_{delivery['id']}_{delivery['job_id']}"
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        status_code, error, retry = await self._post(delivery["url"], body, headers)
        delivered = error is None
        next_retry_at = None
        if not delivered and retry and not self.policy.gives_up_after(attempt):
            next_retry_at = now() + self.policy.delay(attempt)
        await self.store.record_attempt(
            delivery["id"], status_code=status_code, error=error, delivered=delivered, next_retry_at=next_retry_at
        )
        if self.on_attempt is not None:
            result = "delivered" if delivered else "retry" if next_retry_at else "failed" if retry else "refused"
            try:
                self.on_attempt(result)
            except Exception:
                log.exception("webhook attempt hook failed")
        log.log(
            logging.INFO if delivered else logging.WARNING,
            "webhook delivered" if delivered else ("webhook attempt failed" if next_retry_at else "webhook given up"),
            extra={
                "job_id": delivery["job_id"],
                "delivery_id": delivery["id"],
                "attempt": attempt,
                "status_code": status_code,
                "error": error,
                "next_retry_at": iso(next_retry_at),
            },
        )

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None, bool]:
        """POST once: (status code, error or None when delivered, whether to retry)."""
        assert self._session is not None
        if not self.cfg.allow_private_networks:
            host = URL(url).host or ""
            reason = refusal(host) or refusal(numeric_ipv4(host) or "")  # IP literals skip the resolver
            if reason:
                return None, self._refused_message(f"{host} is {reason}"), False
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                location = resp.headers.get("Location", "")
        except TimeoutError:
            return None, f"no answer within {self.cfg.timeout_s:g} s (webhooks.timeout_s)", True
        except (aiohttp.ClientError, OSError) as exc:
            refused = _refused_in(exc)
            if refused is not None:
                return None, self._refused_message(str(refused)), False
            return None, f"could not reach the receiver: {exc}", True
        if 200 <= status < 300:
            return status, None, False
        if 300 <= status < 400:
            return status, f"the receiver answered {status} (redirect to {location or '?'}); redirects are not followed", True
        return status, f"the receiver answered {status}", True

    @staticmethod
    def _refused_message(why: str) -> str:
        return (
            f"refused: {why}; webhook targets must be public addresses "
            "(webhooks.allow_private_networks = true allows private ones); not retried"
        )
