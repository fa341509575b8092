"""Video and audio jobs through the HTTP API: progress, cancel, timeout, HLS uploads and
refused playlist sources."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.av_media import ffmpeg_children, make_video
from tests.conftest import AUTH, job_body, wait_for_job
from tests.test_ops_video import _Receiver
from tests.test_sse import open_stream

SLOW = {"video_codec": "h265", "preset": "veryslow"}  # minutes for the 10 s clip on 2 threads


@pytest.fixture
def long_clip(buckets: Path) -> Path:
    return make_video(buckets / "media" / "long.mp4", seconds=10)


async def _submit(client: Any, operation: str, body: dict[str, Any]) -> str:
    resp = await client.post(f"/api/v1/jobs/{operation}", json=body, headers=AUTH)
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["job_id"])


async def _processing_with_ffmpeg(client: Any, job_id: str, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await (await client.get(f"/api/v1/jobs/{job_id}", headers=AUTH)).json()
        pids = ffmpeg_children()
        if job["status"] == "processing" and pids and job["progress"] > 11:
            return pids
        assert job["status"] in ("pending", "processing"), job
        await asyncio.sleep(0.05)
    raise AssertionError("the job never got an ffmpeg running")


async def test_video_job_progress_increases_while_ffmpeg_runs(
    config_factory: Any, client_factory: Any, long_clip: Path
) -> None:
    # about 4 s of one core: the pool stores progress at most every 0.5 s
    client = await client_factory(config_factory(workers={"ffmpeg_threads": 1}))
    job_id = await _submit(client, "video/transcode", job_body("long.mp4", "out.mkv", preset="veryslow"))
    seen: list[float] = []
    while True:
        job = await (await client.get(f"/api/v1/jobs/{job_id}", headers=AUTH)).json()
        if job["status"] == "processing" and (not seen or job["progress"] != seen[-1]):
            seen.append(job["progress"])
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "completed", job["error"]
    assert seen == sorted(seen)
    assert len([p for p in seen if 10 < p < 90]) >= 3, seen
    (output,) = job["result"]["outputs"]
    assert output["key"] == "out.mkv" and output["video_codec"] == "h264"


async def test_video_job_sse_subscriber_sees_increasing_progress(
    config_factory: Any, client_factory: Any, long_clip: Path
) -> None:
    client = await client_factory(config_factory(workers={"ffmpeg_threads": 1}))
    job_id = await _submit(client, "video/transcode", job_body("long.mp4", "out.mp4", preset="veryslow"))
    events = await (await open_stream(client, job_id, last_event_id=0)).until_end(timeout=120)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    progress = [e["data"]["progress"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress)
    assert len({p for p in progress if 10 < p < 90}) >= 3, progress
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "completed"


async def test_video_job_cancel_kills_ffmpeg_within_two_seconds(
    config_factory: Any, client_factory: Any, long_clip: Path
) -> None:
    client = await client_factory(config_factory(workers={"ffmpeg_threads": 2}))
    job_id = await _submit(client, "video/transcode", job_body("long.mp4", "out.mkv", **SLOW))
    pids = await _processing_with_ffmpeg(client, job_id)
    started = time.monotonic()
    resp = await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert resp.status == 200
    job = await wait_for_job(client, job_id, timeout=2)
    assert job["status"] == "cancelled"
    while ffmpeg_children() and time.monotonic() - started < 2:
        await asyncio.sleep(0.02)
    assert time.monotonic() - started < 2
    assert ffmpeg_children() == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


async def test_video_job_over_the_timeout_fails_naming_the_limit(
    config_factory: Any, client_factory: Any, long_clip: Path
) -> None:
    client = await client_factory(config_factory(workers={"ffmpeg_threads": 2, "job_timeout_s": 1.5, "max_attempts": 1}))
    job_id = await _submit(client, "video/transcode", job_body("long.mp4", "out.mkv", **SLOW))
    job = await wait_for_job(client, job_id, timeout=15)
    assert job["status"] == "failed"
    assert "workers.job_timeout_s" in job["error"]
    assert ffmpeg_children() == []


async def test_hls_job_uploads_the_ladder_beside_the_master(
    config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    make_video(buckets / "media" / "wide.mp4", seconds=3, size="640x360")
    client = await client_factory(config_factory())
    job_id = await _submit(
        client, "video/hls",
        job_body("wide.mp4", "vod/7/master.m3u8", renditions=[360, 240], segment_duration=1, preset="ultrafast"),
    )
    job = await wait_for_job(client, job_id)
    assert job["status"] == "completed", job["error"]
    outputs = job["result"]["outputs"]
    assert outputs[0]["key"] == "vod/7/master.m3u8"
    assert outputs[0]["content_type"] == "application/vnd.apple.mpegurl"
    keys = {o["key"] for o in outputs}
    assert {"vod/7/master_360p.m3u8", "vod/7/master_240p.m3u8"} <= keys
    assert len([k for k in keys if k.endswith(".ts")]) == 6
    for key in keys:
        assert (buckets / "media" / key).stat().st_size > 0
    master = (buckets / "media" / "vod/7/master.m3u8").read_text()
    for name in ("master_360p.m3u8", "master_240p.m3u8"):
        assert name in master
    assert [r["name"] for r in job["result"]["renditions"]] == ["360p", "240p"]


async def test_playlist_source_job_fails_and_nothing_is_fetched(
    config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    receiver = _Receiver()
    try:
        (buckets / "media" / "evil.mp4").write_text(
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n"
            f"#EXTINF:2,\n{receiver.url}/seg.ts\n#EXTINF:2,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
        )
        client = await client_factory(config_factory())
        ids = [
            await _submit(client, "video/transcode", job_body("evil.mp4", "o.mp4")),
            await _submit(client, "audio/waveform", job_body("evil.mp4", "o.json")),
        ]
        for job_id in ids:
            job = await wait_for_job(client, job_id)
            assert job["status"] == "failed"
            assert "HLS playlist" in job["error"] and "self-contained" in job["error"]
        await asyncio.sleep(0.2)
        assert receiver.requests == []
    finally:
        receiver.close()


async def test_audio_metadata_job_returns_the_probe(
    config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    make_video(buckets / "media" / "clip.mp4", seconds=2)
    client = await client_factory(config_factory())
    job_id = await _submit(client, "audio/metadata", job_body("clip.mp4", "meta/clip.json"))
    job = await wait_for_job(client, job_id)
    assert job["status"] == "completed", job["error"]
    written = json.loads((buckets / "media" / "meta/clip.json").read_text())
    assert job["result"]["metadata"] == written
    assert job["result"]["outputs"][0]["content_type"] == "application/json"
