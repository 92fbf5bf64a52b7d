"""Data set readers: a COCO instances json, a YOLO-seg data set or SA-1B per-image jsons ->
``instbank.types.Dataset``.

No pixel is decoded here (the crop stage does it). Dropped instances and file-level events are
counted in ``Dataset.skipped`` under the keys of ``REASONS`` (``FILE_REASONS`` are the keys that
count images or label files rather than instances). docs/formats.md describes the formats, their
quirks and the id schemes.
"""

from __future__ import annotations

import importlib
from typing import Any

from instbank.formats.common import FILE_REASONS, REASONS

# Each reader loads on first use (PEP 562), so ``instbank build --coco`` does not import yaml and
# the YOLO and SA-1B readers (issue #15, start-up: ~15 ms of a build process).
_READERS = {"read_coco": "coco", "read_sa1b": "sa1b", "read_yolo": "yolo"}

__all__ = ["FILE_REASONS", "REASONS", "read_coco", "read_sa1b", "read_yolo"]


def __getattr__(name: str) -> Any:
    if name in _READERS:
        return getattr(importlib.import_module(f"instbank.formats.{_READERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
