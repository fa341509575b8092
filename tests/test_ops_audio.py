"""Audio operations on tones generated with lavfi, checked by probing and measuring."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import pyvips
from pydantic import ValidationError

from mendsrv.errors import JobFailed
from mendsrv.ops import REGISTRY, audio
from mendsrv.probe import probe
from tests.av_media import (
    FFMPEG,
    Progress,
    context,
    ffmpeg,
    ffmpeg_children,
    make_audio,
    make_video,
    params,
)

DURATION_TOLERANCE = 0.1  # seconds
LOUDNESS_TOLERANCE = 1.0  # LU


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    silence = d / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-t", "3", "-c:a", "pcm_s16le", str(silence))
    return {
        "tone": make_audio(d / "tone.wav", seconds=4),
        "quiet": make_audio(d / "quiet.wav", seconds=5, volume=0.05, stereo=False),
        "loud": make_audio(d / "loud.wav", seconds=5, volume=3.0, stereo=False),
        "silence": silence,
        "video": make_video(d / "clip.mp4", seconds=2),
        "mute_video": make_video(d / "mute.mp4", seconds=2, audio=False),
    }


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def integrated_loudness(path: Path) -> float:
    """EBU R128 integrated loudness measured independently with ffmpeg's ebur128 filter."""
    run = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostats", "-i", str(path), "-af", "ebur128=framelog=quiet",
         "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    )
    summary = run.stderr[run.stderr.rindex("Summary:"):]
    return float(re.search(r"I:\s+(-?[\d.]+) LUFS", summary).group(1))  # type: ignore[union-attr]


def test_audio_operations_are_registered_as_ffmpeg() -> None:
    for name in ("transcode", "waveform", "normalize", "metadata"):
        assert REGISTRY[f"audio/{name}"].resource.value == "ffmpeg"


# --- transcode -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dest_key", "fields", "codec", "content_type", "sample_rate", "channels"),
    [
        ("a.mp3", {"bitrate": "96k"}, "mp3", "audio/mpeg", 44100, 2),
        ("a.m4a", {"channels": 1}, "aac", "audio/mp4", 44100, 1),
        # Opus always decodes at 48 kHz, whatever rate it was encoded at
        ("a.opus", {"sample_rate": 24000, "channels": 1}, "opus", "audio/ogg", 48000, 1),
        ("a.ogg", {}, "opus", "audio/ogg", 48000, 2),
        ("a.flac", {"sample_rate": 22050}, "flac", "audio/flac", 22050, 2),
        ("a.bin", {"format": "wav", "channels": 1, "sample_rate": 16000}, "pcm_s16le", "audio/wav", 16000, 1),
    ],
)
async def test_transcode_writes_the_requested_format(
    dest_key: str, fields: dict[str, object], codec: str, content_type: str, sample_rate: int, channels: int,
    media: dict[str, Path], out: Path,
) -> None:
    result = await audio.run_transcode(
        str(media["tone"]), str(out), params(audio.AudioTranscodeParams, dest_key, **fields), Progress(), context()
    )
    info = probe(str(out))
    assert info.audio and info.audio.codec == codec
    assert (info.audio.sample_rate, info.audio.channels) == (sample_rate, channels)
    assert info.duration == pytest.approx(4, abs=DURATION_TOLERANCE)
    assert result["output"]["content_type"] == content_type
    assert result["output"]["duration"] == pytest.approx(4, abs=DURATION_TOLERANCE)


async def test_transcode_mp3_bitrate_is_honoured(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioTranscodeParams, "a.mp3", bitrate="64k")
    await audio.run_transcode(str(media["tone"]), str(out), p, Progress(), context())
    assert out.stat().st_size == pytest.approx(64_000 / 8 * 4, rel=0.15)


async def test_transcode_clips_start_and_duration(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioTranscodeParams, "a.flac", start=1.25, duration=2)
    await audio.run_transcode(str(media["tone"]), str(out), p, Progress(), context())
    assert probe(str(out)).duration == pytest.approx(2, abs=DURATION_TOLERANCE)


async def test_transcode_takes_the_audio_of_a_video(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioTranscodeParams, "a.mp3")
    await audio.run_transcode(str(media["video"]), str(out), p, Progress(), context())
    info = probe(str(out))
    assert info.video is None and info.audio and info.audio.codec == "mp3"


async def test_transcode_of_a_source_without_audio_is_refused(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(JobFailed, match="the source has no audio stream"):
        await audio.run_transcode(
            str(media["mute_video"]), str(out), params(audio.AudioTranscodeParams, "a.mp3"), Progress(), context()
        )


async def test_transcode_over_the_duration_limit_is_refused(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(JobFailed, match=r"media is 4 s long, over the 2 s limit \(limits.max_duration_s\)"):
        await audio.run_transcode(
            str(media["tone"]), str(out), params(audio.AudioTranscodeParams, "a.mp3"), Progress(),
            context(max_duration_s=2),
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "opus", "sample_rate": 44100}, "opus supports sample_rate 8000, 12000, 16000, 24000, 48000"),
        ({"format": "mp3", "channels": 6}, "mp3 supports at most 2 channels"),
        ({"format": "mp3", "bitrate": "lots"}, "bitrate"),
        ({"format": "aiff"}, "format"),
        ({"format": "mp3", "volume": 2}, "volume"),
    ],
)
def test_transcode_params_reject_what_the_encoder_cannot_do(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        params(audio.AudioTranscodeParams, "a.bin", **fields)


def test_transcode_format_defaults_to_the_dest_key_extension_else_mp3() -> None:
    assert params(audio.AudioTranscodeParams, "x/y.FLAC").audio_format == "flac"
    assert params(audio.AudioTranscodeParams, "x/y").audio_format == "mp3"
    assert params(audio.AudioTranscodeParams, "y.wav", format="opus").audio_format == "opus"


# --- normalize -------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), [("quiet", -16.0), ("loud", -16.0), ("tone", -23.0)])
async def test_normalize_reaches_the_target_loudness(
    source: str, target: float, media: dict[str, Path], out: Path
) -> None:
    before = integrated_loudness(media[source])
    progress = Progress()
    p = params(audio.AudioNormalizeParams, "n.flac", target_i=target)
    result = await audio.run_normalize(str(media[source]), str(out), p, progress, context())
    after = integrated_loudness(out)
    assert abs(before - target) > 3  # the test means something
    assert after == pytest.approx(target, abs=LOUDNESS_TOLERANCE)
    assert result["loudness"]["input_i"] == pytest.approx(before, abs=0.5)
    assert result["loudness"]["output_i"] == pytest.approx(target, abs=LOUDNESS_TOLERANCE)
    assert result["output"]["content_type"] == "audio/flac"
    assert probe(str(out)).audio.sample_rate == 44100  # type: ignore[union-attr]
    phases = [phase for _, phase in progress.calls]
    assert "measuring" in phases and "normalizing" in phases
    assert progress.values == sorted(progress.values)


async def test_normalize_defaults_to_minus_16_lufs(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioNormalizeParams, "n.m4a")
    assert p.target_i == -16
    await audio.run_normalize(str(media["quiet"]), str(out), p, Progress(), context())
    assert integrated_loudness(out) == pytest.approx(-16, abs=LOUDNESS_TOLERANCE)


async def test_normalize_of_silence_is_a_sentence(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(JobFailed, match="silent"):
        await audio.run_normalize(
            str(media["silence"]), str(out), params(audio.AudioNormalizeParams, "n.wav"), Progress(), context()
        )
    assert ffmpeg_children() == []


# --- waveform --------------------------------------------------------------------------


async def test_waveform_png_has_the_size_and_colours_asked(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioWaveformParams, "w.png", width=300, height=100,
               background_color="#000000", waveform_color="#ff8000")
    result = await audio.run_waveform(str(media["loud"]), str(out), p, Progress(), context())
    image = pyvips.Image.new_from_file(str(out))
    assert (image.width, image.height) == (300, 100)
    assert result["output"] == {"content_type": "image/png", "width": 300, "height": 100}
    assert image(150, 50)[:3] == [255, 128, 0]  # the centre line is waveform
    assert image(150, 0)[:3] == [0, 0, 0] and image(150, 99)[:3] == [0, 0, 0]
    # the tone peaks at 0.375 of full scale: the bar spans about 38% of the height
    column = [image(150, y)[:3] for y in range(100)]
    filled = sum(1 for px in column if px == [255, 128, 0])
    assert 34 <= filled <= 42


async def test_waveform_png_of_a_quiet_tone_is_thin(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioWaveformParams, "w.png", width=200, height=100)
    await audio.run_waveform(str(media["quiet"]), str(out), p, Progress(), context())
    image = pyvips.Image.new_from_file(str(out))
    column = [image(100, y)[:3] for y in range(100)]
    filled = sum(1 for px in column if px != [255, 255, 255])
    assert 1 <= filled <= 12  # amplitude 0.05 of a full-scale 1/8 tone


async def test_waveform_json_has_the_audiowaveform_shape(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioWaveformParams, "peaks.json", samples_per_pixel=512)
    result = await audio.run_waveform(str(media["tone"]), str(out), p, Progress(), context())
    doc = json.loads(out.read_text())
    assert set(doc) == {"version", "channels", "sample_rate", "samples_per_pixel", "bits", "length", "data"}
    assert (doc["version"], doc["channels"], doc["sample_rate"], doc["samples_per_pixel"], doc["bits"]) == (
        2, 1, 44100, 512, 8)
    assert doc["length"] == math.ceil(4 * 44100 / 512)
    assert len(doc["data"]) == 2 * doc["length"]
    assert all(-128 <= v <= 127 for v in doc["data"])
    mins, maxs = doc["data"][0::2], doc["data"][1::2]
    assert all(lo <= hi for lo, hi in zip(mins, maxs, strict=True))
    assert max(maxs) > 0 > min(mins)
    assert result["output"]["content_type"] == "application/json"
    assert result["length"] == doc["length"]


async def test_waveform_json_split_channels_and_16_bits(media: dict[str, Path], out: Path) -> None:
    p = params(audio.AudioWaveformParams, "p.json", split_channels=True, bits=16)
    await audio.run_waveform(str(media["tone"]), str(out), p, Progress(), context())
    doc = json.loads(out.read_text())
    assert doc["channels"] == 2 and doc["bits"] == 16 and doc["samples_per_pixel"] == 256
    assert len(doc["data"]) == 2 * 2 * doc["length"]
    peak = max(doc["data"])
    # volume 0.25 of lavfi's 1/8 amplitude sine: about 1024 in 16-bit
    assert 900 <= peak <= 1100


# --- metadata --------------------------------------------------------------------------


async def test_metadata_describes_the_audio(media: dict[str, Path], out: Path) -> None:
    result = await audio.run_metadata(
        str(media["tone"]), str(out), params(audio.AudioMetadataParams, "m.json"), Progress(), context()
    )
    doc = json.loads(out.read_text())
    assert doc == result["metadata"]
    assert doc["format"] == "wav" and doc["duration"] == pytest.approx(4, abs=0.01)
    (stream,) = doc["streams"]
    assert (stream["codec"], stream["sample_rate"], stream["channels"]) == ("pcm_s16le", 44100, 2)
    assert stream["bit_rate"] == 44100 * 16 * 2


async def test_metadata_refuses_a_source_without_audio(media: dict[str, Path], out: Path) -> None:
    with pytest.raises(JobFailed, match="no audio stream"):
        await audio.run_metadata(
            str(media["mute_video"]), str(out), params(audio.AudioMetadataParams, "m.json"), Progress(), context()
        )


async def test_transcode_keeps_audio_tags_unless_asked(media: dict[str, Path], tmp_path: Path, out: Path) -> None:
    tagged = tmp_path / "tagged.flac"
    ffmpeg("-i", str(media["tone"]), "-metadata", "title=Song", "-metadata", "artist=Band", str(tagged))
    await audio.run_transcode(str(tagged), str(out), params(audio.AudioTranscodeParams, "a.mp3"), Progress(), context())
    assert probe(str(out)).tags.get("title") == "Song"
    p = params(audio.AudioTranscodeParams, "a.mp3", strip_metadata=True)
    await audio.run_transcode(str(tagged), str(out), p, Progress(), context())
    assert "title" not in probe(str(out)).tags and "artist" not in probe(str(out)).tags


async def test_waveform_json_with_too_many_points_is_refused(media: dict[str, Path], out: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio, "MAX_PEAKS", 1000)
    p = params(audio.AudioWaveformParams, "p.json", samples_per_pixel=16)
    with pytest.raises(JobFailed, match=r"over the limit of 1000; use samples_per_pixel of at least 177"):
        await audio.run_waveform(str(media["tone"]), str(out), p, Progress(), context())
    assert not out.exists()
