"""Audio operations through an ffmpeg child process (and PyAV for probing).

Each run function is a coroutine run on the event loop by the pool; ffmpeg does the
work in a child process that is killed if the job is cancelled or times out.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import JobFailed
from ..ffmpeg import Input, run_ffmpeg
from ..probe import MediaInfo, probe, probe_source
from .base import JobParams, Operation, Progress, Resource, RunContext

BITRATE_PATTERN = r"^[1-9][0-9]*(\.[0-9]+)?[kKmM]?$"
MAX_SECONDS = 1_000_000  # an upper bound for times, which also keeps out inf and nan


def parse_bitrate(value: str) -> int:
    """'128k' -> 128000, '2.5M' -> 2500000, '96000' -> 96000."""
    match = re.fullmatch(r"([0-9.]+)([kKmM]?)", value)
    if not match:
        raise ValueError(f"not a bitrate: {value}")
    scale = {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class AudioFormat:
    muxer: str
    codec: str
    content_type: str
    bitrate: str | None  # default bitrate for lossy codecs
    sample_rates: frozenset[int] | None = None  # what the encoder accepts, if limited
    extra: tuple[str, ...] = ()


_MP3_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})
_OPUS_RATES = frozenset({8000, 12000, 16000, 24000, 48000})

AUDIO_FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("mp3", "libmp3lame", "audio/mpeg", "192k", _MP3_RATES),
    "aac": AudioFormat("adts", "aac", "audio/aac", "160k"),
    "m4a": AudioFormat("mp4", "aac", "audio/mp4", "160k", extra=("-movflags", "+faststart")),
    "opus": AudioFormat("ogg", "libopus", "audio/ogg", "128k", _OPUS_RATES),
    "ogg": AudioFormat("ogg", "libopus", "audio/ogg", "128k", _OPUS_RATES),
    "flac": AudioFormat("flac", "flac", "audio/flac", None),
    "wav": AudioFormat("wav", "pcm_s16le", "audio/wav", None),
}
AudioFormatName = Literal["mp3", "aac", "m4a", "opus", "ogg", "flac", "wav"]
_AUDIO_EXTENSIONS = {
    ".mp3": "mp3", ".aac": "aac", ".m4a": "m4a", ".mp4": "m4a", ".opus": "opus",
    ".ogg": "ogg", ".oga": "ogg", ".flac": "flac", ".wav": "wav",
}


def extension_of(key: str) -> str:
    return os.path.splitext(key)[1].lower()


# --- shared parameter models ---------------------------------------------------------


class AudioEncodeParams(JobParams):
    """How an audio output is encoded."""

    format: AudioFormatName | None = Field(
        default=None,
        description="Output format: mp3, aac (ADTS), m4a (AAC in MP4), opus or ogg (Opus in Ogg), "
        "flac, wav (16-bit PCM). Default: the dest_key extension, else mp3",
    )
    bitrate: str | None = Field(
        default=None,
        pattern=BITRATE_PATTERN,
        description="Bitrate for lossy formats, e.g. '128k' (default: mp3 192k, aac/m4a 160k, "
        "opus/ogg 128k); ignored for flac and wav",
    )
    sample_rate: int | None = Field(
        default=None, ge=8000, le=192000, description="Output sample rate in Hz (default: the source's)"
    )
    channels: int | None = Field(
        default=None, ge=1, le=8, description="Output channel count, e.g. 1 to downmix to mono"
    )
    strip_metadata: bool = Field(
        default=False, description="Drop the source's tags (title, artist, album…); kept by default"
    )

    @property
    def audio_format(self) -> str:
        if self.format:
            return self.format
        return _AUDIO_EXTENSIONS.get(extension_of(self.dest_key), "mp3")

    @model_validator(mode="after")
    def _check_encoding(self) -> AudioEncodeParams:
        fmt = AUDIO_FORMATS[self.audio_format]
        if self.sample_rate is not None and fmt.sample_rates and self.sample_rate not in fmt.sample_rates:
            rates = ", ".join(str(r) for r in sorted(fmt.sample_rates))
            raise ValueError(f"{self.audio_format} supports sample_rate {rates}")
        if self.channels and self.channels > 2 and self.audio_format == "mp3":
            raise ValueError("mp3 supports at most 2 channels")
        return self


class ClipParams(JobParams):
    start: float = Field(default=0, ge=0, le=MAX_SECONDS, description="Start at this many seconds into the source")
    duration: float | None = Field(
        default=None, gt=0, le=MAX_SECONDS, description="Keep this many seconds (default: to the end)"
    )


def clip_span(info: MediaInfo, start: float, duration: float | None) -> float | None:
    """The length of media produced from `start` for `duration`, checked against the source."""
    total = info.duration
    if total is None:
        return duration
    if start >= total:
        raise JobFailed(f"start {start:g} s is at or past the end of the {total:g} s source")
    remaining = total - start
    return min(duration, remaining) if duration is not None else remaining


def clip_options(start: float, duration: float | None) -> list[str]:
    opts: list[str] = []
    if start:
        opts += ["-ss", f"{start:.6f}"]
    if duration is not None:
        opts += ["-t", f"{duration:.6f}"]
    return opts


def audio_map(info: MediaInfo) -> str:
    """The ffmpeg stream specifier of the audio stream probing chose."""
    if info.audio is None:
        raise JobFailed("the source has no audio stream")
    return f"0:{info.audio.index}"


def source_input(src_path: str, info: MediaInfo, options: list[str] | None = None) -> Input:
    """The source as an ffmpeg input, with the demuxer probing found forced."""
    return Input(src_path, options=list(options or []), format=info.format)


def audio_encode_args(
    fmt_name: str, bitrate: str | None, sample_rate: int | None, channels: int | None,
    strip_metadata: bool = False,
) -> list[str]:
    fmt = AUDIO_FORMATS[fmt_name]
    args = ["-c:a", fmt.codec]
    if strip_metadata:
        args += ["-map_metadata", "-1", "-map_metadata:s", "-1", "-map_chapters", "-1"]
    if fmt.bitrate is not None:
        args += ["-b:a", bitrate or fmt.bitrate]
    if sample_rate:
        args += ["-ar", str(sample_rate)]
    if channels:
        args += ["-ac", str(channels)]
    return [*args, *fmt.extra, "-f", fmt.muxer]


def describe(path: str, content_type: str) -> dict[str, Any]:
    """Facts about an output file, read back by probing it."""
    info = probe(path)
    out: dict[str, Any] = {"content_type": content_type, "format": info.format}
    if info.duration is not None:
        out["duration"] = round(info.duration, 3)
    if info.bit_rate:
        out["bit_rate"] = info.bit_rate
    video, audio = info.video, info.audio
    if video is not None:
        size = info.display_size or (video.width, video.height)
        out.update(width=size[0], height=size[1], video_codec=video.codec)
        if video.frame_rate:
            out["frame_rate"] = video.frame_rate
    if audio is not None:
        out.update(audio_codec=audio.codec, sample_rate=audio.sample_rate, channels=audio.channels)
    return out


async def describe_async(path: str, content_type: str) -> dict[str, Any]:
    return await asyncio.to_thread(describe, path, content_type)


async def encode_audio(
    src_path: str, dst_path: str, params: AudioEncodeParams, clip: ClipParams | None,
    progress: Progress, ctx: RunContext, *, info: MediaInfo | None = None,
) -> dict[str, Any]:
    """Decode the source's first audio stream and encode it as `params` say."""
    info = info or await probe_source(src_path, ctx.limits, need="audio")
    progress(1, "probed")
    start, duration = (clip.start, clip.duration) if clip is not None else (0.0, None)
    span = clip_span(info, start, duration)
    fmt_name = params.audio_format
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info, clip_options(start, duration))],
        [
            "-map", audio_map(info), "-vn", "-sn", "-dn",
            *audio_encode_args(
                fmt_name, params.bitrate, params.sample_rate, params.channels, params.strip_metadata
            ),
            dst_path,
        ],
        duration=span,
        progress=progress,
        phase="encoding",
        span=(2, 99),
        what="encode the audio",
    )
    return {"output": await describe_async(dst_path, AUDIO_FORMATS[fmt_name].content_type)}


# --- audio/transcode -----------------------------------------------------------------


class AudioTranscodeParams(AudioEncodeParams, ClipParams):
    """Re-encode the first audio stream of the source."""


async def run_transcode(
    src_path: str, dst_path: str, params: AudioTranscodeParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    return await encode_audio(src_path, dst_path, params, params, progress, ctx)


# --- audio/metadata ------------------------------------------------------------------


class AudioMetadataParams(JobParams):
    """No options: the JSON is written to dest_key and returned in the result."""


async def write_metadata(
    src_path: str, dst_path: str, progress: Progress, ctx: RunContext, need: str | None
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need=need)
    metadata = info.to_dict()
    with open(dst_path, "w", encoding="utf-8") as fh:
        json.dump(metadata, fh, indent=2, ensure_ascii=False)
    return {"output": {"content_type": "application/json"}, "metadata": metadata}


async def run_metadata(
    src_path: str, dst_path: str, params: AudioMetadataParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    return await write_metadata(src_path, dst_path, progress, ctx, "audio")


# --- audio/normalize -----------------------------------------------------------------


class AudioNormalizeParams(AudioEncodeParams):
    target_i: float = Field(
        default=-16.0, ge=-70, le=-5, description="Target integrated loudness in LUFS (EBU R128)"
    )
    target_tp: float = Field(default=-1.5, ge=-9, le=0, description="Maximum true peak in dBTP")
    target_lra: float = Field(default=11.0, ge=1, le=50, description="Target loudness range in LU")


_LOUDNORM_JSON = re.compile(r"\{[^{}]*\"input_i\"[^{}]*\}", re.S)


def parse_loudnorm(stderr: str) -> dict[str, Any]:
    matches = _LOUDNORM_JSON.findall(stderr)
    if not matches:
        raise JobFailed("ffmpeg did not report the loudness of the source")
    return json.loads(matches[-1])


async def run_normalize(
    src_path: str, dst_path: str, params: AudioNormalizeParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="audio")
    progress(1, "probed")
    target = f"I={params.target_i:g}:TP={params.target_tp:g}:LRA={params.target_lra:g}"
    first = await run_ffmpeg(
        ctx,
        [source_input(src_path, info)],
        ["-map", audio_map(info), "-vn", "-sn", "-dn",
         "-af", f"loudnorm={target}:print_format=json", "-f", "null", "-"],
        duration=info.duration, progress=progress, phase="measuring", span=(2, 50),
        loglevel="info", what="measure the loudness",
    )
    measured = parse_loudnorm(first.stderr)
    if measured.get("input_i") in (None, "-inf"):
        raise JobFailed("the source is silent; there is no loudness to normalize")
    second_filter = (
        f"loudnorm={target}:measured_I={measured['input_i']}:measured_TP={measured['input_tp']}"
        f":measured_LRA={measured['input_lra']}:measured_thresh={measured['input_thresh']}"
        f":offset={measured['target_offset']}:linear=true:print_format=json"
    )
    sample_rate = params.sample_rate or (info.audio.sample_rate if info.audio else None)
    fmt = params.audio_format
    if sample_rate and AUDIO_FORMATS[fmt].sample_rates and sample_rate not in AUDIO_FORMATS[fmt].sample_rates:
        sample_rate = 48000  # loudnorm works at 192 kHz; pick a rate the encoder takes
    second = await run_ffmpeg(
        ctx,
        [source_input(src_path, info)],
        ["-map", audio_map(info), "-vn", "-sn", "-dn", "-af", second_filter,
         *audio_encode_args(fmt, params.bitrate, sample_rate, params.channels, params.strip_metadata),
         dst_path],
        duration=info.duration, progress=progress, phase="normalizing", span=(50, 99),
        loglevel="info", what="normalize the loudness",
    )
    result = parse_loudnorm(second.stderr)
    loudness = {
        "input_i": _num(measured["input_i"]),
        "input_tp": _num(measured["input_tp"]),
        "input_lra": _num(measured["input_lra"]),
        "output_i": _num(result.get("output_i")),
        "output_tp": _num(result.get("output_tp")),
        "output_lra": _num(result.get("output_lra")),
        "normalization_type": result.get("normalization_type"),
        "target_i": params.target_i,
        "target_tp": params.target_tp,
        "target_lra": params.target_lra,
    }
    return {"output": await describe_async(dst_path, AUDIO_FORMATS[fmt].content_type), "loudness": loudness}


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --- audio/waveform ------------------------------------------------------------------

_COLOUR = r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{8})$"


class AudioWaveformParams(JobParams):
    format: Literal["png", "json"] | None = Field(
        default=None, description="png (an image) or json (peaks); default: the dest_key extension, else png"
    )
    width: int = Field(default=1800, ge=16, le=20000, description="PNG width in pixels")
    height: int = Field(default=280, ge=16, le=4000, description="PNG height in pixels")
    background_color: str = Field(
        default="#ffffff", pattern=_COLOUR, description="PNG background, #rrggbb or #rrggbbaa"
    )
    waveform_color: str = Field(
        default="#3366cc", pattern=_COLOUR, description="PNG waveform colour, #rrggbb or #rrggbbaa"
    )
    samples_per_pixel: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="JSON: source samples per min/max pair (default 256); "
        "PNG: always computed so the whole source spans width",
    )
    bits: Literal[8, 16] = Field(default=8, description="JSON: peak resolution, 8 or 16 bits")
    split_channels: bool = Field(
        default=False, description="JSON: one min/max pair per channel instead of a mono mix"
    )

    @property
    def output_format(self) -> str:
        if self.format:
            return self.format
        return "json" if extension_of(self.dest_key) == ".json" else "png"


MAX_PEAKS = 5_000_000  # min/max pairs per channel: bounds the memory and the JSON size


def _too_many_peaks(points: int, frames: float) -> JobFailed:
    return JobFailed(
        f"the waveform would have {points} points per channel, over the limit of {MAX_PEAKS}; "
        f"use samples_per_pixel of at least {math.ceil(frames / MAX_PEAKS)}"
    )


class _Peaks:
    """Min/max of each block of `spp` frames of interleaved s16 PCM, streamed."""

    def __init__(self, channels: int, spp: int) -> None:
        self.channels = channels
        self.spp = spp
        self.block = channels * spp
        self.pending = bytearray()
        self.mins: list[list[int]] = [[] for _ in range(channels)]
        self.maxs: list[list[int]] = [[] for _ in range(channels)]

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        usable = (len(self.pending) // (2 * self.block)) * 2 * self.block
        if usable:
            self._blocks(bytes(self.pending[:usable]))
            del self.pending[:usable]

    def finish(self) -> None:
        usable = (len(self.pending) // (2 * self.channels)) * 2 * self.channels
        if usable:
            self._blocks(bytes(self.pending[:usable]))
        self.pending.clear()

    def _blocks(self, data: bytes) -> None:
        samples = array.array("h")
        samples.frombytes(data)
        if sys.byteorder == "big":  # pragma: no cover
            samples.byteswap()
        step, c = self.block, self.channels
        for begin in range(0, len(samples), step):
            block = samples[begin : begin + step]
            for ch in range(c):
                part = block[ch::c]
                self.mins[ch].append(min(part))
                self.maxs[ch].append(max(part))
        if len(self.mins[0]) > MAX_PEAKS:  # the probed duration understated the length
            raise _too_many_peaks(len(self.mins[0]), len(self.mins[0]) * self.spp)

    @property
    def length(self) -> int:
        return len(self.mins[0])


async def _decode_peaks(
    src_path: str, info: MediaInfo, channels: int, spp: int, progress: Progress, ctx: RunContext
) -> _Peaks:
    peaks = _Peaks(channels, spp)
    await run_ffmpeg(
        ctx,
        [source_input(src_path, info)],
        ["-map", audio_map(info), "-vn", "-sn", "-dn", "-ac", str(channels), "-c:a", "pcm_s16le",
         "-f", "s16le", "pipe:1"],
        duration=info.duration, progress=progress, phase="decoding", span=(2, 90),
        what="decode the audio", data=peaks.feed,
    )
    peaks.finish()
    if peaks.length == 0:
        raise JobFailed("the source's audio stream has no samples")
    return peaks


def _rgba(colour: str) -> list[int]:
    v = colour.lstrip("#")
    values = [int(v[i : i + 2], 16) for i in range(0, len(v), 2)]
    return values if len(values) == 4 else [*values, 255]


def _render_png(peaks: _Peaks, params: AudioWaveformParams, dst_path: str) -> None:
    """Draw one vertical bar per column from its max down to its min (libvips does the pixels)."""
    import pyvips

    width, height = params.width, params.height
    mins, maxs = peaks.mins[0], peaks.maxs[0]
    n = len(mins)
    top = array.array("f")
    bottom = array.array("f")
    half = (height - 1) / 2
    for x in range(width):
        a = x * n // width
        b = max(a + 1, (x + 1) * n // width)
        lo, hi = min(mins[a:b]), max(maxs[a:b])
        top.append(half - hi / 32768 * half)
        bottom.append(half - lo / 32768 * half)
    top_row = pyvips.Image.new_from_memory(top.tobytes(), width, 1, 1, "float")
    bottom_row = pyvips.Image.new_from_memory(bottom.tobytes(), width, 1, 1, "float")
    ys = pyvips.Image.xyz(width, height)[1]
    mask = (ys >= top_row.zoom(1, height).floor()) & (ys <= bottom_row.zoom(1, height).ceil())
    fg, bg = _rgba(params.waveform_color), _rgba(params.background_color)
    image = mask.ifthenelse(fg, bg).cast("uchar").copy(interpretation="srgb")
    image.write_to_file(dst_path + ".png")
    os.replace(dst_path + ".png", dst_path)


async def run_waveform(
    src_path: str, dst_path: str, params: AudioWaveformParams, progress: Progress, ctx: RunContext
) -> dict[str, Any]:
    info = await probe_source(src_path, ctx.limits, need="audio")
    progress(1, "probed")
    audio = info.audio
    assert audio is not None
    sample_rate = audio.sample_rate or 44100
    if params.output_format == "png":
        total = (info.duration or 0) * sample_rate
        spp = max(1, math.floor(total / params.width / 4)) if total else 1024
        peaks = await _decode_peaks(src_path, info, 1, spp, progress, ctx)
        await asyncio.to_thread(_render_png, peaks, params, dst_path)
        output = {"content_type": "image/png", "width": params.width, "height": params.height}
        return {"output": output, "duration": info.duration}
    channels = (audio.channels or 1) if params.split_channels else 1
    spp = params.samples_per_pixel or 256
    frames = (info.duration or 0) * sample_rate
    if frames / spp > MAX_PEAKS:
        raise _too_many_peaks(math.ceil(frames / spp), frames)
    peaks = await _decode_peaks(src_path, info, channels, spp, progress, ctx)
    shift = 8 if params.bits == 8 else 0
    data: list[int] = []
    for i in range(peaks.length):
        for ch in range(channels):
            data.append(peaks.mins[ch][i] >> shift)
            data.append(peaks.maxs[ch][i] >> shift)
    document = {
        "version": 2,
        "channels": channels,
        "sample_rate": sample_rate,
        "samples_per_pixel": spp,
        "bits": params.bits,
        "length": peaks.length,
        "data": data,
    }
    with open(dst_path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, separators=(",", ":"))
    output = {"content_type": "application/json"}
    return {"output": output, "duration": info.duration, "length": peaks.length,
            "samples_per_pixel": spp, "channels": channels}


OPERATIONS = [
    Operation(
        name="audio/transcode",
        description="Re-encode audio as mp3, aac/m4a, opus/ogg, flac or wav, optionally "
        "resampled, remixed and clipped (start/duration).",
        model=AudioTranscodeParams,
        run=run_transcode,
        resource=Resource.FFMPEG,
    ),
    Operation(
        name="audio/waveform",
        description="Render the waveform as a PNG (width×height, colours) or as JSON peaks "
        "in the audiowaveform format.",
        model=AudioWaveformParams,
        run=run_waveform,
        resource=Resource.FFMPEG,
    ),
    Operation(
        name="audio/normalize",
        description="Normalize loudness to EBU R128 targets (two-pass loudnorm; default -16 LUFS).",
        model=AudioNormalizeParams,
        run=run_normalize,
        resource=Resource.FFMPEG,
    ),
    Operation(
        name="audio/metadata",
        description="Describe the media (duration, container, streams) as JSON.",
        model=AudioMetadataParams,
        run=run_metadata,
        resource=Resource.FFMPEG,
    ),
]
