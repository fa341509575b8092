"""Object storage: local directory buckets or S3 (aiobotocore).

Sources are streamed to temp files and outputs streamed from them; no whole large
object is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from .config import StorageConfig
from .errors import JobFailed, SourceNotFound, StorageError
from .ops.base import check_bucket, check_key

log = logging.getLogger("mendsrv.storage")

CHUNK = 1024 * 1024
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024


class TooLarge(JobFailed):
    """The source object is over limits.max_source_bytes."""


def too_large(bucket: str, key: str, size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"source object {bucket}/{key} is {size} bytes, over the {limit} byte limit (limits.max_source_bytes)"
    )


class Storage(Protocol):
    async def download(self, bucket: str, key: str, dest: str, max_bytes: int) -> int: ...
    async def upload(self, bucket: str, key: str, src: str, content_type: str) -> int: ...
    async def check(self) -> None: ...
    async def close(self) -> None: ...


class LocalStorage:
    """One directory per bucket under ``root``. Writes are temp file + rename."""

    def __init__(self, root: str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, bucket: str, key: str) -> Path:
        check_bucket(bucket)
        check_key(key)
        base = (self.root / bucket).resolve()
        target = (base / key).resolve()
        if base != self.root / bucket or not target.is_relative_to(base):
            raise JobFailed(f"key {key} escapes bucket {bucket}")
        return target

    async def download(self, bucket: str, key: str, dest: str, max_bytes: int) -> int:
        return await asyncio.to_thread(self._download, bucket, key, dest, max_bytes)

    def _download(self, bucket: str, key: str, dest: str, max_bytes: int) -> int:
        src = self.path(bucket, key)
        try:
            size = src.stat().st_size
            if not src.is_file():
                raise FileNotFoundError
        except FileNotFoundError:
            raise SourceNotFound(f"source object {bucket}/{key} not found") from None
        if size > max_bytes:
            raise too_large(bucket, key, size, max_bytes)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        try:
            os.link(src, dest)  # same filesystem: no copy at all
        except OSError:
            _copy(str(src), dest)
        return size

    async def upload(self, bucket: str, key: str, src: str, content_type: str) -> int:
        return await asyncio.to_thread(self._upload, bucket, key, src)

    def _upload(self, bucket: str, key: str, src: str) -> int:
        target = self.path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".mend-", suffix=".part")
        os.close(fd)
        try:
            _copy(src, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise StorageError(
                    f"no room to write output object {bucket}/{key} under storage.root: {exc.strerror or exc}"
                ) from None
            raise
        return target.stat().st_size

    async def check(self) -> None:
        def probe() -> None:
            if not self.root.is_dir():
                raise StorageError(f"storage root {self.root} is not a directory")
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".mend-health-")
            os.close(fd)
            os.unlink(tmp)

        await asyncio.to_thread(probe)

    async def close(self) -> None:
        return None


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


class S3Storage:
    """S3 through aiobotocore: streamed downloads, multipart uploads, retries."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        session = get_session()
        kwargs: dict[str, Any] = {"region_name": self.cfg.region}
        if self.cfg.endpoint_url:
            kwargs["endpoint_url"] = self.cfg.endpoint_url
        if self.cfg.access_key_id:
            kwargs["aws_access_key_id"] = self.cfg.access_key_id
            kwargs["aws_secret_access_key"] = self.cfg.secret_access_key
        config = AioConfig(
            retries={"total_max_attempts": self.cfg.max_retries + 1, "mode": "standard"},
            connect_timeout=self.cfg.connect_timeout_s,
            read_timeout=self.cfg.read_timeout_s,
            s3={"addressing_style": "path"} if self.cfg.endpoint_url else None,
            max_pool_connections=50,
        )
        self._client = await self._stack.enter_async_context(session.create_client("s3", config=config, **kwargs))

    async def close(self) -> None:
        await self._stack.aclose()

    def _fail(self, exc: Exception, what: str) -> JobFailed:
        code = _error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return SourceNotFound(f"{what} not found")
        if code == "NoSuchBucket":
            return SourceNotFound(f"{what}: bucket does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{what}: access denied by the storage service ({code})")
        if code:
            return StorageError(f"{what}: the storage service failed after {self.cfg.max_retries} retries ({code})")
        return StorageError(f"{what}: {_connection_trouble(exc)} after {self.cfg.max_retries} retries")

    async def download(self, bucket: str, key: str, dest: str, max_bytes: int) -> int:
        what = f"source object {bucket}/{key}"
        try:
            resp = await self._client.get_object(Bucket=bucket, Key=key)
            size = int(resp.get("ContentLength") or 0)
            if size > max_bytes:
                resp["Body"].close()
                raise too_large(bucket, key, size, max_bytes)
            written = 0
            async with resp["Body"] as body:
                with open(dest, "wb") as fh:
                    while chunk := await body.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise too_large(bucket, key, written, max_bytes)
                        fh.write(chunk)
            return written
        except JobFailed:
            raise
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise temp_dir_full(dest, exc) from None
            raise self._fail(exc, what) from None
        except Exception as exc:
            raise self._fail(exc, what) from None

    async def upload(self, bucket: str, key: str, src: str, content_type: str) -> int:
        size = os.path.getsize(src)
        what = f"output object {bucket}/{key}"
        try:
            if size < MULTIPART_THRESHOLD:
                data = await asyncio.to_thread(Path(src).read_bytes)
                await self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            else:
                await self._multipart(bucket, key, src, content_type)
        except JobFailed:
            raise
        except Exception as exc:
            raise self._fail(exc, what) from None
        return size

    async def _multipart(self, bucket: str, key: str, src: str, content_type: str) -> None:
        mp = await self._client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)
        upload_id = mp["UploadId"]
        parts = []
        try:
            with open(src, "rb") as fh:
                number = 1
                while True:
                    chunk = await asyncio.to_thread(fh.read, PART_SIZE)
                    if not chunk:
                        break
                    resp = await self._client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"ETag": resp["ETag"], "PartNumber": number})
                    number += 1
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    async def check(self) -> None:
        try:
            await asyncio.wait_for(self._client.list_buckets(), timeout=self.cfg.connect_timeout_s + 2)
        except Exception as exc:
            raise StorageError(f"S3 endpoint unreachable: {_error_code(exc) or type(exc).__name__}") from None


DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def temp_dir_full(path: str, exc: OSError) -> StorageError:
    """A write to the staging directory failed for lack of room (retried like any storage fault)."""
    where = os.path.dirname(os.path.dirname(os.path.dirname(path))) or path
    return StorageError(
        f"no room to stage the job's files in the temp directory {where} (storage.temp_dir): "
        f"{exc.strerror or exc}"
    )


def _connection_trouble(exc: Exception) -> str:
    """A sentence for a failure that carried no S3 error code (the request got no answer)."""
    name = type(exc).__name__
    inner = getattr(exc, "kwargs", {}).get("error")
    if name == "EndpointConnectionError" and inner is not None and "Connector" not in type(inner).__name__:
        return "the storage service reset the connection"  # connected, then dropped mid-request
    if name in ("EndpointConnectionError", "ConnectTimeoutError"):
        return "the storage endpoint could not be reached (storage.endpoint_url)"
    if name in ("ReadTimeoutError",):
        return "the storage service did not answer in time (storage.read_timeout_s)"
    if name in ("ConnectionClosedError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError"):
        return "the storage service closed the connection"
    return f"the storage service failed ({name})"


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


async def open_storage(cfg: StorageConfig) -> Storage:
    if cfg.backend == "local":
        return LocalStorage(cfg.root)
    storage = S3Storage(cfg)
    await storage.start()
    return storage
