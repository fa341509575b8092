"""What an operator and an API consumer see on day one: /health, /metrics, the OpenAPI
document and Swagger UI, request ids, logs without secrets, and the guides."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from mendsrv.config import SECTIONS, load_config
from mendsrv.keys import DISPATCHER, STORE
from mendsrv.logs import JsonFormatter, LineWriter, RequestIdFilter
from mendsrv.metrics import METRICS
from mendsrv.ops import REGISTRY

from .conftest import AUTH, REPO, free_port, job_body, wait_for_job, write_jpeg

# --- /health ----------------------------------------------------------------------------


async def _health_until(client: Any, status: int, timeout: float = 20.0) -> dict[str, Any]:
    """Poll /health (its result is cached ~1.5 s) until it answers ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get("/health")
        body = await resp.json()
        if resp.status == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/health still {resp.status} after {timeout} s: {body}")
        await asyncio.sleep(0.2)


async def test_health_ok_without_auth(client: Any) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "storage", "ffmpeg", "workers"}
    assert all(check == {"status": "ok"} for check in body["checks"].values())
    assert body["version"]
    assert resp.headers["X-Request-ID"]


async def test_health_503_names_storage_when_local_root_is_gone(client: Any, buckets: Path) -> None:
    await _health_until(client, 200)
    moved = buckets.with_name("buckets-away")
    buckets.rename(moved)
    buckets.write_text("not a directory")  # the root is now a file
    try:
        body = await _health_until(client, 503)
        assert body["status"] == "unhealthy"
        assert body["checks"]["storage"]["status"] == "fail"
        assert "storage" in body["error"]
        assert body["checks"]["database"] == {"status": "ok"}
    finally:
        buckets.unlink()
        moved.rename(buckets)
    body = await _health_until(client, 200)
    assert body["checks"]["storage"] == {"status": "ok"}


class _Moto:
    """A moto S3 server of this test's own, which can go away and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # stop() leaves the socket listening
            self.server = None


@pytest.fixture
def own_moto() -> Iterator[_Moto]:
    moto = _Moto()
    moto.start()
    yield moto
    moto.stop()


async def test_health_503_when_s3_is_unreachable_and_200_when_back(
    own_moto: _Moto, config_factory: Any, client_factory: Any
) -> None:
    cfg = config_factory(
        storage={
            "backend": "s3", "endpoint_url": own_moto.url, "access_key_id": "testing",
            "secret_access_key": "testing", "max_retries": 0, "connect_timeout_s": 1.0, "read_timeout_s": 2.0,
        }
    )
    client = await client_factory(cfg)
    await _health_until(client, 200)
    own_moto.stop()
    body = await _health_until(client, 503)
    assert body["checks"]["storage"]["status"] == "fail"
    assert "S3" in body["checks"]["storage"]["error"]
    assert body["error"].startswith("unhealthy: storage")
    own_moto.start()
    body = await _health_until(client, 200)
    assert body["status"] == "ok"


async def test_health_503_names_ffmpeg_when_the_binary_is_missing(
    config_factory: Any, client_factory: Any, buckets: Path, tmp_path: Path
) -> None:
    client = await client_factory(config_factory(workers={"ffmpeg_path": str(tmp_path / "no-ffmpeg")}))
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["checks"]["ffmpeg"]["status"] == "fail"
    assert "no-ffmpeg" in body["checks"]["ffmpeg"]["error"]
    assert {n for n, c in body["checks"].items() if c["status"] == "fail"} == {"ffmpeg"}


async def test_health_503_names_workers_when_the_dispatcher_stopped(client: Any) -> None:
    await _health_until(client, 200)
    await client.server.app[DISPATCHER].stop(0)
    body = await _health_until(client, 503)
    assert {n for n, c in body["checks"].items() if c["status"] == "fail"} == {"workers"}
    assert "dispatcher" in body["checks"]["workers"]["error"]


# --- /metrics ---------------------------------------------------------------------------


async def _scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_move_as_jobs_run(client: Any, buckets: Path) -> None:
    write_jpeg(buckets / "media" / "in.jpg", 320, 240)
    resize = (("type", "image/resize"),)
    before = await _scrape(client)
    assert before[("mend_jobs_submitted_total", resize)] == 0
    assert ("process_resident_memory_bytes", ()) in before
    assert before[("mend_sse_clients", ())] == 0

    ok = await (await client.post("/api/v1/jobs/image/resize", json=job_body(width=100), headers=AUTH)).json()
    bad = await (
        await client.post("/api/v1/jobs/image/resize", json=job_body(source_key="missing.jpg", width=100), headers=AUTH)
    ).json()
    assert (await wait_for_job(client, ok["job_id"]))["status"] == "completed"
    assert (await wait_for_job(client, bad["job_id"]))["status"] == "failed"

    after = await _scrape(client)
    assert after[("mend_jobs_submitted_total", resize)] == 2
    assert after[("mend_jobs_finished_total", (("status", "completed"), ("type", "image/resize")))] == 1
    assert after[("mend_jobs_finished_total", (("status", "failed"), ("type", "image/resize")))] == 1
    assert after[("mend_job_duration_seconds_count", resize)] == 2
    assert after[("mend_job_duration_seconds_sum", resize)] > 0
    assert after[("mend_jobs_pending", ())] == 0 and after[("mend_jobs_processing", ())] == 0
    # HTTP metrics by route template, never by raw path (a job id would explode the label set)
    polled = (("method", "GET"), ("route", "/api/v1/jobs/{job_id}"), ("status", "200"))
    assert after[("mend_http_requests_total", polled)] >= 2
    assert after[("mend_http_request_duration_seconds_count", (("method", "GET"), ("route", "/api/v1/jobs/{job_id}")))] >= 2
    assert not any(ok["job_id"] in dict(labels).get("route", "") for _, labels in after)


async def test_metrics_pending_gauge_and_401_counted(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    # a type no worker lane serves stays pending: the gauge is read from the store at scrape time
    client = await client_factory(config_factory())
    store = client.server.app[STORE]
    for n in range(3):
        await store.insert_job(
            job_id=f"parked-{n}", type="image/resize", resource="nowhere", params={}, request_id=None,
            webhook_url=None, webhook_style="default",
        )
    await client.get("/api/v1/jobs")  # no key
    samples = await _scrape(client)
    assert samples[("mend_jobs_pending", ())] == 3
    unauthorized = (("method", "GET"), ("route", "/api/v1/jobs"), ("status", "401"))
    assert samples[("mend_http_requests_total", unauthorized)] == 1
    await client.get("/no/such/route")
    samples = await _scrape(client)
    assert samples[("mend_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    # a cancel served here counts; a transition made elsewhere (as by another node sharing
    # the store, here: the store used directly, outside any request) is that node's to count
    assert (await client.post("/api/v1/jobs/parked-0/cancel", headers=AUTH)).status == 200
    await store.cancel("parked-1")
    samples = await _scrape(client)
    cancelled = (("status", "cancelled"), ("type", "image/resize"))
    assert samples[("mend_jobs_finished_total", cancelled)] == 1
    assert samples[("mend_jobs_pending", ())] == 1


async def test_metrics_hooks_for_webhooks_and_sse(client: Any) -> None:
    metrics = client.server.app[METRICS]
    metrics.webhook_delivered("delivered")
    metrics.webhook_delivered("retry")
    metrics.webhook_delivered("retry")
    with metrics.sse_client():
        metrics.sse_client_connected()
        during = await _scrape(client)
        metrics.sse_client_disconnected()
    after = await _scrape(client)
    assert during[("mend_sse_clients", ())] == 2
    assert after[("mend_sse_clients", ())] == 0
    assert after[("mend_webhook_deliveries_total", (("result", "delivered"),))] == 1
    assert after[("mend_webhook_deliveries_total", (("result", "retry"),))] == 2
    assert after[("mend_webhook_deliveries_total", (("result", "failed"),))] == 0


async def test_metrics_count_webhook_deliveries(client: Any, buckets: Path, aiohttp_server: Any) -> None:
    answers = [500, 204]  # one failed attempt (retried), then delivered

    async def receive(request: web.Request) -> web.Response:
        return web.Response(status=answers.pop(0) if answers else 204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    server = await aiohttp_server(receiver)
    write_jpeg(buckets / "media" / "in.jpg", 64, 64)
    body = job_body(width=10, webhook_url=str(server.make_url("/hook")))
    job = await (await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)).json()
    await wait_for_job(client, job["job_id"])
    deadline = time.monotonic() + 30
    while True:
        samples = await _scrape(client)
        if samples[("mend_webhook_deliveries_total", (("result", "delivered"),))] == 1:
            break
        assert time.monotonic() < deadline, "the webhook was not delivered"
        await asyncio.sleep(0.1)
    assert samples[("mend_webhook_deliveries_total", (("result", "retry"),))] == 1


async def test_metrics_count_open_event_streams(client: Any, buckets: Path) -> None:
    """mend_sse_clients follows the job streams from their first event to their end."""
    store = client.server.app[STORE]
    for n in range(2):  # parked: no worker lane serves resource "nowhere"
        await store.insert_job(
            job_id=f"watched-{n}", type="image/resize", resource="nowhere", params={}, request_id=None,
            webhook_url=None, webhook_style="default",
        )
    streams = [await client.get(f"/api/v1/jobs/watched-{n}/stream", headers=AUTH) for n in range(2)]
    for resp in streams:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        while not (await resp.content.readline()).startswith(b"data:"):
            pass
    assert (await client.get("/api/v1/jobs/watched-0/stream")).status == 401  # never a stream
    assert (await client.get("/api/v1/jobs/nobody/stream", headers=AUTH)).status == 404
    assert (await _scrape(client))[("mend_sse_clients", ())] == 2
    for n, resp in enumerate(streams):
        assert (await client.post(f"/api/v1/jobs/watched-{n}/cancel", headers=AUTH)).status == 200
        assert b"cancelled" in await resp.read()  # the stream ends after the terminal event
    assert (await _scrape(client))[("mend_sse_clients", ())] == 0


async def test_metrics_registry_is_per_app(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    one = await client_factory(config_factory())
    two = await client_factory(config_factory())
    one.server.app[METRICS].job_submitted("image/resize")
    assert (await _scrape(one))[("mend_jobs_submitted_total", (("type", "image/resize"),))] == 1
    assert (await _scrape(two))[("mend_jobs_submitted_total", (("type", "image/resize"),))] == 0


# --- OpenAPI and Swagger UI ---------------------------------------------------------------


async def _document(client: Any) -> dict[str, Any]:
    resp = await client.get("/swagger/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return dict(await resp.json())


async def test_openapi_document_is_valid_and_lists_every_operation(client: Any) -> None:
    doc = await _document(client)
    validate(doc)
    schemas = doc["components"]["schemas"]
    for name, op in REGISTRY.items():
        post = doc["paths"][f"/api/v1/jobs/{name}"]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        schema = schemas[body["$ref"].rsplit("/", 1)[-1]]
        assert set(schema["properties"]) == {f.alias or n for n, f in op.model.model_fields.items()}
        assert {"source_bucket", "source_key", "dest_bucket", "dest_key"} <= set(schema["required"])
        assert schema["additionalProperties"] is False
        for code in ("202", "400", "401", "404", "409", "413", "429", "500", "503"):
            assert code in post["responses"], (name, code)
        assert post["security"] == [{"ApiKeyHeader": []}, {"BearerAuth": []}]
    assert "{family}" not in json.dumps(list(doc["paths"]))
    for route in ("/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel",
                  "/api/v1/jobs/{job_id}/retry", "/api/v1/jobs/{job_id}/stream", "/api/v1/jobs/{job_id}/deliveries",
                  "/api/v1/operations", "/health", "/metrics"):
        assert route in doc["paths"], route
    assert doc["paths"]["/health"]["get"]["security"] == []
    error = schemas["Error"]
    assert error["required"] == ["error"] and set(error["properties"]) == {"error", "details"}
    assert doc["components"]["securitySchemes"] == {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token"},
    }


async def test_openapi_every_api_route_answers_401_without_a_key(client: Any) -> None:
    doc = await _document(client)
    checked = 0
    for template, methods in doc["paths"].items():
        if not template.startswith("/api/v1"):
            continue
        path = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", template)
        for method in methods:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                resp = await client.request(method.upper(), path, headers=headers, json={})
                assert resp.status == 401, (method, path, headers, await resp.text())
                assert isinstance((await resp.json())["error"], str)
            checked += 1
    assert checked >= len(REGISTRY) + 6


async def test_openapi_try_it_out_example_submits_a_job(client: Any, buckets: Path) -> None:
    """What Swagger UI's "Try it out" sends: the document's path and example, with the key."""
    doc = await _document(client)
    post = doc["paths"]["/api/v1/jobs/image/resize"]["post"]
    example = dict(post["requestBody"]["content"]["application/json"]["example"])
    write_jpeg(buckets / example["source_bucket"] / example["source_key"], 200, 100)
    resp = await client.post("/api/v1/jobs/image/resize", json=example | {"width": 50}, headers=AUTH)
    assert resp.status == 202, await resp.text()
    job = await wait_for_job(client, (await resp.json())["job_id"])
    assert job["status"] == "completed", job


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        url = found.get("src") if tag == "script" else found.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


async def test_swagger_ui_and_all_its_assets_load_from_the_server(client: Any) -> None:
    resp = await client.get("/swagger", allow_redirects=False)
    assert resp.status in (301, 302) and resp.headers["Location"] == "/swagger/"
    resp = await client.get("/swagger/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = _Assets()
    page.feed(await resp.text())
    assert any(u.endswith("swagger-ui-bundle.js") for u in page.urls)
    assert any(u.endswith(".css") for u in page.urls)
    for url in page.urls:
        assert not re.match(r"^([a-z]+:)?//", url), f"{url} is not served by this server"
        asset = await client.get(urljoin("/swagger/", url))
        assert asset.status == 200, url
        body = await asset.read()
        assert body, url
        if url.endswith(".css"):
            for ref in re.findall(rb"url\(\s*['\"]?([^'\")]+)", body):
                assert ref.startswith(b"data:") or not re.match(rb"^([a-z]+:)?//", ref), ref[:60]
    initializer = await (await client.get(urljoin("/swagger/", next(u for u in page.urls if "initializer" in u)))).text()
    assert '"openapi.json"' in initializer and "persistAuthorization: true" in initializer
    assert "petstore" not in initializer
    # the document the initializer points at, relative to /swagger/
    assert (await client.get("/swagger/openapi.json")).status == 200


# --- request ids and logs -------------------------------------------------------------------


async def test_request_id_echoed_and_default_job_request_id(client: Any, buckets: Path) -> None:
    rid = {"X-Request-ID": "trace-4f1c"}
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=10), headers=AUTH | rid)
    assert resp.status == 202 and resp.headers["X-Request-ID"] == "trace-4f1c"
    job = await wait_for_job(client, (await resp.json())["job_id"])
    assert job["request_id"] == "trace-4f1c"
    for method, path, headers in (
        ("GET", "/api/v1/jobs", rid), ("GET", "/health", rid), ("GET", "/metrics", rid),
        ("GET", "/swagger/swagger-ui.css", rid), ("GET", "/nowhere", rid),
    ):
        resp = await client.request(method, path, headers=headers)
        assert resp.headers["X-Request-ID"] == "trace-4f1c", path
    generated = (await client.get("/health")).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The server's log as it would be written: JSON lines with the request-id filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_logs_carry_the_request_id_and_never_an_api_key(
    json_log: io.StringIO, config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    keys = ["k-first-8c1d5e", "k-second-77ab90"]
    client = await client_factory(config_factory(auth={"api_keys": keys}))
    write_jpeg(buckets / "media" / "in.jpg", 64, 64)
    rid = "req-logs-1"
    resp = await client.post(
        "/api/v1/jobs/image/resize", json=job_body(width=10), headers={"X-API-Key": keys[0], "X-Request-ID": rid}
    )
    job_id = (await resp.json())["job_id"]
    deadline = time.monotonic() + 30
    while (await (await client.get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {keys[1]}"})).json())[
        "status"
    ] != "completed":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await client.get("/api/v1/jobs", headers={"X-API-Key": "k-wrong-3e3e3e"})
    await client.get("/api/v1/jobs", headers={"Authorization": "Bearer k-wrong-3e3e3e"})
    text = json_log.getvalue()
    for secret in (*keys, "k-wrong-3e3e3e"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    requests = [e for e in lines if e["msg"] == "request"]
    assert len(requests) >= 4 and all(e["request_id"] for e in requests)
    assert not any("headers" in e for e in requests)
    submitted = next(e for e in lines if e["msg"] == "job submitted")
    assert submitted["request_id"] == rid and submitted["job_id"] == job_id
    transitions = [e for e in lines if e.get("job_id") == job_id and e["msg"].startswith("job ")]
    assert {e["msg"] for e in transitions} >= {"job submitted", "job processing", "job completed"}
    assert all(e["request_id"] == rid for e in transitions)
    assert next(e for e in transitions if e["msg"] == "job completed")["duration_s"] >= 0


def test_logs_of_a_server_process_contain_no_api_key(server_process: Callable[..., Any], tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    keys = ["proc-key-one-5d2a", "proc-key-two-91bb"]
    server = server_process({"auth": {"api_keys": keys}}).start()
    try:
        (tmp_path / "data" / "buckets" / "media").mkdir(parents=True, exist_ok=True)
        write_jpeg(tmp_path / "data" / "buckets" / "media" / "in.jpg", 64, 64)

        def call(path: str, headers: dict[str, str], body: dict[str, Any] | None = None) -> int:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(
                server.url + path, data=data, headers={"Content-Type": "application/json", **headers}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert call("/api/v1/jobs/image/resize", {"X-API-Key": keys[0], "X-Request-ID": "proc-rid"}, job_body(width=8)) == 202
        assert call("/api/v1/jobs", {"Authorization": f"Bearer {keys[1]}"}) == 200
        assert call("/api/v1/jobs", {"X-API-Key": "proc-wrong-key-0000"}) == 401
        assert call("/api/v1/jobs?api_key=x", {"Authorization": "Bearer proc-wrong-key-0000"}) == 401
        assert call("/health", {}) in (200, 503)
        deadline = time.monotonic() + 30
        while "job completed" not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert server.terminate() == 0
    text = server.log_path.read_text()
    for secret in (*keys, "proc-wrong-key-0000"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert sum(1 for e in lines if e["msg"] == "request") >= 5
    assert any(e["msg"] == "job completed" and e["request_id"] == "proc-rid" for e in lines)


async def test_log_lines_of_one_loop_turn_are_written_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the server's loop the lines of a turn leave in one write, at the next turn;
    an error, a line from another thread and the lines left at the end go out at once."""
    import os
    import threading

    import mendsrv.logs

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(mendsrv.logs.os, "write", counting_write)
    handler = LineWriter(write_fd)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("mendsrv.test.linewriter")
    logger.addHandler(handler)
    logger.propagate = False

    def pipe_lines() -> list[dict[str, Any]]:
        try:
            data = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            return []
        return [json.loads(line) for line in data.decode().splitlines()]

    try:
        handler.gather_on(asyncio.get_running_loop())
        for i in range(3):
            logger.warning("turn line", extra={"n": i})
        assert pipe_lines() == [] and writes == []  # gathered, not yet written
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [e["n"] for e in pipe_lines()] == [0, 1, 2] and len(writes) == 1

        logger.warning("before the error")
        logger.error("an error")  # at once, after what was gathered
        assert [e["msg"] for e in pipe_lines()] == ["before the error", "an error"]

        thread = threading.Thread(target=lambda: logger.warning("from a thread"))
        thread.start()
        thread.join()
        assert [e["msg"] for e in pipe_lines()] == ["from a thread"]

        logger.warning("left at the end")
        handler.gather_on(None)  # the app's cleanup does this
        assert [e["msg"] for e in pipe_lines()] == ["left at the end"]
        logger.warning("no loop")
        assert [e["msg"] for e in pipe_lines()] == ["no loop"]
    finally:
        logger.removeHandler(handler)
        os.close(read_fd)
        os.close(write_fd)


# --- guides ---------------------------------------------------------------------------------


def test_configuration_doc_lists_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    for name, model in SECTIONS.items():
        section = next((s for s in sections if s.startswith(f"[{name}]")), None)
        assert section is not None, f"docs/configuration.md has no '## [{name}]' section"
        for key in model.model_fields:
            env = f"MEND_{name.upper()}_{key.upper()}"
            assert re.search(rf"^\| `{key}` \|.*`{env}`", section, flags=re.M), (
                f"{name}.{key} is not documented in docs/configuration.md (a table row with `{key}` and `{env}`)"
            )


async def test_auth_keys_from_environment_rotate(client_factory: Any, tmp_path: Path) -> None:
    """As docs/authentication.md describes: MEND_AUTH_API_KEYS=a,b accepts both keys."""
    cfg = load_config(
        None,
        env={
            "MEND_AUTH_API_KEYS": "old-key-1, new-key-2",
            "MEND_STORE_PATH": str(tmp_path / "env.db"),
            "MEND_STORAGE_ROOT": str(tmp_path / "env-buckets"),
            "MEND_WORKERS_PROCESSES": "1",
        },
    )
    client = await client_factory(cfg)
    assert (await client.get("/api/v1/jobs", headers={"X-API-Key": "old-key-1"})).status == 200
    assert (await client.get("/api/v1/jobs", headers={"Authorization": "Bearer new-key-2"})).status == 200
    assert (await client.get("/api/v1/jobs", headers={"X-API-Key": "dev-key-change-me"})).status == 401
    guide = (REPO / "docs" / "authentication.md").read_text()
    assert "MEND_AUTH_API_KEYS" in guide and "Authorization: Bearer" in guide and "X-API-Key" in guide


def test_deployment_guide_covers_the_essentials() -> None:
    guide = (REPO / "docs" / "deployment.md").read_text()
    for needle in ("[Service]", "proxy_buffering off", "proxy_read_timeout", ".backup", "VACUUM INTO",
                   "endpoint_url", "MEND_STORAGE_SECRET_ACCESS_KEY"):
        assert needle in guide, needle
