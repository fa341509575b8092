"""HTTP routes and middlewares of /api/v1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from .errors import BadRequest, MendError, NotFound, PayloadTooLarge, Unauthorized
from .keys import API_KEYS, CONFIG, DISPATCHER, REGISTRY, STORE
from .logs import REQUEST_ID as REQUEST_ID_VAR
from .metrics import METRICS, request_done
from .models import Status, iso, new_hex_id, new_uuid

log = logging.getLogger("mendsrv.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/v1"
MAX_LIMIT = 200
MAX_DETAILS = 20  # validation details listed in one 400 answer
MAX_FIELD_NAME = 100  # characters of a field name echoed back
REQUEST_ID = web.RequestKey("request_id", str)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    return json_response(body, status=status)


# --- middlewares ---------------------------------------------------------------------------


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each request's frame, in one middleware (every middleware is one more coroutine
    per request): its id (``X-Request-ID``, kept from the client or made here, and in
    the context of every log line it causes), the ``{"error": …}`` answer of every
    failure, its metrics and its log line."""
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if 0 < len(incoming) <= 200 and incoming.isprintable() else new_hex_id()
    request[REQUEST_ID] = rid
    token = REQUEST_ID_VAR.set(rid)  # every log line of this request carries it
    started = time.monotonic()
    status = 500  # unless a response says otherwise (a cancelled request has none)
    try:
        try:
            response = await handler(request)
        except MendError as exc:
            response = error_response(exc.status, exc.message, exc.details)
        except web.HTTPException as exc:
            if exc.status < 400:
                status = exc.status
                raise
            response = _http_error(request, exc)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "path": request.path})
            response = error_response(500, "internal server error; the server log has details")
        status = response.status
        if not response.prepared:
            response.headers["X-Request-ID"] = rid
        return response
    finally:
        REQUEST_ID_VAR.reset(token)
        duration = time.monotonic() - started
        request_done(request, status, duration)
        log.info(
            "request",
            extra={
                "request_id": rid,
                "method": request.method,
                "path": request.path,
                "status": status,
                "duration_ms": round(duration * 1000, 2),
            },
        )


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: X-Request-ID on every response, streams and files included."""
    if REQUEST_ID in request and "X-Request-ID" not in response.headers:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx/5xx (no route, wrong method, body too large) in the error shape."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[CONFIG].server.max_body_bytes
        return error_response(413, f"request body is larger than {limit} bytes (server.max_body_bytes)")
    message = {404: "no such route", 405: f"method {request.method} is not allowed here"}.get(exc.status, exc.reason)
    resp = error_response(exc.status, message)
    if "Allow" in exc.headers:
        resp.headers["Allow"] = exc.headers["Allow"]
    return resp


def presented_key(request: web.Request) -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_is_valid(presented: str, keys: list[bytes]) -> bool:
    candidate = presented.encode()
    ok = False
    for key in keys:  # compare against every key: no early exit, constant time each
        ok |= hmac.compare_digest(candidate, key)
    return ok


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(API + "/") or request.path == API:
        presented = presented_key(request)
        if presented is None:
            raise Unauthorized("missing API key: send it as X-API-Key or Authorization: Bearer")
        if not key_is_valid(presented, request.app[API_KEYS]):
            raise Unauthorized("invalid API key")
    return await handler(request)


# --- handlers ------------------------------------------------------------------------------


def _body_hash(op_name: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(op_name.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    details = []
    # bounded: a hostile body with thousands of unknown (or huge) field names gets a short answer
    for err in exc.errors(include_url=False, include_context=False, include_input=False)[:MAX_DETAILS]:
        field = (".".join(str(p) for p in err["loc"]) or "body")[:MAX_FIELD_NAME]
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        details.append({"field": field, "message": message})
    return details


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def submit(request: web.Request) -> web.Response:
    name = f"{request.match_info['family']}/{request.match_info['operation']}"
    op = request.app[REGISTRY].get(name)
    if op is None:
        raise NotFound(f"unknown operation {name}; GET {API}/operations lists them")
    if request.content_length is not None and request.content_length > request.app[CONFIG].server.max_body_bytes:
        raise PayloadTooLarge(
            f"request body is larger than {request.app[CONFIG].server.max_body_bytes} bytes (server.max_body_bytes)"
        )
    body = await read_json_object(request)
    try:
        params = op.model.model_validate(body)
    except ValidationError as exc:
        details = _validation_details(exc)
        first = details[0]
        raise BadRequest(f"invalid parameters: {first['field']}: {first['message']}", details=details) from None
    stored = params.model_dump(mode="json", exclude_unset=True)
    idem = request.headers.get("Idempotency-Key")
    if idem is not None and not (0 < len(idem) <= 255):
        raise BadRequest("Idempotency-Key must be 1-255 characters")
    job, created = await request.app[STORE].insert_job(
        job_id=new_uuid(),
        type=name,
        resource=op.resource.value,
        params=stored,
        request_id=params.request_id or request.get(REQUEST_ID),
        webhook_url=params.webhook_url,
        webhook_style=params.webhook_style,
        idempotency_key=idem,
        body_hash=_body_hash(name, body) if idem is not None else None,
        max_queue=request.app[CONFIG].limits.max_queue,
    )
    if created:
        request.app[METRICS].job_submitted(name)
        log.info("job submitted", extra={"job_id": job.id, "type": name, "status": job.status.value})
    return json_response(
        {"job_id": job.id, "status": job.status.value, "message": "Job queued for processing"},
        status=202,
        headers={"Location": f"{API}/jobs/{job.id}"},
    )


async def _job_or_404(request: web.Request) -> Any:
    job_id = request.match_info["job_id"]
    job = await request.app[STORE].get_job(job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


async def get_job(request: web.Request) -> web.Response:
    job = await _job_or_404(request)
    return json_response(job.resource_dict())


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, seq = raw.partition(":")
        if version != "v1":
            raise ValueError
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("cursor is not valid; pass next_cursor from a previous page") from None


async def list_jobs(request: web.Request) -> web.Response:
    q = request.query
    unknown = set(q) - {"status", "type", "request_id", "limit", "cursor"}
    if unknown:
        raise BadRequest(f"unknown query parameter {sorted(unknown)[0]}")
    status = q.get("status")
    if status is not None and status not in {s.value for s in Status}:
        raise BadRequest(f"status must be one of {', '.join(s.value for s in Status)}")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    before = _decode_cursor(q["cursor"]) if q.get("cursor") else None
    jobs = await request.app[STORE].list_jobs(
        status=status, type=q.get("type"), request_id=q.get("request_id"), before_seq=before, limit=limit + 1
    )
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return json_response(
        {
            "jobs": [j.resource_dict() for j in jobs],
            "next_cursor": _encode_cursor(jobs[-1].seq) if more and jobs else None,
        }
    )


async def cancel_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = await request.app[STORE].cancel(job_id)
    return json_response(job.resource_dict())


async def retry_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = await request.app[STORE].retry(job_id)
    request.app[DISPATCHER].wake()
    return json_response(job.resource_dict(), status=202, headers={"Location": f"{API}/jobs/{job.id}"})


async def list_deliveries(request: web.Request) -> web.Response:
    job = await _job_or_404(request)
    attempts = await request.app[STORE].list_attempts(job.id)
    return json_response(
        {"deliveries": [a | {"at": iso(a["at"]), "next_retry_at": iso(a["next_retry_at"])} for a in attempts]}
    )


async def list_operations(request: web.Request) -> web.Response:
    return json_response(
        {
            "operations": [
                {
                    "name": op.name,
                    "description": op.description,
                    "resource": op.resource.value,
                    "parameters": op.model.model_json_schema(),
                }
                for op in request.app[REGISTRY].values()
            ]
        }
    )


def setup_routes(app: web.Application) -> None:
    # Submissions first, their family spelled out: aiohttp tries the routes under
    # /api/v1/jobs in order, each a coroutine and a regular expression, and submissions
    # are the most frequent request. No job id is a family name.
    families = "|".join(sorted({name.split("/")[0] for name in app[REGISTRY]}))
    app.router.add_post(API + "/jobs/{family:" + families + "}/{operation}", submit)
    app.router.add_get(f"{API}/operations", list_operations)
    app.router.add_get(f"{API}/jobs", list_jobs)
    app.router.add_get(API + "/jobs/{job_id}", get_job)
    app.router.add_post(API + "/jobs/{job_id}/cancel", cancel_job)
    app.router.add_post(API + "/jobs/{job_id}/retry", retry_job)
    app.router.add_get(API + "/jobs/{job_id}/deliveries", list_deliveries)
    from .sse import stream_job  # sse builds on this module

    app.router.add_get(API + "/jobs/{job_id}/stream", stream_job)
    # any other family, after the job routes (/jobs/<id>/cancel must not read as
    # family/operation): the answer names the unknown operation
    app.router.add_post(API + "/jobs/{family}/{operation}", submit)
