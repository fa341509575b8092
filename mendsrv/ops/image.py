"""Image operations on pyvips. Each runs in a worker process of the CPU pool."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import JobFailed
from .base import JobParams, Operation, Progress, Resource, RunContext

Fit = Literal["inside", "cover", "contain", "fill", "outside"]
Gravity = Literal[
    "centre", "center", "north", "south", "east", "west",
    "northeast", "northwest", "southeast", "southwest", "attention", "entropy",
]
ImageFormat = Literal["jpeg", "jpg", "png", "webp", "avif", "gif", "tiff", "heif"]

# The saver and MIME type of each output format.
FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": (".jpg", "image/jpeg"),
    "png": (".png", "image/png"),
    "webp": (".webp", "image/webp"),
    "avif": (".avif", "image/avif"),
    "gif": (".gif", "image/gif"),
    "tiff": (".tif", "image/tiff"),
    "heif": (".heic", "image/heif"),
}
_EXTENSIONS = {
    ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".jfif": "jpeg", ".png": "png",
    ".webp": "webp", ".avif": "avif", ".gif": "gif", ".tif": "tiff", ".tiff": "tiff",
    ".heic": "heif", ".heif": "heif",
}
# vips loader name prefix -> our format name
_LOADERS = {
    "jpeg": "jpeg", "png": "png", "webp": "webp", "gif": "gif", "tiff": "tiff",
    "heif": "heif", "svg": "png", "pdf": "png", "magick": "png",
}
_FORMATS_WITHOUT_ALPHA = {"jpeg"}


def _vips() -> Any:
    import pyvips

    return pyvips


def block_untrusted() -> None:
    """Refuse libvips loaders marked untrusted (run once per worker process)."""
    pyvips = _vips()
    try:
        pyvips.block_untrusted_set(True)
    except Exception:  # pragma: no cover - older libvips
        pass


class ImageParams(JobParams):
    """Options shared by the image operations that write an image."""

    format: ImageFormat | None = Field(
        default=None, description="Output format; default: the dest_key extension, else the source's"
    )
    quality: int | None = Field(default=None, ge=1, le=100, description="Encoder quality 1-100")
    strip_metadata: bool = Field(default=True, description="Drop EXIF/XMP/IPTC (keeps ICC as sRGB)")
    auto_rotate: bool = Field(default=True, description="Apply the EXIF orientation")
    background: str | None = Field(
        default=None,
        description="Fill colour as #rrggbb or #rrggbbaa (padding, flattening alpha)",
        pattern=r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{8})$",
    )


class ResizeParams(ImageParams):
    width: int | None = Field(default=None, ge=1, le=65535, description="Target width in pixels")
    height: int | None = Field(default=None, ge=1, le=65535, description="Target height in pixels")
    fit: Fit = Field(default="inside", description="How the image fits width×height")
    gravity: Gravity = Field(default="centre", description="Anchor for cover crops and contain padding")
    enlarge: bool = Field(default=False, description="Allow output larger than the source")

    @model_validator(mode="after")
    def _need_size(self) -> ResizeParams:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        return self


# --- helpers -------------------------------------------------------------------------


def parse_colour(value: str | None, bands: int = 3) -> list[float]:
    """'#rrggbb[aa]' -> a list of band values (default white)."""
    if not value:
        rgb = [255.0, 255.0, 255.0, 255.0]
    else:
        v = value.lstrip("#")
        rgb = [float(int(v[i : i + 2], 16)) for i in range(0, len(v), 2)]
        if len(rgb) == 3:
            rgb.append(255.0)
    if bands in (1, 2):
        grey = [round(0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2])]
        return grey + ([rgb[3]] if bands == 2 else [])
    return rgb[:bands]


def source_format(image: Any) -> str:
    loader = str(image.get("vips-loader")) if image.get_typeof("vips-loader") else ""
    for prefix, fmt in _LOADERS.items():
        if loader.startswith(prefix):
            return fmt
    return "png"


def output_format(params: ImageParams, dst_path: str, image: Any) -> str:
    if params.format:
        return "jpeg" if params.format == "jpg" else params.format
    ext = os.path.splitext(dst_path)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    return source_format(image)


def check_source(path: str, ctx: RunContext) -> Any:
    """Open the source lazily and check its header against the limits."""
    pyvips = _vips()
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise JobFailed(f"cannot read the source file: {exc.strerror}") from None
    if size == 0:
        raise JobFailed("the source object is empty (0 bytes), not an image")
    try:
        image = pyvips.Image.new_from_file(path, access="sequential", fail=False)
    except pyvips.Error as exc:
        raise JobFailed(f"the source is not an image libvips can read: {_vips_reason(exc)}") from None
    pixels = image.width * image.height
    pages = image.get("n-pages") if image.get_typeof("n-pages") else 1
    if pixels > ctx.limits.max_input_pixels:
        raise JobFailed(
            f"image is {image.width}×{image.height}, over the "
            f"{_megapixels(ctx.limits.max_input_pixels)} megapixel limit (limits.max_input_pixels)"
        )
    if pages > ctx.limits.max_frames:
        raise JobFailed(f"image has {pages} frames, over the limit of {ctx.limits.max_frames} (limits.max_frames)")
    return image


def check_output(width: int, height: int, ctx: RunContext) -> None:
    if width * height > ctx.limits.max_output_pixels:
        raise JobFailed(
            f"output would be {width}×{height}, over the "
            f"{_megapixels(ctx.limits.max_output_pixels)} megapixel limit (limits.max_output_pixels)"
        )


def _megapixels(pixels: int) -> str:
    mp = pixels / 1_000_000
    return f"{mp:g}"


def _vips_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    lines = [line for line in text if line and not line.startswith("VipsForeignLoad") or ":" in line]
    reason = (lines[-1] if lines else "unknown error").strip()
    return reason[:300]


def to_srgb(image: Any) -> Any:
    """Convert CMYK, Lab, 16-bit and ICC-tagged images to 8-bit sRGB (or grey)."""
    pyvips = _vips()
    if image.get_typeof("icc-profile-data"):
        try:
            image = image.icc_transform("srgb", embedded=True, intent="perceptual")
        except pyvips.Error:
            pass
    interp = image.interpretation
    if interp in ("b-w", "grey16"):
        if interp == "grey16" or image.format != "uchar":
            image = image.colourspace("b-w")
    elif interp != "srgb":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def flatten_if_needed(image: Any, fmt: str, background: str | None) -> Any:
    if image.hasalpha() and fmt in _FORMATS_WITHOUT_ALPHA:
        bands = image.bands - 1
        image = image.flatten(background=parse_colour(background, bands))
    return image


def save(image: Any, dst_path: str, fmt: str, params: ImageParams, **options: Any) -> dict[str, Any]:
    """Write `image` as `fmt` and describe the file written."""
    pyvips = _vips()
    image = flatten_if_needed(image, fmt, params.background)
    ext, mime = FORMATS[fmt]
    kwargs: dict[str, Any] = dict(options)
    if params.strip_metadata:
        kwargs["keep"] = pyvips.enums.ForeignKeep.ICC if hasattr(pyvips.enums, "ForeignKeep") else None
        if kwargs["keep"] is None:
            kwargs.pop("keep")
            kwargs["strip"] = True
    if params.quality is not None and fmt in ("jpeg", "webp", "avif", "heif", "tiff"):
        kwargs["Q"] = params.quality
    if fmt == "png" and params.quality is not None:
        kwargs.setdefault("Q", params.quality)
    if fmt == "avif":
        kwargs.setdefault("compression", "av1")
        fmt_suffix = ".avif"
    else:
        fmt_suffix = ext
    if fmt == "heif":
        kwargs.setdefault("compression", "hevc")
    try:
        data = image.write_to_buffer(fmt_suffix, **kwargs)
    except pyvips.Error as exc:
        raise JobFailed(f"cannot write {fmt}: {_vips_reason(exc)}") from None
    tmp = dst_path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, dst_path)
    height = image.get("page-height") if image.get_typeof("page-height") else image.height
    return {"content_type": mime, "width": image.width, "height": height, "format": fmt}


# --- image/resize ------------------------------------------------------------------------

_GRAVITY_TO_INTERESTING = {"attention": "attention", "entropy": "entropy"}
_COMPASS = {
    "centre": "centre", "center": "centre", "north": "north", "south": "south", "east": "east",
    "west": "west", "northeast": "north-east", "northwest": "north-west",
    "southeast": "south-east", "southwest": "south-west",
}


def _target_size(src_w: int, src_h: int, p: ResizeParams) -> tuple[int, int, int, int]:
    """(thumbnail width, thumbnail height, final width, final height)."""
    w = p.width or max(1, round(src_w * p.height / src_h))  # type: ignore[operator]
    h = p.height or max(1, round(src_h * p.width / src_w))  # type: ignore[operator]
    return w, h, w, h


def run_resize(src_path: str, dst_path: str, params: ResizeParams, progress: Progress, ctx: RunContext) -> dict[str, Any]:
    pyvips = _vips()
    header = check_source(src_path, ctx)
    fmt = output_format(params, dst_path, header)
    src_w, src_h = header.width, header.height
    if params.auto_rotate and header.get_typeof("orientation") and header.get("orientation") in (5, 6, 7, 8):
        src_w, src_h = src_h, src_w
    w, h, _, _ = _target_size(src_w, src_h, params)
    check_output(w, h, ctx)
    size = "both" if params.enlarge else "down"
    crop = "none"
    fit = params.fit
    if fit == "cover":
        crop = _GRAVITY_TO_INTERESTING.get(params.gravity, "centre")
    kwargs: dict[str, Any] = {"height": h, "size": size, "no_rotate": not params.auto_rotate}
    if fit == "fill":
        kwargs["size"] = "force"
    elif fit == "outside":
        # scale so the image covers the box without cropping
        scale = max(w / src_w, h / src_h)
        if not params.enlarge:
            scale = min(scale, 1.0)
        w, h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        kwargs["height"] = h
        kwargs["size"] = "force"
    elif fit == "cover" and crop == "centre" and params.gravity not in ("centre", "center"):
        crop = "none"  # cover with a compass gravity: scale then crop ourselves
    try:
        if fit == "cover" and crop == "none":
            scale = max(w / src_w, h / src_h)
            if not params.enlarge:
                scale = min(scale, 1.0)
            sw, sh = max(w, round(src_w * scale)), max(h, round(src_h * scale))
            image = pyvips.Image.thumbnail(src_path, sw, height=sh, size="force", no_rotate=not params.auto_rotate)
            cw, ch = min(w, image.width), min(h, image.height)
            if (cw, ch) != (image.width, image.height):
                left, top = _anchor(image.width, image.height, cw, ch, params.gravity)
                image = image.crop(left, top, cw, ch)
        else:
            image = pyvips.Image.thumbnail(src_path, w, crop=crop, **kwargs)
        image = to_srgb(image)
        if fit == "contain" and (image.width, image.height) != (w, h):
            if not image.hasalpha() and params.background and len(params.background.lstrip("#")) == 8:
                image = image.bandjoin(255)  # a translucent background needs an alpha band
            bg = parse_colour(params.background, image.bands)
            image = image.gravity(_COMPASS.get(params.gravity, "centre"), w, h, extend="background", background=bg)
        progress(80, "encoding")
        out = save(image, dst_path, fmt, params)
    except pyvips.Error as exc:
        raise JobFailed(f"cannot process the image: {_vips_reason(exc)}") from None
    return {"output": out}


def _anchor(iw: int, ih: int, cw: int, ch: int, gravity: str) -> tuple[int, int]:
    g = _COMPASS.get(gravity, "centre")
    left = (iw - cw) // 2
    top = (ih - ch) // 2
    if "west" in g:
        left = 0
    if "east" in g:
        left = iw - cw
    if g.startswith("north"):
        top = 0
    if g.startswith("south"):
        top = ih - ch
    return left, top


OPERATIONS = [
    Operation(
        name="image/resize",
        description="Resize an image to width×height with a fit mode (shrink-on-load via libvips thumbnail).",
        model=ResizeParams,
        run=run_resize,
        resource=Resource.CPU,
    ),
]
