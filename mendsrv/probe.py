"""Probing media with PyAV, safely.

A source is untrusted. Before anything opens it we:

- sniff its first bytes and refuse text playlists and scripts (HLS ``#EXTM3U``,
  ``ffconcat``, SDP, DASH manifests…): their demuxers open whatever they point at;
- open it with PyAV restricted to the ``file`` protocol and to a whitelist of
  self-contained demuxers, so probing itself never follows a reference.

The demuxer found here is then forced on ffmpeg (``-f``) so it cannot pick another.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import JobFailed

if TYPE_CHECKING:  # ops.base imports the registry, which imports us
    from .ops.base import Limits

# Demuxers for self-contained media files. Playlist, concat, manifest, session
# description and device formats are deliberately absent.
SAFE_DEMUXERS = (
    "mov,matroska,webm,avi,flv,mpegts,mpegtsraw,mpeg,mpegvideo,mp3,aac,ogg,wav,w64,flac,"
    "aiff,caf,asf,amr,amrnb,amrwb,ac3,eac3,dts,truehd,mlp,wv,ape,tta,au,gif,apng,ivf,"
    "h264,hevc,m4v,obu,vc1,yuv4mpegpipe,rm,nut,mxf,gxf,dv,live_flv,"
    "avs,voc,mpc,mpc8,shn,dsf,iff,xwma,s337m,loas,latm,"
    "png_pipe,jpeg_pipe,webp_pipe,bmp_pipe,tiff_pipe,gif_pipe,jpegxl_pipe,qoi_pipe"
)

# What a source must not start with (after a BOM and blank space): formats whose
# demuxer opens other files or network addresses named inside them.
_REFUSED_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"#EXTM3U", "an HLS playlist (m3u8)"),
    (b"#EXT-X-", "an HLS playlist (m3u8)"),
    (b"ffconcat", "an ffconcat script"),
    (b"file ", "a concat script"),
    (b"file\t", "a concat script"),
    (b"v=0", "an SDP session description"),
    (b"[playlist]", "a PLS playlist"),
    (b"#EXTINF", "an M3U playlist"),
    (b"<?xml", "an XML document (DASH manifest, SMIL or similar)"),
    (b"<MPD", "a DASH manifest"),
    (b"<smil", "a SMIL playlist"),
    (b"http://", "a list of URLs"),
    (b"https://", "a list of URLs"),
    (b"file://", "a list of URLs"),
    (b"rtsp://", "a list of URLs"),
)


@dataclass
class StreamInfo:
    index: int
    type: str  # "video" | "audio" | "subtitle" | "data" | "attachment"
    codec: str | None
    duration: float | None = None
    bit_rate: int | None = None
    width: int | None = None
    height: int | None = None
    rotation: int | None = None
    frame_rate: float | None = None
    frames: int | None = None
    pix_fmt: str | None = None
    sample_aspect_ratio: float | None = None  # pixel shape, when not square
    attached_pic: bool | None = None  # cover art, not a video
    sample_rate: int | None = None
    channels: int | None = None
    channel_layout: str | None = None
    language: str | None = None


@dataclass
class MediaInfo:
    format: str  # the demuxer's first name, e.g. "mov", "matroska", "mp3"
    format_names: str  # all the demuxer's names, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    format_long: str
    duration: float | None
    bit_rate: int | None
    size: int
    streams: list[StreamInfo] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def video(self) -> StreamInfo | None:
        """The first real video stream (cover art does not count)."""
        return next((s for s in self.streams if s.type == "video" and not s.attached_pic), None)

    @property
    def audio(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.type == "audio"), None)

    @property
    def display_size(self) -> tuple[int, int] | None:
        """Width and height as shown, after the rotation a player applies."""
        v = self.video
        if v is None or not v.width or not v.height:
            return None
        width = v.width
        if v.sample_aspect_ratio:
            width = max(1, round(v.width * v.sample_aspect_ratio))
        if v.rotation in (90, 270, -90, -270):
            return v.height, width
        return width, v.height

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["streams"] = [{k: v for k, v in s.items() if v is not None} for s in out["streams"]]
        return out


def sniff(path: str) -> None:
    """Refuse playlists, concat scripts and manifests by their first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise JobFailed(f"cannot read the source file: {exc.strerror}") from None
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    for prefix, what in _REFUSED_PREFIXES:
        if text[: len(prefix)].lower() == prefix.lower():
            raise JobFailed(
                f"the source is {what}, which refers to other files or URLs; "
                "only self-contained media files are accepted"
            )


def check_size(path: str, limits: Limits, kind: str = "a media file") -> int:
    """The source's size, checked against limits.max_source_bytes (image and media alike)."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise JobFailed(f"cannot read the source file: {exc.strerror}") from None
    if size == 0:
        raise JobFailed(f"the source object is empty (0 bytes), not {kind}")
    if size > limits.max_source_bytes:
        raise JobFailed(
            f"source is {size} bytes, over the {limits.max_source_bytes} byte limit "
            "(limits.max_source_bytes)"
        )
    return size


def open_options() -> dict[str, str]:
    """PyAV open options that keep a demuxer to local, self-contained files."""
    return {"protocol_whitelist": "file", "format_whitelist": SAFE_DEMUXERS}


def probe(path: str, limits: Limits | None = None) -> MediaInfo:
    """Describe a local media file.

    With `limits` (always, for a job's source) the size and duration limits are
    enforced; without, as for the files an operation wrote itself, they are not.
    """
    import av

    if limits is not None:
        size = check_size(path, limits)
    else:
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise JobFailed(f"cannot read {os.path.basename(path)}: {exc.strerror}") from None
    sniff(path)
    try:
        container = av.open(path, options=open_options())
    except av.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise JobFailed(
            f"the source is not a media file ffmpeg can read: {reason}"
        ) from None
    with container:
        names = container.format.name
        info = MediaInfo(
            format=names.split(",")[0],
            format_names=names,
            format_long=container.format.long_name,
            duration=_seconds(container.duration, 1 / 1_000_000),
            bit_rate=container.bit_rate or None,
            size=size,
            tags=dict(container.metadata),
        )
        for stream in container.streams:
            info.streams.append(_stream_info(stream))
        if info.duration is None:
            durations = [s.duration for s in info.streams if s.duration]
            info.duration = max(durations) if durations else None
        video = info.video
        if video is not None:
            if limits is not None:  # before the first frame is decoded (below, in this process)
                check_pixels(video, limits)
            video.rotation = _rotation(container, video.index)
    if limits is not None and info.duration is not None and info.duration > limits.max_duration_s:
        raise JobFailed(
            f"media is {info.duration:g} s long, over the {limits.max_duration_s:g} s limit "
            "(limits.max_duration_s)"
        )
    return info


def check_pixels(video: StreamInfo, limits: Limits) -> None:
    """A video stream (or a still image ffmpeg reads) over limits.max_input_pixels, from its header."""
    width, height = video.width or 0, video.height or 0
    if width * height > limits.max_input_pixels:
        raise JobFailed(
            f"video is {width}×{height}, over the {limits.max_input_pixels / 1_000_000:g} megapixel limit "
            "(limits.max_input_pixels)"
        )


def _seconds(value: int | None, unit: float) -> float | None:
    if value is None or value <= 0:
        return None
    return round(value * unit, 6)


def _stream_info(stream: Any) -> StreamInfo:
    import av

    cc = stream.codec_context
    codec = None
    if cc is not None:
        codec = cc.codec.canonical_name if cc.codec is not None else cc.name
    info = StreamInfo(
        index=stream.index,
        type=stream.type,
        codec=codec,
        duration=_seconds(stream.duration, float(stream.time_base)) if stream.time_base else None,
        bit_rate=(stream.bit_rate or (cc.bit_rate if cc is not None else None)) or None,
        language=stream.language,
    )
    if stream.type == "video" and cc is not None:
        info.width = cc.width or None
        info.height = cc.height or None
        rate = stream.average_rate or stream.guessed_rate
        info.frame_rate = round(float(rate), 3) if rate else None
        info.frames = stream.frames or None
        info.pix_fmt = cc.pix_fmt
        sar = stream.sample_aspect_ratio or cc.sample_aspect_ratio
        if sar and sar != 1:
            info.sample_aspect_ratio = round(float(sar), 6)
        if stream.disposition & av.stream.Disposition.attached_pic:
            info.attached_pic = True
    elif stream.type == "audio" and cc is not None:
        info.sample_rate = cc.sample_rate or None
        layout = cc.layout
        info.channels = layout.nb_channels if layout is not None else None
        info.channel_layout = layout.name if layout is not None else None
        info.frames = stream.frames or None
    return info


def _rotation(container: Any, index: int) -> int:
    """The display rotation (degrees clockwise, 0/90/180/270) of a video stream."""
    stream = container.streams[index]
    try:
        frame = next(iter(container.decode(stream)), None)
    except Exception:  # noqa: BLE001 - a broken first frame is ffmpeg's problem, not probing's
        return 0
    if frame is None:
        return 0
    # PyAV reports counter-clockwise degrees; players turn the picture clockwise by the
    # negation, which is also what the legacy "rotate" tag held.
    return int(round(-frame.rotation)) % 360


async def probe_source(path: str, limits: Limits, *, need: str | None = None) -> MediaInfo:
    """Probe a job's source off the event loop; `need` is "video" or "audio"."""
    import asyncio

    info = await asyncio.to_thread(probe, path, limits)
    if need == "video" and info.video is None:
        raise JobFailed("the source has no video stream")
    if need == "audio" and info.audio is None:
        raise JobFailed("the source has no audio stream")
    return info


def count_frames(path: str) -> int:
    """The number of video frames (packets; ANMF chunks for WebP) in a file we wrote."""
    import av

    with open(path, "rb") as fh:
        head = fh.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_frames(path)
    with av.open(path, options=open_options()) as container:
        if not container.streams.video:
            return 0
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _webp_frames(path: str) -> int:
    with open(path, "rb") as fh:
        data = fh.read()
    frames, pos = 0, 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"ANMF":
            frames += 1
        pos += 8 + size + (size & 1)
    return frames or 1
