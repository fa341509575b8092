"""DESIGN §4: every limit is enforced, and a job or request stopped by one gets a
sentence naming the limit's configuration key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mendsrv.ops import REGISTRY

from ..conftest import AUTH, job_body, wait_for_job, write_jpeg
from .conftest import (
    animated_gif,
    assert_failed_with_sentence,
    make_bucket,
    operation_bodies,
    png_bomb,
    sine_wav,
    submit,
    worker_peak_rss_mb,
)


def one_op_per_family() -> list[str]:
    bodies = operation_bodies()
    chosen: dict[str, str] = {}
    for name in bodies:
        chosen.setdefault(name.split("/")[0], name)
    return sorted(chosen.values())


async def test_limit_max_source_bytes_local_every_family(
    config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    client = await client_factory(config_factory(limits={"max_source_bytes": 4096}))
    write_jpeg(buckets / "media" / "big.jpg", 400, 300)
    bodies = operation_bodies()
    ids = []
    for name in one_op_per_family():
        ids.append(await submit(client, name, job_body("big.jpg", "out-" + name.replace("/", "-"), **bodies[name])))
    for job_id in ids:
        job = await wait_for_job(client, job_id)
        error = assert_failed_with_sentence(job, names="limits.max_source_bytes")
        assert "media/big.jpg" in error and "4096" in error
        assert job["attempts"] == 1  # a limit is not retried


async def test_limit_max_source_bytes_s3_stops_the_download(
    config_factory: Any, client_factory: Any, s3_config: dict[str, Any], s3_client: Any
) -> None:
    bucket = make_bucket(s3_client, "limits")
    s3_client.put_object(Bucket=bucket, Key="big.bin", Body=b"\0" * 300_000)
    client = await client_factory(config_factory(storage=s3_config, limits={"max_source_bytes": 100_000}))
    job_id = await submit(client, "image/resize", job_body("big.bin", "out.png", bucket=bucket, width=10))
    job = await wait_for_job(client, job_id)
    error = assert_failed_with_sentence(job, names="limits.max_source_bytes")
    assert "300000" in error
    with pytest.raises(s3_client.exceptions.ClientError):
        s3_client.head_object(Bucket=bucket, Key="out.png")


async def test_limit_max_input_pixels_checked_from_the_header(
    config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    """A 2.5-gigapixel PNG of 400 bytes is refused before decoding: the worker stays small."""
    import os

    client = await client_factory(config_factory())
    (buckets / "media" / "bomb.png").write_bytes(png_bomb(50_000, 50_000))
    assert (buckets / "media" / "bomb.png").stat().st_size < 10_000
    job_id = await submit(client, "image/resize", job_body("bomb.png", "out.png", width=100))
    job = await wait_for_job(client, job_id)
    error = assert_failed_with_sentence(job, names="limits.max_input_pixels")
    assert "50000×50000" in error and "100 megapixel" in error
    peaks = worker_peak_rss_mb(os.getpid())
    assert peaks and max(peaks.values()) < 400, peaks  # decoding it would take 2.5 GB


async def test_limit_max_output_pixels(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(limits={"max_output_pixels": 1_000_000}))
    write_jpeg(buckets / "media" / "in.jpg", 200, 100)
    job_id = await submit(client, "image/resize", job_body(width=4000, height=2000, enlarge=True))
    error = assert_failed_with_sentence(await wait_for_job(client, job_id), names="limits.max_output_pixels")
    assert "4000×2000" in error
    assert not (buckets / "media" / "out.jpg").exists()


async def test_limit_max_frames(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(limits={"max_frames": 5}))
    (buckets / "media" / "anim.gif").write_bytes(animated_gif(8))
    job_id = await submit(client, "image/resize", job_body("anim.gif", "out.gif", width=16))
    error = assert_failed_with_sentence(await wait_for_job(client, job_id), names="limits.max_frames")
    assert "8 frames" in error


async def test_limit_max_duration_s(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    client = await client_factory(config_factory(limits={"max_duration_s": 1.0}))
    (buckets / "media" / "long.wav").write_bytes(sine_wav(3.0))
    bodies = operation_bodies()
    names = [n for n in bodies if n.split("/")[0] == "audio"][:2] or [n for n in bodies if n.startswith("video/")][:1]
    for name in names:
        job_id = await submit(client, name, job_body("long.wav", "out-" + name.replace("/", "-"), **bodies[name]))
        error = assert_failed_with_sentence(await wait_for_job(client, job_id), names="limits.max_duration_s")
        assert "3 s" in error, error


async def test_limit_max_queue_answers_429(config_factory: Any, client_factory: Any, buckets: Path) -> None:
    """Past limits.max_queue pending jobs, a submission gets 429 with a sentence; the accepted ones run."""
    client = await client_factory(config_factory(limits={"max_queue": 3}))
    write_jpeg(buckets / "media" / "in.jpg", 1200, 900)
    resps = await asyncio.gather(
        *(client.post("/api/v1/jobs/image/resize", json=job_body(dest_key=f"o{i}.jpg", width=300), headers=AUTH)
          for i in range(25))
    )
    statuses = [r.status for r in resps]
    assert set(statuses) <= {202, 429}, statuses
    assert statuses.count(429) >= 10, statuses  # 3 pending + at most a few claimed meanwhile
    refused = next(r for r in resps if r.status == 429)
    assert refused.content_type == "application/json"
    assert "limits.max_queue" in (await refused.json())["error"]
    accepted = [(await r.json())["job_id"] for r in resps if r.status == 202]
    for job_id in accepted:
        assert (await wait_for_job(client, job_id))["status"] == "completed"
    # the queue drained: submissions are accepted again
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=10), headers=AUTH)
    assert resp.status == 202


async def test_limit_body_size_answers_413(config_factory: Any, client_factory: Any) -> None:
    client = await client_factory(config_factory(server={"max_body_bytes": 4096}))
    big = b'{"source_bucket": "' + b"a" * 10_000 + b'"}'
    resp = await client.post("/api/v1/jobs/image/resize", data=big, headers=AUTH | {"Content-Type": "application/json"})
    assert resp.status == 413
    assert "server.max_body_bytes" in (await resp.json())["error"]

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"x" * 1000

    resp = await client.post("/api/v1/jobs/image/resize", data=chunks(), headers=AUTH)
    assert resp.status == 413
    assert "server.max_body_bytes" in (await resp.json())["error"]
    resp = await client.get("/api/v1/jobs", headers=AUTH)
    assert resp.status == 200


def test_limits_every_limit_has_a_configuration_key() -> None:
    from mendsrv.config import LimitsConfig, ServerConfig, WorkersConfig

    for key in ("max_source_bytes", "max_input_pixels", "max_output_pixels", "max_frames", "max_duration_s", "max_queue"):
        assert key in LimitsConfig.model_fields
    assert "max_body_bytes" in ServerConfig.model_fields and "job_timeout_s" in WorkersConfig.model_fields
    assert REGISTRY  # operations are registered


@pytest.mark.parametrize(
    ("name", "params", "limits", "key"),
    [
        ("video/preview", {"fps": 10, "duration": 1}, {"max_frames": 5}, "limits.max_frames"),
        ("video/metadata", {}, {"max_duration_s": 0.5}, "limits.max_duration_s"),
        ("video/transcode", {}, {"max_duration_s": 0.5}, "limits.max_duration_s"),
        ("video/thumbnail", {}, {"max_input_pixels": 1000}, "limits.max_input_pixels"),
        ("video/transcode", {"width": 4000, "height": 3000}, {"max_output_pixels": 100_000}, "limits.max_output_pixels"),
    ],
)
async def test_limit_video_limits_name_their_keys(
    name: str, params: dict[str, Any], limits: dict[str, Any], key: str,
    config_factory: Any, client_factory: Any, buckets: Path, corpus_bytes: dict[str, bytes],
) -> None:
    """Video: frames, duration, input and output size each stop the job with the key's name."""
    assert "clip.mp4" in corpus_bytes and name in REGISTRY
    client = await client_factory(config_factory(limits=limits))
    (buckets / "media" / "clip.mp4").write_bytes(corpus_bytes["clip.mp4"])
    ext = {"video/preview": ".gif", "video/metadata": ".json", "video/thumbnail": ".jpg"}.get(name, ".mp4")
    job_id = await submit(client, name, job_body("clip.mp4", "v/out" + ext, **params))
    job = await wait_for_job(client, job_id, timeout=60)
    if key == "limits.max_output_pixels" and job["status"] == "completed":
        out = job["result"]["outputs"][0]
        assert out["width"] * out["height"] <= 100_000, out  # it kept to the source size instead
        return
    assert_failed_with_sentence(job, names=key)
