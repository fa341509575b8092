"""The hostile corpus through every registered operation of every family.

Each job on a hostile file fails with a sentence (no traceback, no "internal
error"); nothing reaches the canary server that the SVG and playlists point at; the
worker processes' peak memory stays bounded (a pixel bomb is refused from its
header); and a normal job submitted afterwards completes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mendsrv.ops import REGISTRY

from ..conftest import job_body, wait_for_job, write_jpeg
from .conftest import (
    Canary,
    Corpus,
    assert_failed_with_sentence,
    dest_key_for,
    operation_bodies,
    own_peak_rss_mb,
    submit,
    worker_peak_rss_mb,
)

PEAK_MB = 600  # per worker process; decoding one pixel bomb would need gigabytes
# Operations that read only a container's header: a file cut off after it is still described.
HEADER_ONLY = {"video/metadata", "audio/metadata"}
# ...which they may then describe: cut off after the header, or (bomb.png) a header whose
# size ffmpeg itself refuses to decode, so the size is not even reported.
HEADER_ONLY_MAY_READ = {"truncated.png", "truncated.jpg", "truncated.mp4", "bomb.png"}


async def test_hostile_media_every_operation_fails_with_a_sentence(
    corpus: Corpus, canary: Canary, config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    client = await client_factory(config_factory(workers={"processes": 2, "ffmpeg_jobs": 2, "max_attempts": 2}))
    own_peak_before = own_peak_rss_mb()
    media = buckets / "media"
    for name, data in corpus.files.items():
        (media / name).write_bytes(data)
    bodies = operation_bodies()
    assert bodies, "no operation accepted a minimal body"
    assert set(bodies) == set(REGISTRY), f"no minimal body for {set(REGISTRY) - set(bodies)}"
    submitted: list[tuple[str, str, str]] = []
    for op_name, params in sorted(bodies.items()):
        ext = dest_key_for(REGISTRY[op_name])
        for file_name in [*corpus.must_fail, "script.svg"]:
            body = job_body(file_name, f"out/{op_name}/{file_name}{ext}", **_with_source(op_name, params, file_name))
            submitted.append((op_name, file_name, await submit(client, op_name, body)))
    problems: list[str] = []
    for op_name, file_name, job_id in submitted:
        job = await wait_for_job(client, job_id, timeout=120)
        if file_name == "script.svg" and job["status"] == "completed":
            continue  # rendered without its script and external parts (checked below)
        if file_name in HEADER_ONLY_MAY_READ and op_name in HEADER_ONLY and job["status"] == "completed":
            continue  # reads the container's header only; the cut-off data is never touched
        try:
            error = assert_failed_with_sentence(job)
            assert job["attempts"] == 1, f"retried {job['attempts']} times: {error}"  # hostile input is not retried
            if file_name.startswith("bomb") and op_name.startswith("image/"):
                assert "limits.max_input_pixels" in error, error
            if file_name == "bomb-valid.png" and op_name.startswith("video/"):
                assert "limits.max_input_pixels" in error or "no audio" in error, error
        except AssertionError as exc:
            problems.append(f"{op_name} on {file_name}: {str(exc).splitlines()[0]}")
    assert not problems, "\n".join(problems)
    assert canary.hits == [], canary.hits  # no external reference was followed
    for path in media.rglob("out/**/*"):
        if path.is_file():
            assert b"root:x:0:0" not in path.read_bytes(), path
    peaks = worker_peak_rss_mb(os.getpid())
    assert peaks and max(peaks.values()) < PEAK_MB, peaks
    # the server process itself (probing runs here) did not grow by a decoded bomb either
    assert own_peak_rss_mb() - own_peak_before < 300, (own_peak_before, own_peak_rss_mb())
    # the server keeps serving: a normal job completes
    write_jpeg(media / "in.jpg", 320, 240)
    job = await wait_for_job(client, await submit(client, "image/resize", job_body(width=64)))
    assert job["status"] == "completed", job


async def test_hostile_media_wrong_extension_is_sniffed_or_refused(
    corpus: Corpus, config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    """Sound content under the wrong extension: read by its content, or refused with a sentence."""
    client = await client_factory(config_factory())
    media = buckets / "media"
    (media / "png-as.jpg").write_bytes(corpus.files["png-as.jpg"])
    (media / "jpeg.mp4").write_bytes(corpus.files["good.jpg"])
    if "clip.mp4" in corpus.files:
        (media / "video.jpg").write_bytes(corpus.files["clip.mp4"])
    bodies = operation_bodies()
    jobs = []
    for op_name, params in sorted(bodies.items()):
        for file_name in ("png-as.jpg", "jpeg.mp4", "video.jpg"):
            if not (media / file_name).exists():
                continue
            body = job_body(file_name, f"wrong/{op_name}/{file_name}{dest_key_for(REGISTRY[op_name])}",
                            **_with_source(op_name, params, file_name))
            jobs.append((op_name, file_name, await submit(client, op_name, body)))
    for op_name, file_name, job_id in jobs:
        job = await wait_for_job(client, job_id, timeout=120)
        if job["status"] != "completed":
            assert_failed_with_sentence(job)
        elif op_name.startswith("image/") and file_name == "png-as.jpg":
            assert job["result"]["outputs"][0]["size"] > 0


def _with_source(op_name: str, params: dict[str, Any], file_name: str) -> dict[str, Any]:
    """Extra sources (a watermark image) point at the hostile file too."""
    out = dict(params)
    for _, key_field in REGISTRY[op_name].extra_sources.values():
        if key_field in out:
            out[key_field] = file_name
    return out


def _svg(inner: str, doctype: str = "") -> bytes:
    return (
        f'<?xml version="1.0"?>{doctype}<svg xmlns="http://www.w3.org/2000/svg" '
        f'xmlns:xlink="http://www.w3.org/1999/xlink" width="32" height="32">{inner}'
        '<rect width="32" height="32" fill="blue"/></svg>'
    ).encode()


async def test_hostile_svg_each_trick_is_refused_by_name(
    canary: Canary, config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    client = await client_factory(config_factory())
    url = canary.url
    cases = {
        "script.svg": (_svg("<script>alert(1)</script>"), "script"),
        "onload.svg": (_svg(f'<g onload="fetch(\'{url}/onload\')"/>'), "script"),
        "xxe.svg": (_svg("<text>&x;</text>", '<!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'), "entities"),
        "billion.svg": (_svg("<text>&b;</text>", '<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'), "entities"),
        "href.svg": (_svg(f'<image href="{url}/image.png" width="8" height="8"/>'), "external"),
        "xlink.svg": (_svg('<image xlink:href="file:///etc/passwd" width="8" height="8"/>'), "external"),
        "css.svg": (_svg(f'<style>@import url("{url}/x.css");</style>'), "stylesheet"),
        "cssurl.svg": (_svg(f'<rect style="fill: url({url}/paint#p)" width="4" height="4"/>'), "external"),
    }
    ids = {}
    for name, (data, _) in cases.items():
        (buckets / "media" / name).write_bytes(data)
        ids[name] = await submit(client, "image/resize", job_body(name, f"svg/{name}.png", width=16))
    for name, job_id in ids.items():
        error = assert_failed_with_sentence(await wait_for_job(client, job_id))
        assert cases[name][1] in error, (name, error)
    assert canary.hits == []


async def test_hostile_media_second_sources_are_checked_too(
    corpus: Corpus, config_factory: Any, client_factory: Any, buckets: Path
) -> None:
    """A sound source with a hostile overlay (watermark image): the overlay meets the same limits."""
    ops = [op for op in REGISTRY.values() if op.extra_sources]
    assert ops, "image/watermark takes a second source"
    client = await client_factory(config_factory(limits={"max_source_bytes": 2_000_000}))
    media = buckets / "media"
    for name in ("good.jpg", "bomb-valid.png", "bomb.jpg", "truncated.png", "text.jpg", "zero.jpg"):
        (media / name).write_bytes(corpus.files[name])
    big = media / "big.bin"
    big.write_bytes(b"\0" * 3_000_000)
    expected = {
        "bomb-valid.png": "limits.max_input_pixels", "bomb.jpg": "limits.max_input_pixels",
        "big.bin": "limits.max_source_bytes", "truncated.png": "", "text.jpg": "", "zero.jpg": "",
    }
    for op in ops:
        for overlay, names in expected.items():
            params = {}
            for bucket_field, key_field in op.extra_sources.values():
                params |= {bucket_field: "media", key_field: overlay}
            job_id = await submit(client, op.name, job_body("good.jpg", f"overlay/{overlay}.png", **params))
            error = assert_failed_with_sentence(await wait_for_job(client, job_id))
            assert names in error, (op.name, overlay, error)
