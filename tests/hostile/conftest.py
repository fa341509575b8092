"""Fixtures of the hostile-input and fault suite.

The corpus is generated here, at test time (nothing large is committed): pixel
bombs whose headers claim gigapixels in a few hundred bytes, truncated and
zero-byte files, text under an image extension, SVG with script and external
references, playlists and concat scripts pointing outside, a long audio file.

``fault_proxy`` is a real aiohttp reverse proxy on 127.0.0.1 in front of the moto
S3 server that a test switches between ``pass``, ``down``, ``slow``, ``reset``,
``500`` and ``503``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import socket
import struct
import subprocess
import wave
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, ClientTimeout, web
from yarl import URL

from mendsrv.ops import REGISTRY
from mendsrv.ops.base import Operation

from ..conftest import AUTH, free_port, wait_for_job

# --- a corpus of hostile files ----------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims width×height 8-bit grey pixels; a few rows of data follow."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)  # four zero rows; the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def png_bomb_complete(side: int = 12_000) -> bytes:
    """A complete, valid side×side grey PNG (144 MP at the default) of about 1 MB: it decodes."""
    comp = zlib.compressobj(1)
    row = b"\0" * (side + 1)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def jpeg_bomb(jpeg: bytes, width: int = 60_000, height: int = 60_000) -> bytes:
    """A small real JPEG whose frame header (SOF) is patched to claim width×height."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data) - 9:
        if data[i] != 0xFF:
            raise ValueError("not a JPEG marker")
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker")


def noise_jpeg(width: int = 640, height: int = 480) -> bytes:
    import pyvips

    return bytes(pyvips.Image.gaussnoise(width, height).cast("uchar").bandjoin([90, 200]).jpegsave_buffer(Q=90))


def small_png(width: int = 320, height: int = 240) -> bytes:
    import pyvips

    image = pyvips.Image.xyz(width, height).extract_band(0).cast("uchar").bandjoin([40, 220])
    return bytes(image.pngsave_buffer())


def animated_gif(frames: int, size: int = 32) -> bytes:
    import pyvips

    pages = [pyvips.Image.black(size, size).add(i * 20).cast("uchar") for i in range(frames)]
    strip = pyvips.Image.arrayjoin(pages, across=1)
    strip = strip.copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    return bytes(strip.gifsave_buffer())


def svg_hostile(canary: str) -> bytes:
    """SVG with a script, an external entity (XXE) and external image references."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64" height="64">
  <script type="text/javascript">fetch("{canary}/script");</script>
  <image href="{canary}/image.png" width="64" height="64"/>
  <image xlink:href="file:///etc/passwd" width="64" height="64"/>
  <use xlink:href="{canary}/sprite.svg#x"/>
  <text x="1" y="20">&xxe;</text>
  <rect width="64" height="64" fill="red"/>
</svg>
""".encode()


def hls_outside(canary: str) -> bytes:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n"
        f"#EXTINF:10.0,\n{canary}/segment0.ts\n#EXTINF:10.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    ).encode()


def ffconcat_outside() -> bytes:
    return b"ffconcat version 1.0\nfile '/etc/passwd'\nfile 'file:///etc/hostname'\n"


def sine_wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(int(seconds * rate))
        )
        w.writeframes(frames)
    return buf.getvalue()


def small_mp4(path: Path, seconds: float = 1.0) -> bytes | None:
    """A tiny real MP4 made by the bundled ffmpeg (None when there is no ffmpeg)."""
    try:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return None
    subprocess.run(
        [ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={seconds}",
         "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
        check=True, timeout=60,
    )
    return path.read_bytes()


@dataclass
class Corpus:
    """Hostile files by name (name -> bytes) and the canary every external reference points at."""

    canary: str
    files: dict[str, bytes] = field(default_factory=dict)
    # names of the files every operation must fail on
    must_fail: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def corpus_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The canary-independent part of the corpus (generated once per session)."""
    tmp = tmp_path_factory.mktemp("corpus")
    jpeg = noise_jpeg()
    png = small_png()
    files = {
        "bomb.png": png_bomb(),
        "bomb-valid.png": png_bomb_complete(),
        "bomb.jpg": jpeg_bomb(jpeg),
        "zero.jpg": b"",
        "zero.mp4": b"",
        "truncated.jpg": jpeg[: len(jpeg) * 3 // 5],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"this is a text file, not an image\n" * 20,
        "text.mp4": b"this is a text file, not a video\n" * 20,
        "concat.txt": ffconcat_outside(),
        "good.jpg": jpeg,
        "png-as.jpg": png,  # wrong extension, sound content
    }
    mp4 = small_mp4(tmp / "clip.mp4")
    if mp4 is not None:
        files["truncated.mp4"] = mp4[: len(mp4) // 3]
        files["clip.mp4"] = mp4
    return files


@pytest_asyncio.fixture
async def canary() -> AsyncIterator[Canary]:
    """A real HTTP server on 127.0.0.1 that records every request: nothing should reach it."""
    c = Canary()
    await c.start()
    yield c
    await c.stop()


class Canary:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.path_qs}")
        return web.Response(text="#EXTM3U\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def corpus(corpus_bytes: dict[str, bytes], canary: Canary) -> Corpus:
    files = dict(corpus_bytes)
    files["script.svg"] = svg_hostile(canary.url)
    files["outside.m3u8"] = hls_outside(canary.url)
    files["playlist.mp4"] = hls_outside(canary.url)  # a playlist under a media extension
    must_fail = [
        "bomb.png", "bomb-valid.png", "bomb.jpg", "zero.jpg", "zero.mp4", "truncated.jpg", "truncated.png", "text.jpg",
        "text.mp4", "concat.txt", "outside.m3u8", "playlist.mp4",
    ]
    if "truncated.mp4" in files:
        must_fail.append("truncated.mp4")
    return Corpus(canary=canary.url, files=files, must_fail=must_fail)


# --- operations and their smallest valid bodies ---------------------------------------

# Parameters to try, in order, until an operation's model accepts one of them.
_CANDIDATE_PARAMS: list[dict[str, Any]] = [
    {},
    {"width": 32},
    {"width": 32, "height": 32},
    {"width": 16, "height": 16, "left": 0, "top": 0},
    {"angle": 90},
    {"format": "png"},
    {"text": "mend"},
    {"at": 0.0},
    {"duration": 0.5},
    {"start": 0.0, "duration": 0.5},
    {"start": 0.0, "end": 0.5},
]


# Per-operation additions: a crop reads only its region, so take it from the bottom,
# where a truncated file's data is missing.
_OVERRIDES: dict[str, dict[str, Any]] = {"image/crop": {"gravity": "south"}}


def minimal_params(op: Operation, dest_key: str) -> dict[str, Any] | None:
    """Operation parameters (besides the common fields) the model accepts, or None."""
    base = {"source_bucket": "media", "source_key": "x.bin", "dest_bucket": "media", "dest_key": dest_key}
    extra_keys = {key for _, key in op.extra_sources.values()}
    extra_buckets = {bucket for bucket, _ in op.extra_sources.values()}
    for candidate in _CANDIDATE_PARAMS:
        params = dict(candidate)
        # operations that need a second object (a watermark image) get the source itself
        for name in op.model.model_fields:
            if name in extra_buckets:
                params[name] = "media"
            elif name in extra_keys:
                params[name] = "x.bin"
        params = {k: v for k, v in params.items() if k in op.model.model_fields}
        params |= {k: v for k, v in _OVERRIDES.get(op.name, {}).items() if k in op.model.model_fields}
        try:
            op.model.model_validate(base | params)
        except Exception:
            continue
        return params
    return None


_DEST_EXT = {"image": ".png", "video": ".mp4", "audio": ".mp3"}


def dest_key_for(op: Operation) -> str:
    name = op.name.split("/", 1)[1]
    if name == "metadata":
        return ".json"
    if op.name == "video/hls":
        return ".m3u8"
    if op.name == "video/thumbnail":
        return ".jpg"
    if op.name == "video/preview":
        return ".gif"
    if op.name == "video/extract_audio":
        return ".mp3"
    if op.name == "audio/waveform":
        return ".png"
    return _DEST_EXT.get(op.family, ".bin")


def operation_bodies() -> dict[str, dict[str, Any]]:
    """name -> the operation-specific part of a minimal valid body, for every registered operation."""
    out: dict[str, dict[str, Any]] = {}
    for op in REGISTRY.values():
        params = minimal_params(op, "out" + dest_key_for(op))
        if params is not None:
            out[op.name] = params
    return out


# --- helpers -----------------------------------------------------------------------------


async def submit(client: Any, op_name: str, body: dict[str, Any], expect: int = 202) -> str:
    resp = await client.post(f"/api/v1/jobs/{op_name}", json=body, headers=AUTH)
    text = await resp.text()
    assert resp.status == expect, f"{op_name}: {resp.status} {text}"
    return str((await resp.json()).get("job_id", ""))


async def wait_all(client: Any, job_ids: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
    return [await wait_for_job(client, job_id, timeout=timeout) for job_id in job_ids]


def assert_failed_with_sentence(job: dict[str, Any], *, names: str | None = None) -> str:
    """The job failed and its error is a sentence a user can act on (not a traceback)."""
    assert job["status"] == "failed", f"{job['type']} on {job['params']['source_key']}: {job['status']} {job.get('result')}"
    error = job["error"]
    assert isinstance(error, str) and 10 <= len(error) <= 1000, error
    for marker in ("Traceback", "internal error", 'File "', "Exception:", "Error:"):
        assert marker not in error, f"{job['type']}: {error}"
    if names is not None:
        assert names in error, f"{job['type']}: {error!r} does not name {names}"
    return error


def own_peak_rss_mb() -> float:
    """Peak resident memory (VmHWM, MB) of this process (where the app under test runs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_peak_rss_mb(parent: int) -> dict[int, float]:
    """Peak resident memory (VmHWM, MB) of every live child process of ``parent``."""
    peaks: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path("/proc", entry, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("PPid", "0").strip()) == parent and "VmHWM" in fields:
            peaks[int(entry)] = int(fields["VmHWM"].split()[0]) / 1024
    return peaks


# --- a switchable S3 fault proxy ----------------------------------------------------------

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
_ERROR_CODES = {500: "InternalError", 503: "ServiceUnavailable"}


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of an S3 endpoint, switchable into faults.

    Modes: ``pass`` (forward), ``down`` (not listening; open connections are reset),
    ``slow`` (wait ``delay_s`` before forwarding), ``reset`` (reset the connection
    without an answer), ``500`` / ``503`` (an S3 error document). With ``count``
    the fault applies to that many requests only, then the proxy passes again; with
    ``methods`` only to requests of those HTTP methods.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.mode = "pass"
        self.delay_s = 0.0
        self.faults_left: int | None = None
        self.methods: set[str] | None = None  # the fault applies to these methods only
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: ClientSession | None = None
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=60))
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def set_mode(
        self, mode: str, *, delay_s: float = 0.0, count: int | None = None, methods: set[str] | None = None
    ) -> None:
        assert mode in ("pass", "down", "slow", "reset", "500", "503"), mode
        self.mode, self.delay_s, self.faults_left, self.methods = mode, delay_s, count, methods
        if mode == "down" and self._site is not None:
            await self._site.stop()
            self._site = None
        elif mode != "down" and self._site is None:
            await self._listen()

    def requests(self, outcome: str | None = None) -> int:
        return sum(1 for _, _, what in self.log if outcome is None or what == outcome)

    def _fault(self, method: str) -> str:
        if self.mode == "pass" or (self.methods is not None and method not in self.methods):
            return "pass"
        if self.faults_left is not None:
            if self.faults_left <= 0:
                return "pass"
            self.faults_left -= 1
        return self.mode

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault(request.method)
        self.log.append((request.method, request.path, fault))
        if fault in ("reset", "down"):
            _reset(request)
            return web.Response(status=500)
        if fault in ("500", "503"):
            status = int(fault)
            code = _ERROR_CODES[status]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f"<Error><Code>{code}</Code><Message>injected fault</Message><RequestId>fault</RequestId></Error>"
            )
            return web.Response(status=status, text=body if request.method != "HEAD" else None, content_type="application/xml")
        if fault == "slow":
            with contextlib.suppress(TimeoutError):  # stop() releases the sleepers at once
                await asyncio.wait_for(self._released.wait(), self.delay_s)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data if request.method != "HEAD" else None, headers=out)


def _reset(request: web.Request) -> None:
    """Close the client's connection with a TCP reset and no answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


@pytest_asyncio.fixture
async def fault_proxy(moto_server: str) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto_server)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def proxied_s3_config(fault_proxy: FaultProxy) -> dict[str, Any]:
    """The [storage] section pointing at the fault proxy (short timeouts, two tries)."""
    return {
        "backend": "s3",
        "endpoint_url": fault_proxy.url,
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "region": "us-east-1",
        "max_retries": 1,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 1.0,
    }


def make_bucket(s3_client: Any, name: str) -> str:
    try:
        s3_client.create_bucket(Bucket=name)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return name


Factory = Callable[..., Any]
