"""S3 faults through a real reverse proxy in front of the moto server: the endpoint
down, slow, resetting connections, answering 500 or 503. The storage client retries
a bounded number of times with backoff (storage.max_retries); the job is then run
again up to workers.max_attempts and finally fails with a sentence. When the
endpoint recovers meanwhile, the job completes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ..conftest import job_body, wait_for_job
from .conftest import FaultProxy, assert_failed_with_sentence, make_bucket, noise_jpeg, submit

ATTEMPTS = 2  # workers.max_attempts in these tests
STORAGE_TRIES = 2  # storage.max_retries = 1: one try and one retry per attempt


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    bucket = make_bucket(s3_client, "faults")
    s3_client.put_object(Bucket=bucket, Key="in.jpg", Body=noise_jpeg(320, 240))
    return bucket


async def _client(client_factory: Any, config_factory: Any, storage: dict[str, Any], **workers: Any) -> Any:
    cfg = config_factory(storage=storage, workers={"max_attempts": ATTEMPTS, "retry_base_s": 0.05} | workers)
    return await client_factory(cfg)


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("503", "ServiceUnavailable"),
        ("500", "InternalError"),
        ("reset", "reset the connection"),
        ("down", "could not be reached"),
    ],
)
async def test_s3_fault_retried_then_failed_with_a_sentence(
    mode: str, says: str, fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any],
    s3_bucket: str, client_factory: Any, config_factory: Any,
) -> None:
    client = await _client(client_factory, config_factory, proxied_s3_config)
    await fault_proxy.set_mode(mode)
    started = time.monotonic()
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, width=32))
    job = await wait_for_job(client, job_id, timeout=60)
    error = assert_failed_with_sentence(job)
    assert f"source object {s3_bucket}/in.jpg" in error and says in error, error
    assert f"after {ATTEMPTS} attempts" in error and "retries" in error
    assert job["attempts"] == ATTEMPTS
    if mode in ("500", "503"):  # bounded: storage tries × job attempts, no more
        assert fault_proxy.requests(mode) == STORAGE_TRIES * ATTEMPTS, fault_proxy.log
    elif mode == "reset":  # the HTTP client may resend once on a reused connection that was reset
        assert STORAGE_TRIES * ATTEMPTS <= fault_proxy.requests(mode) <= 2 * STORAGE_TRIES * ATTEMPTS
    assert time.monotonic() - started < 45
    # the endpoint recovers: the same job, retried by the user, completes
    await fault_proxy.set_mode("pass")
    resp = await client.post(f"/api/v1/jobs/{job_id}/retry", headers={"X-API-Key": "test-key"})
    assert resp.status == 202
    assert (await wait_for_job(client, job_id, timeout=30))["status"] == "completed"


async def test_s3_fault_transient_errors_are_absorbed(
    fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any, s3_client: Any,
) -> None:
    """Three faults in a row: the storage retry absorbs some, the job retry the rest; it completes."""
    client = await _client(client_factory, config_factory, proxied_s3_config, max_attempts=3)
    await fault_proxy.set_mode("503", count=3)
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, dest_key="ok.jpg", width=32))
    job = await wait_for_job(client, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert job["attempts"] == 2 and job["error"] is None
    assert fault_proxy.requests("503") == 3
    s3_client.head_object(Bucket=s3_bucket, Key="ok.jpg")


async def test_s3_fault_upload_500_leaves_no_object(
    fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any, s3_client: Any,
) -> None:
    """GETs pass, every PUT fails: the job fails naming the output object; nothing half-written."""
    client = await _client(client_factory, config_factory, proxied_s3_config)
    await fault_proxy.set_mode("500", methods={"PUT", "POST"})
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, dest_key="never.jpg", width=32))
    job = await wait_for_job(client, job_id, timeout=60)
    error = assert_failed_with_sentence(job)
    assert f"output object {s3_bucket}/never.jpg" in error and "InternalError" in error
    with pytest.raises(s3_client.exceptions.ClientError):
        s3_client.head_object(Bucket=s3_bucket, Key="never.jpg")


async def test_s3_fault_slow_within_timeout_completes(
    fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any,
) -> None:
    client = await _client(client_factory, config_factory, proxied_s3_config | {"read_timeout_s": 5.0})
    await fault_proxy.set_mode("slow", delay_s=0.3)
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, dest_key="slow.jpg", width=32))
    job = await wait_for_job(client, job_id, timeout=30)
    assert job["status"] == "completed" and job["attempts"] == 1, job


async def test_s3_fault_slower_than_read_timeout_fails(
    fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any,
) -> None:
    client = await _client(client_factory, config_factory, proxied_s3_config | {"read_timeout_s": 0.3})
    await fault_proxy.set_mode("slow", delay_s=3.0)
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, width=32))
    job = await wait_for_job(client, job_id, timeout=60)
    error = assert_failed_with_sentence(job)
    assert "storage.read_timeout_s" in error and f"after {ATTEMPTS} attempts" in error


async def test_s3_fault_slow_past_the_job_timeout(
    fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any,
) -> None:
    """workers.job_timeout_s bounds a whole run, however patient the storage client is."""
    client = await _client(
        client_factory, config_factory, proxied_s3_config | {"read_timeout_s": 30.0}, job_timeout_s=0.5
    )
    await fault_proxy.set_mode("slow", delay_s=5.0)
    started = time.monotonic()
    job_id = await submit(client, "image/resize", job_body(bucket=s3_bucket, width=32))
    job = await wait_for_job(client, job_id, timeout=30)
    error = assert_failed_with_sentence(job, names="workers.job_timeout_s")
    assert "0.5 s" in error
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("mode", ["down", "503", "slow"])
async def test_s3_fault_health_reports_storage_then_recovers(
    mode: str, fault_proxy: FaultProxy, proxied_s3_config: dict[str, Any], s3_bucket: str,
    client_factory: Any, config_factory: Any,
) -> None:
    """GET /health names the storage while the endpoint is faulty, and is 200 again once it is not."""
    client = await _client(client_factory, config_factory, proxied_s3_config)
    assert (await client.get("/health")).status == 200
    await fault_proxy.set_mode(mode, delay_s=20.0)
    await asyncio.sleep(1.6)  # past the health cache
    started = time.monotonic()
    resp = await client.get("/health")
    assert resp.status == 503
    report = await resp.json()
    assert report["checks"]["storage"]["status"] == "fail" and "storage" in report["error"], report
    assert time.monotonic() - started < 10  # a hanging endpoint does not hang /health
    await fault_proxy.set_mode("pass")
    deadline = time.monotonic() + 15
    while (resp := await client.get("/health")).status != 200:
        assert time.monotonic() < deadline, await resp.text()
        await asyncio.sleep(0.3)
