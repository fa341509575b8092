"""Video operations through an ffmpeg child process (and PyAV for probing).

Each run function is a coroutine run on the event loop by the pool; ffmpeg does the
work in a child process that is killed if the job is cancelled or times out. Sizes
are computed here from the probed *display* size (rotation applied): ffmpeg turns
rotated sources upright before our filters run.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import JobFailed
from ..ffmpeg import run_ffmpeg
from ..probe import MediaInfo, count_frames, probe_source
from .audio import (
    BITRATE_PATTERN,
    MAX_SECONDS,
    AudioEncodeParams,
    ClipParams,
    audio_map,
    clip_options,
    clip_span,
    describe_async,
    encode_audio,
    extension_of,
    parse_bitrate,
    source_input,
    write_metadata,
)
from .base import JobParams, Operation, Progress, Resource, RunContext

Container = Literal["mp4", "webm", "mkv", "mov"]
VideoCodec = Literal["h264", "h265", "vp9", "av1"]
AudioCodec = Literal["aac", "opus", "mp3", "none"]
Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
PRESETS: tuple[str, ...] = get_args(Preset)

# container -> (muxer, MIME type, allowed video codecs, allowed audio codecs)
CONTAINERS: dict[str, tuple[str, str, frozenset[str], frozenset[str]]] = {
    "mp4": ("mp4", "video/mp4", frozenset({"h264", "h265", "vp9", "av1"}), frozenset({"aac", "mp3", "opus", "none"})),
    "mov": ("mov", "video/quicktime", frozenset({"h264", "h265"}), frozenset({"aac", "mp3", "none"})),
    "webm": ("webm", "video/webm", frozenset({"vp9", "av1"}), frozenset({"opus", "none"})),
    "mkv": ("matroska", "video/x-matroska", frozenset({"h264", "h265", "vp9", "av1"}), frozenset({"aac", "mp3", "opus", "none"})),
}
_VIDEO_EXTENSIONS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".webm": "webm", ".mkv": "mkv"}
ENCODERS = {"h264": "libx264", "h265": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
DEFAULT_CRF = {"h264": 23, "h265": 28, "vp9": 32, "av1": 35}
MAX_CRF = {"h264": 51, "h265": 51, "vp9": 63, "av1": 63}
# x264/x265 preset -> libvpx-vp9 cpu-used / SVT-AV1 preset
_VP9_SPEED = dict(zip(PRESETS, (8, 7, 6, 5, 5, 4, 3, 2, 1), strict=True))
_SVT_PRESET = dict(zip(PRESETS, (12, 11, 10, 10, 9, 8, 6, 5, 4), strict=True))
_AUDIO = {
    "aac": ("aac", "128k"),
    "opus": ("libopus", "96k"),
    "mp3": ("libmp3lame", "128k"),
}


# no global or per-stream tags, no chapters (encoder tags are written by the muxer anyway)
METADATA_STRIP = ["-map_metadata", "-1", "-map_metadata:s", "-1", "-map_chapters", "-1"]


def even(value: float) -> int:
    """Round down to an even size (so a fitted size never exceeds its box), at least 2."""
    return max(2, int(value / 2 + 1e-6) * 2)


def fit_size(src_w: int, src_h: int, width: int | None, height: int | None, enlarge: bool = True) -> tuple[int, int]:
    """Scale (src_w, src_h) to fit inside width×height, keeping the aspect, even sizes."""
    scales = []
    if width:
        scales.append(width / src_w)
    if height:
        scales.append(height / src_h)
    scale = min(scales) if scales else 1.0
    if not enlarge:
        scale = min(scale, 1.0)
    return even(src_w * scale), even(src_h * scale)


def check_output_pixels(width: int, height: int, ctx: RunContext) -> None:
    if width * height > ctx.limits.max_output_pixels:
        raise JobFailed(
            f"output would be {width}×{height}, over the {ctx.limits.max_output_pixels} pixel limit "
            "(limits.max_output_pixels)"
        )


def display_size(info: MediaInfo) -> tuple[int, int]:
    size = info.display_size
    if size is None:
        raise JobFailed("the source's video stream has no picture size")
    return size


def video_container(fmt: str | None, dest_key: str, info: MediaInfo | None = None) -> str:
    """The output container: `fmt`, else the dest_key extension, else from the source, else mp4."""
    if fmt:
        return fmt
    ext = extension_of(dest_key)
    if ext in _VIDEO_EXTENSIONS:
        return _VIDEO_EXTENSIONS[ext]
    if info is not None:
        names = info.format_names.split(",")
        if "webm" in names and info.video and info.video.codec in ("vp8", "vp9", "av1"):
            return "webm" if info.video.codec != "vp8" else "mkv"
        if "matroska" in names:
            return "mkv"
        if "mov" in names and "mp4" not in extension_of(dest_key):
            return "mp4"
    return "mp4"


class VideoEncodeParams(JobParams):
    """How a video output is encoded (shared by transcode and trim)."""

    format: Container | None = Field(
        default=None, description="Container: mp4, webm, mkv or mov. Default: the dest_key extension, else mp4"
    )
    video_codec: VideoCodec | None = Field(
        default=None, description="h264, h265, vp9 or av1. Default: h264 (vp9 for webm)"
    )
    audio_codec: AudioCodec | None = Field(
        default=None, description="aac, opus, mp3 or none (drop audio). Default: aac (opus for webm)"
    )
    crf: int | None = Field(
        default=None, ge=0, le=63,
        description="Constant quality; lower is better. Default h264 23, h265 28, vp9 32, av1 35. "
        "With video_bitrate too, the bitrate becomes a cap",
    )
    preset: Preset = Field(
        default="medium", description="Speed/size trade-off, x264 names (mapped for vp9 and av1)"
    )
    video_bitrate: str | None = Field(
        default=None, pattern=BITRATE_PATTERN, description="Target video bitrate, e.g. '2M' or '800k'"
    )
    audio_bitrate: str | None = Field(
        default=None, pattern=BITRATE_PATTERN, description="Audio bitrate, e.g. '128k' (default aac/mp3 128k, opus 96k)"
    )
    strip_metadata: bool = Field(
        default=True,
        description="Drop the source's metadata tags (title, creation time, GPS location…) and chapters",
    )

    @property
    def container(self) -> str:
        return video_container(self.format, self.dest_key)

    @property
    def vcodec(self) -> str:
        return self.video_codec or ("vp9" if self.container == "webm" else "h264")

    @property
    def acodec(self) -> str:
        return self.audio_codec or ("opus" if self.container == "webm" else "aac")

    @model_validator(mode="after")
    def _check_combination(self) -> VideoEncodeParams:
        container = self.container
        _, _, vcodecs, acodecs = CONTAINERS[container]
        if self.vcodec not in vcodecs:
            raise ValueError(
                f"{container} cannot hold {self.vcodec} video; use one of {', '.join(sorted(vcodecs))}"
            )
        if self.acodec not in acodecs:
            raise ValueError(
                f"{container} cannot hold {self.acodec} audio; use one of {', '.join(sorted(acodecs))}"
            )
        if self.crf is not None and self.crf > MAX_CRF[self.vcodec]:
            raise ValueError(f"crf for {self.vcodec} must be at most {MAX_CRF[self.vcodec]}")
        return self


def video_encode_args(params: VideoEncodeParams) -> list[str]:
    codec, container = params.vcodec, params.container
    args = ["-c:v", ENCODERS[codec], "-pix_fmt", "yuv420p"]
    crf = params.crf if params.crf is not None or not params.video_bitrate else None
    if params.crf is None and not params.video_bitrate:
        crf = DEFAULT_CRF[codec]
    bitrate = parse_bitrate(params.video_bitrate) if params.video_bitrate else None
    if codec in ("h264", "h265"):
        args += ["-preset", params.preset]
        if codec == "h265":
            args += ["-x265-params", "log-level=error"]
            if container in ("mp4", "mov"):
                args += ["-tag:v", "hvc1"]
        if crf is not None:
            args += ["-crf", str(crf)]
            if bitrate:
                args += ["-maxrate", str(bitrate), "-bufsize", str(2 * bitrate)]
        elif bitrate:
            args += ["-b:v", str(bitrate), "-maxrate", str(bitrate), "-bufsize", str(2 * bitrate)]
    elif codec == "vp9":
        args += ["-deadline", "good", "-cpu-used", str(_VP9_SPEED[params.preset]), "-row-mt", "1"]
        if crf is not None:
            args += ["-crf", str(crf), "-b:v", str(bitrate or 0)]
        elif bitrate:
            args += ["-b:v", str(bitrate)]
    else:  # av1 with SVT-AV1
        args += ["-preset", str(_SVT_PRESET[params.preset])]
        if crf is not None:
            args += ["-crf", str(max(crf, 1))]
            if bitrate:
                args += ["-maxrate", str(bitrate)]
        elif bitrate:
            args += ["-b:v", str(bitrate)]
    if params.acodec == "none":
        args += ["-an"]
    else:
        encoder, default_rate = _AUDIO[params.acodec]
        args += ["-c:a", encoder, "-b:a", params.audio_bitrate or default_rate]
    if params.strip_metadata:
        args += METADATA_STRIP
    muxer = CONTAINERS[container][0]
    if muxer in ("mp4", "mov"):
        args += ["-movflags", "+faststart"]
    return [*args, "-f", muxer]


def video_map(info: MediaInfo) -> str:
    """The ffmpeg stream specifier of the video stream probing chose (never cover art)."""
    if info.video is None:
        raise JobFailed("the source has no video stream")
    return f"0:{info.video.index}"


def _maps(info: MediaInfo, want_audio: bool) -> list[str]:
    maps = ["-map", video_map(info)]
    if want_audio and info.audio is not None:
        maps += ["-map", audio_map(info)]
    return [*maps, "-sn", "-dn"]


# --- video/transcode -----------------------------------------------------------------


class VideoTranscodeParams(VideoEncodeParams, ClipParams):
    width: int | None = Field(default=None, ge=2, le=16384, description="Fit inside this width, keeping the aspect")
    height: int | None = Field(default=None, ge=2, le=16384, description="Fit inside this height, keeping the aspect")
    fps: float | None = Field(default=None, gt=0, le=240, description="Output frame rate (default: the source's)")


async def run_transcode(
    src_path: str, dst_path: str, params: VideoTranscodeParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="video")
    progress(1, "probed")
    span = clip_span(info, params.start, params.duration)
    src_w, src_h = display_size(info)
    out_w, out_h = fit_size(src_w, src_h, params.width, params.height)
    check_output_pixels(out_w, out_h, ctx)
    filters = []
    if (out_w, out_h) != (src_w, src_h):
        filters.append(f"scale={out_w}:{out_h}")
    filters.append("setsar=1")
    if params.fps:
        filters.append(f"fps={params.fps:g}")
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info, clip_options(params.start, params.duration))],
        [*_maps(info, params.acodec != "none"), "-vf", ",".join(filters),
         *video_encode_args(params), dst_path],
        duration=span, progress=progress, phase="encoding", span=(2, 99), what="transcode the video",
    )
    return {"output": await describe_async(dst_path, CONTAINERS[params.container][1])}


# --- video/trim ----------------------------------------------------------------------


class VideoTrimParams(VideoEncodeParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: float = Field(default=0, ge=0, le=MAX_SECONDS, description="Cut from this many seconds")
    end: float | None = Field(
        default=None, gt=0, le=MAX_SECONDS, description="Cut up to this many seconds (or give duration)"
    )
    duration: float | None = Field(
        default=None, gt=0, le=MAX_SECONDS, description="Keep this many seconds (or give end)"
    )
    copy_streams: bool = Field(
        default=False, alias="copy",
        description="Copy the streams without re-encoding: fast and lossless, but the cut starts "
        "at the keyframe at or before start. Otherwise re-encoded, accurate to a frame",
    )

    @model_validator(mode="after")
    def _check_span(self) -> VideoTrimParams:
        if self.end is not None and self.duration is not None:
            raise ValueError("give end or duration, not both")
        if self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    @property
    def length(self) -> float | None:
        if self.end is not None:
            return self.end - self.start
        return self.duration


async def run_trim(
    src_path: str, dst_path: str, params: VideoTrimParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="video")
    progress(1, "probed")
    span = clip_span(info, params.start, params.length)
    container = video_container(params.format, params.dest_key, info)
    muxer, mime = CONTAINERS[container][:2]
    if params.copy_streams:
        out = ["-map", video_map(info), "-map", "0:a?", "-sn", "-dn", "-c", "copy",
               "-avoid_negative_ts", "make_zero"]
        if params.strip_metadata:
            out += METADATA_STRIP
        if muxer in ("mp4", "mov"):
            out += ["-movflags", "+faststart"]
        out += ["-f", muxer, dst_path]
    else:
        encode = params.model_copy(update={"format": container})
        out = [*_maps(info, encode.acodec != "none"), "-vf", "setsar=1",
               *video_encode_args(encode), dst_path]
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info, clip_options(params.start, params.length))],
        out, duration=span, progress=progress, phase="trimming", span=(2, 99), what="trim the video",
    )
    return {"output": await describe_async(dst_path, mime), "copied": params.copy_streams}


# --- video/thumbnail -----------------------------------------------------------------

ImageFormat = Literal["jpeg", "png", "webp"]
_IMAGE_FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_IMAGE_EXTENSIONS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


class VideoThumbnailParams(JobParams):
    time: float | None = Field(
        default=None, ge=0, le=MAX_SECONDS, description="Take the frame at this many seconds"
    )
    percent: float | None = Field(
        default=None, ge=0, le=100, description="Or at this percentage of the duration (default 10)"
    )
    width: int | None = Field(default=None, ge=2, le=16384, description="Fit inside this width, keeping the aspect")
    height: int | None = Field(default=None, ge=2, le=16384, description="Fit inside this height, keeping the aspect")
    format: ImageFormat | None = Field(
        default=None, description="jpeg, png or webp; default: the dest_key extension, else jpeg"
    )
    quality: int = Field(default=85, ge=1, le=100, description="jpeg/webp quality 1-100")

    @model_validator(mode="after")
    def _one_position(self) -> VideoThumbnailParams:
        if self.time is not None and self.percent is not None:
            raise ValueError("give time or percent, not both")
        return self

    @property
    def image_format(self) -> str:
        return self.format or _IMAGE_EXTENSIONS.get(extension_of(self.dest_key), "jpeg")


async def run_thumbnail(
    src_path: str, dst_path: str, params: VideoThumbnailParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="video")
    progress(1, "probed")
    total = info.duration
    if params.time is not None:
        at = params.time
        if total is not None and at > total:
            raise JobFailed(f"time {at:g} s is past the end of the {total:g} s video")
    else:
        at = (total or 0) * (params.percent if params.percent is not None else 10) / 100
    if total is not None:
        frame = 1 / (info.video.frame_rate or 25) if info.video else 0.04
        at = max(0.0, min(at, total - 2 * frame))
    src_w, src_h = display_size(info)
    out_w, out_h = fit_size(src_w, src_h, params.width, params.height)
    check_output_pixels(out_w, out_h, ctx)
    fmt = params.image_format
    filters = [f"scale={out_w}:{out_h}", "setsar=1"]
    if fmt == "jpeg":
        encode = ["-c:v", "mjpeg", "-q:v", str(round(2 + (100 - params.quality) * 29 / 99))]
        filters.append("format=yuvj420p")
    elif fmt == "webp":
        encode = ["-c:v", "libwebp", "-quality", str(params.quality)]
    else:
        encode = ["-c:v", "png"]
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info, ["-ss", f"{at:.6f}"])],
        ["-map", video_map(info), "-an", "-sn", "-dn", "-frames:v", "1", "-vf", ",".join(filters), *encode,
         "-f", "image2", "-update", "1", dst_path],
        what="extract a frame",
    )
    if not os.path.exists(dst_path) or os.path.getsize(dst_path) == 0:
        raise JobFailed(f"the video has no frame at {at:g} s")
    output = {"content_type": _IMAGE_FORMATS[fmt], "width": out_w, "height": out_h, "format": fmt}
    return {"output": output, "time": round(at, 3)}


# --- video/preview -------------------------------------------------------------------


class VideoPreviewParams(JobParams):
    format: Literal["gif", "webp"] | None = Field(
        default=None, description="gif or webp (animated); default: the dest_key extension, else gif"
    )
    start: float = Field(default=0, ge=0, le=MAX_SECONDS, description="Start at this many seconds")
    duration: float = Field(default=3, gt=0, le=60, description="Length in seconds (clipped to the video)")
    fps: float = Field(default=10, gt=0, le=30, description="Frames per second")
    width: int = Field(default=320, ge=16, le=1920, description="Width in pixels (never larger than the source)")
    quality: int = Field(default=75, ge=1, le=100, description="webp quality 1-100")
    loop: int = Field(default=0, ge=0, le=65535, description="Times to loop; 0 loops forever")

    @property
    def image_format(self) -> str:
        if self.format:
            return self.format
        return "webp" if extension_of(self.dest_key) == ".webp" else "gif"


async def run_preview(
    src_path: str, dst_path: str, params: VideoPreviewParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="video")
    progress(1, "probed")
    span = clip_span(info, params.start, params.duration) or params.duration
    frames = math.ceil(span * params.fps)
    if frames > ctx.limits.max_frames:
        raise JobFailed(
            f"preview would have {frames} frames, over the limit of {ctx.limits.max_frames} "
            "(limits.max_frames); lower duration or fps"
        )
    src_w, src_h = display_size(info)
    out_w, out_h = fit_size(src_w, src_h, params.width, None, enlarge=False)
    check_output_pixels(out_w, out_h, ctx)
    base = f"[{video_map(info)}]fps={params.fps:g},scale={out_w}:{out_h}:flags=lanczos,setsar=1"
    if params.image_format == "gif":
        graph = (
            f"{base},split[a][b];[a]palettegen=max_colors=256:stats_mode=diff[p];"
            "[b][p]paletteuse=dither=bayer:bayer_scale=5:diff_mode=rectangle[out]"
        )
        encode = ["-c:v", "gif", "-loop", str(params.loop), "-f", "gif"]
        mime = "image/gif"
    else:
        graph = f"{base}[out]"
        encode = ["-c:v", "libwebp_anim", "-quality", str(params.quality), "-lossless", "0",
                  "-loop", str(params.loop), "-f", "webp"]
        mime = "image/webp"
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info, clip_options(params.start, span))],
        ["-filter_complex", graph, "-map", "[out]", "-an", "-sn", "-dn", *encode, dst_path],
        duration=span, progress=progress, phase="encoding", span=(2, 99), what="make the preview",
    )
    try:
        written = await asyncio.to_thread(count_frames, dst_path)
    except Exception:  # noqa: BLE001 - the file is written; the count is informative only
        written = None
    output = {"content_type": mime, "width": out_w, "height": out_h, "format": params.image_format,
              "duration": round(span, 3)}
    if written:
        output["frames"] = written
    return {"output": output}


# --- video/hls -----------------------------------------------------------------------


class HlsRendition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    height: int = Field(ge=32, le=4320, description="Rendition height in pixels")
    video_bitrate: str | None = Field(
        default=None, pattern=BITRATE_PATTERN, description="Video bitrate (default from the size)"
    )


RenditionHeight = Annotated[int, Field(ge=32, le=4320)]


class VideoHlsParams(JobParams):
    renditions: list[RenditionHeight | HlsRendition] = Field(
        default_factory=lambda: [1080, 720, 480, 360],
        min_length=1, max_length=8,
        description="Heights (or {height, video_bitrate}) of the ladder; those larger than the "
        "source are dropped (the source height is used if none is left)",
    )
    segment_duration: float = Field(default=6, ge=1, le=30, description="Target segment length in seconds")
    preset: Preset = Field(default="veryfast", description="x264 preset for the renditions")
    audio_bitrate: str = Field(default="128k", pattern=BITRATE_PATTERN, description="AAC bitrate per rendition")


def default_video_bitrate(width: int, height: int) -> int:
    """About 2.4 bits per pixel per second (1080p ≈ 5 Mb/s, 360p ≈ 550 kb/s)."""
    return max(150_000, round(width * height * 2.4 / 1000) * 1000)


def hls_ladder(params: VideoHlsParams, src_w: int, src_h: int) -> list[dict[str, Any]]:
    wanted: list[HlsRendition] = [r if isinstance(r, HlsRendition) else HlsRendition(height=r) for r in params.renditions]
    fitting = [r for r in wanted if r.height <= src_h]
    if not fitting:
        fitting = [HlsRendition(height=src_h)]
    ladder: list[dict[str, Any]] = []
    seen: set[int] = set()
    for r in sorted(fitting, key=lambda r: -r.height):
        h = even(r.height)
        if h in seen:
            continue
        seen.add(h)
        w = even(src_w * h / src_h)
        bitrate = parse_bitrate(r.video_bitrate) if r.video_bitrate else default_video_bitrate(w, h)
        ladder.append({"name": f"{h}p", "width": w, "height": h, "video_bitrate": bitrate})
    return ladder


_PLAYLIST = "application/vnd.apple.mpegurl"


def _stem(dest_key: str) -> str:
    base = os.path.splitext(os.path.basename(dest_key))[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", base) or "stream"


async def run_hls(
    src_path: str, dst_path: str, params: VideoHlsParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="video")
    progress(1, "probed")
    src_w, src_h = display_size(info)
    ladder = hls_ladder(params, src_w, src_h)
    for r in ladder:
        check_output_pixels(r["width"], r["height"], ctx)
    stem = _stem(params.dest_key)
    out_dir = os.path.dirname(os.path.abspath(dst_path))
    master = os.path.basename(dst_path)
    has_audio = info.audio is not None
    n = len(ladder)
    graph = f"[{video_map(info)}]split={n}" + "".join(f"[s{i}]" for i in range(n)) + ";" + ";".join(
        f"[s{i}]scale={r['width']}:{r['height']},setsar=1[v{i}]" for i, r in enumerate(ladder)
    )
    args = ["-filter_complex", graph]
    for i in range(n):
        args += ["-map", f"[v{i}]"]
        if has_audio:
            args += ["-map", audio_map(info)]
    args += ["-c:v", "libx264", "-preset", params.preset, "-pix_fmt", "yuv420p",
             "-force_key_frames", f"expr:gte(t,n_forced*{params.segment_duration:g})",
             "-sc_threshold", "0"]
    for i, r in enumerate(ladder):
        rate = r["video_bitrate"]
        args += [f"-b:v:{i}", str(rate), f"-maxrate:v:{i}", str(int(rate * 1.07)),
                 f"-bufsize:v:{i}", str(int(rate * 1.5))]
    if has_audio:
        args += ["-c:a", "aac", "-b:a", params.audio_bitrate]
    stream_map = " ".join(
        f"v:{i}" + (f",a:{i}" if has_audio else "") + f",name:{r['name']}" for i, r in enumerate(ladder)
    )
    args += [
        *METADATA_STRIP, "-sn", "-dn", "-f", "hls",
        "-hls_time", f"{params.segment_duration:g}",
        "-hls_playlist_type", "vod",
        "-hls_flags", "independent_segments",
        "-hls_segment_type", "mpegts",
        "-hls_segment_filename", os.path.join(out_dir, f"{stem}_%v_%05d.ts"),
        "-master_pl_name", master,
        "-var_stream_map", stream_map,
        os.path.join(out_dir, f"{stem}_%v.m3u8"),
    ]
    await run_ffmpeg(
        ctx, [source_input(src_path, info)], args,
        duration=info.duration, progress=progress, phase="encoding", span=(2, 99),
        what="package the video as HLS",
    )
    if not os.path.exists(dst_path):
        raise JobFailed("ffmpeg did not write the HLS master playlist")
    extra: list[dict[str, str]] = []
    renditions = []
    for r in ladder:
        playlist = f"{stem}_{r['name']}.m3u8"
        segment = re.compile(rf"^{re.escape(stem)}_{re.escape(r['name'])}_\d{{5}}\.ts$")
        segments = sorted(name for name in os.listdir(out_dir) if segment.match(name))
        extra.append({"name": playlist, "content_type": _PLAYLIST})
        extra += [{"name": s, "content_type": "video/mp2t"} for s in segments]
        renditions.append({**r, "playlist": playlist, "segments": len(segments)})
    output = {"content_type": _PLAYLIST, "duration": info.duration}
    return {"output": output, "extra_outputs": extra, "renditions": renditions,
            "segment_duration": params.segment_duration}


# --- video/extract_audio -------------------------------------------------------------


class VideoExtractAudioParams(AudioEncodeParams, ClipParams):
    """The first audio stream of a video, re-encoded."""


async def run_extract_audio(
    src_path: str, dst_path: str, params: VideoExtractAudioParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    return await encode_audio(src_path, dst_path, params, params, progress, ctx)


# --- video/metadata ------------------------------------------------------------------


class VideoMetadataParams(JobParams):
    """No options: the JSON is written to dest_key and returned in the result."""


async def run_metadata(
    src_path: str, dst_path: str, params: VideoMetadataParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    return await write_metadata(src_path, dst_path, progress, ctx, "video")


OPERATIONS = [
    Operation(
        name="video/transcode",
        description="Re-encode a video (mp4/webm/mkv/mov; h264, h265, vp9, av1) with quality, "
        "bitrate, size, frame rate and start/duration options.",
        model=VideoTranscodeParams, run=run_transcode, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/thumbnail",
        description="One frame at a time or percentage, sized, as jpeg, png or webp.",
        model=VideoThumbnailParams, run=run_thumbnail, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/preview",
        description="A short animated gif (with an optimised palette) or webp.",
        model=VideoPreviewParams, run=run_preview, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/hls",
        description="An HLS ladder: master playlist at dest_key, variant playlists and segments "
        "beside it.",
        model=VideoHlsParams, run=run_hls, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/trim",
        description="Cut start..end (or start+duration), by stream copy or re-encoded to the frame.",
        model=VideoTrimParams, run=run_trim, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/extract_audio",
        description="The audio track as mp3, aac/m4a, opus/ogg, flac or wav.",
        model=VideoExtractAudioParams, run=run_extract_audio, resource=Resource.FFMPEG,
    ),
    Operation(
        name="video/metadata",
        description="Describe the video (duration, container, streams, rotation) as JSON.",
        model=VideoMetadataParams, run=run_metadata, resource=Resource.FFMPEG,
    ),
]
