"""Video operations on clips generated with lavfi, checked by probing the outputs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import pytest
import pyvips
from pydantic import ValidationError

from mendsrv.errors import JobFailed
from mendsrv.ops import REGISTRY, video
from mendsrv.ops.base import COMMON_FIELDS, Limits
from mendsrv.probe import count_frames, open_options, probe
from tests.av_media import (
    Progress,
    alive,
    context,
    ffmpeg,
    ffmpeg_children,
    make_video,
    params,
)

DURATION_TOLERANCE = 0.1  # seconds


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("video")
    return {
        "clip": make_video(d / "clip.mp4", seconds=3),
        "wide": make_video(d / "wide.mp4", seconds=3, size="640x360"),
        "long": make_video(d / "long.mp4", seconds=10),
        "rotated": make_video(d / "rotated.mp4", seconds=2, rotate=90),
        "silent": make_video(d / "silent.mp4", seconds=2, audio=False),
    }


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_video_operations_are_registered_as_ffmpeg() -> None:
    names = {"transcode", "thumbnail", "preview", "hls", "trim", "extract_audio", "metadata"}
    for name in names:
        op = REGISTRY[f"video/{name}"]
        assert op.resource.value == "ffmpeg"
        assert asyncio.iscoroutinefunction(op.run)


# --- transcode -------------------------------------------------------------------------


async def test_transcode_h264_mp4_scales_keeping_aspect_with_even_sizes(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out.mp4", width=171, preset="ultrafast")
    result = await video.run_transcode(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.format == "mov" and info.video and info.video.codec == "h264"
    assert (info.video.width, info.video.height) == (170, 128)
    assert info.audio and info.audio.codec == "aac"
    assert info.duration == pytest.approx(3, abs=DURATION_TOLERANCE)
    assert result["output"]["content_type"] == "video/mp4"
    assert (result["output"]["width"], result["output"]["height"]) == (170, 128)
    # faststart: the moov box comes before the media data
    head = out.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


async def test_transcode_webm_defaults_to_vp9_and_opus(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out.webm", preset="ultrafast", height=120)
    result = await video.run_transcode(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and info.video.codec == "vp9" and (info.video.width, info.video.height) == (160, 120)
    assert info.audio and info.audio.codec == "opus"
    assert result["output"]["content_type"] == "video/webm"


async def test_transcode_h265_mkv_with_start_duration_and_fps(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out.mkv", video_codec="h265", preset="ultrafast",
               start=1, duration=1.5, fps=10, audio_codec="none")
    await video.run_transcode(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and info.video.codec == "hevc" and info.audio is None
    assert info.video.frame_rate == pytest.approx(10)
    assert info.duration == pytest.approx(1.5, abs=DURATION_TOLERANCE)
    assert count_frames(str(out)) == 15


async def test_transcode_av1_mp4_with_bitrate(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out", format="mp4", video_codec="av1", preset="ultrafast",
               video_bitrate="300k", audio_codec="opus")
    await video.run_transcode(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and info.video.codec == "av1" and info.audio and info.audio.codec == "opus"


async def test_transcode_honours_rotation(media: dict[str, Path], out: Path) -> None:
    assert probe(str(media["rotated"])).video.rotation == 90  # type: ignore[union-attr]
    p = params(video.VideoTranscodeParams, "out.mp4", height=160, preset="ultrafast")
    result = await video.run_transcode(str(media["rotated"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and (info.video.width, info.video.height) == (120, 160)
    assert info.video.rotation == 0  # turned upright, not merely tagged
    assert (result["output"]["width"], result["output"]["height"]) == (120, 160)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dest_key": "a.webm", "video_codec": "h264"}, "webm cannot hold h264 video"),
        ({"dest_key": "a.webm", "audio_codec": "aac"}, "webm cannot hold aac audio"),
        ({"dest_key": "a.mov", "audio_codec": "opus"}, "mov cannot hold opus audio"),
        ({"dest_key": "a.mp4", "crf": 60}, "crf for h264 must be at most 51"),
        ({"dest_key": "a.mp4", "video_bitrate": "fast"}, "video_bitrate"),
        ({"dest_key": "a.mp4", "container": "mp4"}, "container"),
    ],
)
def test_transcode_params_reject_bad_combinations(fields: dict[str, object], message: str) -> None:
    dest_key = fields.pop("dest_key")
    with pytest.raises(ValidationError, match=message):
        params(video.VideoTranscodeParams, str(dest_key), **fields)


async def test_transcode_reports_increasing_progress(media: dict[str, Path], out: Path) -> None:
    progress = Progress()
    # about 1.7 s of one core: several 0.25 s progress periods, little CPU
    ctx = context()
    ctx.ffmpeg_threads = 1
    p = params(video.VideoTranscodeParams, "out.mkv", video_codec="h265", preset="medium")
    await video.run_transcode(str(media["long"]), str(out), p, progress, ctx)
    values = progress.values
    assert values == sorted(values)
    assert len([v for v in values if 2 < v < 99]) >= 3, values


def _slow_transcode() -> video.VideoTranscodeParams:
    """Minutes of work for the 10 s clip: it is always still running when stopped."""
    return params(video.VideoTranscodeParams, "out.mkv", video_codec="h265", preset="veryslow")


async def test_transcode_cancel_leaves_no_ffmpeg_within_two_seconds(media: dict[str, Path], out: Path) -> None:
    progress = Progress()
    task = asyncio.ensure_future(
        video.run_transcode(str(media["long"]), str(out), _slow_transcode(), progress, context())
    )
    pids: list[int] = []
    for _ in range(200):
        await asyncio.sleep(0.05)
        pids = ffmpeg_children()
        if pids and any(v > 2 for v in progress.values):
            break
    assert pids and not task.done()
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    assert not any(alive(pid) for pid in pids)
    assert ffmpeg_children() == []


async def test_transcode_timeout_kills_ffmpeg(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(
            video.run_transcode(str(media["long"]), str(out), _slow_transcode(),
                                Progress(), context()),
            timeout=1.0,
        )
    assert ffmpeg_children() == []


# --- limits and unsafe sources -----------------------------------------------------------


async def test_transcode_refuses_media_over_the_duration_limit(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out.mp4")
    with pytest.raises(JobFailed, match=r"media is 10 s long, over the 5 s limit \(limits.max_duration_s\)"):
        await video.run_transcode(str(media["long"]), str(out), p, Progress(), context(max_duration_s=5))
    assert not out.exists()


async def test_transcode_refuses_a_source_over_the_byte_limit(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTranscodeParams, "out.mp4")
    with pytest.raises(JobFailed, match=r"over the 1000 byte limit \(limits.max_source_bytes\)"):
        await video.run_transcode(str(media["clip"]), str(out), p, Progress(), context(max_source_bytes=1000))


async def test_transcode_of_a_non_media_file_is_a_sentence(tmp_path: Path, out: Path) -> None:
    src = tmp_path / "notes.txt"
    src.write_text("just some text, not a video\n" * 50)
    with pytest.raises(JobFailed, match="the source is not a media file ffmpeg can read"):
        await video.run_transcode(str(src), str(out), params(video.VideoTranscodeParams, "o.mp4"), Progress(), context())


class _Receiver:
    """A real HTTP server on 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                receiver.requests.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x47" * 188)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.close()


def _playlists(tmp_path: Path, url: str, clip: Path) -> dict[str, Path]:
    hls = tmp_path / "remote.m3u8"
    hls.write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n"
        f"#EXTINF:2.0,\n{url}/segment0.ts\n#EXTINF:2.0,\nfile://{clip}\n"
        "#EXTINF:2.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    )
    bom = tmp_path / "bom.m3u8"
    bom.write_bytes(b"\xef\xbb\xbf\n  " + hls.read_bytes())
    concat = tmp_path / "list.ffconcat"
    concat.write_text(f"ffconcat version 1.0\nfile '{url}/a.mp4'\nfile '/etc/passwd'\n")
    plain_concat = tmp_path / "list.txt"
    plain_concat.write_text(f"file '{clip}'\nfile '{url}/b.mp4'\n")
    sdp = tmp_path / "stream.sdp"
    sdp.write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n")
    return {"hls": hls, "bom": bom, "concat": concat, "plain_concat": plain_concat, "sdp": sdp}


@pytest.mark.parametrize("kind", ["hls", "bom", "concat", "plain_concat", "sdp"])
async def test_transcode_refuses_playlist_sources_without_fetching(
    kind: str, tmp_path: Path, media: dict[str, Path], receiver: _Receiver, out: Path
) -> None:
    src = _playlists(tmp_path, receiver.url, media["clip"])[kind]
    for op, p in [
        (video.run_transcode, params(video.VideoTranscodeParams, "o.mp4")),
        (video.run_hls, params(video.VideoHlsParams, "o.m3u8")),
        (video.run_metadata, params(video.VideoMetadataParams, "o.json")),
    ]:
        with pytest.raises(JobFailed, match="only self-contained media files are accepted"):
            await op(str(src), str(out), p, Progress(), context())
    await asyncio.sleep(0.2)
    assert receiver.requests == []
    assert ffmpeg_children() == []


def test_probe_demuxer_whitelist_refuses_hls_even_without_sniffing(
    tmp_path: Path, media: dict[str, Path], receiver: _Receiver
) -> None:
    src = _playlists(tmp_path, receiver.url, media["clip"])["hls"]
    with pytest.raises(av.FFmpegError):
        av.open(str(src), options=open_options())
    time.sleep(0.2)
    assert receiver.requests == []


# --- thumbnail ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "magic"), [("jpeg", b"\xff\xd8\xff"), ("png", b"\x89PNG"), ("webp", b"RIFF")])
async def test_thumbnail_writes_a_sized_frame(fmt: str, magic: bytes, media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoThumbnailParams, f"thumb.{fmt}", width=160, percent=50)
    result = await video.run_thumbnail(str(media["clip"]), str(out), p, Progress(), context())
    assert out.read_bytes()[: len(magic)] == magic
    info = probe(str(out))
    assert info.video and (info.video.width, info.video.height) == (160, 120)
    assert result["output"]["content_type"] == f"image/{fmt}"
    assert result["time"] == pytest.approx(1.5, abs=0.05)


async def test_thumbnail_of_rotated_video_is_upright(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoThumbnailParams, "t.png", time=1)
    result = await video.run_thumbnail(str(media["rotated"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and (info.video.width, info.video.height) == (240, 320)
    assert (result["output"]["width"], result["output"]["height"]) == (240, 320)


async def test_thumbnail_at_the_very_end_still_gets_a_frame(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoThumbnailParams, "t.jpg", time=3)
    await video.run_thumbnail(str(media["clip"]), str(out), p, Progress(), context())
    assert out.stat().st_size > 0


async def test_thumbnail_past_the_end_is_refused(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoThumbnailParams, "t.jpg", time=30)
    with pytest.raises(JobFailed, match="time 30 s is past the end of the 3 s video"):
        await video.run_thumbnail(str(media["clip"]), str(out), p, Progress(), context())


def test_thumbnail_params_take_time_or_percent() -> None:
    with pytest.raises(ValidationError, match="time or percent"):
        params(video.VideoThumbnailParams, "t.jpg", time=1, percent=5)


# --- preview -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gif", "webp"])
async def test_preview_is_animated_with_fps_times_duration_frames(fmt: str, media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoPreviewParams, f"p.{fmt}", start=0.5, duration=2, fps=10, width=160)
    result = await video.run_preview(str(media["clip"]), str(out), p, Progress(), context())
    assert out.read_bytes()[:4] == (b"GIF8" if fmt == "gif" else b"RIFF")
    assert count_frames(str(out)) == 20
    assert result["output"]["frames"] == 20
    assert (result["output"]["width"], result["output"]["height"]) == (160, 120)
    assert result["output"]["content_type"] == f"image/{fmt}"


async def test_preview_never_enlarges_the_source(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoPreviewParams, "p.gif", duration=0.5, width=1280)
    result = await video.run_preview(str(media["clip"]), str(out), p, Progress(), context())
    assert (result["output"]["width"], result["output"]["height"]) == (320, 240)


async def test_preview_over_the_frame_limit_is_refused(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoPreviewParams, "p.gif", duration=3, fps=30)
    with pytest.raises(JobFailed, match=r"90 frames, over the limit of 50 \(limits.max_frames\)"):
        await video.run_preview(str(media["clip"]), str(out), p, Progress(), context(max_frames=50))


# --- hls ---------------------------------------------------------------------------------


async def test_hls_ladder_has_no_rendition_larger_than_the_source(media: dict[str, Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "hls"
    out_dir.mkdir()
    dst = out_dir / "job-output"
    p = params(video.VideoHlsParams, "videos/master.m3u8", renditions=[720, 360, {"height": 240, "video_bitrate": "300k"}],
               segment_duration=1, preset="ultrafast")
    result = await video.run_hls(str(media["wide"]), str(dst), p, Progress(), context())
    master = dst.read_text()
    assert master.startswith("#EXTM3U")
    assert [r["name"] for r in result["renditions"]] == ["360p", "240p"]
    assert [(r["width"], r["height"]) for r in result["renditions"]] == [(640, 360), (426, 240)]
    assert result["renditions"][1]["video_bitrate"] == 300_000
    assert "master_360p.m3u8" in master and "master_240p.m3u8" in master
    assert "RESOLUTION=640x360" in master and "RESOLUTION=426x240" in master
    names = {e["name"] for e in result["extra_outputs"]}
    assert names == {p.name for p in out_dir.iterdir()} - {dst.name}
    for rendition in result["renditions"]:
        playlist = (out_dir / rendition["playlist"]).read_text()
        segments = [line for line in playlist.splitlines() if line.endswith(".ts")]
        assert len(segments) == rendition["segments"] == 3
        assert all(s in names for s in segments)
        assert "#EXT-X-ENDLIST" in playlist
        first = probe(str(out_dir / segments[0]))
        assert first.video and (first.video.width, first.video.height) == (rendition["width"], rendition["height"])
        assert first.audio is not None
    types = {e["name"].rsplit(".", 1)[1]: e["content_type"] for e in result["extra_outputs"]}
    assert types == {"m3u8": "application/vnd.apple.mpegurl", "ts": "video/mp2t"}
    assert result["output"]["content_type"] == "application/vnd.apple.mpegurl"


@pytest.mark.parametrize("renditions", [[], [0], [99999], [{"height": 720, "bitrate": "1M"}], list(range(100, 1000, 100))])
def test_hls_params_reject_bad_ladders(renditions: list[object]) -> None:
    with pytest.raises(ValidationError, match="renditions"):
        params(video.VideoHlsParams, "m.m3u8", renditions=renditions)


@pytest.mark.parametrize("fields", [{"start": float("inf")}, {"duration": float("nan")}, {"end": 1e12}])
def test_trim_params_reject_unbounded_times(fields: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        params(video.VideoTrimParams, "c.mp4", **fields)


async def test_hls_of_a_small_silent_source_uses_its_own_height(media: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "m.m3u8"
    p = params(video.VideoHlsParams, "m.m3u8", segment_duration=2, preset="ultrafast")
    result = await video.run_hls(str(media["silent"]), str(dst), p, Progress(), context())
    assert [(r["width"], r["height"]) for r in result["renditions"]] == [(320, 240)]
    segment = next(e["name"] for e in result["extra_outputs"] if e["name"].endswith(".ts"))
    assert probe(str(tmp_path / segment)).audio is None


# --- trim --------------------------------------------------------------------------------


async def test_trim_reencoded_is_accurate_to_a_tenth_of_a_second(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTrimParams, "cut.mp4", start=0.52, end=2.0, preset="ultrafast")
    result = await video.run_trim(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and info.video.duration == pytest.approx(1.48, abs=DURATION_TOLERANCE)
    assert info.duration == pytest.approx(1.48, abs=DURATION_TOLERANCE)
    assert count_frames(str(out)) == pytest.approx(37, abs=1)
    assert result["copied"] is False
    assert result["output"]["content_type"] == "video/mp4"


async def test_trim_with_copy_keeps_the_codecs_and_cuts_at_keyframes(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTrimParams, "cut.mkv", start=1.0, duration=1.0, copy=True)
    result = await video.run_trim(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video and info.video.codec == "h264" and info.audio and info.audio.codec == "aac"
    assert info.duration == pytest.approx(1.0, abs=DURATION_TOLERANCE)  # keyframes every second
    assert result["copied"] is True
    assert result["output"]["content_type"] == "video/x-matroska"


def test_trim_params_check_the_span() -> None:
    with pytest.raises(ValidationError, match="end or duration, not both"):
        params(video.VideoTrimParams, "c.mp4", start=1, end=2, duration=1)
    with pytest.raises(ValidationError, match="end must be after start"):
        params(video.VideoTrimParams, "c.mp4", start=2, end=1)


async def test_trim_past_the_end_is_refused(media: dict[str, Path], out: Path) -> None:
    p = params(video.VideoTrimParams, "c.mp4", start=5)
    with pytest.raises(JobFailed, match="start 5 s is at or past the end of the 3 s source"):
        await video.run_trim(str(media["clip"]), str(out), p, Progress(), context())


# --- extract_audio and metadata ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "codec", "content_type"),
    [("mp3", "mp3", "audio/mpeg"), ("m4a", "aac", "audio/mp4"), ("aac", "aac", "audio/aac"),
     ("opus", "opus", "audio/ogg"), ("flac", "flac", "audio/flac"), ("wav", "pcm_s16le", "audio/wav")],
)
async def test_extract_audio_writes_each_format(
    fmt: str, codec: str, content_type: str, media: dict[str, Path], out: Path
) -> None:
    p = params(video.VideoExtractAudioParams, f"sound.{fmt}")
    result = await video.run_extract_audio(str(media["clip"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video is None and info.audio and info.audio.codec == codec
    # raw ADTS has no index: its duration is estimated from the bitrate
    assert info.duration == pytest.approx(3, abs=0.25 if fmt == "aac" else DURATION_TOLERANCE)
    assert result["output"]["content_type"] == content_type


async def test_extract_audio_from_a_silent_video_is_refused(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(JobFailed, match="the source has no audio stream"):
        await video.run_extract_audio(
            str(media["silent"]), str(out), params(video.VideoExtractAudioParams, "a.mp3"), Progress(), context()
        )


async def test_metadata_writes_json_and_returns_it(media: dict[str, Path], out: Path) -> None:
    result = await video.run_metadata(
        str(media["rotated"]), str(out), params(video.VideoMetadataParams, "m.json"), Progress(), context()
    )
    written = json.loads(out.read_text())
    assert written == result["metadata"]
    assert written["format"] == "mov" and written["duration"] == pytest.approx(2, abs=0.05)
    v, a = written["streams"]
    assert (v["type"], v["codec"], v["width"], v["height"], v["rotation"]) == ("video", "h264", 320, 240, 90)
    assert v["frame_rate"] == 25 and v["frames"] == 50
    assert (a["type"], a["codec"], a["sample_rate"], a["channels"]) == ("audio", "aac", 48000, 1)
    assert result["output"]["content_type"] == "application/json"


async def test_metadata_of_a_corrupt_file_is_a_sentence(media: dict[str, Path], tmp_path: Path, out: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(media["clip"].read_bytes()[:3000])
    with pytest.raises(JobFailed, match="not a media file ffmpeg can read"):
        await video.run_metadata(str(broken), str(out), params(video.VideoMetadataParams, "m.json"), Progress(), context())



async def test_transcode_applies_the_pixel_aspect_of_anamorphic_sources(tmp_path: Path, out: Path) -> None:
    src = tmp_path / "anamorphic.mkv"
    make_video(src, seconds=1, audio=False)
    squeezed = tmp_path / "squeezed.mkv"
    ffmpeg("-i", str(src), "-vf", "setsar=4/3", "-c:v", "libx264", "-preset", "ultrafast", str(squeezed))
    assert probe(str(squeezed)).display_size == (427, 240)
    p = params(video.VideoTranscodeParams, "o.mp4", preset="ultrafast")
    result = await video.run_transcode(str(squeezed), str(out), p, Progress(), context())
    assert (result["output"]["width"], result["output"]["height"]) == (426, 240)


async def test_cover_art_is_not_a_video_stream(tmp_path: Path, out: Path) -> None:
    song = tmp_path / "song.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-f", "lavfi", "-i", "color=c=red:s=64x64:d=1",
           "-map", "1:v", "-map", "0:a", "-frames:v", "1", "-c:v", "png", "-disposition:v", "attached_pic",
           "-c:a", "libmp3lame", str(song))
    info = probe(str(song))
    assert info.video is None and info.audio is not None
    assert any(s.attached_pic for s in info.streams)
    with pytest.raises(JobFailed, match="the source has no video stream"):
        await video.run_thumbnail(str(song), str(out), params(video.VideoThumbnailParams, "t.jpg"), Progress(), context())
    result = await video.run_extract_audio(str(song), str(out), params(video.VideoExtractAudioParams, "a.wav"),
                                           Progress(), context())
    assert result["output"]["audio_codec"] == "pcm_s16le"


def test_probe_of_an_output_ignores_the_source_limits(media: dict[str, Path]) -> None:
    tight = Limits(max_source_bytes=1000, max_duration_s=1)
    with pytest.raises(JobFailed, match="limits.max_source_bytes"):
        probe(str(media["clip"]), tight)
    assert probe(str(media["clip"])).duration == pytest.approx(3, abs=DURATION_TOLERANCE)


async def test_thumbnail_of_rotated_video_is_turned_clockwise(media: dict[str, Path], tmp_path: Path) -> None:
    plain = media["rotated"].with_name("unrotated-" + media["rotated"].name)
    turned, upright = tmp_path / "turned.png", tmp_path / "upright.png"
    for src, dst in ((media["rotated"], turned), (plain, upright)):
        p = params(video.VideoThumbnailParams, "t.png", time=1)
        await video.run_thumbnail(str(src), str(dst), p, Progress(), context())
    expected = pyvips.Image.new_from_file(str(upright)).rot90()
    got = pyvips.Image.new_from_file(str(turned))
    assert (got.width, got.height) == (expected.width, expected.height) == (240, 320)
    assert (got - expected).abs().avg() < 3
    assert (got - expected.rot180()).abs().avg() > 20  # the direction matters


@pytest.mark.parametrize(("strip", "kept"), [(True, False), (False, True)])
async def test_transcode_strips_source_tags_by_default(strip: bool, kept: bool, media: dict[str, Path],
                                                        tmp_path: Path, out: Path) -> None:
    tagged = tmp_path / "tagged.mp4"
    ffmpeg("-i", str(media["clip"]), "-c", "copy", "-metadata", "title=Secret place",
           "-metadata", "location=+48.8584+002.2945/", str(tagged))
    assert probe(str(tagged)).tags.get("title") == "Secret place"
    p = params(video.VideoTranscodeParams, "o.mp4", preset="ultrafast", strip_metadata=strip)
    await video.run_transcode(str(tagged), str(out), p, Progress(), context())
    tags = probe(str(out)).tags
    assert ("title" in tags) is kept and ("location" in tags) is kept


def test_operations_doc_names_every_video_and_audio_parameter() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    for name, op in REGISTRY.items():
        if op.family not in ("video", "audio"):
            continue
        heading = f"### {name}\n"
        assert heading in doc, f"docs/operations.md has no section for {name}"
        section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
        for field_name, info in op.model.model_fields.items():
            if field_name in COMMON_FIELDS:
                continue
            key = info.alias or field_name
            assert f"`{key}`" in section, f"{name}: parameter {key} is not documented"
