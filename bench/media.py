"""Generated test media, cached in the context's media directory."""

from __future__ import annotations

import subprocess
from pathlib import Path


def photo(path: Path, width: int, height: int, seed: int) -> Path:
    """A JPEG with smooth structure and grain, compressing like a photograph (Q 90)."""
    if path.exists():
        return path
    import pyvips

    # structure at a quarter of the size (perlin/worley are slow), scaled up, plus full-size grain
    sw, sh = max(8, width // 4), max(8, height // 4)
    smooth = pyvips.Image.perlin(sw, sh, cell_size=max(4, sw // 12), seed=seed).resize(width / sw, vscale=height / sh)
    cells = pyvips.Image.worley(sw, sh, cell_size=max(4, sw // 20), seed=seed + 1).resize(width / sw, vscale=height / sh)
    grain = pyvips.Image.gaussnoise(width, height, sigma=12, mean=0, seed=seed + 2)
    r = smooth * 110 + 128 + grain
    g = (cells / 2).cast("float") + 60 + grain
    b = smooth * -90 + 120 + grain
    image = r.bandjoin([g, b]).cast("uchar").copy(interpretation="srgb")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.write_to_file(str(path), Q=90)
    return path


def clip(path: Path, ffmpeg: str, seconds: int = 10) -> Path:
    """A 1080p30 H.264 clip with a stereo AAC tone (ffmpeg lavfi testsrc2 + sine)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2",
         "-shortest", str(path)],
        check=True, timeout=300,
    )
    return path
