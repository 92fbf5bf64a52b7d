"""YOLO-seg (Ultralytics polygon txt labels) -> ``Dataset``.

Layouts read:

- a ``data.yaml``: ``path`` (the root; relative to the yaml's directory when relative, absent =
  the yaml's directory), ``train``/``val``/``test`` (each a directory, a ``.txt`` list of image
  paths, or a list of those; relative to the root), ``names`` (list, or ``{index: name}`` with
  indices ``0..n-1``), optional ``nc`` (must equal the number of names);
- a directory holding a ``data.yaml`` (that yaml is read);
- a directory with ``images/`` and ``labels/`` (split subdirectories allowed): class names are
  unknown, so the class indices seen become the classes, named ``class<index>``, with contiguous
  ids in ascending index (``source_id`` keeps the index).

YOLO-pose: a yaml with ``kpt_shape: [J, 2 or 3]`` (optional ``flip_idx``: the flip permutation,
``kpt_names``: the ``J`` names, as a list or per class ``{index: [names]}``, the same for every
class) has pose lines ``cls cx cy w h x1 y1 [v1] ... xJ yJ [vJ]`` (all normalised). A pose line
carries a box, not a polygon: it is cut as the box rectangle only with ``box_masks`` (else counted
``box_only``, with a note). Without ``v`` (``[J, 2]``) a keypoint is visible (``v = 2``) unless it
is ``0 0``, the missing point of YOLO tools (``v = 0``). The bank's ``KeypointSpec``: those names
(default ``kp0..kp{J-1}``), no skeleton (YOLO has none), ``flip_idx`` (default: from the names).
A malformed ``kpt_shape``, ``flip_idx`` or ``kpt_names`` is an ``InputError`` naming the yaml.

Labels: ``.../images/<sub>/x.jpg`` -> ``.../labels/<sub>/x.txt`` (the Ultralytics rule: the last
``images`` path component becomes ``labels``). Orphan label files are looked for under the label
directories of image *directories* only, not of ``.txt`` image lists.

Ids: ``image_id`` = position of the image in the sorted list of its absolute paths (all selected
splits together, duplicates once); ``ann_id = image_id * 1_000_000 + line`` with ``line`` the
0-based line number in the label file, so an id points back to its file and line.

Counts in ``Dataset.skipped``. Per label line (the instance is dropped): ``box_only`` (5 numbers,
``box_masks=False``), ``bad_label_line`` (not numbers, NaN/inf, non-integer class, odd coordinate
count, < 3 points, empty box), ``bad_keypoints`` (pose: another number of values than
``5 + J * dim``, a visibility not 0, 1, 2), ``class_out_of_range``. Per file (nothing dropped, except orphan
label files, which no image reads): ``image_without_label`` (the image is kept with no instances),
``label_without_image``, ``empty_label_file``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from instbank.formats.common import gc_paused, input_error, keypoint_rows, rectangle, valid_box
from instbank.types import MAX_KEYPOINTS, ClassInfo, Dataset, ImageRecord, InstanceRecord, KeypointSpec, SkipLog

SPLITS = ("train", "val", "test")
#: Ultralytics ``IMG_FORMATS`` (ultralytics/data/utils.py), compared lower-case.
IMAGE_EXTENSIONS = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"})
#: ``ann_id = image_id * LINES_PER_FILE + line``; a longer label file is refused, not wrapped.
LINES_PER_FILE = 1_000_000
_IMAGES, _LABELS = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


@dataclass
class Layout:
    """Where the images are: ``image_dirs`` are walked recursively (their label directories are
    searched for orphan labels); ``listed`` are images named in ``.txt`` lists. ``names`` is
    ``None`` when the data set does not name its classes."""

    root: str
    image_dirs: list[str] = field(default_factory=list)
    listed: list[str] = field(default_factory=list)
    names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    keypoints: KeypointSpec | None = None
    keypoint_dim: int = 3


@dataclass
class Parsed:
    """One label line that passed every check: polygon float64 ``[n, 2]`` and, for pose lines,
    keypoints float64 ``[J, 3]``, normalised."""

    ann_id: int
    source_class: int
    polygon: np.ndarray
    keypoints: np.ndarray | None = None


def read_yolo(
    path: str | os.PathLike, *, box_masks: bool = False, splits: Sequence[str] | None = None, keypoints: bool = True
) -> Dataset:
    """Read a YOLO-seg data set from a ``data.yaml`` or a directory (see the module docstring).

    ``splits``: which of ``train``/``val``/``test`` to read (default: every split the yaml names;
    for a plain directory, the subdirectories ``images/<split>``). ``box_masks``: a box-only line
    ``cls cx cy w h`` (or a pose line) becomes a rectangle polygon instead of being skipped.
    ``keypoints``: read YOLO-pose keypoints when the yaml has ``kpt_shape`` (``False``: pose lines
    are read for their box only, a bank without keypoints).

    Polygons are float64 ``[n, 2]`` in ``[0, 1]`` (``normalized=True``); width/height are 0.
    """
    chosen = check_splits(splits)
    layout = find_layout(Path(path), chosen)
    if layout.keypoints is not None and not box_masks:
        layout.notes.append("pose labels (kpt_shape) carry a box and no polygon: every line is skipped as box_only "
                            "unless box_masks cuts the box rectangle")
    image_paths = sorted(set(walk_images(layout.image_dirs)) | set(layout.listed))
    skips = SkipLog()
    with gc_paused():
        parsed = [read_label_file(i, p, layout, box_masks, skips) for i, p in enumerate(image_paths)]
        classes = class_table(layout, parsed, layout.notes)
        images = image_records(image_paths, parsed, {c.source_id: c.id for c in classes}, keypoints)
    orphans = sorted(walk_labels(layout.image_dirs) - {label_path(p) for p in image_paths})
    for orphan in orphans:
        skips.add("label_without_image", orphan, detail="no image of this name beside the labels")
    return Dataset(source=str(path), kind="yolo", images=images, classes=classes, skipped=skips.counts, notes=layout.notes,
                   skip_examples=skips.examples, images_root=str(layout.root),
                   keypoint_spec=layout.keypoints if keypoints else None)


def image_records(
    image_paths: list[str], parsed: list[list[Parsed]], contiguous: dict[int, int], keypoints: bool = True
) -> list[ImageRecord]:
    """One ``ImageRecord`` per image path, ``image_id`` = its index; class indices made contiguous;
    pose keypoints kept when ``keypoints``."""
    return [
        ImageRecord(
            image_id=i,
            path=p,
            width=0,
            height=0,
            instances=tuple(
                InstanceRecord(r.ann_id, contiguous[r.source_class], polygons=(r.polygon,), normalized=True,
                               keypoints=r.keypoints if keypoints else None)
                for r in records
            ),
        )
        for i, (p, records) in enumerate(zip(image_paths, parsed))
    ]


def check_splits(splits: Sequence[str] | None) -> list[str] | None:
    if splits is None:
        return None
    chosen = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in chosen if s not in SPLITS]
    if unknown or not chosen:
        raise ValueError(f"splits must be a non-empty selection of {SPLITS}, got {splits!r}")
    return list(dict.fromkeys(chosen))


# --------------------------------------------------------------------------------------------
# layout: data.yaml or directory


def find_layout(path: Path, splits: list[str] | None) -> Layout:
    if path.is_dir():
        if (path / "data.yaml").is_file():
            layout = yaml_layout(path / "data.yaml", splits)
            layout.notes.append(f"classes and splits: using {path / 'data.yaml'}")
            return layout
        return directory_layout(path, splits)
    if path.exists():
        return yaml_layout(path, splits)
    raise input_error(path, "no such data.yaml or directory")


def directory_layout(root: Path, splits: list[str] | None) -> Layout:
    for sub in ("images", "labels"):
        if not (root / sub).is_dir():
            raise input_error(root, f"has no data.yaml and no {sub}/ directory; not a YOLO-seg data set")
    dirs = [root / "images"] if splits is None else [root / "images" / s for s in splits]
    for d in dirs:
        if not d.is_dir():
            raise input_error(root, f"has no {d.relative_to(root)}/ directory for the requested split")
    return Layout(root=os.path.abspath(root), image_dirs=[os.path.abspath(d) for d in dirs])


def load_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise input_error(path, f"cannot read the data yaml ({getattr(e, 'strerror', None) or e})") from None
    try:
        cfg = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, RecursionError) as e:
        raise input_error(path, f"is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise input_error(path, "is not a YOLO data yaml (not a mapping of keys)")
    return cfg


def yaml_layout(path: Path, splits: list[str] | None) -> Layout:
    cfg = load_yaml(path)
    root = yaml_root(path, cfg)
    chosen = splits if splits is not None else [s for s in SPLITS if cfg.get(s) is not None]
    if not chosen:
        raise input_error(path, "names no split (train, val or test)")
    layout = Layout(root=os.path.abspath(root), names=class_names(path, cfg))
    layout.keypoints, layout.keypoint_dim = pose_layout(path, cfg)
    for split in chosen:
        for entry in split_entries(path, cfg, split):
            add_split_entry(path, split, root, entry, layout)
    return layout


def yaml_root(path: Path, cfg: dict) -> Path:
    value = cfg.get("path")
    if value is None:
        return path.parent
    if not isinstance(value, str):
        raise input_error(path, f"'path' is not a string (got {value!r:.40})")
    root = path.parent / value  # an absolute value replaces the yaml's directory
    if not root.is_dir():
        raise input_error(path, f"dataset root 'path: {value}' does not exist ({root})")
    return root


def split_entries(path: Path, cfg: dict, split: str) -> list[str]:
    value = cfg.get(split)
    if value is None:
        raise input_error(path, f"has no '{split}' split")
    entries = [value] if isinstance(value, str) else value
    if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
        raise input_error(path, f"'{split}' is not a path or a list of paths (got {value!r:.40})")
    return entries


def add_split_entry(path: Path, split: str, root: Path, entry: str, layout: Layout) -> None:
    target = root / entry
    if target.is_dir():
        layout.image_dirs.append(os.path.abspath(target))
    elif target.is_file():
        layout.listed.extend(read_image_list(target))
        layout.notes.append(f"{split}: images listed in {target}; orphan labels are not counted for lists")
    else:
        raise input_error(path, f"{split} path '{entry}' does not exist ({target})")


def read_image_list(list_path: Path) -> list[str]:
    """Absolute image paths named in a ``.txt`` list; relative lines are relative to the list's
    directory (Ultralytics does this for ``./`` lines); non-image lines are ignored, as there."""
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise input_error(list_path, f"cannot read the image list ({getattr(e, 'strerror', None) or e})") from None
    base = list_path.parent
    names = (line.strip() for line in lines)
    return [os.path.abspath(base / name) for name in names if name and is_image_name(name)]


def class_names(path: Path, cfg: dict) -> list[str] | None:
    """``names`` as a list (index = position), or ``None`` when neither ``names`` nor ``nc`` is given."""
    names, nc = cfg.get("names"), cfg.get("nc")
    if nc is not None and (type(nc) is not int or nc < 0):
        raise input_error(path, f"'nc' is not a non-negative integer (got {nc!r:.40})")
    if names is None:
        return None if nc is None else [f"class{i}" for i in range(nc)]
    if isinstance(names, dict):
        names = names_from_dict(path, names)
    if not isinstance(names, list) or not all(is_scalar(n) for n in names):
        raise input_error(path, "'names' is not a list of names or a mapping {index: name}")
    if nc is not None and nc != len(names):
        raise input_error(path, f"'nc: {nc}' disagrees with the {len(names)} entries of 'names'")
    return [str(n) for n in names]


def pose_layout(path: Path, cfg: dict) -> tuple[KeypointSpec | None, int]:
    """``(KeypointSpec, dim)`` from ``kpt_shape``, ``flip_idx`` and ``kpt_names`` (``(None, 3)``
    without ``kpt_shape``); ``InputError`` naming the yaml for a malformed one."""
    shape = cfg.get("kpt_shape")
    if shape is None:
        for key in ("flip_idx", "kpt_names"):
            if cfg.get(key) is not None:
                raise input_error(path, f"'{key}' without 'kpt_shape' (YOLO-pose needs kpt_shape: [J, 2 or 3])")
        return None, 3
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)
            and 1 <= shape[0] <= MAX_KEYPOINTS and shape[1] in (2, 3)):
        raise input_error(path, f"'kpt_shape' must be [J, 2 or 3] with J in 1..{MAX_KEYPOINTS} (got {shape!r:.40})")
    j = shape[0]
    names = keypoint_names(path, cfg.get("kpt_names"), j)
    flip = cfg.get("flip_idx")
    if flip is not None and not (isinstance(flip, list) and all(type(v) is int for v in flip) and sorted(flip) == list(range(j))):
        raise input_error(path, f"'flip_idx' must be a permutation of 0..{j - 1} (one slot per keypoint of kpt_shape), "
                          f"got {flip!r:.80}")
    return KeypointSpec(tuple(names), (), None if flip is None else tuple(flip)), shape[1]


def keypoint_names(path: Path, value: Any, j: int) -> list[str]:
    """``kpt_names``: ``J`` distinct names, as a list or per class (``{index: [names]}`` or a list
    of lists, the same for every class); ``kp0..kp{J-1}`` when absent."""
    if value is None:
        return [f"kp{i}" for i in range(j)]
    per_class = list(value.values()) if isinstance(value, dict) else value
    if isinstance(per_class, list) and per_class and all(isinstance(n, str) for n in per_class):
        per_class = [per_class]
    if not (isinstance(per_class, list) and per_class and all(isinstance(n, list) for n in per_class)):
        raise input_error(path, "'kpt_names' must be a list of names, or one list of names per class")
    if any(names != per_class[0] for names in per_class):
        raise input_error(path, "'kpt_names' differ between classes; a bank holds one keypoint layout")
    names = per_class[0]
    if len(names) != j or not all(is_scalar(n) for n in names) or len({str(n) for n in names}) != j:
        raise input_error(path, f"'kpt_names' must be {j} distinct names (kpt_shape), got {names!r:.80}")
    return [str(n) for n in names]


def names_from_dict(path: Path, names: dict) -> list:
    """``{0: a, 1: b}`` (keys may be digit strings) -> ``[a, b]``; keys must be exactly ``0..n-1``."""
    by_index = {int(k) if isinstance(k, str) and k.isdecimal() else k: v for k, v in names.items()}
    if sorted(by_index, key=repr) != sorted(range(len(names)), key=repr) or len(by_index) != len(names):
        raise input_error(path, f"'names' keys are not the class indices 0..{len(names) - 1}")
    return [by_index[i] for i in range(len(names))]


def is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# files


def is_image_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in IMAGE_EXTENSIONS


def walk_images(dirs: Iterable[str]) -> Iterable[str]:
    for top in dirs:
        for parent, _, files in os.walk(top):
            yield from (os.path.join(parent, f) for f in files if is_image_name(f))


def walk_labels(image_dirs: Iterable[str]) -> set[str]:
    """Every ``.txt`` under the label directories that belong to ``image_dirs``."""
    found: set[str] = set()
    for label_dir in {label_dir_of(d) for d in image_dirs}:
        for parent, _, files in os.walk(label_dir):
            found.update(os.path.join(parent, f) for f in files if f.lower().endswith(".txt"))
    return found


def label_path(image_path: str) -> str:
    """Ultralytics ``img2label_paths``: the last ``/images/`` becomes ``/labels/``, suffix ``.txt``."""
    head, sep, tail = image_path.rpartition(_IMAGES)
    return os.path.splitext(head + _LABELS + tail if sep else image_path)[0] + ".txt"


def label_dir_of(image_dir: str) -> str:
    head, sep, tail = (image_dir + os.sep).rpartition(_IMAGES)
    return (head + _LABELS + tail if sep else image_dir + os.sep).rstrip(os.sep)


def read_label_file(image_id: int, image_path: str, layout: Layout, box_masks: bool, skips: SkipLog) -> list[Parsed]:
    path = label_path(image_path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        skips.add("image_without_label", image_path, image_id, detail=f"no {path} (image kept as a background)")
        return []
    except OSError as e:
        raise input_error(path, f"cannot read the label file ({e.strerror or e})") from None
    # undecodable bytes become U+FFFD, which fails number parsing: a bad line, not a bad file
    lines = data.decode("utf-8", errors="replace").split("\n")
    if len(lines) > LINES_PER_FILE:
        raise input_error(path, f"has more than {LINES_PER_FILE} lines; annotation ids would collide")
    num_classes = None if layout.names is None else len(layout.names)
    pose = None if layout.keypoints is None else (layout.keypoints.num_keypoints, layout.keypoint_dim)
    records, nonblank = [], 0
    for line_no, line in enumerate(lines):
        tokens = line.split()
        if not tokens:
            continue
        nonblank += 1
        if pose is None:
            result = parse_line(tokens, num_classes, box_masks)
        else:
            result = parse_pose_line(tokens, num_classes, box_masks, *pose)
        ann_id = image_id * LINES_PER_FILE + line_no
        if isinstance(result, str):
            skips.add(result, path, image_id, ann_id, detail=f"line {line_no + 1}: {line.strip()[:60]}")
        else:
            records.append(Parsed(ann_id, *result))
    if not nonblank:
        skips.add("empty_label_file", path, image_id, detail="no label line (image kept as a background)")
    return records


def label_numbers(tokens: list[str]) -> np.ndarray | str:
    """float64 values of a label line whose first is an integer class, else ``bad_label_line``."""
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        return "bad_label_line"
    if not np.isfinite(values).all() or not values[0].is_integer():
        return "bad_label_line"
    return values


def parse_line(tokens: list[str], num_classes: int | None, box_masks: bool) -> tuple[int, np.ndarray] | str:
    """``(class index, polygon float64 [n, 2])`` for ``cls x1 y1 ... xn yn``, else a skip reason."""
    values = label_numbers(tokens)
    if isinstance(values, str):
        return values
    coords = values[1:]
    if coords.size == 4:
        if not box_masks:
            return "box_only"
        polygon = box_rectangle(*coords)
        if polygon is None:
            return "bad_label_line"
    elif coords.size % 2 or coords.size < 6:
        return "bad_label_line"
    else:
        polygon = coords.reshape(-1, 2)
    cls = int(values[0])
    if cls < 0 or (num_classes is not None and cls >= num_classes):
        return "class_out_of_range"
    return cls, polygon


def parse_pose_line(
    tokens: list[str], num_classes: int | None, box_masks: bool, num_keypoints: int, dim: int
) -> tuple[int, np.ndarray, np.ndarray] | str:
    """``(class index, box polygon float64 [4, 2], keypoints float64 [J, 3])`` for a pose line
    ``cls cx cy w h x1 y1 [v1] ...``, else a skip reason (order: bad_label_line for numbers,
    box_only, bad_keypoints, bad_label_line for the box, class_out_of_range)."""
    values = label_numbers(tokens)
    if isinstance(values, str):
        return values
    if not box_masks:
        return "box_only"
    points = values[5:]
    if points.size != num_keypoints * dim:
        return "bad_keypoints"
    if dim == 2:
        xy = points.reshape(-1, 2)
        missing = (xy == 0).all(axis=1)  # "0 0": the missing point of YOLO tools
        points = np.column_stack([xy, np.where(missing, 0.0, 2.0)]).reshape(-1)
    keypoints = keypoint_rows(points, num_keypoints)
    if isinstance(keypoints, str):
        return keypoints
    polygon = box_rectangle(*values[1:5])
    if polygon is None:
        return "bad_label_line"
    cls = int(values[0])
    if cls < 0 or (num_classes is not None and cls >= num_classes):
        return "class_out_of_range"
    return cls, polygon, keypoints


def box_rectangle(cx: float, cy: float, w: float, h: float) -> np.ndarray | None:
    """Normalised centre box -> 4-point polygon; ``None`` for an empty box."""
    if not valid_box(cx, cy, w, h):
        return None
    return rectangle(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


# --------------------------------------------------------------------------------------------
# classes


def class_table(layout: Layout, parsed: list[list[Parsed]], notes: list[str]) -> list[ClassInfo]:
    """``ClassInfo(i, i, names[i])``. Without names, the YOLO indices are kept as the bank's ids:
    ``class{i}`` for ``0..max index seen``, unused ones empty. Renumbering only the indices seen
    would make a pasted label disagree with the user's own labels, and change with the splits read
    or the order of a merge."""
    if layout.names is not None:
        return [ClassInfo(id=i, source_id=i, name=n) for i, n in enumerate(layout.names)]
    seen = {r.source_class for records in parsed for r in records}
    count = max(seen) + 1 if seen else 0
    notes.append(f"classes: no names given; YOLO class indices kept as bank ids 0..{count - 1}, "
                 f"named class<index> ({count - len(seen)} of them unused)")
    return [ClassInfo(id=i, source_id=i, name=f"class{i}") for i in range(count)]
