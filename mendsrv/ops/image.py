"""Image operations on pyvips. Each runs in a worker process of the CPU pool.

Every run function opens its source through `imaging.open_source` (format allowlist,
SVG checks, pixel and frame limits from the header) before decoding a pixel, and
writes through `imaging.save`. The shared plumbing lives in `imaging.py`, the
metadata extraction in `image_metadata.py`.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import JobFailed
from . import image_metadata
from .base import JobParams, Operation, Progress, Resource, RunContext, check_bucket, check_key
from .imaging import (
    ALPHA_FORMATS,
    ANIMATED_FORMATS,
    COMPASS,
    FORMATS,
    PALETTE_MIN_PSNR,
    SMART,
    Source,
    anchor,
    block_untrusted,
    check_input_limits,
    check_output,
    colour_has_alpha,
    crop_to,
    encoder_options,
    ensure_alpha,
    map_frames,
    open_source,
    output_format,
    page_height,
    parse_colour,
    psnr,
    save,
    to_srgb,
    vips,
    vips_errors,
)

Fit = Literal["inside", "cover", "contain", "fill", "outside"]
Compass = Literal[
    "centre", "center", "north", "south", "east", "west",
    "northeast", "northwest", "southeast", "southwest",
]
Gravity = Literal[
    "centre", "center", "north", "south", "east", "west",
    "northeast", "northwest", "southeast", "southwest", "attention", "entropy",
]
ImageFormat = Literal["jpeg", "jpg", "png", "webp", "avif", "gif", "tiff", "heif"]
COLOUR_PATTERN = r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{8})$"


# --- parameter models -------------------------------------------------------------------


class ImageParams(JobParams):
    """Options shared by the image operations that write an image."""

    format: ImageFormat | None = Field(
        default=None,
        description="Output format (jpeg, png, webp, avif, gif, tiff, heif). "
        "Default: the dest_key extension, else the source's format",
    )
    quality: int | None = Field(
        default=None, ge=1, le=100,
        description="Encoder quality 1-100 (JPEG, WebP, AVIF, HEIF; on PNG: quantise to a palette). "
        "Default: the encoder's default",
    )
    strip_metadata: bool = Field(
        default=True, description="Drop EXIF, XMP and IPTC from the output (the ICC profile is kept)"
    )
    auto_rotate: bool = Field(default=True, description="Apply the EXIF orientation before anything else")
    background: str | None = Field(
        default=None, pattern=COLOUR_PATTERN,
        description="Colour #rrggbb or #rrggbbaa used for padding, rotation corners and for "
        "flattening transparency into formats without alpha (JPEG). Default: white, or "
        "transparent where the output format has alpha",
    )


class ResizeParams(ImageParams):
    width: int | None = Field(default=None, ge=1, le=65535, description="Target width in pixels")
    height: int | None = Field(default=None, ge=1, le=65535, description="Target height in pixels")
    fit: Fit = Field(
        default="inside",
        description="inside: fit within width×height; cover: fill the box and crop; contain: fit "
        "within and pad to exactly width×height; fill: stretch to exactly width×height; outside: "
        "cover the box without cropping",
    )
    gravity: Gravity = Field(
        default="centre", description="Where cover crops and contain padding anchor (attention/entropy: smart crop)"
    )
    enlarge: bool = Field(default=False, description="Allow output larger than the source")

    @model_validator(mode="after")
    def _need_size(self) -> ResizeParams:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        return self


class ThumbnailParams(ImageParams):
    width: int = Field(ge=1, le=65535, description="Thumbnail width in pixels")
    height: int | None = Field(default=None, ge=1, le=65535, description="Thumbnail height; default: width (square)")
    gravity: Gravity = Field(
        default="attention",
        description="What to keep: attention (salient features, faces, skin), entropy (busiest "
        "region), centre, or a compass side",
    )
    enlarge: bool = Field(default=False, description="Allow a thumbnail larger than the source")


class CropParams(ImageParams):
    width: int = Field(ge=1, le=65535, description="Width of the region in pixels")
    height: int = Field(ge=1, le=65535, description="Height of the region in pixels")
    left: int | None = Field(default=None, ge=0, description="Left edge of the region; give with top")
    top: int | None = Field(default=None, ge=0, description="Top edge of the region; give with left")
    gravity: Gravity = Field(
        default="centre", description="Where to take the region when left/top are not given"
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> CropParams:
        if (self.left is None) != (self.top is None):
            raise ValueError("give both left and top, or neither (then gravity places the region)")
        return self


class RotateParams(ImageParams):
    angle: float = Field(
        default=0, ge=-360, le=360,
        description="Clockwise rotation in degrees; multiples of 90 are lossless, other angles "
        "enlarge the canvas and fill the corners with background",
    )
    flip: bool = Field(default=False, description="Mirror top to bottom (after rotating)")
    flop: bool = Field(default=False, description="Mirror left to right (after rotating)")


class ConvertParams(ImageParams):
    lossless: bool = Field(default=False, description="Lossless WebP, AVIF or HEIF")
    progressive: bool = Field(default=False, description="Progressive JPEG; interlaced PNG or GIF")
    interlace: bool = Field(default=False, description="Same as progressive")


class WatermarkParams(ImageParams):
    watermark_bucket: str | None = Field(
        default=None, description="Bucket of the overlay image; give with watermark_key"
    )
    watermark_key: str | None = Field(default=None, description="Key of the overlay image (PNG with alpha works best)")
    text: str | None = Field(default=None, min_length=1, max_length=500, description="Text to draw instead of an image")
    font: str = Field(
        default="sans", pattern=r"^[A-Za-z0-9 ,_-]{1,64}$", description="Font family for text (fontconfig name)"
    )
    font_size: int | None = Field(
        default=None, ge=4, le=2000,
        description="Text size in pixels; default: 5% of the image's shorter side",
    )
    colour: str = Field(default="#ffffff", pattern=COLOUR_PATTERN, description="Text colour #rrggbb or #rrggbbaa")
    gravity: Compass = Field(default="southeast", description="Where the watermark sits")
    margin: int = Field(default=16, ge=0, le=10000, description="Distance from the edges in pixels")
    opacity: float = Field(default=0.5, ge=0, le=1, description="0 invisible … 1 as drawn")
    size: float | None = Field(
        default=None, gt=0, le=1,
        description="Watermark width as a fraction of the image width; default: its natural size "
        "(shrunk to fit inside the margins)",
    )

    @field_validator("watermark_key")
    @classmethod
    def _wm_key(cls, v: str | None) -> str | None:
        return None if v is None else check_key(v)

    @field_validator("watermark_bucket")
    @classmethod
    def _wm_bucket(cls, v: str | None) -> str | None:
        return None if v is None else check_bucket(v)

    @model_validator(mode="after")
    def _image_or_text(self) -> WatermarkParams:
        if (self.watermark_key is None) == (self.text is None):
            raise ValueError("give either watermark_key (an overlay image) or text, not both")
        if (self.watermark_key is None) != (self.watermark_bucket is None):
            raise ValueError("give watermark_bucket and watermark_key together")
        return self


class OptimizeParams(ImageParams):
    quality: int | None = Field(
        default=80, ge=1, le=100,
        description="Target quality 1-100 for lossy formats (JPEG, WebP, AVIF, HEIF)",
    )


class MetadataParams(JobParams):
    include_gps: bool = Field(default=False, description="Include the EXIF GPS position (off: privacy)")


# --- shared steps -------------------------------------------------------------------------


def _open(src_path: str, dst_path: str, params: ImageParams, ctx: RunContext) -> tuple[Source, str, bool]:
    """The checked source, the output format, and whether to keep every frame."""
    source = open_source(src_path, ctx)
    fmt = output_format(params.format, params.dest_key, source)
    animate = source.animated and fmt in ANIMATED_FORMATS
    if animate:
        check_input_limits(source, ctx, all_frames=True)
    return source, fmt, animate


def _save(image: Any, dst_path: str, fmt: str, params: ImageParams, **options: Any) -> dict[str, Any]:
    opts = encoder_options(fmt, quality=params.quality)
    opts.update(options)
    return save(image, dst_path, fmt, strip_metadata=params.strip_metadata, background=params.background, **opts)


def _background(image: Any, fmt: str, background: str | None) -> tuple[Any, list[float]]:
    """The image (with an alpha band if the fill needs one) and the fill colour."""
    if fmt in ALPHA_FORMATS and (background is None or colour_has_alpha(background)):
        image = ensure_alpha(image)
        return image, parse_colour(background, image.bands, default="#00000000")
    return image, parse_colour(background, image.bands)


def _fit(source: Source, box_w: int | None, box_h: int | None, fit: str, gravity: str, enlarge: bool,
         auto_rotate: bool, animate: bool, fmt: str, background: str | None, ctx: RunContext) -> Any:
    """Resize the source into width×height by the fit rules (shared by resize and thumbnail)."""
    sw, sh = source.size(auto_rotate)
    bw = float(box_w) if box_w else sw * box_h / sh  # type: ignore[operator]
    bh = float(box_h) if box_h else sh * bw / sw
    if fit == "fill":
        tw, th = max(1, round(bw)), max(1, round(bh))
    else:
        pick = max if fit in ("cover", "outside") else min
        scale = pick(bw / sw, bh / sh)
        if not enlarge:
            scale = min(scale, 1.0)
        tw, th = max(1, round(sw * scale)), max(1, round(sh * scale))
    box = max(1, round(bw)), max(1, round(bh))
    final = {"cover": (min(box[0], tw), min(box[1], th)), "contain": box}.get(fit, (tw, th))
    check_output(max(tw, final[0]), max(th, final[1]), ctx)
    image = source.thumbnail(tw, th, size="force", auto_rotate=auto_rotate, all_frames=animate)
    image = to_srgb(image)
    if fit == "cover":
        if gravity in SMART and (image.width, image.height) != final:
            image = image.copy_memory()  # smartcrop reads at random; the image is output-sized
        image = crop_to(image, *final, gravity)
    elif fit == "contain" and (image.width, page_height(image)) != final:
        image, bg = _background(image, fmt, background)
        place = COMPASS.get(gravity, "centre")
        image = map_frames(image, lambda f: f.gravity(place, final[0], final[1], extend="background", background=bg))
    return image


# --- image/resize ---------------------------------------------------------------------------


@vips_errors
def run_resize(src_path: str, dst_path: str, params: ResizeParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    progress(10, "decoding")
    image = _fit(source, params.width, params.height, params.fit, params.gravity, params.enlarge,
                 params.auto_rotate, animate, fmt, params.background, ctx)
    progress(60, "encoding")
    return {"output": _save(image, dst_path, fmt, params)}


# --- image/thumbnail ------------------------------------------------------------------------


@vips_errors
def run_thumbnail(src_path: str, dst_path: str, params: ThumbnailParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    progress(10, "decoding")
    image = _fit(source, params.width, params.height or params.width, "cover", params.gravity,
                 params.enlarge, params.auto_rotate, animate, fmt, params.background, ctx)
    progress(60, "encoding")
    return {"output": _save(image, dst_path, fmt, params)}


# --- image/crop -----------------------------------------------------------------------------


@vips_errors
def run_crop(src_path: str, dst_path: str, params: CropParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    iw, ih = source.size(params.auto_rotate)
    region = None
    if params.left is not None and params.top is not None:
        left, top = params.left, params.top
        if left >= iw or top >= ih:
            raise JobFailed(f"the crop region starts at {left},{top}, outside the {iw}×{ih} image")
        region = (left, top, min(params.width, iw - left), min(params.height, ih - top))
    check_output(min(params.width, iw), min(params.height, ih), ctx)
    progress(10, "decoding")
    image = source.load(auto_rotate=params.auto_rotate, all_frames=animate, random=params.gravity in SMART)
    image = to_srgb(image)
    if region is not None:
        image = map_frames(image, lambda f: f.crop(*region))
    else:
        image = crop_to(image, params.width, params.height, params.gravity)
    progress(60, "encoding")
    return {"output": _save(image, dst_path, fmt, params)}


# --- image/rotate ---------------------------------------------------------------------------


@vips_errors
def run_rotate(src_path: str, dst_path: str, params: RotateParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    angle = params.angle % 360
    w, h = source.size(params.auto_rotate)
    if angle in (90, 270):
        w, h = h, w
    elif angle:
        rad = math.radians(angle)
        w, h = (math.ceil(abs(w * math.cos(rad)) + abs(h * math.sin(rad))),
                math.ceil(abs(w * math.sin(rad)) + abs(h * math.cos(rad))))
    check_output(w, h, ctx)
    progress(10, "decoding")
    image = to_srgb(source.load(auto_rotate=params.auto_rotate, all_frames=animate, random=True))
    if angle in (90, 180, 270):
        image = map_frames(image, lambda f: f.rot(f"d{int(angle)}"))
    elif angle:
        image, bg = _background(image, fmt, params.background)
        image = map_frames(image, lambda f: _rotate_any(f, angle, bg))
    if params.flip:
        image = map_frames(image, lambda f: f.flip("vertical"))
    if params.flop:
        image = map_frames(image, lambda f: f.flip("horizontal"))
    progress(60, "encoding")
    return {"output": _save(image, dst_path, fmt, params)}


def _rotate_any(frame: Any, angle: float, bg: list[float]) -> Any:
    if not frame.hasalpha():
        return frame.rotate(angle, background=bg)
    # rotate premultiplied so edge pixels do not pick up the colour of transparent ones
    alpha = bg[-1] / 255.0
    bg_pre = [c * alpha for c in bg[:-1]] + [bg[-1]]
    return frame.premultiply().rotate(angle, background=bg_pre).unpremultiply().cast("uchar")


# --- image/convert --------------------------------------------------------------------------


@vips_errors
def run_convert(src_path: str, dst_path: str, params: ConvertParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    if params.lossless and fmt == "jpeg":
        raise JobFailed("JPEG cannot be lossless; choose webp, avif or png for lossless output")
    w, h = source.size(params.auto_rotate)
    check_output(w, h, ctx)
    progress(10, "decoding")
    image = to_srgb(source.load(auto_rotate=params.auto_rotate, all_frames=animate))
    opts = encoder_options(fmt, quality=params.quality, lossless=params.lossless,
                           progressive=params.progressive or params.interlace)
    progress(40, "encoding")
    return {"output": _save(image, dst_path, fmt, params, **opts)}


# --- image/watermark ------------------------------------------------------------------------


@vips_errors
def run_watermark(src_path: str, dst_path: str, params: WatermarkParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    w, h = source.size(params.auto_rotate)
    check_output(w, h, ctx)
    progress(10, "decoding")
    image = to_srgb(source.load(auto_rotate=params.auto_rotate, all_frames=animate))
    fw, fh = image.width, page_height(image)
    margin = min(params.margin, (fw - 1) // 2, (fh - 1) // 2)
    room = (fw - 2 * margin, fh - 2 * margin)
    if params.text is not None:
        overlay = _text_overlay(params, fw, fh, room)
    else:
        overlay = _image_overlay(params, ctx, fw, room)
    overlay = _with_opacity(overlay, params.opacity).copy_memory()  # small; reused by every frame
    x, y = anchor(room[0], room[1], overlay.width, overlay.height, params.gravity)
    had_alpha = image.hasalpha()

    def stamp(frame: Any) -> Any:
        out = frame.composite2(overlay, "over", x=x + margin, y=y + margin)
        return out if had_alpha else out.extract_band(0, n=out.bands - 1)

    image = map_frames(image, stamp)
    progress(60, "encoding")
    return {"output": _save(image, dst_path, fmt, params)}


def _fit_in(width: float, height: float, room: tuple[int, int]) -> tuple[int, int]:
    """width×height shrunk (never enlarged) to fit inside room, aspect kept."""
    scale = min(1.0, room[0] / width, room[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _image_overlay(params: WatermarkParams, ctx: RunContext, frame_w: int, room: tuple[int, int]) -> Any:
    path = ctx.sources.get("watermark")
    if not path:
        raise JobFailed("the watermark image was not downloaded; give watermark_key")
    try:
        mark = open_source(path, ctx)
    except JobFailed as exc:
        raise JobFailed(f"watermark image: {exc.message}") from None
    nw, nh = mark.size()
    if params.size is not None:
        nw, nh = frame_w * params.size, nh * frame_w * params.size / nw
    tw, th = _fit_in(nw, nh, room)
    overlay = to_srgb(mark.thumbnail(tw, th, size="force"))
    if overlay.bands < 3:
        overlay = overlay.colourspace("srgb")
    return ensure_alpha(overlay).copy(interpretation="srgb")


def _text_overlay(params: WatermarkParams, frame_w: int, frame_h: int, room: tuple[int, int]) -> Any:
    """The text rendered as a mask, then coloured; long lines wrap inside the room."""
    pyvips = vips()
    text = html.escape(params.text or "")  # vips_text reads Pango markup: draw the text as written

    def render(points: int, wrap: int | None) -> Any:
        extra = {"width": wrap} if wrap else {}
        return pyvips.Image.text(text, font=f"{params.font} {points}", dpi=72, **extra)

    points = params.font_size or max(12, round(min(frame_w, frame_h) * 0.05))
    if params.size is None:
        mask = render(points, room[0])
    else:  # render at the font size that gives the asked width, on one line
        first = render(points, None)
        points = max(4, min(2000, round(points * frame_w * params.size / first.width)))
        mask = render(points, None)
    if mask.max() == 0 and (params.text or "").strip():
        raise JobFailed(f"cannot draw the text: the server has no usable font for '{params.font}'")
    tw, _ = _fit_in(mask.width, mask.height, room)
    if tw != mask.width:
        mask = mask.resize(tw / mask.width)
    r, g, b, a = parse_colour(params.colour, 4)
    colour = mask.new_from_image([r, g, b])
    alpha = (mask * (a / 255.0)).cast("uchar")
    return colour.bandjoin(alpha).copy(interpretation="srgb")


def _with_opacity(overlay: Any, opacity: float) -> Any:
    if opacity >= 1.0:
        return overlay
    rgb = overlay.extract_band(0, n=overlay.bands - 1)
    alpha = (overlay.extract_band(overlay.bands - 1) * opacity).cast("uchar")
    return rgb.bandjoin(alpha).copy(interpretation="srgb")


# --- image/optimize -------------------------------------------------------------------------

_LOSSLESS_SOURCES = frozenset({"png", "gif", "svg", "tiff"})


def _candidates(fmt: str, quality: int, source_format: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, saver options) to try; the smallest acceptable file wins."""
    pyvips = vips()
    if fmt == "jpeg":
        base = dict(Q=quality, optimize_coding=True, trellis_quant=True, overshoot_deringing=True, quant_table=3)
        return [("jpeg: baseline, trellis quantisation, optimised Huffman", base),
                ("jpeg: progressive, trellis quantisation, optimised scans", dict(base, interlace=True, optimize_scans=True))]
    if fmt == "png":
        flat = dict(compression=9, effort=10, filter=pyvips.enums.ForeignPngFilter.ALL)
        return [("png: lossless, compression 9, all filters", flat),
                ("png: palette", dict(flat, palette=True, Q=100, dither=0.0))]
    if fmt == "webp":
        found = [("webp: lossy", dict(Q=quality, effort=6, smart_subsample=True))]
        if source_format in _LOSSLESS_SOURCES:
            found.append(("webp: lossless", dict(lossless=True, effort=6)))
        return found
    if fmt == "avif":
        return [("avif: lossy", dict(compression="av1", Q=quality, effort=6))]
    if fmt == "heif":
        return [("heif: lossy", dict(compression="hevc", Q=quality))]
    if fmt == "gif":
        return [("gif: effort 10", dict(effort=10))]
    return [("tiff: deflate with predictor", dict(compression="deflate", predictor="horizontal", level=9))]


def _close_enough(path: str, image: Any) -> bool:
    """Whether a palette PNG at path loses nothing visible against image."""
    pyvips = vips()
    written = pyvips.Image.new_from_file(path, access="sequential", revalidate=True)

    def norm(im: Any) -> Any:
        im = to_srgb(im)
        if im.bands < 3:
            im = im.colourspace("srgb")
        return ensure_alpha(im)

    return psnr(norm(written), norm(image)) >= PALETTE_MIN_PSNR


_METADATA_FIELDS = ("exif-data", "xmp-data", "iptc-data")


def _source_is_final(source: Source, fmt: str, params: OptimizeParams) -> bool:
    """Whether the source file itself is an acceptable output: same format, already
    8-bit sRGB/grey with no profile to convert, upright, nothing to strip."""
    h = source.header
    return (
        fmt == source.format
        and (source.orientation == 1 or not params.auto_rotate)
        and h.format == "uchar"
        and h.interpretation in ("srgb", "b-w")
        and not h.get_typeof("icc-profile-data")
        and not (params.strip_metadata and any(h.get_typeof(f) for f in _METADATA_FIELDS))
    )


@vips_errors
def run_optimize(src_path: str, dst_path: str, params: OptimizeParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source, fmt, animate = _open(src_path, dst_path, params, ctx)
    w, h = source.size(params.auto_rotate)
    check_output(w, h, ctx)
    image = to_srgb(source.load(auto_rotate=params.auto_rotate, all_frames=animate, random=True))
    image = image.copy_memory() if w * h <= 4_000_000 else image  # encoded several times
    results: list[tuple[int, str, str, dict[str, Any]]] = []
    tried = _candidates(fmt, params.quality or 80, source.format)
    try:
        for i, (label, opts) in enumerate(tried):
            progress(10 + 80 * i / len(tried), "encoding")
            path = f"{dst_path}.try{i}"
            out = save(image, path, fmt, strip_metadata=params.strip_metadata, background=params.background, **opts)
            if opts.get("palette") and not animate and not _close_enough(path, image):
                os.unlink(path)
                continue
            results.append((os.path.getsize(path), path, label, out))
        size, best, label, out = min(results, key=lambda r: r[0])
        if size >= source.bytes and _source_is_final(source, fmt, params):
            shutil.copyfile(src_path, dst_path)
            size, label = source.bytes, "source kept: no re-encoding was smaller"
        else:
            os.replace(best, dst_path)
    finally:
        for _, path, _, _ in results:
            if os.path.exists(path):
                os.unlink(path)
    return {
        "output": out,
        "bytes_before": source.bytes,
        "bytes_after": size,
        "saved_bytes": source.bytes - size,
        "saved_percent": round(100.0 * (source.bytes - size) / source.bytes, 1),
        "method": label,
    }


# --- image/metadata -------------------------------------------------------------------------


@vips_errors
def run_metadata(src_path: str, dst_path: str, params: MetadataParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    source = open_source(src_path, ctx)
    progress(20, "reading")
    meta = image_metadata.describe_source(source, include_gps=params.include_gps)
    image_metadata.write_json(meta, dst_path)
    return {"output": {"content_type": "application/json"}, "metadata": meta}


OPERATIONS = [
    Operation(
        name="image/resize",
        description="Resize to width×height with a fit mode (inside, cover, contain, fill, outside).",
        model=ResizeParams, run=run_resize, resource=Resource.CPU,
    ),
    Operation(
        name="image/thumbnail",
        description="Smart-cropped thumbnail of exactly width×height (attention, entropy, centre or a compass side).",
        model=ThumbnailParams, run=run_thumbnail, resource=Resource.CPU,
    ),
    Operation(
        name="image/crop",
        description="Cut a region: left/top/width/height, or width×height placed by gravity.",
        model=CropParams, run=run_crop, resource=Resource.CPU,
    ),
    Operation(
        name="image/rotate",
        description="Rotate by any angle (multiples of 90 are lossless), flip, flop; EXIF orientation applied.",
        model=RotateParams, run=run_rotate, resource=Resource.CPU,
    ),
    Operation(
        name="image/convert",
        description="Change format (jpeg, png, webp, avif, gif, tiff, heif) with quality, lossless and progressive "
        "options; animated GIF/WebP stay animated.",
        model=ConvertParams, run=run_convert, resource=Resource.CPU,
    ),
    Operation(
        name="image/watermark",
        description="Overlay an image from storage or a line of text, with gravity, margin, opacity and relative size.",
        model=WatermarkParams, run=run_watermark, resource=Resource.CPU,
        extra_sources={"watermark": ("watermark_bucket", "watermark_key")},
    ),
    Operation(
        name="image/optimize",
        description="Smallest file at a target quality: metadata stripped, optimised coding, palette PNG when "
        "it loses nothing visible. Reports bytes_before and bytes_after.",
        model=OptimizeParams, run=run_optimize, resource=Resource.CPU,
    ),
    Operation(
        name="image/metadata",
        description="JSON description of an image: size, format, frames, colour space, alpha, orientation, ICC, "
        "EXIF subset, dominant colour and blurhash.",
        model=MetadataParams, run=run_metadata, resource=Resource.CPU,
    ),
]

__all__ = ["FORMATS", "OPERATIONS", "block_untrusted", "parse_colour", "save", "to_srgb"]
