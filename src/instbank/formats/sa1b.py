"""SA-1B (Segment Anything) per-image json -> ``Dataset``: class-agnostic masks as compressed RLE.

Layout (https://github.com/facebookresearch/segment-anything#dataset): each tar unpacks flat to
``sa_<n>.jpg`` + ``sa_<n>.json``; a json is ``{"image": {"image_id", "width", "height",
"file_name"}, "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "bbox",
"area", "predicted_iou", "stability_score", "crop_box", "point_coords"}]}``. Every ``sa_*.json``
under the root (subdirectories included, so one directory per unpacked tar works) is read, in
sorted order of its path relative to the root; the image is ``file_name`` beside its json, or
under ``images_dir`` (same relative subdirectory).

What is read: ``image`` (all four fields), and per annotation ``id``, ``segmentation``, and
``predicted_iou`` / ``stability_score`` only when their filter is set. ``bbox``, ``area``,
``crop_box`` and ``point_coords`` are ignored: the mask decides (its area is recomputed from the
runs, which are all decoded here to check them, vectorised over a whole file).

Classes: SA-1B masks have none. Without ``class_map`` every mask gets one class (``category``,
default ``"object"``). A ``class_map`` (a json file ``{"<annotation id>": "<class name>"}``, or a
``{int: str}`` mapping) names the class of each listed annotation; unlisted ones get ``category``
when it is given, else they are skipped (``unmapped``). Classes get contiguous ids in ascending
name order, ``source_id`` = that id.

A problem with a file (not JSON, no ``image`` object, bad ``image`` fields, a ``file_name`` that
leaves its directory, duplicate image or annotation ids) raises ``InputError`` naming the file;
a bad annotation is skipped and counted in ``Dataset.skipped``, checked in this order:
``malformed_annotation``, ``rle_size_mismatch``, ``bad_rle``, ``unmapped``, then the filters
``low_predicted_iou``, ``low_stability_score``, ``small_area``. Missing image files are left to
the build (``missing_image``), as for COCO.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from instbank.formats.coco import check_runs
from instbank.formats.common import gc_paused, input_error, is_int64
from instbank.types import ClassInfo, Dataset, ImageRecord, InstanceRecord, SkipLog

JSON_GLOB = "sa_*.json"
DEFAULT_CATEGORY = "object"
#: Chars of one compressed-RLE number: 5 bits each, so 7 hold +-2**34 (any image's pixel count);
#: a longer number is a corrupt string, and would overflow int64 past 12 chars.
MAX_NUMBER_CHARS = 7
#: What one char (minus 48) adds to its number, before the shift by 5 bits per earlier char: a
#: continuation char (c >= 32) its low 5 bits, c - 32; a number's last char its 5 bits as a signed
#: value, c - 32 when the sign bit 16 is set. So c - 32 for c >= 16. (Chars past 63 are bad_rle.)
CHAR_BITS = np.array([c - 32 if c >= 16 else c for c in range(256)], np.int64)


def read_sa1b(
    root: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    *,
    category: str | None = None,
    class_map: str | os.PathLike | Mapping[int, str] | None = None,
    min_predicted_iou: float = 0.0,
    min_stability_score: float = 0.0,
    min_area: int = 0,
) -> Dataset:
    """Read every ``sa_*.json`` under the directory ``root`` (see the module docstring).

    ``images_dir``: where the images are (default: beside each json). ``category``: the class of
    every mask (default ``"object"``), or with ``class_map`` the class of unlisted annotations
    (``None``: skip them). ``min_predicted_iou`` / ``min_stability_score``: keep masks whose score
    is ``>=`` the value (0 = no filter, and the field is not read). ``min_area``: keep masks of at
    least this many pixels (counted from the RLE).

    Returns images in sorted json path order, instances in file order, RLE ``{"size": [h, w],
    "counts": str}`` as given (checked: every run decoded, non-negative, adding up to ``h * w``).
    """
    for name, value in (("min_predicted_iou", min_predicted_iou), ("min_stability_score", min_stability_score)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
    if type(min_area) is not int or min_area < 0:
        raise ValueError(f"min_area must be an integer >= 0, not {min_area!r}")
    root = Path(root)
    if not root.is_dir():
        raise input_error(root, "no such SA-1B directory")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise input_error(images_dir, f"images directory does not exist (given for {root})")
    mapping = load_class_map(class_map)
    classes, class_of, default = class_table(mapping, category)
    reader = FileReader(classes=class_of, default=default, min_iou=min_predicted_iou,
                        min_stability=min_stability_score, min_area=min_area)  # fmt: skip
    paths = find_jsons(root)
    if not paths:
        raise input_error(root, f"has no {JSON_GLOB} files (an unpacked SA-1B tar holds sa_<n>.jpg + sa_<n>.json)")
    notes = [f"sa1b: {len(paths)} json files under {root}", class_note(classes, mapping, default)]
    images: list[ImageRecord] = []
    with gc_paused():
        for rel in paths:
            image_root = root / rel.parent if images_dir is None else Path(images_dir) / rel.parent
            images.append(reader.read(root / rel, image_root))
    return Dataset(source=str(root), kind="sa1b", images=images, classes=classes, skipped=reader.skips.counts, notes=notes,
                   skip_examples=reader.skips.examples, images_root=str(images_dir if images_dir is not None else root))


# --------------------------------------------------------------------------------------------
# files and classes


def find_jsons(root: Path) -> list[Path]:
    """Every ``sa_*.json`` under ``root``, relative to it, sorted by path (deterministic)."""
    found = []
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(parent).relative_to(root)
        found += [rel / f for f in files if fnmatch.fnmatchcase(f, JSON_GLOB)]
    return sorted(found, key=lambda p: p.parts)


def load_class_map(class_map: str | os.PathLike | Mapping[int, str] | None) -> dict[int, str] | None:
    """``{annotation id: class name}`` from a json file ``{"<id>": "<name>"}`` or a mapping."""
    if class_map is None:
        return None
    if isinstance(class_map, Mapping):
        bad = next((k for k, v in class_map.items() if not (is_int64(k) and isinstance(v, str) and v)), None)
        if bad is not None:
            raise ValueError(f"class_map must map integer annotation ids to class names; bad entry {bad!r}")
        return dict(class_map)
    path = Path(class_map)
    doc = load_json(path, "class map")
    if not isinstance(doc, dict):
        raise input_error(path, "is not a class map (expected a json object {\"<annotation id>\": \"<class name>\"})")
    mapping: dict[int, str] = {}
    for key, name in doc.items():
        try:
            ann_id = int(key) if len(key) <= 20 else None  # int() accepts " 1" and "1_0": round trip below
        except ValueError:
            ann_id = None
        if ann_id is None or not is_int64(ann_id) or str(ann_id) != key:
            raise input_error(path, f"class map key {key!r:.40} is not an annotation id (a decimal integer)")
        if not isinstance(name, str) or not name:
            raise input_error(path, f"class map entry {key} is not a class name string (got {name!r:.40})")
        mapping[ann_id] = name
    return mapping


def class_table(
    mapping: dict[int, str] | None, category: str | None
) -> tuple[list[ClassInfo], dict[int, int], int | None]:
    """``(classes, {annotation id: class id}, class id of unlisted annotations or None)``.

    Classes are every name of the map (used or not, so a subset keeps the ids of the whole) plus
    ``category``, with contiguous ids in ascending name order."""
    if category is not None and (not isinstance(category, str) or not category):
        raise ValueError(f"category must be a non-empty class name, not {category!r}")
    if mapping is None:
        category = category or DEFAULT_CATEGORY
    names = sorted(set(mapping.values() if mapping else ()) | ({category} if category else set()))
    classes = [ClassInfo(id=i, source_id=i, name=n) for i, n in enumerate(names)]
    index = {n: i for i, n in enumerate(names)}
    class_of = {ann_id: index[n] for ann_id, n in mapping.items()} if mapping else {}
    return classes, class_of, (index[category] if category else None)


def class_note(classes: list[ClassInfo], mapping: dict[int, str] | None, default: int | None) -> str:
    if mapping is None:
        return f"classes: class-agnostic, every mask is '{classes[0].name}'"
    rest = f"'{classes[default].name}'" if default is not None else "skipped (unmapped)"
    named = len(set(mapping.values()))
    return (f"classes: {len(classes)}, {named} named by the class map ({len(mapping)} annotations); "
            f"unlisted annotations: {rest}")


def load_json(path: Path, what: str) -> Any:
    """The parsed json; ``InputError`` naming ``path`` for a missing, unreadable or invalid file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise input_error(path, f"no such {what} file") from None
    except OSError as e:
        raise input_error(path, f"cannot read the {what} ({e.strerror or e})") from None
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise input_error(path, f"is not UTF-8 text, so not a {what}") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise input_error(path, f"is not valid JSON (truncated?): {e.msg} at {where}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer beyond sys.get_int_max_str_digits()
        raise input_error(path, f"is not a {what} ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------
# one json


class FileReader:
    """Reads one ``sa_*.json`` at a time; holds the options, the id sets and the skip counts."""

    def __init__(self, classes: dict[int, int], default: int | None, min_iou: float, min_stability: float,
                 min_area: int):  # fmt: skip
        self.classes, self.default = classes, default
        self.min_iou, self.min_stability, self.min_area = min_iou, min_stability, min_area
        self.skips = SkipLog()
        self.image_ids: set[int] = set()
        self.ann_ids: set[int] = set()

    def read(self, path: Path, image_root: Path) -> ImageRecord:
        doc = load_json(path, "SA-1B json")
        if not isinstance(doc, dict):
            raise input_error(path, f"is not an SA-1B json (top level is a {type(doc).__name__}, not an object)")
        image_id, file_name, width, height = self.image_entry(path, doc.get("image"))
        annotations = doc.get("annotations")
        if not isinstance(annotations, list):
            raise input_error(path, "has no 'annotations' list")
        self.check_ids(path, annotations)
        shapes = [segmentation(ann, height, width) for ann in annotations]
        areas = check_masks(shapes, height * width)
        instances = []
        for index, (ann, shape, area) in enumerate(zip(annotations, shapes, areas)):
            result = shape if isinstance(shape, str) else self.keep(ann, shape, area)
            if isinstance(result, str):
                ann_id = ann.get("id") if isinstance(ann, dict) else None
                self.skips.add(result, str(path), image_id, ann_id, detail=f"annotations[{index}]")
            else:
                instances.append(result)
        return ImageRecord(image_id=image_id, path=str(image_root / file_name), width=width, height=height,
                           instances=tuple(instances))  # fmt: skip

    def image_entry(self, path: Path, image: Any) -> tuple[int, str, int, int]:
        """``(image_id, file_name, width, height)``, checked; the id must be new."""
        if not isinstance(image, dict):
            raise input_error(path, "has no 'image' object")
        image_id, file_name = image.get("image_id"), image.get("file_name")
        width, height = image.get("width"), image.get("height")
        if not is_int64(image_id):
            raise input_error(path, f"image has no integer 'image_id' (got {image_id!r:.40})")
        if not (type(width) is int and type(height) is int and width > 0 and height > 0):
            raise input_error(path, f"image width/height are not integers > 0 (got {width!r:.20} x {height!r:.20})")
        if not isinstance(file_name, str) or not file_name:
            raise input_error(path, "image has no 'file_name' string")
        name = PurePosixPath(file_name)
        if name.is_absolute() or ".." in name.parts or "\\" in file_name or "\0" in file_name:
            raise input_error(path, f"image file_name {file_name!r:.60} leaves the json's directory")
        if image_id in self.image_ids:
            raise input_error(path, f"duplicate image id {image_id} (also in an earlier json)")
        self.image_ids.add(image_id)
        return image_id, file_name, width, height

    def check_ids(self, path: Path, annotations: list) -> None:
        """An annotation id names one mask of the whole read (the bank's meta and the class map)."""
        for index, ann in enumerate(annotations):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            if not is_int64(ann_id):
                continue  # counted as malformed_annotation
            if ann_id in self.ann_ids:
                raise input_error(path, f"duplicate annotation id {ann_id} (annotations[{index}])")
            self.ann_ids.add(ann_id)

    def keep(self, ann: dict, rle: dict, area: int) -> InstanceRecord | str:
        """The record of a mask with a valid RLE, or the reason it is skipped."""
        class_id = self.classes.get(ann["id"], self.default)
        if class_id is None:
            return "unmapped"
        for key, low, reason in (("predicted_iou", self.min_iou, "low_predicted_iou"),
                                 ("stability_score", self.min_stability, "low_stability_score")):  # fmt: skip
            if low > 0:
                score = ann.get(key)
                if type(score) not in (int, float) or not math.isfinite(score):
                    return "malformed_annotation"
                if score < low:
                    return reason
        if area < self.min_area:
            return "small_area"
        return InstanceRecord(ann["id"], class_id, rle=rle)


def segmentation(ann: Any, height: int, width: int) -> dict | str:
    """``{"size": [h, w], "counts": str | list}`` of a well-typed annotation, or a skip reason."""
    if not isinstance(ann, dict) or not is_int64(ann.get("id")):
        return "malformed_annotation"
    seg = ann.get("segmentation")
    if not isinstance(seg, dict):
        return "malformed_annotation"
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 0 for v in size)):
        return "malformed_annotation"
    if not isinstance(counts, (str, list)):
        return "malformed_annotation"
    if size != [height, width]:
        return "rle_size_mismatch"
    return {"size": [height, width], "counts": counts}


# --------------------------------------------------------------------------------------------
# RLE runs, checked in one vectorised pass per file


def check_masks(shapes: list[dict | str], num_pixels: int) -> list[int]:
    """Check the runs of every RLE in ``shapes`` (replacing a bad one by its skip reason, in place)
    and return each mask's foreground pixel count (0 for skipped entries)."""
    areas = [0] * len(shapes)
    strings = [k for k, s in enumerate(shapes) if isinstance(s, dict) and isinstance(s["counts"], str)]
    reasons, found = check_strings([shapes[k]["counts"] for k in strings], num_pixels)
    for k, reason, area in zip(strings, reasons, found):
        shapes[k], areas[k] = (reason, 0) if reason else (shapes[k], area)
    for k, shape in enumerate(shapes):
        if isinstance(shape, dict) and isinstance(shape["counts"], list):
            reason = check_runs(shape["counts"], num_pixels)
            shapes[k], areas[k] = (reason, 0) if reason else (shape, sum(shape["counts"][1::2]))
    return areas



def check_strings(strings: list[str], num_pixels: int) -> tuple[list[str | None], list[int]]:
    """Decode COCO compressed RLE strings (``maskApi.c`` ``rleFrString``) all at once.

    Returns per string ``None`` or ``"bad_rle"`` (a char outside ``'0'..'o'``, a number cut off at
    the end, a number of more than ``MAX_NUMBER_CHARS`` chars, a negative run, runs not adding up
    to ``num_pixels``), and its foreground pixel count (0 when bad). The same arithmetic as
    ``instbank.crops.rle_string_to_counts``, over every char of every string in numpy: ~8 us per
    SA-1B-sized mask (~600 chars) against ~100 us for that per-char loop (benchmarks/sa1b.py).
    """
    n = len(strings)
    reasons: list[str | None] = ["bad_rle"] * n
    areas = [0] * n
    ok = [k for k, s in enumerate(strings) if s and s.isascii()]
    if not ok:
        return reasons, areas
    lengths = np.fromiter((len(strings[k]) for k in ok), np.int64, len(ok))
    # '0'..'o' -> 0..63 (bit 5: more chars follow; bit 4 of a number's last char: its sign);
    # other chars wrap above 63 in uint8
    c = np.frombuffer("".join(strings[k] for k in ok).encode("ascii"), np.uint8) - np.uint8(48)
    last_char = np.cumsum(lengths) - 1
    first_char = last_char - (lengths - 1)
    ends = c < 32
    bad = ~ends[last_char]  # the string ends inside a number
    outside = c > 63
    if outside.any():
        bad |= np.logical_or.reduceat(outside, first_char)
    ends[last_char] = True  # never let a number run into the next string
    stops = np.flatnonzero(ends)
    starts = np.concatenate(([0], stops[:-1] + 1))
    length = stops - starts + 1
    position = np.arange(len(c)) - np.repeat(starts, length)
    chunk = np.take(CHAR_BITS, c) << (5 * np.minimum(position, MAX_NUMBER_CHARS))
    value = np.diff(np.cumsum(chunk)[stops], prepend=0)  # int64 wrap-around cancels in the difference
    too_long = length > MAX_NUMBER_CHARS
    through = np.searchsorted(stops, last_char) + 1  # numbers up to each string's end
    numbers = np.diff(through, prepend=0)
    first_token = through - numbers
    bad |= np.logical_or.reduceat(too_long, first_token)
    # runs: counts[j] = d[j] + counts[j - 2] for j > 2: a running sum over every other number,
    # from j = 1 (odd j) and j = 2 (even j) of each string. Done over the whole batch with a
    # running sum per parity of the batch index (a string's odd or even j is one batch parity),
    # minus its value just before the string's own part begins (index first - 1 or first).
    j = np.arange(len(starts)) - np.repeat(first_token, numbers)
    odd = (j & 1) == 1
    total = np.zeros(len(value) + 2, np.int64)  # two leading zeros: index -1 and -2 read 0
    total[2::2], total[3::2] = np.cumsum(value[0::2]), np.cumsum(value[1::2])
    base = np.repeat(first_token, numbers) - odd + 2
    runs = np.where(j == 0, value, total[2:] - total[base])
    bad |= np.minimum.reduceat(runs, first_token) < 0
    bad |= np.add.reduceat(runs, first_token) != num_pixels
    area = np.add.reduceat(np.where(odd, runs, 0), first_token)
    for k, is_bad, a in zip(ok, bad.tolist(), area.tolist()):
        if not is_bad:
            reasons[k], areas[k] = None, a
    return reasons, areas
