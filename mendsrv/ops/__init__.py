"""The operation registry: every operation of every family, keyed by "family/name".

Routes, validation, the catalogue endpoint and the OpenAPI document are all built
from `REGISTRY`; an operation is defined once, in its family module.

A run function returns a dict:

- ``output``: facts about the primary file written at ``dst_path`` (``content_type``
  required; ``width``, ``height``, ``duration``… where they apply);
- ``extra_outputs`` (optional): further files written beside ``dst_path``, each
  ``{"name": <file name relative to dst_path's directory>, "content_type": …}``;
  they are uploaded next to ``dest_key``;
- anything else is operation-specific and lands in the job's ``result`` as is.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import Operation


def build_registry(operations: Iterable[Operation]) -> dict[str, Operation]:
    registry: dict[str, Operation] = {}
    for op in operations:
        if op.name in registry:
            raise RuntimeError(f"operation {op.name} is registered twice")
        registry[op.name] = op
    return registry


def _all_operations() -> list[Operation]:
    from . import audio, image, video

    return [*image.OPERATIONS, *video.OPERATIONS, *audio.OPERATIONS]


REGISTRY: dict[str, Operation] = build_registry(_all_operations())
