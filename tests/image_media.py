"""Test images made with pyvips: known pixels at known places, and hostile files.

The canonical picture is `quadrants`: red top-left, green top-right, blue bottom-left,
white bottom-right, so a test can tell orientation, crops and flips by colour.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pyvips

RED, GREEN, BLUE, WHITE, BLACK = [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]


def solid(width: int, height: int, colour: list[int]) -> Any:
    return pyvips.Image.black(width, height).new_from_image(colour).cast("uchar").copy(
        interpretation="srgb" if len(colour) >= 3 else "b-w"
    )


def quadrants(width: int = 200, height: int = 100) -> Any:
    hw, hh = width // 2, height // 2
    top = solid(hw, hh, RED).join(solid(width - hw, hh, GREEN), "horizontal")
    bottom = solid(hw, height - hh, BLUE).join(solid(width - hw, height - hh, WHITE), "horizontal")
    return top.join(bottom, "vertical").copy(interpretation="srgb")


def write_quadrants(path: Path, width: int = 200, height: int = 100, **save: Any) -> Path:
    quadrants(width, height).write_to_file(str(path), **save)
    return path


def write_exif_rotated(path: Path, orientation: int = 6) -> Path:
    """A JPEG whose stored pixels, once EXIF `orientation` is applied, show quadrants(200, 100)."""
    image = quadrants(200, 100)
    stored = {6: image.rot270(), 8: image.rot90(), 3: image.rot180(), 1: image}[orientation]
    stored = stored.copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    stored.jpegsave(str(path), Q=95)
    return path


def write_cmyk(path: Path, *, with_profile: bool = True) -> Path:
    """A CMYK JPEG of a red field (with the built-in CMYK profile embedded, or none)."""
    cmyk = solid(64, 64, RED).icc_transform("cmyk", input_profile="srgb")
    if not with_profile:
        cmyk = cmyk.copy()
        cmyk.remove("icc-profile-data")
    cmyk.jpegsave(str(path), Q=95)
    return path


def write_p3_tagged(path: Path) -> Path:
    """A PNG of sRGB red expressed in Display P3 values, with the P3 profile embedded."""
    solid(32, 32, RED).icc_transform("p3", input_profile="srgb").pngsave(str(path))
    return path


def write_16bit(path: Path) -> Path:
    """A 16-bit RGB PNG of quadrants (white = 65535)."""
    (quadrants(64, 64).cast("ushort") * 257).cast("ushort").copy(interpretation="rgb16").pngsave(str(path))
    return path


def write_alpha(path: Path) -> Path:
    """64×64 RGBA PNG: left half fully transparent, right half opaque red."""
    rgb = solid(64, 64, RED)
    alpha = solid(32, 64, [0]).join(solid(32, 64, [255]), "horizontal")
    rgb.bandjoin(alpha).copy(interpretation="srgb").pngsave(str(path))
    return path


def write_palette(path: Path) -> Path:
    quadrants(64, 64).pngsave(str(path), palette=True)
    return path


def write_grey(path: Path, *, bits: int = 8) -> Path:
    """A horizontal grey ramp, 256×32, 0 at the left to 255 (or 65535) at the right."""
    ramp = pyvips.Image.identity().resize(1, vscale=32, kernel="nearest")  # 256×32
    if bits == 16:
        ramp = (ramp.cast("ushort") * 257).cast("ushort").copy(interpretation="grey16")
    else:
        ramp = ramp.cast("uchar").copy(interpretation="b-w")
    ramp.write_to_file(str(path))
    return path


def write_animated(path: Path, colours: list[list[int]] | None = None, size: int = 40) -> Path:
    """An animated GIF or WebP (by suffix) whose frame i is a field of colours[i]."""
    colours = colours or [RED, GREEN, BLUE]
    frames = [solid(size, size, c) for c in colours]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * len(colours))
    strip.set_type(pyvips.GValue.gint_type, "loop", 0)
    strip.write_to_file(str(path))
    return path


def write_with_exif(path: Path, *, gps: bool = True) -> Path:
    image = quadrants(120, 80).copy()
    s = pyvips.GValue.gstr_type
    fields = {
        "exif-ifd0-Make": "TestCam",
        "exif-ifd0-Model": "Model X",
        "exif-ifd2-LensModel": "Lens 50mm",
        "exif-ifd2-DateTimeOriginal": "2024:05:01 12:34:56",
        "exif-ifd2-FNumber": "28/10",
    }
    if gps:
        fields.update({
            "exif-ifd3-GPSLatitude": "51/1 30/1 2667/100", "exif-ifd3-GPSLatitudeRef": "N",
            "exif-ifd3-GPSLongitude": "0/1 7/1 3900/100", "exif-ifd3-GPSLongitudeRef": "W",
        })
    for name, value in fields.items():
        image.set_type(s, name, value)
    image.jpegsave(str(path), Q=95)
    return path


def write_noise_right(path: Path) -> Path:
    """400×200: flat grey on the left half, busy noise on the right half."""
    flat = solid(200, 200, [128, 128, 128])
    bands = [pyvips.Image.gaussnoise(200, 200, sigma=80, mean=128).cast("uchar") for _ in range(3)]
    busy = bands[0].bandjoin(bands[1:]).copy(interpretation="srgb")
    flat.join(busy, "horizontal").pngsave(str(path))
    return path


# --- hostile files ---------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, width: int = 50000, height: int = 50000) -> Path:
    """A ~100-byte PNG whose header claims width×height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def write_jpeg_bomb(path: Path, width: int = 65000, height: int = 65000) -> Path:
    """A small JPEG whose frame header (SOF0) is patched to claim width×height."""
    data = bytearray(solid(16, 16, RED).jpegsave_buffer())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    noise = pyvips.Image.gaussnoise(400, 300).cast("uchar")
    data = noise.bandjoin([noise, noise]).copy(interpretation="srgb").jpegsave_buffer(Q=90)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_png(path: Path) -> Path:
    noise = pyvips.Image.gaussnoise(300, 300).cast("uchar")
    data = noise.pngsave_buffer(compression=1)
    path.write_bytes(data[: len(data) // 2])
    return path


SVG_SAFE = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
    '<rect width="100" height="50" fill="#00ff00"/></svg>'
)
SVG_SCRIPT = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
    '<script>alert(1)</script><rect width="100" height="50" fill="red"/></svg>'
)
SVG_EXTERNAL = (
    '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
    'width="100" height="50"><image xlink:href="http://169.254.169.254/latest/meta-data" '
    'width="100" height="50"/></svg>'
)
SVG_LOCAL_FILE = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
    '<image href="file:///etc/passwd" width="100" height="50"/></svg>'
)
SVG_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&b;</text></svg>'
)
SVG_BOMB = '<svg xmlns="http://www.w3.org/2000/svg" width="60000" height="60000"></svg>'
