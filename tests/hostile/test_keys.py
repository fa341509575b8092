"""Path-traversal keys on every storage backend: rejected at submission (400), or
taken literally and kept inside their bucket; symlinks cannot lead a local bucket
outside its directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mendsrv.ops import REGISTRY

from ..conftest import AUTH, job_body, wait_for_job
from .conftest import assert_failed_with_sentence, make_bucket, noise_jpeg

REJECTED = [
    "../etc/passwd", "a/../../b.jpg", "..", ".", "/etc/passwd", "a\\..\\b.jpg", "\\\\server\\share.jpg",
    "a/./b.jpg", "./a.jpg", "a/..", "nul\x00.jpg", "ctl\x1b[2J.jpg", "del\x7f.jpg", "c1\x85.jpg",
    "line\nbreak.jpg", "tab\t.jpg", "k" * 1025, "é" * 600,
]

# Legal keys that look like traversal once decoded or normalised: they must stay literal.
LITERAL = [
    "%2e%2e/x.jpg", "..%2f..%2fetc%2fpasswd.jpg", "%2E%2E%5Cwin.jpg", "%252e%252e/x.jpg",
    "\uff0e\uff0e/fullwidth.jpg", "\u2025/two-dot-leader.jpg", "a/..\u2215b.jpg", "....//x.jpg",
    "..a/b..c.jpg", "\u202egpj.exe.jpg", "spa ce/+plus&amp;?q=1#frag.jpg", "ü/ñ/日本.jpg",
]


def key_fields() -> list[tuple[str, str]]:
    """(operation, field) for every key-like field of every operation."""
    out = []
    for op in REGISTRY.values():
        for name in op.model.model_fields:
            if name.endswith("_key"):
                out.append((op.name, name))
    return out


async def test_keys_traversal_rejected_for_every_key_field(client: Any) -> None:
    for op_name, field in key_fields():
        for key in REJECTED:
            body = job_body(width=10) | {field: key}
            resp = await client.post(f"/api/v1/jobs/{op_name}", json=body, headers=AUTH)
            assert resp.status == 400, (op_name, field, key, resp.status)
            answer = await resp.json()
            assert any(d["field"] == field for d in answer.get("details", [])), (op_name, field, key, answer)
    for bucket in ("..", ".", "a/b", "../media", "", "a\\b", "-x", "b" * 64):
        resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=10) | {"source_bucket": bucket}, headers=AUTH)
        assert resp.status == 400, bucket


def _files_outside(root: Path, inside: list[Path]) -> set[str]:
    found = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if not any(path.is_relative_to(i) for i in inside):
                found.add(str(path))
    return found


async def test_keys_literal_on_local_storage_stay_in_the_bucket(client: Any, buckets: Path, tmp_path: Path) -> None:
    jpeg = noise_jpeg(64, 48)
    before = _files_outside(tmp_path, [buckets, tmp_path / "tmp"])
    ids = {}
    for i, key in enumerate(LITERAL):
        src = buckets / "media" / key
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(jpeg)
        resp = await client.post(
            "/api/v1/jobs/image/resize", json=job_body(key, f"out{i}/{key}", width=16), headers=AUTH
        )
        assert resp.status == 202, (key, await resp.text())
        ids[key] = (i, (await resp.json())["job_id"])
    for key, (i, job_id) in ids.items():
        job = await wait_for_job(client, job_id)
        assert job["status"] == "completed", (key, job["error"])
        out = job["result"]["outputs"][0]
        assert out["key"] == f"out{i}/{key}"
        written = (buckets / "media" / f"out{i}" / key).resolve()
        assert written.is_file() and written.is_relative_to((buckets / "media").resolve())
    after = _files_outside(tmp_path, [buckets, tmp_path / "tmp"])
    assert after - before <= {str(p) for p in tmp_path.glob("mend.db*")}


async def test_keys_symlinks_cannot_leave_a_local_bucket(client: Any, buckets: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(noise_jpeg(64, 48))
    (buckets / "media" / "link.jpg").symlink_to(secret)
    (buckets / "media" / "in.jpg").write_bytes(noise_jpeg(64, 48))
    (buckets / "media" / "outdir").symlink_to(outside, target_is_directory=True)
    (buckets / "evil").symlink_to(outside, target_is_directory=True)
    cases = [
        job_body("link.jpg", "copy.jpg", width=16),  # source symlink pointing out
        job_body("in.jpg", "outdir/planted.jpg", width=16),  # dest through a symlinked directory
        job_body("secret.jpg", "x.jpg", bucket="evil", width=16),  # a bucket that is a symlink
        job_body("in.jpg", "x.jpg", width=16) | {"dest_bucket": "evil"},
    ]
    for body in cases:
        resp = await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)
        assert resp.status == 202
        job = await wait_for_job(client, (await resp.json())["job_id"])
        error = assert_failed_with_sentence(job)
        assert "escapes" in error or "not found" in error, error
    assert sorted(p.name for p in outside.iterdir()) == ["secret.jpg"]
    assert not (buckets / "media" / "copy.jpg").exists()


async def test_keys_literal_on_s3_stay_literal(
    config_factory: Any, client_factory: Any, s3_config: dict[str, Any], s3_client: Any
) -> None:
    bucket = make_bucket(s3_client, "keys")
    client = await client_factory(config_factory(storage=s3_config))
    jpeg = noise_jpeg(64, 48)
    ids = {}
    for i, key in enumerate(LITERAL):
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg)
        resp = await client.post(
            "/api/v1/jobs/image/resize", json=job_body(key, f"out{i}/{key}", bucket=bucket, width=16), headers=AUTH
        )
        assert resp.status == 202, (key, await resp.text())
        ids[key] = (i, (await resp.json())["job_id"])
    for key, (i, job_id) in ids.items():
        job = await wait_for_job(client, job_id)
        assert job["status"] == "completed", (key, job["error"])
        s3_client.head_object(Bucket=bucket, Key=f"out{i}/{key}")
    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, MaxKeys=1000).get("Contents", [])}
    assert listed == set(LITERAL) | {f"out{i}/{k}" for k, (i, _) in ids.items()}
    # a traversal key never reaches S3 either: refused at submission
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body("../x.jpg", bucket=bucket, width=1), headers=AUTH)
    assert resp.status == 400


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_keys_missing_source_is_a_sentence(
    backend: str, config_factory: Any, client_factory: Any, buckets: Path, s3_config: dict[str, Any], s3_client: Any
) -> None:
    storage = s3_config if backend == "s3" else {}
    bucket = make_bucket(s3_client, "missing") if backend == "s3" else "media"
    client = await client_factory(config_factory(storage=storage))
    resp = await client.post(
        "/api/v1/jobs/image/resize", json=job_body("%2e%2e/nothing.jpg", bucket=bucket, width=1), headers=AUTH
    )
    job = await wait_for_job(client, (await resp.json())["job_id"])
    error = assert_failed_with_sentence(job)
    assert f"{bucket}/%2e%2e/nothing.jpg" in error and "not found" in error
    assert job["attempts"] == 1
