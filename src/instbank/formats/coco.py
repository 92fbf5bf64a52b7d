"""COCO instances json -> ``Dataset``, with plain ``json`` and Python (no pycocotools index).

What is read: ``images`` (``id``, ``file_name``, optional ``width``/``height``), ``categories``
(``id``, ``name``, and ``keypoints``/``skeleton`` where given) and ``annotations`` (``id``,
``image_id``, ``category_id``, ``iscrowd``, ``segmentation``, ``keypoints``, and ``bbox`` only for
``box_masks``). Everything else is ignored, ``num_keypoints`` too (it is the count of ``v > 0``).

Keypoints (COCO person keypoints and any json in that layout): the categories that name keypoints
must all name the same ones with the same skeleton (a bank has one layout, ``KeypointSpec``; an
``InputError`` otherwise); flip pairs come from the names (``left_X`` <-> ``right_X``). Every
annotation then carries ``J`` keypoints: its own ``keypoints`` (``3 * J`` numbers ``x, y, v``) when
its category names keypoints, else all ``v = 0``.

Problems in the file itself or in its ``images``/``categories`` tables raise ``InputError``
(one line, naming the json); a bad annotation is dropped and counted in ``Dataset.skipped``
under a reason key of ``instbank.formats.REASONS`` (checked in this order: ``malformed_annotation``,
``unknown_image``, ``unknown_category``, ``crowd``, then the shape: ``no_segmentation``/``bad_bbox``,
``bad_polygon``, ``rle_size_mismatch``, ``bad_rle``, then ``bad_keypoints``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from instbank.formats.common import gc_paused, input_error, is_int64, keypoint_rows, rectangle, valid_box
from instbank.types import ClassInfo, Dataset, ImageRecord, InstanceRecord, KeypointSpec, SkipLog

CROWD_MODES = ("skip", "include")
SECTIONS = ("images", "annotations", "categories")
#: JSON numbers; bool (a subclass of int) is deliberately not one of them.
NUMBER_TYPES = frozenset({int, float})
#: How many image files (lowest ids first) are looked for when guessing the images directory: one
#: missing file must not defeat the guess, and a handful of stats costs nothing.
GUESS_PROBES = 5


def read_coco(
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    *,
    crowd: str = "skip",
    box_masks: bool = False,
    keypoints: bool = True,
) -> Dataset:
    """Read a COCO instances json.

    ``images_dir``: where ``file_name`` is found; ``None`` guesses it (see ``candidate_images_dirs``)
    and says which in ``Dataset.notes``. ``crowd``: ``"skip"`` drops ``iscrowd=1`` (counted as
    ``crowd``), ``"include"`` keeps them with ``is_crowd=True``. ``box_masks``: an annotation with
    an empty segmentation gets its ``bbox`` rectangle as polygon instead of being skipped.
    ``keypoints``: read the keypoints when categories name them (``False``: a bank without them).

    Returns images in ascending image id, instances in ascending annotation id, classes with
    contiguous ids in ascending category id. Polygons are float64 ``[n, 2]`` source pixels; RLE is
    ``{"size": [h, w], "counts": list[int] | str}`` with ``counts`` as given.
    """
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, not {crowd!r}")
    path = Path(ann_path)
    with gc_paused():
        return build_dataset(path, load_json(path), images_dir, crowd == "include", box_masks, keypoints)


def build_dataset(
    path: Path, doc: Any, images_dir: str | os.PathLike | None, keep_crowd: bool, box_masks: bool,
    keypoints: bool = True,
) -> Dataset:
    """The ``Dataset`` of a parsed COCO json (see ``read_coco``)."""
    sections = {name: require_list(path, doc, name) for name in SECTIONS}
    images = image_table(path, sections["images"])
    classes = class_table(path, sections["categories"])
    spec, with_keypoints = keypoint_layout(path, sections["categories"]) if keypoints else (None, frozenset())
    layout = None if spec is None else KeypointLayout(spec.num_keypoints, with_keypoints)
    notes: list[str] = []
    root = resolve_images_dir(path, images_dir, images, notes)
    class_of = {c.source_id: c.id for c in classes}
    per_image: dict[int, list[InstanceRecord]] = {image_id: [] for image_id in images}
    skips = SkipLog()
    seen_ids: set[int] = set()
    for index, ann in enumerate(sections["annotations"]):
        check_unique_id(path, ann, index, seen_ids)
        result = read_annotation(ann, images, class_of, keep_crowd, box_masks, layout)
        if isinstance(result, str):
            ids = (ann.get("image_id"), ann.get("id")) if isinstance(ann, dict) else (None, None)
            skips.add(result, str(path), *ids, detail=f"annotations[{index}]")
        else:
            per_image[result[0]].append(result[1])
    records = [
        ImageRecord(
            image_id=image_id,
            path=str(root / file_name),
            width=width,
            height=height,
            instances=tuple(sorted(per_image[image_id], key=lambda r: r.ann_id)),
        )
        for image_id, (file_name, width, height) in sorted(images.items())
    ]
    return Dataset(source=str(path), kind="coco", images=records, classes=classes, skipped=skips.counts, notes=notes,
                   skip_examples=skips.examples, images_root=str(root), keypoint_spec=spec)


# --------------------------------------------------------------------------------------------
# file and tables


def load_json(path: Path) -> Any:
    """The parsed json; ``InputError`` for a missing, unreadable, non-JSON or truncated file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise input_error(path, "no such annotation file") from None
    except OSError as e:
        raise input_error(path, f"cannot read the annotation file ({e.strerror or e})") from None
    try:
        # bytes input: json detects UTF-8/16/32 itself and skips decoding twice
        return json.loads(data)
    except UnicodeDecodeError:
        raise input_error(path, "is not UTF-8 text, so not a COCO json") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise input_error(path, f"is not valid JSON (truncated?): {e.msg} at {where}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer beyond sys.get_int_max_str_digits()
        raise input_error(path, f"is not a COCO json ({type(e).__name__}: {e})") from None


def require_list(path: Path, doc: Any, name: str) -> list:
    if not isinstance(doc, dict):
        raise input_error(path, f"is not a COCO json (top level is a {type(doc).__name__}, not an object)")
    section = doc.get(name)
    if not isinstance(section, list):
        raise input_error(path, f"has no '{name}' list")
    return section


def image_table(path: Path, entries: list) -> dict[int, tuple[str, int, int]]:
    """``{image_id: (file_name, width, height)}``; width/height 0 when the json does not give them."""
    table: dict[int, tuple[str, int, int]] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise input_error(path, f"images[{k}] is not an object")
        image_id = entry.get("id")
        if not is_int64(image_id):
            raise input_error(path, f"images[{k}] has no integer 'id' (got {image_id!r:.40})")
        if image_id in table:
            raise input_error(path, f"duplicate image id {image_id} (images[{k}])")
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise input_error(path, f"images[{k}] (id {image_id}) has no 'file_name' string")
        size = [entry.get(key, 0) for key in ("width", "height")]
        if not all(type(v) is int and v >= 0 for v in size):
            raise input_error(path, f"images[{k}] (id {image_id}) has a width/height that is not an integer >= 0")
        table[image_id] = (file_name, size[0], size[1])
    return table


def class_table(path: Path, entries: list) -> list[ClassInfo]:
    """Contiguous ids ``0..C-1`` in ascending category id; unused categories stay in the table."""
    names: dict[int, str] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise input_error(path, f"categories[{k}] is not an object")
        cat_id = entry.get("id")
        if type(cat_id) is not int:
            raise input_error(path, f"categories[{k}] has no integer 'id' (got {cat_id!r:.40})")
        if cat_id in names:
            raise input_error(path, f"duplicate category id {cat_id} (categories[{k}])")
        name = entry.get("name")
        if not isinstance(name, str):
            raise input_error(path, f"categories[{k}] (id {cat_id}) has no 'name' string")
        names[cat_id] = name
    return [ClassInfo(id=i, source_id=cat_id, name=names[cat_id]) for i, cat_id in enumerate(sorted(names))]


class KeypointLayout(NamedTuple):
    """What an annotation needs of the keypoint layout: ``J`` and the categories that have keypoints."""

    num_keypoints: int
    categories: frozenset


def keypoint_layout(path: Path, entries: list) -> tuple[KeypointSpec | None, frozenset]:
    """The one ``KeypointSpec`` of the categories that name keypoints (``None`` when none does) and
    their ids; ``InputError`` naming the category for a malformed list or two different layouts."""
    spec, first, ids = None, None, set()
    for k, entry in enumerate(entries):
        names, skeleton = entry.get("keypoints"), entry.get("skeleton", [])
        if names is None or names == []:
            continue
        where = f"categories[{k}] (id {entry['id']})"
        if not (isinstance(names, list) and isinstance(skeleton, list)):
            raise input_error(path, f"{where}: 'keypoints' and 'skeleton' must be lists")
        if not all(isinstance(p, list) and len(p) == 2 and all(type(v) is int and 1 <= v <= len(names) for v in p)
                   for p in skeleton):
            raise input_error(path, f"{where}: 'skeleton' must be pairs of keypoint numbers 1..{len(names)} (1-based)")
        try:
            this = KeypointSpec(tuple(names), tuple((a - 1, b - 1) for a, b in skeleton))
        except ValueError as e:
            raise input_error(path, f"{where}: {e}") from None
        if spec is not None and (this.names, this.skeleton) != (spec.names, spec.skeleton):
            raise input_error(path, f"{where} and {first} name different keypoints or skeletons; a bank holds one "
                              "keypoint layout (build the categories apart, or pass keypoints=False)")
        spec, first = spec or this, first or where
        ids.add(entry["id"])
    return spec, frozenset(ids)


def check_unique_id(path: Path, ann: Any, index: int, seen: set[int]) -> None:
    """A duplicate annotation id is an error, whether or not either copy is later skipped."""
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    if not is_int64(ann_id):
        return  # counted as malformed_annotation by read_annotation
    if ann_id in seen:
        raise input_error(path, f"duplicate annotation id {ann_id} (annotations[{index}])")
    seen.add(ann_id)


# --------------------------------------------------------------------------------------------
# images directory


def candidate_images_dirs(ann_path: Path) -> list[Path]:
    """Where COCO-style layouts keep the images, most specific first.

    ``root/annotations/instances_val2017.json`` -> ``root/val2017``, ``root/images/val2017``,
    ``root/images``, ``root``; then, for any json, ``<json dir>/images`` and the json's own
    directory (Roboflow puts ``_annotations.coco.json`` beside its images).
    """
    json_dir = ann_path.parent
    split = ann_path.stem.rsplit("_", 1)[-1]  # instances_val2017 -> val2017
    found: list[Path] = []
    if json_dir.name == "annotations":
        root = json_dir.parent
        found += [root / split, root / "images" / split, root / "images", root]
    found += [json_dir / "images", json_dir]
    return list(dict.fromkeys(found))


def resolve_images_dir(
    ann_path: Path, images_dir: str | os.PathLike | None, images: dict[int, tuple[str, int, int]], notes: list[str]
) -> Path:
    """The given directory (which must exist), or the first candidate holding one of the first images."""
    if images_dir is not None:
        root = Path(images_dir)
        if not root.is_dir():
            raise input_error(root, f"images directory does not exist (given for {ann_path})")
        return root
    probes = [images[i][0] for i in sorted(images)[:GUESS_PROBES]]
    candidates = candidate_images_dirs(ann_path)
    for root in candidates:
        if root.is_dir() and (not probes or any((root / name).is_file() for name in probes)):
            notes.append(f"images: using {root}")
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise input_error(ann_path, f"cannot find the images (looked for {probes[0]!r} in {tried}); pass images_dir")


# --------------------------------------------------------------------------------------------
# one annotation


def read_annotation(
    ann: Any, images: dict[int, tuple[str, int, int]], class_of: dict[int, int], keep_crowd: bool, box_masks: bool,
    layout: KeypointLayout | None = None,
) -> tuple[int, InstanceRecord] | str:
    """``(image_id, record)`` for a usable annotation, else the reason key it is skipped for."""
    if not isinstance(ann, dict):
        return "malformed_annotation"
    ann_id, image_id, cat_id = ann.get("id"), ann.get("image_id"), ann.get("category_id")
    iscrowd = ann.get("iscrowd", 0)
    if not (is_int64(ann_id) and type(image_id) is int and type(cat_id) is int and iscrowd in (0, 1)):
        return "malformed_annotation"
    if image_id not in images:
        return "unknown_image"
    if cat_id not in class_of:
        return "unknown_category"
    is_crowd = bool(iscrowd)
    if is_crowd and not keep_crowd:
        return "crowd"
    _, width, height = images[image_id]
    shape = read_segmentation(ann.get("segmentation"), height, width)
    if shape == "empty":
        shape = box_polygon(ann.get("bbox")) if box_masks else "no_segmentation"
    if isinstance(shape, str):
        return shape
    polygons, rle = shape
    points = None
    if layout is not None:
        points = read_keypoints(ann.get("keypoints") if cat_id in layout.categories else None, layout.num_keypoints)
        if isinstance(points, str):
            return points
    return image_id, InstanceRecord(ann_id, class_of[cat_id], polygons=polygons, rle=rle, is_crowd=is_crowd,
                                    keypoints=points)


def read_keypoints(values: Any, num_keypoints: int) -> np.ndarray | str:
    """float64 ``[J, 3]`` of an annotation's ``keypoints`` (all zeros when it has none), or a skip reason."""
    if values is None:
        return np.zeros((num_keypoints, 3))
    if type(values) is not list or not NUMBER_TYPES.issuperset(map(type, values)):
        return "malformed_annotation"
    try:
        array = np.array(values, np.float64)
    except OverflowError:  # an integer beyond the float range
        return "bad_keypoints"
    return keypoint_rows(array, num_keypoints)


Shape = tuple[tuple[np.ndarray, ...], dict | None]


def read_segmentation(seg: Any, height: int, width: int) -> Shape | str:
    """``(polygons, rle)``, ``"empty"``, or a skip reason."""
    if seg is None or seg == []:
        return "empty"
    if isinstance(seg, list):
        return read_polygons(seg)
    if isinstance(seg, dict):
        return read_rle(seg, height, width)
    return "malformed_annotation"


def read_polygons(parts: list) -> Shape | str:
    """float64 ``[n, 2]`` per part with >= 3 points and an even coordinate count; others dropped."""
    # Types are checked on the list, not left to np.array: it would turn "1" into 1.0 and true
    # into 1.0. One np.array per kept part is then most of the cost (~3 us for 25 points).
    for part in parts:
        if type(part) is not list or not NUMBER_TYPES.issuperset(map(type, part)):
            return "malformed_annotation"
    try:
        # the sum of a list is NaN/inf exactly when one element is (or the coordinates are near
        # the float limit, 1.8e308, which no image has)
        if not all(math.isfinite(sum(part)) for part in parts):
            return "bad_polygon"
    except OverflowError:  # an integer beyond the float range
        return "bad_polygon"
    kept = tuple(np.array(p, np.float64).reshape(-1, 2) for p in parts if len(p) >= 6 and len(p) % 2 == 0)
    return (kept, None) if kept else "bad_polygon"


def read_rle(seg: dict, height: int, width: int) -> Shape | str:
    """``{"size": [h, w], "counts": ...}`` checked against the image size; counts kept as given."""
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 0 for v in size)):
        return "malformed_annotation"
    if not isinstance(counts, (list, str)):
        return "malformed_annotation"
    if height and width and size != [height, width]:
        return "rle_size_mismatch"
    if isinstance(counts, list):
        reason = check_runs(counts, size[0] * size[1])
        if reason:
            return reason
    return (), {"size": list(size), "counts": counts}


def check_runs(counts: list, num_pixels: int) -> str | None:
    """Uncompressed RLE: non-negative integer runs that cover exactly ``num_pixels``."""
    if not all(type(v) is int for v in counts):
        return "malformed_annotation"
    if any(v < 0 for v in counts) or sum(counts) != num_pixels:
        return "bad_rle"
    return None


def box_polygon(bbox: Any) -> Shape | str:
    """The ``[x, y, w, h]`` box as a 4-point polygon (``box_masks=True``)."""
    if bbox is None:
        return "bad_bbox"
    if not (isinstance(bbox, list) and len(bbox) == 4 and NUMBER_TYPES.issuperset(map(type, bbox))):
        return "malformed_annotation"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:  # an integer beyond the float range
        return "bad_bbox"
    if not valid_box(x, y, w, h):
        return "bad_bbox"
    return (rectangle(x, y, x + w, y + h),), None


