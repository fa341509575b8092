"""Helpers for the video and audio tests: media generated with ffmpeg's lavfi sources,
a RunContext, parameter models and a scan for leftover ffmpeg children."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, TypeVar

from mendsrv.ffmpeg import default_ffmpeg
from mendsrv.ops.base import JobParams, Limits, RunContext

FFMPEG = default_ffmpeg()
P = TypeVar("P", bound=JobParams)


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_video(
    path: Path,
    seconds: float = 3,
    size: str = "320x240",
    rate: int = 25,
    audio: bool = True,
    rotate: int | None = None,
    codec: str = "libx264",
) -> Path:
    """A testsrc2 clip (with a 440 Hz tone) of `seconds`, keyframes every second."""
    args = ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={rate}:d={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:d={seconds}"]
    args += ["-c:v", codec, "-g", str(rate), "-pix_fmt", "yuv420p"]
    if codec == "libx264":
        args += ["-preset", "ultrafast"]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    if rotate is None:
        ffmpeg(*args, str(path))
        return path
    plain = path.with_name("unrotated-" + path.name)
    ffmpeg(*args, str(plain))
    # a display matrix, as phones write it: rotate the picture `rotate` degrees clockwise
    ffmpeg("-display_rotation:v:0", str(-rotate), "-i", str(plain), "-c", "copy", str(path))
    return path


def make_audio(path: Path, seconds: float = 4, volume: float = 0.25, stereo: bool = True) -> Path:
    """A 440/660 Hz tone (stereo) or a 440 Hz tone (mono), as WAV."""
    if stereo:
        graph = "[0:a][1:a]amerge=inputs=2,volume=" + str(volume)
        args = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:d={seconds}",
                "-f", "lavfi", "-i", f"sine=frequency=660:sample_rate=44100:d={seconds}",
                "-filter_complex", graph]
    else:
        args = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:d={seconds}",
                "-af", f"volume={volume}"]
    ffmpeg(*args, "-c:a", "pcm_s16le", str(path))
    return path


def context(**limits: Any) -> RunContext:
    return RunContext(limits=Limits(**limits), ffmpeg=FFMPEG, ffmpeg_threads=2, timeout_s=60)


def params(model: type[P], dest_key: str, **fields: Any) -> P:
    return model(source_bucket="src", source_key="source", dest_bucket="dst", dest_key=dest_key, **fields)


class Progress:
    """A progress callback that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, percent: float, phase: str) -> None:
        self.calls.append((percent, phase))

    @property
    def values(self) -> list[float]:
        return [p for p, _ in self.calls]


def ffmpeg_children() -> list[int]:
    """Pids of live (not zombie-reaped) ffmpeg processes whose parent is this process."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[1] == me and "ffmpeg" in name:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
