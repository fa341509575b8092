"""The ffmpeg runner: command line, progress, error sentences, and no child left behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mendsrv.errors import JobFailed
from mendsrv.ffmpeg import (
    Input,
    build_argv,
    default_ffmpeg,
    error_reason,
    resolve_ffmpeg,
    run_ffmpeg,
)
from tests.av_media import Progress, alive, context, ffmpeg_children, make_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("ffmpeg") / "clip.mp4", seconds=8)


def realtime(path: Path) -> Input:
    """An input read at its native rate: ffmpeg runs as long as the media lasts."""
    return Input(str(path), options=["-re"], format="mov")


def test_runner_argv_restricts_every_input_and_never_uses_a_shell() -> None:
    ctx = context()
    argv = build_argv(ctx, [Input("/tmp/a.mp4", format="mov"), Input("/tmp/b.png")], ["-f", "null", "-"])
    assert argv[0] == ctx.ffmpeg
    for flag in ("-nostdin", "-nostats", "-hide_banner"):
        assert flag in argv
    assert argv[argv.index("-progress") + 1] == "pipe:1"
    inputs = [i for i, a in enumerate(argv) if a == "-i"]
    assert [argv[i + 1] for i in inputs] == ["file:/tmp/a.mp4", "file:/tmp/b.png"]
    whitelists = [i for i, a in enumerate(argv) if a == "-protocol_whitelist"]
    assert len(whitelists) == 2 and all(argv[i + 1] == "file,pipe" for i in whitelists)
    assert whitelists[0] < inputs[0] < whitelists[1] < inputs[1]
    assert argv[argv.index("-f") + 1] == "mov"  # the probed demuxer is forced
    assert argv[argv.index("-threads") + 1] == "2"


def test_runner_argv_omits_threads_when_zero() -> None:
    ctx = context()
    ctx.ffmpeg_threads = 0
    assert "-threads" not in build_argv(ctx, [Input("/tmp/a.mp4")], ["-f", "null", "-"])


async def test_runner_reports_increasing_progress(clip: Path) -> None:
    progress = Progress()
    await run_ffmpeg(
        context(), [Input(str(clip), options=["-re", "-t", "2"], format="mov")],
        ["-f", "null", "-"], duration=2, progress=progress, phase="encoding",
    )
    values = progress.values
    assert len([v for v in values if 0 < v < 100]) >= 3, values
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[-1] == 100
    assert {phase for _, phase in progress.calls} == {"encoding"}


async def test_runner_progress_maps_into_span(clip: Path) -> None:
    progress = Progress()
    await run_ffmpeg(
        context(), [Input(str(clip), options=["-t", "1"], format="mov")], ["-f", "null", "-"],
        duration=1, progress=progress, span=(50, 80),
    )
    assert all(50 <= v <= 80 for v in progress.values)
    assert progress.values[-1] == 80


async def test_runner_cancel_kills_the_child_within_two_seconds(clip: Path) -> None:
    task = asyncio.ensure_future(run_ffmpeg(context(), [realtime(clip)], ["-f", "null", "-"], duration=8))
    pids: list[int] = []
    for _ in range(100):
        await asyncio.sleep(0.05)
        pids = ffmpeg_children()
        if pids:
            break
    assert pids, "ffmpeg did not start"
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    assert not any(alive(pid) for pid in pids)
    assert ffmpeg_children() == []


async def test_runner_wait_for_timeout_kills_the_child(clip: Path) -> None:
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(
            run_ffmpeg(context(), [realtime(clip)], ["-f", "null", "-"], duration=8), timeout=0.8
        )
    assert time.monotonic() - started < 2.8
    assert ffmpeg_children() == []


async def test_runner_failure_is_a_sentence_from_stderr(tmp_path: Path, clip: Path) -> None:
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[:4000])  # the moov box is at the end
    with pytest.raises(JobFailed) as caught:
        await run_ffmpeg(
            context(), [Input(str(truncated), format="mov")], ["-f", "null", "-"], what="decode the source"
        )
    message = caught.value.message
    assert message == (
        "ffmpeg could not decode the source: moov atom not found (Invalid data found when processing input)"
    )
    assert str(tmp_path) not in message and "Traceback" not in message
    assert ffmpeg_children() == []


async def test_runner_missing_binary_is_a_sentence(clip: Path) -> None:
    ctx = context()
    ctx.ffmpeg = "/nonexistent/ffmpeg"
    with pytest.raises(JobFailed, match="cannot start ffmpeg"):
        await run_ffmpeg(ctx, [Input(str(clip))], ["-f", "null", "-"])


async def test_runner_data_mode_streams_stdout(clip: Path) -> None:
    chunks: list[bytes] = []
    progress = Progress()
    await run_ffmpeg(
        context(), [Input(str(clip), options=["-t", "1"], format="mov")],
        ["-map", "0:a:0", "-ac", "1", "-ar", "8000", "-f", "s16le", "pipe:1"],
        duration=1, progress=progress, data=chunks.append,
    )
    assert sum(len(c) for c in chunks) == pytest.approx(8000 * 2, rel=0.05)
    assert progress.values[-1] == 100


async def test_runner_failure_names_the_first_cause_not_the_aftermath(clip: Path) -> None:
    with pytest.raises(JobFailed) as caught:
        await run_ffmpeg(
            context(), [Input(str(clip), format="mov")],
            ["-vf", "scale=7:-1", "-c:v", "libx264", "-f", "null", "-"], what="encode the video",
        )
    assert caught.value.message == "ffmpeg could not encode the video: width not divisible by 2 (7x5)"


def test_error_reason_drops_addresses_wrappers_and_paths() -> None:
    lines = [
        "[in#0 @ 0x55d0c0a1b2c0] Error opening input: Invalid data found when processing input",
        "Error opening input file /tmp/job-1/source.",
        "Error opening input files: Invalid data found when processing input",
    ]
    assert error_reason(lines, 1) == "Invalid data found when processing input"
    assert error_reason([], 1) == "ffmpeg exited with status 1"
    assert error_reason(["x"], -9) == "ffmpeg was killed by signal 9"
    reason = error_reason(["[mp4 @ 0x1] could not open /tmp/job-1/out/x.mp4"], 1)
    assert "/tmp" not in reason
    tagged = [
        "[info] Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/tmp/x':",
        "[vost#0:0/libx264 @ 0x5] [enc:libx264 @ 0x6] [error] Error while opening encoder - maybe incorrect parameters",
        "[libx264 @ 0x55a83b2b9080] [error] width not divisible by 2 (7x5)",
        "[vf#0:0 @ 0x7] [error] Task finished with error code: -542398533 (Generic error in an external library)",
        "[fatal] Conversion failed!",
    ]
    assert error_reason(tagged, 1) == "width not divisible by 2 (7x5)"


def test_resolve_ffmpeg_prefers_a_configured_path_else_the_bundled_binary() -> None:
    assert resolve_ffmpeg("/opt/ffmpeg/bin/ffmpeg") == "/opt/ffmpeg/bin/ffmpeg"
    assert resolve_ffmpeg("") == default_ffmpeg()
    assert resolve_ffmpeg("no-such-ffmpeg-on-path") == default_ffmpeg()


async def test_runner_survives_a_huge_stderr_line(tmp_path: Path) -> None:
    # a stand-in binary: one stderr line far over asyncio's 64 KiB readline limit, then the reason
    fake = tmp_path / "ffmpeg"
    fake.write_text(
        "#!/bin/sh\nhead -c 200000 /dev/zero | tr '\\0' x >&2\necho >&2\n"
        "echo 'Unknown encoder no-such-encoder' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    ctx = context()
    ctx.ffmpeg = str(fake)
    with pytest.raises(JobFailed, match="ffmpeg could not encode: Unknown encoder no-such-encoder$"):
        await run_ffmpeg(ctx, [Input("/dev/null")], ["-f", "null", "-"], what="encode")


async def test_runner_failing_data_callback_kills_the_child(clip: Path) -> None:
    def refuse(chunk: bytes) -> None:
        raise JobFailed("too much data")

    with pytest.raises(JobFailed, match="too much data"):
        await run_ffmpeg(
            context(), [realtime(clip)], ["-map", "0:a:0", "-f", "s16le", "pipe:1"], duration=8, data=refuse
        )
    assert ffmpeg_children() == []
