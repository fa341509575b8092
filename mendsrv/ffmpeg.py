"""Running ffmpeg as a child process: argv lists, live progress, kill on cancel.

`run_ffmpeg` builds the command line (never through a shell), restricts every input
to local files, streams ``-progress`` output into progress calls, keeps the tail of
stderr for the error sentence, and — when the awaiting task is cancelled (user
cancel, or the pool's timeout) — kills the child's whole process group, reaps it and
re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import JobFailed

if TYPE_CHECKING:  # ops.base imports the registry, which imports us
    from .ops.base import Progress, RunContext

STDERR_TAIL_BYTES = 64 * 1024


def default_ffmpeg() -> str:
    """The ffmpeg bundled by imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def resolve_ffmpeg(configured: str | None) -> str:
    """A configured path (or command on PATH) wins; otherwise the bundled binary."""
    if configured and (os.sep in configured or shutil.which(configured)):
        return configured
    return default_ffmpeg()


@dataclass
class Input:
    """One ``-i`` input: a local path and the options placed before it."""

    path: str
    options: list[str] = field(default_factory=list)
    format: str | None = None  # forced demuxer, normally the one probing found


@dataclass
class Result:
    stderr: str  # the tail of stderr (the whole of it for short runs)


def build_argv(
    ctx: RunContext,
    inputs: Sequence[Input],
    output: Sequence[str],
    *,
    loglevel: str = "error",
    progress_fd: str = "pipe:1",
) -> list[str]:
    """The full ffmpeg command line for `inputs` and the output options `output`."""
    argv = [
        resolve_ffmpeg(ctx.ffmpeg),
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel", "level+" + loglevel,
        "-progress", progress_fd,
        "-stats_period", "0.25",
        "-y",
    ]
    for inp in inputs:
        argv += ["-protocol_whitelist", "file,pipe"]
        if inp.format:
            argv += ["-f", inp.format]
        argv += [*inp.options, "-i", "file:" + inp.path]
    if ctx.ffmpeg_threads > 0:
        argv += ["-threads", str(ctx.ffmpeg_threads)]
    argv += list(output)
    return argv


class _ProgressParser:
    """Turns ``out_time_us=`` lines into throttled, increasing progress calls."""

    def __init__(
        self,
        progress: Progress | None,
        duration: float | None,
        phase: str,
        span: tuple[float, float],
        min_step: float = 1.0,
        min_interval: float = 0.5,
    ) -> None:
        self.progress = progress
        self.duration = duration if duration and duration > 0 else None
        self.phase = phase
        self.lo, self.hi = span
        self.min_step = min_step
        self.min_interval = min_interval
        self.last = -1.0
        self.last_at = 0.0

    def line(self, text: str) -> None:
        key, _, value = text.partition("=")
        if key == "out_time_us" and self.duration is not None:
            try:
                seconds = int(value) / 1_000_000
            except ValueError:  # "N/A" before the first frame
                return
            fraction = min(max(seconds / self.duration, 0.0), 0.999)
            self.emit(self.lo + (self.hi - self.lo) * fraction)

    def emit(self, percent: float, force: bool = False) -> None:
        if self.progress is None:
            return
        percent = round(percent, 1)
        now = time.monotonic()
        if percent <= self.last:
            return
        if force or percent - self.last >= self.min_step or now - self.last_at >= self.min_interval:
            self.last, self.last_at = percent, now
            self.progress(percent, self.phase)


async def run_ffmpeg(
    ctx: RunContext,
    inputs: Sequence[Input],
    output: Sequence[str],
    *,
    duration: float | None = None,
    progress: Progress | None = None,
    phase: str = "processing",
    span: tuple[float, float] = (0.0, 100.0),
    loglevel: str = "error",
    what: str = "process the source",
    data: Callable[[bytes], None] | None = None,
) -> Result:
    """Run ffmpeg to completion; raise JobFailed with a readable reason on failure.

    ``duration`` is the length of media ffmpeg will produce (for progress). With
    ``data``, the output must be ``pipe:1`` and its bytes are passed to ``data`` as
    they arrive; progress then travels over stderr.
    """
    progress_fd = "pipe:2" if data is not None else "pipe:1"
    argv = build_argv(ctx, inputs, output, loglevel=loglevel, progress_fd=progress_fd)
    parser = _ProgressParser(progress, duration, phase, span)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise JobFailed(f"cannot start ffmpeg ({ctx.ffmpeg}): {exc.strerror}") from None
    tail: deque[str] = deque()
    tail_size = [0]

    def keep(line: str) -> None:
        tail.append(line)
        tail_size[0] += len(line)
        while tail_size[0] > STDERR_TAIL_BYTES and len(tail) > 1:
            tail_size[0] -= len(tail.popleft())

    async def lines(stream: asyncio.StreamReader, handle: Callable[[str], None]) -> None:
        # chunked, not readline(): a line longer than the reader's limit must not fail the job
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                handle(raw.decode("utf-8", "replace").rstrip("\r"))
            if len(pending) > STDERR_TAIL_BYTES:
                pending = pending[-STDERR_TAIL_BYTES:]
        if pending:
            handle(pending.decode("utf-8", "replace").rstrip("\r"))

    def on_stderr(line: str) -> None:
        if data is not None and _PROGRESS_LINE.match(line):
            parser.line(line)
        else:
            keep(line)

    async def read_stdout() -> None:
        assert proc.stdout is not None
        if data is None:
            await lines(proc.stdout, lambda line: parser.line(line.strip()))
            return
        while chunk := await proc.stdout.read(256 * 1024):
            data(chunk)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        await lines(proc.stderr, on_stderr)

    readers = [asyncio.ensure_future(read_stdout()), asyncio.ensure_future(read_stderr())]
    try:
        await asyncio.gather(*readers)
        returncode = await proc.wait()
    except BaseException:
        # Cancelled (user cancel or the pool's timeout) or a failing data callback:
        # no child may outlive the job.
        for task in readers:
            task.cancel()
        await _kill(proc)
        for task in readers:
            with contextlib.suppress(BaseException):
                await task
        raise
    if returncode != 0:
        raise JobFailed(f"ffmpeg could not {what}: {error_reason(list(tail), returncode, inputs)}")
    parser.emit(span[1], force=True)
    return Result(stderr="\n".join(tail))


_PROGRESS_LINE = re.compile(
    r"^(frame|fps|stream_\d+_\d+_q|bitrate|total_size|out_time_us|out_time_ms|out_time|"
    r"dup_frames|drop_frames|speed|progress)="
)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's process group and reap it, even if cancelled again."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    waiter = asyncio.ensure_future(proc.wait())
    while not waiter.done():
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            continue  # keep reaping; the original cancellation is re-raised by the caller
    with contextlib.suppress(BaseException):
        waiter.result()


_CONTEXT = re.compile(r"^(?:\[[^\]]* @ 0x[0-9a-f]+\]\s*)+")
_LEVEL = re.compile(r"^\[(panic|fatal|error|warning|info|verbose|debug|trace)\]\s*")
# lines that only say something failed downstream of the real cause
_NOISE = re.compile(
    r"^(Conversion failed!|Exiting normally|Error opening input file |Error opening output file |"
    r"Task finished with error code|Terminating thread with return code|Error sending frames to consumers|"
    r"Nothing was written into output file|Could not open encoder before EOF|"
    r"Error while opening encoder - maybe incorrect parameters|Error while filtering|"
    r"Error while processing the decoded data|Error closing file|Error writing trailer)"
)
_WRAPPERS = ("Error opening input files: ", "Error opening output files: ", "Error opening input: ",
             "Error opening output: ")
# the errno strings ffmpeg ends with: informative only next to a specific cause
_ERRNO = {"Invalid data found when processing input", "Invalid argument", "Generic error in an external library",
          "Operation not permitted", "Input/output error", "Immediate exit requested"}


def _classify(line: str) -> tuple[str | None, str]:
    """(log level or None, message) of one stderr line written with ``-loglevel level+…``."""
    line = _CONTEXT.sub("", line.strip())
    match = _LEVEL.match(line)
    if match:
        return match.group(1), _CONTEXT.sub("", line[match.end():]).strip()
    return None, line


def error_reason(lines: list[str], returncode: int, inputs: Sequence[Input] = ()) -> str:
    """A one-line reason from the tail of ffmpeg's stderr, without temp paths.

    The first specific error is usually the cause; a trailing errno string
    ("Invalid data found when processing input") is added to it in brackets.
    """
    if returncode < 0:
        return f"ffmpeg was killed by signal {-returncode}"
    classified = [_classify(line) for line in lines]
    errors = [msg for level, msg in classified if level in ("panic", "fatal", "error")]
    if not errors:  # an ffmpeg that does not tag levels: take every line
        errors = [msg for _, msg in classified]
    messages: list[str] = []
    for msg in errors:
        for wrapper in _WRAPPERS:
            if msg.startswith(wrapper):
                msg = msg[len(wrapper):]
                break
        if msg and not _NOISE.match(msg) and not _PROGRESS_LINE.match(msg) and msg not in messages:
            messages.append(msg)
    if not messages:
        return f"ffmpeg exited with status {returncode}"
    specific = [m for m in messages if m not in _ERRNO]
    reason = specific[0] if specific else messages[-1]
    if specific and messages[-1] in _ERRNO:
        reason = f"{reason} ({messages[-1]})"
    for inp in inputs:
        reason = reason.replace("file:" + inp.path, "the source").replace(inp.path, "the source")
    reason = re.sub(r"/(?:[\w.+-]+/)+[\w.+%-]+", "<file>", reason)
    return reason[:300]
