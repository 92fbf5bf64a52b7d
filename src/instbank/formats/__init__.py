"""Data set readers: a COCO instances json, a YOLO-seg data set or SA-1B per-image jsons ->
``instbank.types.Dataset``.

No pixel is decoded here (the crop stage does it). Dropped instances and file-level events are
counted in ``Dataset.skipped`` under the keys of ``REASONS`` (``FILE_REASONS`` are the keys that
count images or label files rather than instances). docs/formats.md describes the formats, their
quirks and the id schemes.
"""

from instbank.formats.coco import read_coco
from instbank.formats.common import FILE_REASONS, REASONS
from instbank.formats.sa1b import read_sa1b
from instbank.formats.yolo import read_yolo

__all__ = ["FILE_REASONS", "REASONS", "read_coco", "read_sa1b", "read_yolo"]
