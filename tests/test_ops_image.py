"""Image operations, run directly on real pyvips with generated inputs.

Outputs are checked by what a user would see: dimensions, the loader that reads them
back, pixel colours at known places, bands, frames; hostile inputs by the sentence
they fail with and how fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pyvips
from pydantic import ValidationError

from mendsrv.errors import JobFailed
from mendsrv.ops import REGISTRY
from mendsrv.ops.base import Limits, RunContext
from mendsrv.ops.imaging import can_save

try:
    from tests import image_media as media
except ImportError:  # pragma: no cover - pytest run from inside tests/
    import image_media as media  # type: ignore[no-redef]

RED, GREEN, BLUE, WHITE, BLACK = media.RED, media.GREEN, media.BLUE, media.WHITE, media.BLACK


needs_fonts = pytest.mark.skipif(pyvips.Image.text("x", dpi=72).max() == 0, reason="no fonts installed")


def run(op: str, src: Path, tmp_path: Path, dest_key: str = "out.png", ctx: RunContext | None = None,
        **params: Any) -> tuple[dict[str, Any], Path]:
    """Validate params through the operation's model and run it; (result, output path)."""
    operation = REGISTRY[op]
    model = operation.model(source_bucket="in", source_key=src.name, dest_bucket="out", dest_key=dest_key, **params)
    dst = tmp_path / ("result-" + dest_key.replace("/", "_"))
    phases: list[tuple[float, str]] = []
    result = operation.run(str(src), str(dst), model, lambda p, phase: phases.append((p, phase)), ctx or RunContext())
    assert all(0 <= p <= 100 for p, _ in phases)
    return result, dst


def load(path: Path, **options: Any) -> Any:
    """Read a file back; revalidate: the same path may have been rewritten in a test."""
    return pyvips.Image.new_from_file(str(path), revalidate=True, **options)


def loader(path: Path) -> str:
    return str(load(path).get("vips-loader"))


def px(image: Any, x: int, y: int) -> list[float]:
    return image(x, y)


def near(actual: list[float], expected: list[int], tol: float = 12) -> bool:
    return len(actual) >= len(expected) and all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=False))


def assert_quadrants(image: Any, tol: float = 12) -> None:
    """The canonical picture: red TL, green TR, blue BL, white BR."""
    w, h = image.width, image.height
    corners = {(w // 4, h // 4): RED, (3 * w // 4, h // 4): GREEN, (w // 4, 3 * h // 4): BLUE,
               (3 * w // 4, 3 * h // 4): WHITE}
    for (x, y), colour in corners.items():
        assert near(px(image, x, y), colour, tol), f"pixel at {x},{y} is {px(image, x, y)}, expected {colour}"


@pytest.fixture
def quad(tmp_path: Path) -> Path:
    return media.write_quadrants(tmp_path / "quad.png", 200, 100)


@pytest.fixture
def quad_jpeg(tmp_path: Path) -> Path:
    return media.write_quadrants(tmp_path / "quad.jpg", 200, 100, Q=95)


# --- the registry -----------------------------------------------------------------------


def test_registry_lists_every_image_operation() -> None:
    names = {n for n in REGISTRY if n.startswith("image/")}
    assert names == {f"image/{n}" for n in
                     ("resize", "thumbnail", "crop", "rotate", "convert", "watermark", "optimize", "metadata")}


def test_registry_image_parameters_all_have_descriptions() -> None:
    for name, op in REGISTRY.items():
        if name.startswith("image/"):
            schema = op.model.model_json_schema()
            missing = [f for f, s in schema["properties"].items() if not s.get("description")]
            assert not missing, f"{name}: {missing} lack a description"


def test_registry_watermark_declares_its_extra_source() -> None:
    assert REGISTRY["image/watermark"].extra_sources == {"watermark": ("watermark_bucket", "watermark_key")}


# --- image/resize ------------------------------------------------------------------------


def test_resize_inside_keeps_aspect_ratio(quad: Path, tmp_path: Path) -> None:
    result, out = run("image/resize", quad, tmp_path, width=100, height=100)
    image = load(out)
    assert (image.width, image.height) == (100, 50)
    assert result["output"] == {"content_type": "image/png", "width": 100, "height": 50, "format": "png"}
    assert_quadrants(image)


def test_resize_cover_crops_by_compass_gravity(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, width=50, height=50, fit="cover", gravity="west")
    image = load(out)
    assert (image.width, image.height) == (50, 50)
    assert near(px(image, 10, 10), RED) and near(px(image, 40, 10), RED)
    assert near(px(image, 10, 40), BLUE)


def test_resize_contain_pads_with_background(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, "out.jpg", width=100, height=100, fit="contain",
                 background="#000000")
    image = load(out)
    assert (image.width, image.height) == (100, 100)
    assert near(px(image, 50, 5), BLACK) and near(px(image, 50, 95), BLACK)
    assert near(px(image, 20, 40), RED)


def test_resize_contain_pads_transparent_for_png(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, width=100, height=100, fit="contain")
    image = load(out)
    assert image.bands == 4 and px(image, 50, 5)[3] == 0 and px(image, 20, 40)[3] == 255


def test_resize_fill_stretches_to_exact_size(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, width=60, height=90, fit="fill")
    image = load(out)
    assert (image.width, image.height) == (60, 90)
    assert_quadrants(image)


def test_resize_outside_covers_box_without_cropping(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, width=50, height=50, fit="outside")
    assert (load(out).width, load(out).height) == (100, 50)


def test_resize_does_not_enlarge_unless_asked(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/resize", quad, tmp_path, width=400)
    assert load(out).width == 200
    _, out = run("image/resize", quad, tmp_path, "big.png", width=400, enlarge=True)
    assert (load(out).width, load(out).height) == (400, 200)


def test_resize_applies_exif_orientation(tmp_path: Path) -> None:
    src = media.write_exif_rotated(tmp_path / "rot.jpg", 6)
    assert (load(src).width, load(src).height) == (100, 200)  # stored on its side
    _, out = run("image/resize", src, tmp_path, "out.jpg", width=100)
    image = load(out)
    assert (image.width, image.height) == (100, 50)
    assert_quadrants(image, tol=30)
    assert not image.get_typeof("orientation") or image.get("orientation") == 1


def test_resize_format_from_dest_key_then_format_param(quad: Path, tmp_path: Path) -> None:
    result, out = run("image/resize", quad, tmp_path, "photo.webp", width=50)
    assert loader(out).startswith("webpload") and result["output"]["content_type"] == "image/webp"
    result, out = run("image/resize", quad, tmp_path, "photo.webp", width=50, format="jpeg")
    assert loader(out).startswith("jpegload") and result["output"]["content_type"] == "image/jpeg"
    result, out = run("image/resize", quad, tmp_path, "no-extension", width=50)
    assert loader(out).startswith("pngload")  # the source's format


def test_resize_animated_gif_stays_animated(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif")
    result, out = run("image/resize", src, tmp_path, "out.gif", width=20)
    image = load(out, n=-1)
    assert image.get("n-pages") == 3 and image.get("page-height") == 20 and image.width == 20
    assert result["output"]["frames"] == 3
    assert near(px(image, 10, 10), RED) and near(px(image, 10, 30), GREEN) and near(px(image, 10, 50), BLUE)


@pytest.mark.parametrize(("op", "params", "size"), [
    ("image/thumbnail", {"width": 16, "gravity": "attention"}, (16, 16)),
    ("image/crop", {"left": 4, "top": 4, "width": 10, "height": 12}, (10, 12)),
    ("image/rotate", {"angle": 90, "flop": True}, (40, 40)),
])
def test_animation_webp_stays_animated_through(op: str, params: dict[str, Any], size: tuple[int, int],
                                              tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.webp")
    result, out = run(op, src, tmp_path, "out.webp", **params)
    image = load(out, n=-1)
    assert image.get("n-pages") == 3 and (image.width, image.get("page-height")) == size
    frames = [px(image, 5, 5 + size[1] * i) for i in range(3)]
    assert all(near(f, c, 8) for f, c in zip(frames, [RED, GREEN, BLUE], strict=True)), frames
    assert result["output"]["frames"] == 3


def test_resize_extreme_aspect_ratio_keeps_at_least_one_pixel(tmp_path: Path) -> None:
    src = tmp_path / "line.png"
    media.solid(1000, 2, RED).pngsave(str(src))
    for fit in ("inside", "fill", "cover", "contain", "outside"):
        _, out = run("image/resize", src, tmp_path, f"{fit}.png", width=10, fit=fit)
        image = load(out)
        assert image.width == 10 and image.height >= 1 and px(image, 5, 0)[:3] == RED


def test_resize_needs_width_or_height() -> None:
    with pytest.raises(ValidationError):
        REGISTRY["image/resize"].model(source_bucket="a", source_key="a.jpg", dest_bucket="b", dest_key="b.jpg")


# --- image/thumbnail ---------------------------------------------------------------------


def test_thumbnail_square_by_default(quad_jpeg: Path, tmp_path: Path) -> None:
    result, out = run("image/thumbnail", quad_jpeg, tmp_path, "t.jpg", width=40)
    image = load(out)
    assert (image.width, image.height) == (40, 40) == (result["output"]["width"], result["output"]["height"])
    assert loader(out).startswith("jpegload")


def test_thumbnail_entropy_keeps_busy_region(tmp_path: Path) -> None:
    src = media.write_noise_right(tmp_path / "noise.png")
    _, out = run("image/thumbnail", src, tmp_path, width=100, height=100, gravity="entropy")
    image = load(out)
    assert (image.width, image.height) == (100, 100)
    # the noisy half, edge to edge: a centre crop would have a flat grey left side
    assert image.crop(0, 0, 20, 100).deviate() > 10


def test_thumbnail_attention_keeps_salient_region(tmp_path: Path) -> None:
    src = tmp_path / "spot.png"
    media.solid(400, 200, [128, 128, 128]).insert(media.solid(40, 40, RED), 340, 80).pngsave(str(src))
    _, out = run("image/thumbnail", src, tmp_path, width=100, height=100, gravity="attention")
    image = load(out)
    red = (image[0] > 200) & (image[1] < 60)
    assert red.max() == 255  # the red spot at the far right is in the crop
    assert near(px(image, 5, 5), [128, 128, 128], 2)


def test_thumbnail_compass_gravity(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/thumbnail", quad, tmp_path, width=50, height=50, gravity="east")
    image = load(out)
    assert near(px(image, 25, 10), GREEN) and near(px(image, 25, 40), WHITE)


# --- image/crop ----------------------------------------------------------------------------


def test_crop_region_takes_exact_pixels(quad: Path, tmp_path: Path) -> None:
    result, out = run("image/crop", quad, tmp_path, left=90, top=40, width=20, height=20)
    image = load(out)
    assert (image.width, image.height) == (20, 20)
    assert px(image, 5, 5) == RED and px(image, 15, 5) == GREEN
    assert px(image, 5, 15) == BLUE and px(image, 15, 15) == WHITE
    assert result["output"]["width"] == 20


def test_crop_region_is_clipped_to_the_image(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/crop", quad, tmp_path, left=150, top=50, width=100, height=100)
    image = load(out)
    assert (image.width, image.height) == (50, 50) and px(image, 25, 25) == WHITE


def test_crop_region_outside_the_image_fails(quad: Path, tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match=r"crop region starts at 300,0, outside the 200×100 image"):
        run("image/crop", quad, tmp_path, left=300, top=0, width=10, height=10)


def test_crop_gravity_places_the_region(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/crop", quad, tmp_path, width=30, height=30, gravity="southeast")
    image = load(out)
    assert (image.width, image.height) == (30, 30) and px(image, 15, 15) == WHITE


def test_crop_applies_exif_orientation_first(tmp_path: Path) -> None:
    src = media.write_exif_rotated(tmp_path / "rot.jpg", 6)
    _, out = run("image/crop", src, tmp_path, left=0, top=0, width=40, height=40)
    assert near(px(load(out), 20, 20), RED, 30)


def test_crop_needs_both_left_and_top() -> None:
    with pytest.raises(ValidationError, match="both left and top"):
        REGISTRY["image/crop"].model(source_bucket="a", source_key="a.jpg", dest_bucket="b", dest_key="b.jpg",
                                     width=10, height=10, left=5)


# --- image/rotate -------------------------------------------------------------------------


def test_rotate_90_turns_clockwise(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/rotate", quad, tmp_path, angle=90)
    image = load(out)
    assert (image.width, image.height) == (100, 200)
    # clockwise: the red top-left ends at the top-right
    assert px(image, 75, 50) == RED and px(image, 25, 50) == BLUE
    assert px(image, 75, 150) == GREEN and px(image, 25, 150) == WHITE


def test_rotate_negative_90_is_270(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/rotate", quad, tmp_path, angle=-90)
    image = load(out)
    assert (image.width, image.height) == (100, 200) and px(image, 25, 150) == RED


def test_rotate_any_angle_fills_corners(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/rotate", quad, tmp_path, angle=30)
    image = load(out)
    assert image.width > 200 and image.bands == 4 and px(image, 0, 0)[3] == 0  # transparent corner
    _, out = run("image/rotate", quad, tmp_path, "out.jpg", angle=30, background="#0000ff")
    image = load(out)
    assert image.bands == 3 and near(px(image, 1, 1), BLUE, 20)


def test_rotate_flip_and_flop(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/rotate", quad, tmp_path, flip=True)
    image = load(out)
    assert px(image, 50, 25) == BLUE and px(image, 150, 75) == GREEN
    _, out = run("image/rotate", quad, tmp_path, "flop.png", flop=True)
    image = load(out)
    assert px(image, 50, 25) == GREEN and px(image, 150, 75) == BLUE


def test_rotate_zero_only_applies_exif(tmp_path: Path) -> None:
    src = media.write_exif_rotated(tmp_path / "rot.jpg", 8)
    _, out = run("image/rotate", src, tmp_path, "out.png")
    image = load(out)
    assert (image.width, image.height) == (200, 100)
    assert_quadrants(image, tol=30)


def test_rotate_without_auto_rotate_keeps_stored_pixels(tmp_path: Path) -> None:
    src = media.write_exif_rotated(tmp_path / "rot.jpg", 6)
    _, out = run("image/rotate", src, tmp_path, "out.png", auto_rotate=False)
    assert (load(out).width, load(out).height) == (100, 200)


# --- image/convert ------------------------------------------------------------------------

FORMAT_LOADERS = {"jpeg": "jpegload", "png": "pngload", "webp": "webpload", "avif": "heifload",
                  "gif": "gifload", "tiff": "tiffload"}


@pytest.mark.parametrize("fmt", sorted(FORMAT_LOADERS))
def test_convert_writes_each_format(fmt: str, quad: Path, tmp_path: Path) -> None:
    result, out = run("image/convert", quad, tmp_path, f"out.{fmt}", quality=90)
    image = load(out)
    assert loader(out).startswith(FORMAT_LOADERS[fmt])
    assert (image.width, image.height) == (200, 100)
    assert result["output"]["format"] == fmt
    if fmt == "avif":
        assert image.get("heif-compression") == "av1"
    assert_quadrants(image.extract_band(0, n=3) if image.bands > 3 else image, tol=40)


def test_convert_heif_written_or_refused_clearly(quad: Path, tmp_path: Path) -> None:
    if can_save("heif"):
        _, out = run("image/convert", quad, tmp_path, "out.heic")
        assert load(out).get("heif-compression") == "hevc"
    else:
        with pytest.raises(JobFailed, match="cannot write HEIF; choose avif"):
            run("image/convert", quad, tmp_path, "out.heic")


def test_convert_flattens_alpha_onto_background_for_jpeg(tmp_path: Path) -> None:
    src = media.write_alpha(tmp_path / "alpha.png")
    _, out = run("image/convert", src, tmp_path, "out.jpg", background="#00ff00")
    image = load(out)
    assert image.bands == 3
    assert near(px(image, 8, 32), GREEN, 20) and near(px(image, 56, 32), RED, 20)


def test_convert_keeps_alpha_for_webp(tmp_path: Path) -> None:
    src = media.write_alpha(tmp_path / "alpha.png")
    _, out = run("image/convert", src, tmp_path, "out.webp", lossless=True)
    image = load(out)
    assert image.bands == 4 and px(image, 8, 32)[3] == 0 and px(image, 56, 32) == [255, 0, 0, 255]


def test_convert_cmyk_comes_out_srgb(tmp_path: Path) -> None:
    for name, profile in (("cmyk.jpg", True), ("cmyk-bare.jpg", False)):
        src = media.write_cmyk(tmp_path / name, with_profile=profile)
        assert load(src).interpretation == "cmyk"
        _, out = run("image/convert", src, tmp_path, "out.png")
        image = load(out)
        assert image.interpretation == "srgb" and image.bands == 3
        assert near(px(image, 32, 32), RED, 45), px(image, 32, 32)


def test_convert_icc_tagged_input_is_transformed_to_srgb(tmp_path: Path) -> None:
    src = media.write_p3_tagged(tmp_path / "p3.png")
    assert not near(px(load(src), 5, 5), RED, 12)  # P3 numbers differ from sRGB red
    _, out = run("image/convert", src, tmp_path, "out.png")
    assert near(px(load(out), 5, 5), RED, 6)


WRITING_OPS = [
    ("image/resize", {"width": 16}), ("image/thumbnail", {"width": 16}), ("image/crop", {"width": 8, "height": 8}),
    ("image/rotate", {"angle": 90}),
    pytest.param("image/watermark", {"text": "x", "gravity": "southeast"}, marks=needs_fonts),
    ("image/optimize", {}),
]


@pytest.mark.parametrize(("op", "params"), WRITING_OPS)
@pytest.mark.parametrize("maker", [media.write_p3_tagged, media.write_cmyk])
def test_colour_managed_inputs_come_out_srgb_from_every_operation(
        op: str, params: dict[str, Any], maker: Any, tmp_path: Path) -> None:
    src = maker(tmp_path / ("src.png" if maker is media.write_p3_tagged else "src.jpg"))
    _, out = run(op, src, tmp_path, "out.png", **params)
    image = load(out)
    assert image.interpretation == "srgb" and image.bands == 3
    assert near(px(image, 2, 2), RED, 45 if maker is media.write_cmyk else 6), px(image, 2, 2)


def test_convert_16bit_becomes_8bit(tmp_path: Path) -> None:
    src = media.write_16bit(tmp_path / "deep.png")
    assert load(src).format == "ushort"
    _, out = run("image/convert", src, tmp_path, "out.png")
    image = load(out)
    assert image.format == "uchar" and image.interpretation == "srgb"
    assert_quadrants(image, tol=1)


def test_convert_greyscale_stays_one_band(tmp_path: Path) -> None:
    for bits in (8, 16):
        src = media.write_grey(tmp_path / f"grey{bits}.png", bits=bits)
        _, out = run("image/convert", src, tmp_path, "out.png")
        image = load(out)
        assert image.bands == 1 and image.format == "uchar"
        assert px(image, 0, 5) == [0] and px(image, 255, 5) == [255] and abs(px(image, 128, 5)[0] - 128) <= 1


def test_convert_palette_png_input(tmp_path: Path) -> None:
    src = media.write_palette(tmp_path / "pal.png")
    _, out = run("image/convert", src, tmp_path, "out.jpg", quality=95)
    assert_quadrants(load(out), tol=30)


def test_convert_animated_gif_to_webp_keeps_frames(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif")
    result, out = run("image/convert", src, tmp_path, "out.webp", lossless=True)
    image = load(out, n=-1)
    assert loader(out).startswith("webpload")
    assert image.get("n-pages") == 3 and image.get("page-height") == 40
    assert [px(image, 20, 20 + 40 * i)[:3] for i in range(3)] == [RED, GREEN, BLUE]
    assert list(image.get("delay")) == [100, 100, 100]
    assert result["output"]["frames"] == 3


def test_convert_animated_to_jpeg_takes_first_frame(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.webp")
    _, out = run("image/convert", src, tmp_path, "out.jpg")
    image = load(out)
    assert (image.width, image.height) == (40, 40) and near(px(image, 20, 20), RED, 20)


def test_convert_progressive_jpeg_and_interlaced_png(quad: Path, tmp_path: Path) -> None:
    _, out = run("image/convert", quad, tmp_path, "out.jpg", progressive=True)
    assert load(out).get("interlaced") == 1
    _, out = run("image/convert", quad, tmp_path, "out.png", interlace=True)
    assert load(out).get("interlaced") == 1


def test_convert_lossless_webp_keeps_exact_pixels(tmp_path: Path) -> None:
    src = media.write_noise_right(tmp_path / "noise.png")
    _, out = run("image/convert", src, tmp_path, "out.webp", lossless=True)
    assert (load(out) - load(src)).abs().max() == 0


def test_convert_lossless_jpeg_is_refused(quad: Path, tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match="JPEG cannot be lossless"):
        run("image/convert", quad, tmp_path, "out.jpg", lossless=True)


def test_convert_strips_metadata_unless_asked(tmp_path: Path) -> None:
    src = media.write_with_exif(tmp_path / "exif.jpg")
    _, out = run("image/convert", src, tmp_path, "out.jpg")
    assert not load(out).get_typeof("exif-ifd0-Make")
    _, out = run("image/convert", src, tmp_path, "kept.jpg", strip_metadata=False)
    assert load(out).get("exif-ifd0-Make").startswith("TestCam")


# --- image/watermark ----------------------------------------------------------------------


def _watermark_ctx(path: Path) -> RunContext:
    return RunContext(sources={"watermark": str(path)})


def test_watermark_image_at_gravity_with_margin(tmp_path: Path) -> None:
    base = tmp_path / "base.png"
    media.solid(200, 200, WHITE).pngsave(str(base))
    mark = tmp_path / "mark.png"
    media.solid(20, 20, RED).pngsave(str(mark))
    _, out = run("image/watermark", base, tmp_path, ctx=_watermark_ctx(mark), watermark_bucket="brand", watermark_key="mark.png",
                 opacity=1.0, margin=10, gravity="southeast")
    image = load(out)
    assert image.bands == 3
    assert px(image, 180, 180) == RED and px(image, 171, 171) == RED
    assert px(image, 195, 195) == WHITE and px(image, 168, 180) == WHITE and px(image, 10, 10) == WHITE


def test_watermark_opacity_blends(tmp_path: Path) -> None:
    base = tmp_path / "base.png"
    media.solid(100, 100, WHITE).pngsave(str(base))
    mark = tmp_path / "mark.png"
    media.solid(20, 20, RED).pngsave(str(mark))
    _, out = run("image/watermark", base, tmp_path, ctx=_watermark_ctx(mark), watermark_bucket="brand", watermark_key="mark.png",
                 opacity=0.5, gravity="northwest", margin=0)
    assert near(px(load(out), 10, 10), [255, 128, 128], 3)


def test_watermark_size_is_relative_to_image_width(tmp_path: Path) -> None:
    base = tmp_path / "base.jpg"
    media.solid(400, 200, WHITE).jpegsave(str(base))
    mark = tmp_path / "mark.png"
    media.solid(10, 10, BLUE).pngsave(str(mark))
    _, out = run("image/watermark", base, tmp_path, "out.jpg", ctx=_watermark_ctx(mark),
                 watermark_bucket="brand", watermark_key="mark.png", size=0.25, opacity=1.0, gravity="centre", margin=0)
    image = load(out)
    # a 100×100 blue square in the middle of 400×200
    assert near(px(image, 155, 55), BLUE, 30) and near(px(image, 245, 145), BLUE, 30)
    assert near(px(image, 140, 100), WHITE, 30) and near(px(image, 260, 100), WHITE, 30)


@needs_fonts
def test_watermark_text_is_drawn_in_colour(tmp_path: Path) -> None:
    base = tmp_path / "base.png"
    media.solid(300, 100, BLACK).pngsave(str(base))
    _, out = run("image/watermark", base, tmp_path, text="© Mend <b>", colour="#ff0000", font_size=30,
                 opacity=1.0, gravity="southwest", margin=5)
    image = load(out)
    left_bottom = image.crop(0, 50, 150, 50)
    assert left_bottom.extract_band(0).max() > 200  # red text drawn
    assert left_bottom.extract_band(1).max() < 30  # and only red
    assert image.crop(200, 0, 100, 40).max() == 0  # far corner untouched


@needs_fonts
def test_watermark_text_size_is_relative_to_image_width(tmp_path: Path) -> None:
    base = tmp_path / "base.png"
    media.solid(400, 100, BLACK).pngsave(str(base))
    _, out = run("image/watermark", base, tmp_path, text="MEND MEND", size=0.5, opacity=1.0,
                 gravity="northwest", margin=0)
    drawn = load(out).extract_band(0) > 128
    columns = drawn.project()[0]  # per-column count of lit pixels
    lit = [x for x in range(400) if columns(x, 0)[0] > 0]
    assert 170 <= lit[-1] - lit[0] + 1 <= 200  # about half the width


@needs_fonts
def test_watermark_keeps_animation(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif")
    _, out = run("image/watermark", src, tmp_path, "out.gif", text="x", font_size=12, opacity=1.0)
    assert load(out, n=-1).get("n-pages") == 3


def test_watermark_needs_image_or_text() -> None:
    model = REGISTRY["image/watermark"].model
    common = dict(source_bucket="a", source_key="a.jpg", dest_bucket="b", dest_key="b.jpg")
    with pytest.raises(ValidationError):
        model(**common)
    with pytest.raises(ValidationError):
        model(**common, text="x", watermark_key="w.png")
    with pytest.raises(ValidationError):
        model(**common, watermark_key="../secret.png")
    with pytest.raises(ValidationError, match="together"):
        model(**common, watermark_key="w.png")
    with pytest.raises(ValidationError):
        model(**common, watermark_bucket="../x", watermark_key="w.png")
    assert model(**common, watermark_bucket="brand", watermark_key="w.png").watermark_key == "w.png"


def test_watermark_missing_download_fails_clearly(quad: Path, tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match="watermark image was not downloaded"):
        run("image/watermark", quad, tmp_path, watermark_bucket="brand", watermark_key="w.png")


def test_watermark_bad_overlay_fails_clearly(quad: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(JobFailed, match="^watermark image: the source is not an image"):
        run("image/watermark", quad, tmp_path, ctx=_watermark_ctx(bad), watermark_bucket="brand", watermark_key="bad.png")


# --- image/optimize -----------------------------------------------------------------------


def test_optimize_jpeg_gets_smaller_and_reports_bytes(tmp_path: Path) -> None:
    src = media.write_with_exif(tmp_path / "big.jpg")
    pyvips.Image.gaussnoise(300, 200, sigma=20, mean=128).cast("uchar").bandjoin([128, 128]).copy(
        interpretation="srgb").jpegsave(str(src), Q=100)
    result, out = run("image/optimize", src, tmp_path, "out.jpg", quality=75)
    assert result["bytes_before"] == src.stat().st_size
    assert result["bytes_after"] == out.stat().st_size < src.stat().st_size
    assert result["saved_bytes"] == result["bytes_before"] - result["bytes_after"]
    assert result["method"].startswith("jpeg:")
    assert loader(out).startswith("jpegload") and (load(out).width, load(out).height) == (300, 200)


def test_optimize_png_with_few_colours_uses_lossless_palette(tmp_path: Path) -> None:
    src = tmp_path / "flat.png"
    media.quadrants(256, 256).pngsave(str(src), compression=0)
    result, out = run("image/optimize", src, tmp_path, "out.png")
    assert result["method"] == "png: palette"
    assert result["bytes_after"] < result["bytes_before"] / 10
    assert (load(out).extract_band(0, n=3) - load(src)).abs().max() == 0


def test_optimize_png_photo_stays_truecolour(tmp_path: Path) -> None:
    src = media.write_noise_right(tmp_path / "photo.png")
    result, out = run("image/optimize", src, tmp_path, "out.png")
    assert result["method"].startswith("png: lossless")
    assert (load(out) - load(src)).abs().max() == 0


def test_optimize_keeps_an_already_smaller_source(tmp_path: Path) -> None:
    src = tmp_path / "tight.webp"
    load(media.write_noise_right(tmp_path / "noise.png")).webpsave(str(src), Q=5, keep=pyvips.enums.ForeignKeep.NONE)  # quality 5, no metadata
    result, out = run("image/optimize", src, tmp_path, "out.webp", quality=90)
    assert result["method"].startswith("source kept")
    assert out.read_bytes() == src.read_bytes() and result["saved_bytes"] == 0


def test_optimize_strips_metadata(tmp_path: Path) -> None:
    src = media.write_with_exif(tmp_path / "exif.jpg")
    _, out = run("image/optimize", src, tmp_path, "out.jpg")
    assert not load(out).get_typeof("exif-ifd0-Make")


def test_optimize_animated_gif_stays_animated(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif")
    result, out = run("image/optimize", src, tmp_path, "out.gif")
    assert load(out, n=-1).get("n-pages") == 3
    assert result["bytes_after"] == out.stat().st_size


# --- image/metadata -----------------------------------------------------------------------


def test_metadata_reports_header_exif_and_writes_json(tmp_path: Path) -> None:
    src = media.write_with_exif(tmp_path / "exif.jpg")
    result, out = run("image/metadata", src, tmp_path, "meta.json")
    meta = result["metadata"]
    assert result["output"]["content_type"] == "application/json"
    assert json.loads(out.read_text()) == meta
    assert meta | {"exif": None, "dominant_colour": None, "blurhash": None} == meta | {
        "format": "jpeg", "content_type": "image/jpeg", "width": 120, "height": 80, "pages": 1, "frames": 1,
        "bands": 3, "colour_space": "srgb", "has_alpha": False, "orientation": 1, "icc_profile": False,
        "size": src.stat().st_size, "exif": None, "dominant_colour": None, "blurhash": None,
    }
    assert meta["exif"] == {"make": "TestCam", "model": "Model X", "lens_model": "Lens 50mm",
                            "date_time_original": "2024-05-01T12:34:56", "f_number": 2.8}


def test_metadata_gps_only_when_asked(tmp_path: Path) -> None:
    src = media.write_with_exif(tmp_path / "exif.jpg")
    result, _ = run("image/metadata", src, tmp_path, "meta.json")
    assert "gps" not in result["metadata"]["exif"]
    result, _ = run("image/metadata", src, tmp_path, "meta2.json", include_gps=True)
    gps = result["metadata"]["exif"]["gps"]
    assert gps["latitude"] == pytest.approx(51.507408, abs=1e-5)
    assert gps["longitude"] == pytest.approx(-0.1275, abs=1e-5)


def test_metadata_orientation_and_display_size(tmp_path: Path) -> None:
    src = media.write_exif_rotated(tmp_path / "rot.jpg", 6)
    meta = run("image/metadata", src, tmp_path, "m.json")[0]["metadata"]
    assert (meta["width"], meta["height"], meta["orientation"]) == (100, 200, 6)
    assert (meta["display_width"], meta["display_height"]) == (200, 100)


def test_metadata_animation_alpha_cmyk_and_depth(tmp_path: Path) -> None:
    meta = run("image/metadata", media.write_animated(tmp_path / "a.gif"), tmp_path, "1.json")[0]["metadata"]
    assert (meta["pages"], meta["frames"], meta["animated"], meta["width"], meta["height"]) == (3, 3, True, 40, 40)
    meta = run("image/metadata", media.write_alpha(tmp_path / "a.png"), tmp_path, "2.json")[0]["metadata"]
    assert (meta["has_alpha"], meta["bands"]) == (True, 4)
    meta = run("image/metadata", media.write_cmyk(tmp_path / "c.jpg"), tmp_path, "3.json")[0]["metadata"]
    assert (meta["colour_space"], meta["icc_profile"], meta["has_alpha"]) == ("cmyk", True, False)
    meta = run("image/metadata", media.write_16bit(tmp_path / "d.png"), tmp_path, "4.json")[0]["metadata"]
    assert meta["bit_depth"] == 16
    meta = run("image/metadata", media.write_grey(tmp_path / "g.png"), tmp_path, "5.json")[0]["metadata"]
    assert (meta["colour_space"], meta["bands"]) == ("grey", 1)


def test_metadata_dominant_colour_and_blurhash(tmp_path: Path) -> None:
    import blurhash

    src = tmp_path / "mostly-blue.png"
    media.solid(100, 100, BLUE).insert(media.solid(20, 20, RED), 0, 0).pngsave(str(src))
    meta = run("image/metadata", src, tmp_path, "m.json")[0]["metadata"]
    assert meta["dominant_colour"] == "#0000ff"
    assert blurhash.is_valid_blurhash(meta["blurhash"])
    assert len(meta["blurhash"]) == 6 + 2 * (4 * 3 - 1)  # 4×3 components


def test_metadata_blurhash_matches_reference_encoder() -> None:
    import blurhash
    from PIL import Image as PILImage

    from mendsrv.ops.image_metadata import blurhash_encode

    image = media.quadrants(32, 24)
    data = bytes(image.write_to_memory())
    with warnings.catch_warnings():  # blurhash-python uses a Pillow API deprecated in Pillow 13
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = blurhash.encode(PILImage.frombytes("RGB", (32, 24), data), 4, 3)
    assert blurhash_encode(data, 32, 24) == reference


def test_metadata_of_svg(tmp_path: Path) -> None:
    src = tmp_path / "ok.svg"
    src.write_text(media.SVG_SAFE)
    meta = run("image/metadata", src, tmp_path, "m.json")[0]["metadata"]
    assert (meta["format"], meta["width"], meta["height"], meta["dominant_colour"]) == ("svg", 100, 50, "#00ff00")


# --- limits and hostile inputs --------------------------------------------------------------


def _fails_fast(op: str, src: Path, tmp_path: Path, match: str, seconds: float = 2.0, **kw: Any) -> None:
    start = time.monotonic()
    with pytest.raises(JobFailed, match=match) as info:
        run(op, src, tmp_path, **kw)
    assert time.monotonic() - start < seconds
    assert "Traceback" not in info.value.message and "/tmp" not in info.value.message
    assert not list(tmp_path.glob("result-*"))  # nothing half-written


def test_limits_pixel_bomb_fails_from_header_in_well_under_a_second(tmp_path: Path) -> None:
    src = media.write_png_bomb(tmp_path / "bomb.png")
    assert src.stat().st_size < 200
    for op, kw in (("image/resize", {"width": 10}), ("image/metadata", {}), ("image/convert", {})):
        _fails_fast(op, src, tmp_path, r"^image is 50000×50000, over the 100 megapixel limit", 0.5, **kw)


def test_limits_jpeg_bomb_fails_from_header(tmp_path: Path) -> None:
    src = media.write_jpeg_bomb(tmp_path / "bomb.jpg")
    for op, kw in (("image/thumbnail", {"width": 10}), ("image/metadata", {}), ("image/optimize", {})):
        _fails_fast(op, src, tmp_path, r"^image is 65000×65000, over the 100 megapixel limit", 0.5, **kw)


def test_hostile_svgz_is_checked_like_svg(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "evil.svgz"
    src.write_bytes(gzip.compress(media.SVG_EXTERNAL.encode()))
    _fails_fast("image/convert", src, tmp_path, r"^the SVG references an external resource", dest_key="o.png")
    broken = tmp_path / "broken.svgz"
    broken.write_bytes(gzip.compress(media.SVG_SAFE.encode() * 50)[:60])
    _fails_fast("image/convert", broken, tmp_path, r"truncated or corrupt|not an image", dest_key="o.png")


def test_limits_max_input_pixels_is_configurable(quad: Path, tmp_path: Path) -> None:
    ctx = RunContext(limits=Limits(max_input_pixels=10_000))
    _fails_fast("image/convert", quad, tmp_path, r"image is 200×100, over the 0.01 megapixel limit", ctx=ctx)


def test_limits_max_output_pixels(quad: Path, tmp_path: Path) -> None:
    ctx = RunContext(limits=Limits(max_output_pixels=100_000))
    _fails_fast("image/resize", quad, tmp_path, r"output would be 1000×500, over the 0.1 megapixel limit",
                ctx=ctx, width=1000, enlarge=True)


def test_limits_max_frames(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif", [RED, GREEN, BLUE, WHITE, BLACK], size=8)
    ctx = RunContext(limits=Limits(max_frames=4))
    _fails_fast("image/convert", src, tmp_path, r"image has 5 frames, over the limit of 4", ctx=ctx)


def test_limits_animation_pixels_count_every_frame(tmp_path: Path) -> None:
    src = media.write_animated(tmp_path / "anim.gif", size=40)  # 3 × 1600 px
    ctx = RunContext(limits=Limits(max_input_pixels=4000))
    _fails_fast("image/convert", src, tmp_path, r"animation is 40×40 with 3 frames", ctx=ctx, dest_key="o.gif")
    run("image/convert", src, tmp_path, "o.png", ctx=ctx)  # one frame is within the limit


@pytest.mark.parametrize("maker", [media.write_truncated_jpeg, media.write_truncated_png])
def test_hostile_truncated_image_fails_clearly(maker: Any, tmp_path: Path) -> None:
    src = maker(tmp_path / ("trunc" + (".jpg" if "jpeg" in maker.__name__ else ".png")))
    for op, kw in (("image/convert", {}), ("image/resize", {"width": 50}), ("image/metadata", {})):
        _fails_fast(op, src, tmp_path, r"truncated or corrupt|not a readable image", 5, **kw)


def test_hostile_zero_bytes_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "empty.jpg"
    src.write_bytes(b"")
    _fails_fast("image/convert", src, tmp_path, r"^the source object is empty \(0 bytes\), not an image$")


def test_hostile_text_file_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "notes.jpg"
    src.write_text("just some words, not a picture\n" * 20)
    _fails_fast("image/resize", src, tmp_path, r"^the source is not an image in a supported format \(JPEG, PNG",
                width=10)


def test_hostile_untrusted_format_is_refused_before_parsing(quad: Path, tmp_path: Path) -> None:
    csv = tmp_path / "pic.csv"
    load(quad).extract_band(0).crop(0, 0, 10, 10).csvsave(str(csv))
    _fails_fast("image/convert", csv, tmp_path, r"^the source is a Csv file, which is not accepted")
    vfile = tmp_path / "pic.v"
    load(quad).vipssave(str(vfile))
    _fails_fast("image/convert", vfile, tmp_path, r"^the source is a Vips file, which is not accepted")


@pytest.mark.parametrize(("svg", "match"), [
    (media.SVG_SCRIPT, r"^the SVG contains script"),
    (media.SVG_EXTERNAL, r"^the SVG references an external resource \(http://169\.254"),
    (media.SVG_LOCAL_FILE, r"^the SVG references an external resource \(file:///etc/passwd\)"),
    (media.SVG_ENTITY, r"^the SVG declares XML entities"),
    (media.SVG_BOMB, r"^image is 60000×60000, over the 100 megapixel limit"),
])
def test_hostile_svg_is_refused(svg: str, match: str, tmp_path: Path) -> None:
    src = tmp_path / "evil.svg"
    src.write_text(svg)
    _fails_fast("image/convert", src, tmp_path, match, dest_key="out.png")


def test_svg_self_contained_is_rendered(tmp_path: Path) -> None:
    src = tmp_path / "ok.svg"
    src.write_text(media.SVG_SAFE)
    _, out = run("image/convert", src, tmp_path, "no-ext")
    image = load(out)
    assert loader(out).startswith("pngload") and (image.width, image.height) == (100, 50)
    assert px(image, 50, 25)[:3] == GREEN
    _, out = run("image/resize", src, tmp_path, "big.png", width=400, enlarge=True)
    assert (load(out).width, load(out).height) == (400, 200)  # rendered at size, not upscaled


def test_vips_reason_drops_paths_and_generic_lines() -> None:
    from mendsrv.ops.imaging import vips_reason

    text = 'unable to call copy\nVipsForeignLoad: "/tmp/job-1/src" is not a known file format\n' \
           'VipsJpeg: premature end of JPEG image at /tmp/job-1/src\n'
    assert vips_reason(Exception(text)) == "premature end of JPEG image at the file"
    assert vips_reason(Exception("vipspng: bad value 3/4")) == "bad value 3/4"


def test_block_untrusted_leaves_only_trusted_loaders(quad: Path, tmp_path: Path) -> None:
    """In a fresh process (the setting is process-wide), as a pool worker would."""
    vfile = tmp_path / "pic.v"
    load(quad).vipssave(str(vfile))
    svg = tmp_path / "ok.svg"
    svg.write_text(media.SVG_SAFE)
    code = f"""
import pyvips
from mendsrv.ops.image import block_untrusted
block_untrusted()
assert pyvips.Image.new_from_file({str(quad)!r}).width == 200
try:
    pyvips.Image.new_from_file({str(vfile)!r}); raise SystemExit(".v loaded")
except pyvips.Error:
    pass
try:
    pyvips.Image.new_from_file({str(svg)!r}); raise SystemExit("svg loaded from a file")
except pyvips.Error:
    pass
from mendsrv.ops import REGISTRY
from mendsrv.ops.base import RunContext
op = REGISTRY["image/convert"]
p = op.model(source_bucket="a", source_key="a.svg", dest_bucket="b", dest_key="b.png")
op.run({str(svg)!r}, {str(tmp_path / "svg-out.png")!r}, p, lambda *a: None, RunContext())
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stdout.strip() == "ok"
    assert load(tmp_path / "svg-out.png").width == 100


def test_pool_spawned_workers_fail_hostile_jobs_and_finish_good_ones(quad: Path, tmp_path: Path) -> None:
    """As the pool runs them: spawned processes initialised with block_untrusted, picklable
    run functions, params and context; a pixel bomb fails with its sentence while the
    job beside it completes."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from mendsrv.ops.image import block_untrusted

    op = REGISTRY["image/resize"]
    assert pickle.loads(pickle.dumps(op.run)) is op.run
    bomb = media.write_png_bomb(tmp_path / "bomb.png")
    params = op.model(source_bucket="a", source_key="q.png", dest_bucket="b", dest_key="o.webp", width=50)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=block_untrusted) as pool:
        bad = pool.submit(op.run, str(bomb), str(tmp_path / "bad.webp"), params, _no_progress, RunContext())
        good = pool.submit(op.run, str(quad), str(tmp_path / "good.webp"), params, _no_progress, RunContext())
        with pytest.raises(JobFailed, match="^image is 50000×50000"):
            bad.result(timeout=60)
        assert good.result(timeout=60)["output"]["width"] == 50
    assert load(tmp_path / "good.webp").width == 50


def _no_progress(percent: float, phase: str) -> None:
    pass
