"""Helpers shared by the readers: one-line errors, id range, box rectangles."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from instbank.errors import InputError

#: Image and annotation ids end up in ``META_DTYPE`` int64 fields.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def input_error(path: str | os.PathLike, problem: str) -> InputError:
    """``InputError("<path>: <problem>")`` on one line (YAML and JSON errors span several lines)."""
    return InputError(" ".join(f"{os.fspath(path)}: {problem}".split()))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a reader builds millions of acyclic objects.

    Every ~700 new containers CPython runs a collection that walks the young objects, and the
    older generations are walked again and again as the parsed json grows; none of it frees
    anything here. Pausing cuts about a fifth of ``read_coco``'s time (benchmarks/formats.py).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_int64(value: object) -> bool:
    """A JSON integer (not a bool, not a float) that fits an int64 id field."""
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """float64 ``[4, 2]``: the corners of a box, clockwise in image coordinates (y down)."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def valid_box(x: float, y: float, w: float, h: float) -> bool:
    """Finite corner, finite positive size: a box that makes a non-degenerate rectangle."""
    return bool(np.isfinite([x, y, w, h]).all()) and w > 0 and h > 0


def keypoint_rows(values: np.ndarray, num_keypoints: int) -> np.ndarray | str:
    """float64 ``[J, 3]`` rows ``x, y, v`` of float64 ``[3 * J]`` ``values`` (COCO's flat
    ``x1, y1, v1, ...``), with ``x = y = 0`` where ``v = 0`` (COCO writes unlabeled keypoints so;
    some tools leave a position there); ``"bad_keypoints"`` for another length, a NaN/inf or a
    ``v`` outside 0, 1, 2."""
    if values.shape != (3 * num_keypoints,) or not np.isfinite(values).all():
        return "bad_keypoints"
    rows = values.reshape(num_keypoints, 3).copy()
    v = rows[:, 2]
    if not ((v == 0) | (v == 1) | (v == 2)).all():  # np.isin costs 4x this (~10 us per row set)
        return "bad_keypoints"
    rows[v == 0, :2] = 0
    return rows


#: Every key a reader puts in ``Dataset.skipped``, with what it means (for build reports).
#: Keys in ``FILE_REASONS`` count images or label files; the others count dropped instances.
REASONS: dict[str, str] = {
    # COCO, per annotation
    "crowd": "iscrowd=1 annotation skipped (crowd='skip')",
    "unknown_image": "annotation's image_id is not in 'images'",
    "unknown_category": "annotation's category_id is not in 'categories'",
    "no_segmentation": "annotation has no segmentation (pass box_masks to use its bbox)",
    "bad_bbox": "box_masks: bbox missing, non-finite, or with width/height <= 0",
    "bad_polygon": "no polygon part with >= 3 points and an even coordinate count, or a NaN/inf coordinate",
    "rle_size_mismatch": "RLE size differs from the image's height/width",
    "bad_rle": "RLE runs are negative or do not add up to height*width (SA-1B: or a corrupt counts string)",
    "malformed_annotation": "annotation field of the wrong JSON type",
    "bad_keypoints": ("keypoints of another length than 3 x the layout's J (YOLO: kpt_shape), a NaN/inf, "
                      "or a visibility not 0, 1, 2"),
    # YOLO, per label line
    "box_only": "label line with a box and no polygon (pass box_masks to use the box)",
    "bad_label_line": "label line that is not numbers, has NaN/inf, an odd coordinate count or < 3 points",
    "class_out_of_range": "label line whose class index is not in 'names'",
    # SA-1B, per annotation (also rle_size_mismatch, bad_rle for compressed strings, malformed_annotation)
    "unmapped": "annotation id not in the class map, and no default category",
    "low_predicted_iou": "predicted_iou under min_predicted_iou",
    "low_stability_score": "stability_score under min_stability_score",
    "small_area": "mask area (pixels) under min_area",
    # YOLO, per file (images are kept; orphan label files are not read)
    "image_without_label": "no label file (kept, with no instances)",
    "label_without_image": "label file with no image",
    "empty_label_file": "empty label file (kept, with no instances)",
}

FILE_REASONS = frozenset({"image_without_label", "label_without_image", "empty_label_file"})
