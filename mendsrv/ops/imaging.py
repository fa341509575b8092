"""The pyvips plumbing shared by the image operations.

- `open_source` checks a source before any pixel is decoded: size, format (only
  trusted loaders), SVG content, and the pixel and frame limits read from the header.
- `Source.load` / `Source.thumbnail` decode it (truncated data is an error, not grey).
- `to_srgb` brings CMYK, ICC-tagged, 16-bit and Lab images to 8-bit sRGB (or grey).
- `save` writes one of FORMATS, flattening alpha where the format has none.
- `vips_errors` turns libvips errors into sentences a user can act on.

Everything here runs inside a worker process; nothing keeps global state except the
libvips settings made once by `block_untrusted`.
"""

from __future__ import annotations

import errno
import functools
import gzip
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import JobFailed
from ..probe import check_size
from .base import RunContext

# output format -> (libvips saver, MIME type)
FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": ("jpegsave", "image/jpeg"),
    "png": ("pngsave", "image/png"),
    "webp": ("webpsave", "image/webp"),
    "avif": ("heifsave", "image/avif"),
    "gif": ("gifsave", "image/gif"),
    "tiff": ("tiffsave", "image/tiff"),
    "heif": ("heifsave", "image/heif"),
}
EXTENSIONS = {
    ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".jfif": "jpeg", ".png": "png",
    ".webp": "webp", ".avif": "avif", ".gif": "gif", ".tif": "tiff", ".tiff": "tiff",
    ".heic": "heif", ".heif": "heif",
}
ALPHA_FORMATS = frozenset({"png", "webp", "avif", "gif", "tiff", "heif"})
ANIMATED_FORMATS = frozenset({"gif", "webp"})
MULTIPAGE_SOURCES = frozenset({"gif", "webp", "tiff", "heif", "avif"})

# Loader classes a source may be opened with (prefix of the libvips type name) and
# the format name we give it. Everything else (CSV, matrix, raw, .vips, PPM, FITS…)
# is refused before libvips parses it.
TRUSTED_LOADERS = {
    "VipsForeignLoadJpeg": "jpeg",
    "VipsForeignLoadUhdr": "jpeg",
    "VipsForeignLoadPng": "png",
    "VipsForeignLoadWebp": "webp",
    "VipsForeignLoadNsgif": "gif",
    "VipsForeignLoadGif": "gif",
    "VipsForeignLoadTiff": "tiff",
    "VipsForeignLoadHeif": "heif",
}
SUPPORTED_INPUTS = "JPEG, PNG, WebP, GIF, TIFF, HEIF/AVIF or SVG"
SVG_MAX_BYTES = 16 * 1024 * 1024
# a palette PNG is used by image/optimize only if it is at least this close (PSNR, dB)
PALETTE_MIN_PSNR = 45.0

COMPASS = {
    "centre": "centre", "center": "centre", "north": "north", "south": "south",
    "east": "east", "west": "west", "northeast": "north-east", "northwest": "north-west",
    "southeast": "south-east", "southwest": "south-west",
}
SMART = frozenset({"attention", "entropy"})


def vips() -> Any:
    import pyvips

    return pyvips


def block_untrusted() -> None:
    """Lock libvips down; the pool calls this once in every worker process.

    Blocks the loaders libvips marks untrusted, then every loader except the trusted
    ones above, and re-allows only the in-memory SVG loader: SVG reaches librsvg only
    through `Source`, after `_check_svg` has refused scripts, entities and external
    references, and from memory, so librsvg has no base path to resolve files against.
    It also turns off the libvips operation cache: temp paths are reused across jobs.
    """
    pyvips = vips()
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in (*TRUSTED_LOADERS, "VipsForeignLoadSvgBuffer"):
        pyvips.operation_block_set(name, False)
    pyvips.cache_set_max(0)


# --- errors ----------------------------------------------------------------------------

_CORRUPT_HINTS = (
    "premature end", "truncated", "out of order", "read error", "load error", "corrupt",
    "unexpected end", "not enough data", "libspng", "invalid", "bad ", "damaged", "eof",
)
_CODEC_HINTS = ("no decoding plugin", "unsupported codec", "no decoder", "decoder plugin")
_QUOTED_PATH = re.compile(r"""(?:b?["'])?(?<![\w.])/[\w.-]+(?:/[\w.-]+)+["']?""")


def vips_reason(exc: BaseException) -> str:
    """The informative line of a libvips error, without file paths."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [
        line for line in lines
        if not line.startswith(("unable to ", "VipsForeignLoad:"))
    ] or lines or ["unknown error"]
    reason = useful[0]
    reason = re.sub(r"^((?i:vips)\w*|\w+load\w*|\w+save\w*):\s*", "", reason)
    reason = _QUOTED_PATH.sub("the file", reason)
    return reason[:200].rstrip(".")


def vips_failure(exc: BaseException, doing: str = "process the image") -> JobFailed:
    reason = vips_reason(exc)
    if any(hint in str(exc).lower() for hint in _CODEC_HINTS):
        return JobFailed(f"this server cannot decode the image's compression ({reason}); send JPEG, PNG, WebP or AVIF")
    if any(hint in str(exc).lower() for hint in _CORRUPT_HINTS):
        return JobFailed(f"the image data is truncated or corrupt ({reason})")
    return JobFailed(f"cannot {doing}: {reason}")


F = TypeVar("F", bound=Callable[..., Any])


def vips_errors(fn: F) -> F:
    """Turn a libvips error escaping a run function into a JobFailed sentence."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        pyvips = vips()
        try:
            return fn(*args, **kwargs)
        except pyvips.Error as exc:
            raise vips_failure(exc) from None

    return wrapper  # type: ignore[return-value]


# --- the source ------------------------------------------------------------------------


@dataclass
class Source:
    """A source image that passed the checks; decode it with `load` or `thumbnail`."""

    path: str
    format: str  # jpeg, png, webp, gif, tiff, heif, avif, svg
    header: Any  # the lazily opened first page: header fields only
    pages: int
    bytes: int
    svg: bytes | None = None  # checked SVG text, loaded from memory only

    @property
    def width(self) -> int:
        return int(self.header.width)

    @property
    def height(self) -> int:
        return int(self.header.height)

    @property
    def orientation(self) -> int:
        h = self.header
        return int(h.get("orientation")) if h.get_typeof("orientation") else 1

    @property
    def animated(self) -> bool:
        return self.pages > 1 and self.format in ANIMATED_FORMATS

    def size(self, auto_rotate: bool = True) -> tuple[int, int]:
        """Width and height as displayed (EXIF orientation applied when auto_rotate)."""
        if auto_rotate and self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height

    def _options(self, all_frames: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {"fail_on": "truncated"}
        if all_frames and self.pages > 1 and self.format in MULTIPAGE_SOURCES:
            opts["n"] = -1
        return opts

    def load(self, *, auto_rotate: bool = True, all_frames: bool = False, random: bool = False) -> Any:
        """Decode the image (lazily); EXIF orientation applied when auto_rotate."""
        pyvips = vips()
        rotate = auto_rotate and self.orientation != 1
        access = "random" if (random or rotate or all_frames) else "sequential"
        opts = self._options(all_frames)
        if self.svg is not None:
            image = pyvips.Image.svgload_buffer(self.svg, access=access, fail_on="truncated")
        else:
            image = pyvips.Image.new_from_file(self.path, access=access, **opts)
        if rotate:
            image = image.autorot()
        return image

    def thumbnail(
        self, width: int, height: int, *, size: str = "down", auto_rotate: bool = True,
        all_frames: bool = False, crop: str = "none",
    ) -> Any:
        """Shrink-on-load resize to fit width×height (`size="force"`: exactly)."""
        pyvips = vips()
        kwargs: dict[str, Any] = {
            "height": height, "size": size, "no_rotate": not auto_rotate, "crop": crop,
            "fail_on": "truncated",
        }
        if self.svg is not None:
            return pyvips.Image.thumbnail_buffer(self.svg, width, **kwargs)
        opts = self._options(all_frames)
        name = self.path + ("[n=-1]" if "n" in opts else "")
        return pyvips.Image.thumbnail(name, width, **kwargs)


def open_source(path: str, ctx: RunContext, *, all_frames: bool = False) -> Source:
    """Check a source against the format allowlist and the limits, decoding nothing.

    all_frames: the caller will decode every frame of an animation, so the pixel
    limit applies to all frames together.
    """
    pyvips = vips()
    nbytes = check_size(path, ctx.limits, "an image")
    svg = _read_svg(path, nbytes)
    try:
        if svg is not None:
            fmt = "svg"
            header = pyvips.Image.svgload_buffer(svg, access="sequential")
        else:
            fmt = _trusted_format(path)
            header = pyvips.Image.new_from_file(path, access="sequential", fail_on="truncated")
    except pyvips.Error as exc:
        raise JobFailed(f"the source is not a readable image: {vips_reason(exc)}") from None
    if fmt == "heif" and header.get_typeof("heif-compression"):
        if str(header.get("heif-compression")) == "av1":
            fmt = "avif"
    pages = int(header.get("n-pages")) if header.get_typeof("n-pages") else 1
    source = Source(path=path, format=fmt, header=header, pages=max(1, pages), bytes=nbytes, svg=svg)
    check_input_limits(source, ctx, all_frames=all_frames)
    return source


def check_input_limits(source: Source, ctx: RunContext, *, all_frames: bool = False) -> None:
    limit = ctx.limits.max_input_pixels
    w, h = source.width, source.height
    if w * h > limit:
        raise JobFailed(f"image is {w}×{h}, over the {megapixels(limit)} megapixel limit (limits.max_input_pixels)")
    if source.pages > ctx.limits.max_frames:
        raise JobFailed(
            f"image has {source.pages} frames, over the limit of {ctx.limits.max_frames} (limits.max_frames)"
        )
    if all_frames and source.pages > 1 and w * h * source.pages > limit:
        raise JobFailed(
            f"animation is {w}×{h} with {source.pages} frames ({megapixels(w * h * source.pages)} "
            f"megapixels in all), over the {megapixels(limit)} megapixel limit (limits.max_input_pixels)"
        )


def check_output(width: int, height: int, ctx: RunContext) -> None:
    limit = ctx.limits.max_output_pixels
    if width * height > limit:
        raise JobFailed(
            f"output would be {width}×{height}, over the {megapixels(limit)} megapixel limit"
            " (limits.max_output_pixels)"
        )


def megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.6g}"


def _trusted_format(path: str) -> str:
    pyvips = vips()
    found = pyvips.vips_lib.vips_foreign_find_load(path.encode())
    pyvips.vips_lib.vips_error_clear()
    if found == pyvips.ffi.NULL:
        raise JobFailed(f"the source is not an image in a supported format ({SUPPORTED_INPUTS})")
    loader = pyvips.ffi.string(found).decode()
    for prefix, fmt in TRUSTED_LOADERS.items():
        if loader.startswith(prefix):
            return fmt
    if loader.startswith("VipsForeignLoadSvg"):  # librsvg would take it, _read_svg could not check it
        raise JobFailed("the source looks like an SVG but cannot be checked: it is truncated or corrupt")
    kind = re.sub(r"^VipsForeignLoad|(File|Source|Buffer)$", "", loader) or "unknown"
    raise JobFailed(f"the source is a {kind} file, which is not accepted; send {SUPPORTED_INPUTS}")


# --- SVG -------------------------------------------------------------------------------

_SVG_ENTITY = re.compile(r"<!ENTITY", re.I)
_SVG_SCRIPT = re.compile(r"<(\w+:)?script[\s>/]", re.I)
_SVG_HANDLER = re.compile(r"\son[a-z]+\s*=", re.I)
_SVG_HREF = re.compile(r"""(?:\bhref|\bsrc)\s*=\s*(["'])(.*?)\1""", re.I | re.S)
_SVG_URL = re.compile(r"""url\(\s*(["']?)([^"')]*)\1\s*\)""", re.I)
_SVG_IMPORT = re.compile(r"@import", re.I)


def _read_svg(path: str, nbytes: int) -> bytes | None:
    """The file's bytes if it is an SVG (refused if unsafe), else None."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    gz = head.startswith(b"\x1f\x8b")
    if gz:
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(4096)
        except (OSError, EOFError, zlib.error):
            return None
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    # liberal on purpose: anything that might reach librsvg goes through _check_svg
    if not head.startswith(b"<") or b"<svg" not in head.lower():
        return None
    if nbytes > SVG_MAX_BYTES:
        raise JobFailed(f"SVG sources are limited to {SVG_MAX_BYTES // (1024 * 1024)} MiB")
    if gz:
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read(SVG_MAX_BYTES + 1)
        except (OSError, EOFError, zlib.error):
            raise JobFailed("the compressed SVG is truncated or corrupt") from None
        if len(data) > SVG_MAX_BYTES:
            raise JobFailed(f"the compressed SVG expands past {SVG_MAX_BYTES // (1024 * 1024)} MiB")
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    _check_svg(data.decode("utf-8", errors="replace"))
    return data


def _check_svg(text: str) -> None:
    if _SVG_ENTITY.search(text):
        raise JobFailed("the SVG declares XML entities, which are not accepted")
    if _SVG_SCRIPT.search(text) or _SVG_HANDLER.search(text):
        raise JobFailed("the SVG contains script (a <script> element or an on… event attribute), which is not accepted")
    if _SVG_IMPORT.search(text):
        raise JobFailed("the SVG imports an external stylesheet; only self-contained SVGs are accepted")
    refs = [m.group(2).strip() for m in _SVG_HREF.finditer(text)]
    refs += [m.group(2).strip() for m in _SVG_URL.finditer(text)]
    for ref in refs:
        if ref and not ref.startswith("#") and not ref.lower().startswith("data:"):
            shown = ref if len(ref) <= 80 else ref[:77] + "..."
            raise JobFailed(
                f"the SVG references an external resource ({shown}); only self-contained SVGs are accepted"
            )


# --- formats and colour ----------------------------------------------------------------


def output_format(requested: str | None, dest_key: str, source: Source) -> str:
    """`format` if given, else the dest_key extension, else the source's format."""
    if requested:
        return "jpeg" if requested == "jpg" else requested
    ext = os.path.splitext(dest_key)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    return "png" if source.format == "svg" else source.format


def parse_colour(value: str | None, bands: int = 3, default: str = "#ffffff") -> list[float]:
    """'#rrggbb[aa]' -> band values for an image of `bands` bands (alpha last)."""
    v = (value or default).lstrip("#")
    rgba = [float(int(v[i : i + 2], 16)) for i in range(0, len(v), 2)]
    if len(rgba) == 3:
        rgba.append(255.0)
    if bands in (1, 2):
        grey = [float(round(0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]))]
        return grey + ([rgba[3]] if bands == 2 else [])
    return rgba[:bands]


def colour_has_alpha(value: str | None) -> bool:
    return bool(value) and len(value.lstrip("#")) == 8 and value.lstrip("#")[6:].lower() != "ff"  # type: ignore[union-attr]


def to_srgb(image: Any) -> Any:
    """8-bit sRGB (or 8-bit grey): CMYK, ICC-tagged, 16-bit, Lab… are converted."""
    pyvips = vips()
    interp = image.interpretation
    grey = interp in ("b-w", "grey16") or (interp == "multiband" and image.bands in (1, 2))
    if image.get_typeof("icc-profile-data") and not grey:
        try:
            image = image.icc_transform("srgb", embedded=True, intent="perceptual")
        except pyvips.Error:
            image = image.copy()
            image.remove("icc-profile-data")
    interp = image.interpretation
    if grey:
        if interp == "multiband":
            image = image.copy(interpretation="grey16" if image.format == "ushort" else "b-w")
        if image.interpretation != "b-w":
            image = image.colourspace("b-w")
    elif interp != "srgb":
        if interp == "multiband":
            image = image.copy(interpretation="srgb")
        else:
            image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def ensure_alpha(image: Any) -> Any:
    return image if image.hasalpha() else image.bandjoin(255)


def flatten(image: Any, background: str | None) -> Any:
    if not image.hasalpha():
        return image
    return image.flatten(background=parse_colour(background, image.bands - 1)).cast("uchar")


# --- frames ----------------------------------------------------------------------------


def page_height(image: Any) -> int:
    if image.get_typeof("page-height"):
        ph = int(image.get("page-height"))
        if 0 < ph <= image.height and image.height % ph == 0:
            return ph
    return int(image.height)


def map_frames(image: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply fn to each frame of an animation (a vertical strip), or to the image."""
    pyvips = vips()
    ph = page_height(image)
    if ph == image.height:
        return fn(image)
    frames = [fn(image.crop(0, top, image.width, ph)) for top in range(0, image.height, ph)]
    out = pyvips.Image.arrayjoin(frames, across=1).copy()
    out.set_type(pyvips.GValue.gint_type, "page-height", frames[0].height)
    return out


def anchor(iw: int, ih: int, cw: int, ch: int, gravity: str) -> tuple[int, int]:
    """Top-left of a cw×ch box placed in an iw×ih area by a compass gravity."""
    g = COMPASS.get(gravity, "centre")
    left, top = (iw - cw) // 2, (ih - ch) // 2
    if g.endswith("west"):
        left = 0
    elif g.endswith("east"):
        left = iw - cw
    if g.startswith("north"):
        top = 0
    elif g.startswith("south"):
        top = ih - ch
    return left, top


def crop_to(image: Any, width: int, height: int, gravity: str) -> Any:
    """Cut width×height out of every frame, by compass or smart (attention/entropy) gravity."""
    cw, ch = min(width, image.width), min(height, page_height(image))

    def one(frame: Any) -> Any:
        if (cw, ch) == (frame.width, frame.height):
            return frame
        if gravity in SMART:
            return frame.smartcrop(cw, ch, interesting=gravity)
        left, top = anchor(frame.width, frame.height, cw, ch, gravity)
        return frame.crop(left, top, cw, ch)

    if gravity in SMART and page_height(image) != image.height:
        gravity = "centre"  # one smart crop per frame would make the animation jump
    return map_frames(image, one)


# --- encoding --------------------------------------------------------------------------


@functools.cache
def can_save(fmt: str) -> bool:
    """Whether this libvips build can write fmt (HEVC is often missing)."""
    pyvips = vips()
    probe = pyvips.Image.black(16, 16, bands=3).copy(interpretation="srgb")
    try:
        probe.write_to_buffer(*_buffer_args(fmt))
    except pyvips.Error:
        return False
    return True


def _buffer_args(fmt: str) -> tuple[str, ...]:
    return {"avif": (".avif",), "heif": (".heic[compression=hevc]",)}.get(fmt, ("." + fmt,))


def encoder_options(fmt: str, *, quality: int | None = None, lossless: bool = False,
                    progressive: bool = False) -> dict[str, Any]:
    """libvips saver options for the common knobs."""
    opts: dict[str, Any] = {}
    if fmt in ("jpeg", "webp", "avif", "heif") and quality is not None:
        opts["Q"] = quality
    if fmt == "jpeg":
        opts["optimize_coding"] = True
        if progressive:
            opts["interlace"] = True
    elif fmt == "png":
        if quality is not None:  # quality on PNG means a quantised palette image
            opts.update(palette=True, Q=quality)
        if progressive:
            opts["interlace"] = True
    elif fmt == "gif":
        if progressive:
            opts["interlace"] = True
    elif fmt == "webp":
        if lossless:
            opts["lossless"] = True
    elif fmt in ("avif", "heif"):
        opts["compression"] = "av1" if fmt == "avif" else "hevc"
        if lossless:
            opts["lossless"] = True
    elif fmt == "tiff":
        opts.update(compression="deflate", predictor="horizontal")
        if quality is not None:
            opts.update(compression="jpeg", Q=quality)
    return opts


def prepare_for(image: Any, fmt: str, background: str | None) -> Any:
    """Make an sRGB/grey image fit what fmt can hold (alpha flattened for JPEG…)."""
    if fmt not in ALPHA_FORMATS and image.hasalpha():
        image = flatten(image, background)
    return image


def save(image: Any, dst_path: str, fmt: str, *, strip_metadata: bool = True,
         background: str | None = None, **options: Any) -> dict[str, Any]:
    """Write image as fmt at dst_path (atomically) and describe the file written."""
    pyvips = vips()
    if not can_save(fmt):
        raise JobFailed(f"this server's libvips cannot write {fmt.upper()}; choose avif, webp, jpeg or png")
    image = prepare_for(image, fmt, background)
    saver, mime = FORMATS[fmt]
    if strip_metadata:
        options["keep"] = pyvips.enums.ForeignKeep.ICC
    tmp = f"{dst_path}.part"
    try:
        getattr(image, saver)(tmp, **options)
    except pyvips.Error as exc:
        _unlink(tmp)
        full = _disk_full(str(exc))
        if full is not None:  # the pool turns this into a retried "temp directory full" sentence
            raise OSError(full, os.strerror(full), tmp) from None
        raise vips_failure(exc, f"write {fmt.upper()}") from None
    except BaseException:
        _unlink(tmp)
        raise
    os.replace(tmp, dst_path)
    return describe(image, fmt, mime)


def _disk_full(message: str) -> int | None:
    """The errno of a full disk or file-size limit named in a libvips error, if any."""
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        if f"system error: {os.strerror(code)}" in message:
            return code
    return None


def describe(image: Any, fmt: str, mime: str | None = None) -> dict[str, Any]:
    ph = page_height(image)
    out: dict[str, Any] = {
        "content_type": mime or FORMATS[fmt][1], "width": int(image.width), "height": ph, "format": fmt,
    }
    if ph != image.height:
        out["frames"] = image.height // ph
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio (dB) between two same-sized 8-bit images."""
    diff = (a.cast("float") - b.cast("float")) ** 2
    mse = diff.avg()
    if mse <= 0:
        return float("inf")
    return 10 * math.log10(255.0**2 / mse)


def rgb_pixels(small: Any) -> bytes:
    """A small image as raw 8-bit RGB bytes (alpha flattened on white)."""
    small = flatten(to_srgb(small), "#ffffff")
    if small.bands == 1:
        small = small.colourspace("srgb")
    return bytes(small.write_to_memory())
