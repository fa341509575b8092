"""What image/metadata reports: header facts, an EXIF subset, dominant colour, blurhash."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Any

from .imaging import FORMATS, Source, ensure_alpha, rgb_pixels, to_srgb

# EXIF field (libvips name) -> our key. GPS fields are handled apart.
_EXIF_FIELDS = {
    "exif-ifd0-Make": "make",
    "exif-ifd0-Model": "model",
    "exif-ifd0-Software": "software",
    "exif-ifd2-LensMake": "lens_make",
    "exif-ifd2-LensModel": "lens_model",
    "exif-ifd2-DateTimeOriginal": "date_time_original",
    "exif-ifd0-DateTime": "date_time",
    "exif-ifd2-ExposureTime": "exposure_time",
    "exif-ifd2-FNumber": "f_number",
    "exif-ifd2-ISOSpeedRatings": "iso",
    "exif-ifd2-PhotographicSensitivity": "iso",
    "exif-ifd2-FocalLength": "focal_length_mm",
}
_NUMERIC = frozenset({"exposure_time", "f_number", "iso", "focal_length_mm"})
# libvips renders an EXIF entry as "<raw value> (<libexif text>, <type>, <n> components, <n> bytes)"
_ENTRY = re.compile(r"^(?P<raw>.*) \((?P<text>.*), (?P<type>[^,]+), \d+ components, \d+ bytes\)$", re.S)
_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_COLOUR_NAMES = {"b-w": "grey", "grey16": "grey", "rgb16": "srgb"}
_MIME = {"svg": "image/svg+xml", **{fmt: mime for fmt, (_, mime) in FORMATS.items()}}


def describe_source(source: Source, *, include_gps: bool = False) -> dict[str, Any]:
    h = source.header
    dw, dh = source.size(auto_rotate=True)
    interp = str(h.interpretation)
    meta: dict[str, Any] = {
        "format": source.format,
        "content_type": _MIME.get(source.format, "application/octet-stream"),
        "size": source.bytes,
        "width": source.width,
        "height": source.height,
        "display_width": dw,
        "display_height": dh,
        "orientation": source.orientation,
        "pages": source.pages,
        "frames": source.pages,
        "animated": source.animated,
        "bands": int(h.bands),
        "colour_space": _COLOUR_NAMES.get(interp, interp),
        "interpretation": interp,
        "bit_depth": {"uchar": 8, "char": 8, "ushort": 16, "short": 16}.get(str(h.format), 32),
        "has_alpha": bool(h.hasalpha()),
        "icc_profile": bool(h.get_typeof("icc-profile-data")),
        "exif": exif_subset(h, include_gps=include_gps),
    }
    if source.animated and h.get_typeof("delay"):
        meta["delays_ms"] = list(h.get("delay"))[: source.pages]
    if h.get_typeof("loop"):
        meta["loop"] = int(h.get("loop"))
    small = to_srgb(source.thumbnail(64, 64, auto_rotate=True)).copy_memory()
    meta["dominant_colour"] = dominant_colour(small)
    meta["blurhash"] = blurhash_of(small)
    return meta


def write_json(meta: dict[str, Any], dst_path: str) -> None:
    tmp = f"{dst_path}.part"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, ensure_ascii=False, indent=2)
    os.replace(tmp, dst_path)


# --- EXIF ------------------------------------------------------------------------------------


def _entry(image: Any, name: str) -> tuple[str, str] | None:
    if not image.get_typeof(name):
        return None
    value = image.get(name)
    if not isinstance(value, str):
        return None
    m = _ENTRY.match(value)
    return (m.group("raw").strip(), m.group("text").strip()) if m else (value.strip(), value.strip())


def _number(raw: str) -> float | None:
    parts = raw.split()
    if not parts:
        return None
    try:
        num, _, den = parts[0].partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None


def _rationals(raw: str) -> list[float]:
    out = []
    for part in raw.split():
        num, _, den = part.partition("/")
        try:
            out.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            return []
    return out


def exif_subset(image: Any, *, include_gps: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for field, key in _EXIF_FIELDS.items():
        if key in found:
            continue
        entry = _entry(image, field)
        if entry is None or not entry[0]:
            continue
        raw, _ = entry
        if key in _NUMERIC:
            number = _number(raw)
            if number is not None:
                found[key] = round(number, 6)
        elif key.startswith("date"):
            m = _DATE.match(raw)
            found[key] = "{}-{}-{}T{}:{}:{}".format(*m.groups()) if m else raw
        else:
            found[key] = raw
    if include_gps:
        gps = gps_position(image)
        if gps:
            found["gps"] = gps
    return found


def gps_position(image: Any) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for axis, negative in (("Latitude", "S"), ("Longitude", "W")):
        entry, ref = _entry(image, f"exif-ifd3-GPS{axis}"), _entry(image, f"exif-ifd3-GPS{axis}Ref")
        parts = _rationals(entry[0]) if entry else []
        if len(parts) != 3:
            return None
        value = parts[0] + parts[1] / 60 + parts[2] / 3600
        if ref and ref[0].upper().startswith(negative):
            value = -value
        out[axis.lower()] = round(value, 7)
    altitude = _entry(image, "exif-ifd3-GPSAltitude")
    if altitude:
        number = _number(altitude[0])
        if number is not None:
            ref = _entry(image, "exif-ifd3-GPSAltitudeRef")
            below = ref is not None and ref[0].startswith("1")
            out["altitude_m"] = round(-number if below else number, 2)
    return out


# --- colour summaries --------------------------------------------------------------------


def dominant_colour(small: Any) -> str | None:
    """The mean colour of the most common 3-bit-per-channel bin of opaque pixels."""
    image = to_srgb(small)
    if image.bands < 3:
        image = image.colourspace("srgb")
    image = ensure_alpha(image)
    data = bytes(image.write_to_memory())
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for i in range(0, len(data), 4):
        if data[i + 3] < 128:
            continue
        r, g, b = data[i], data[i + 1], data[i + 2]
        acc = sums[(r >> 5) << 6 | (g >> 5) << 3 | (b >> 5)]
        acc[0] += r
        acc[1] += g
        acc[2] += b
        acc[3] += 1
    if not sums:
        return None
    r, g, b, n = max(sums.values(), key=lambda acc: acc[3])
    return f"#{round(r / n):02x}{round(g / n):02x}{round(b / n):02x}"


_B83 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"


def _base83(value: int, length: int) -> str:
    return "".join(_B83[(value // 83 ** (length - 1 - i)) % 83] for i in range(length))


def _to_linear(value: int) -> float:
    v = value / 255.0
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def _to_srgb(value: float) -> int:
    v = max(0.0, min(1.0, value))
    if v <= 0.0031308:
        return int(v * 12.92 * 255 + 0.5)
    return int((1.055 * v ** (1 / 2.4) - 0.055) * 255 + 0.5)


def blurhash_encode(rgb: bytes, width: int, height: int, nx: int = 4, ny: int = 3) -> str:
    """The BlurHash of raw 8-bit RGB pixels (the reference algorithm, woltapp/blurhash)."""
    linear = [_to_linear(b) for b in range(256)]
    cos_x = [[math.cos(math.pi * i * x / width) for x in range(width)] for i in range(nx)]
    cos_y = [[math.cos(math.pi * j * y / height) for y in range(height)] for j in range(ny)]
    factors: list[tuple[float, float, float]] = []
    for j in range(ny):
        for i in range(nx):
            norm = 1.0 if i == j == 0 else 2.0
            r = g = b = 0.0
            for y in range(height):
                row = y * width * 3
                cy = cos_y[j][y] * norm
                for x in range(width):
                    basis = cos_x[i][x] * cy
                    k = row + 3 * x
                    r += basis * linear[rgb[k]]
                    g += basis * linear[rgb[k + 1]]
                    b += basis * linear[rgb[k + 2]]
            scale = 1.0 / (width * height)
            factors.append((r * scale, g * scale, b * scale))
    dc, ac = factors[0], factors[1:]
    out = _base83((nx - 1) + (ny - 1) * 9, 1)
    if ac:
        quant_max = max(0, min(82, int(max(abs(c) for f in ac for c in f) * 166 - 0.5)))
        max_ac = (quant_max + 1) / 166
    else:
        quant_max, max_ac = 0, 1.0
    out += _base83(quant_max, 1)
    out += _base83((_to_srgb(dc[0]) << 16) + (_to_srgb(dc[1]) << 8) + _to_srgb(dc[2]), 4)
    for f in ac:
        q = [max(0, min(18, int(math.floor(math.copysign(abs(c / max_ac) ** 0.5, c) * 9 + 9.5)))) for c in f]
        out += _base83(q[0] * 19 * 19 + q[1] * 19 + q[2], 2)
    return out


def blurhash_of(small: Any) -> str:
    """BlurHash (4×3 components, 3×4 for portrait) of a small rendition."""
    thumb = small.thumbnail_image(32, height=32) if max(small.width, small.height) > 32 else small
    data = rgb_pixels(thumb)
    portrait = thumb.height > thumb.width
    return blurhash_encode(data, thumb.width, thumb.height, 3 if portrait else 4, 4 if portrait else 3)
