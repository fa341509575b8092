"""The raw baseline for image work: the same pyvips call in a bare ProcessPoolExecutor."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

VIPS_CONCURRENCY = 1  # as mendsrv's workers.vips_concurrency default: the same libvips set-up on both sides


def _init() -> None:
    import pyvips

    pyvips.concurrency_set(VIPS_CONCURRENCY)
    pyvips.cache_set_max(0)  # as mendsrv's workers (each job there reads a new file)


def thumbnail(src: str, dst: str, width: int, height: int) -> int:
    import pyvips

    image = pyvips.Image.thumbnail(src, width, height=height, size="down")
    # the file mendsrv writes by default, byte for byte: metadata stripped but the ICC
    # profile kept, optimised Huffman tables (JPEG: about a fifth smaller, a few per cent
    # more CPU)
    opts = {"optimize_coding": True} if dst.lower().endswith((".jpg", ".jpeg")) else {}
    image.write_to_file(dst, keep=pyvips.enums.ForeignKeep.ICC, **opts)
    return int(image.width)


def noop() -> None:
    return None


def pool(processes: int) -> ProcessPoolExecutor:
    """Spawned workers, as mendsrv's pool uses; warm them before timing."""
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"), initializer=_init)
