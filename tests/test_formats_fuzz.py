"""Fuzz both readers with well-typed junk: a ``Dataset`` or a one-line ``InputError``, nothing else.

When a ``Dataset`` comes back, nothing is lost silently: every COCO annotation is either an
instance or counted in ``skipped``, and so is every non-blank YOLO label line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instbank.errors import InputError
from instbank.formats import FILE_REASONS, REASONS, read_coco, read_yolo
from instbank.types import Dataset

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# JSON values

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
junk = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
small_ids = st.integers(-1, 3)
coords = st.floats(-50, 500) | st.integers(-50, 500)  # NaN and other junk come from `corrupted`
polygons = st.lists(st.lists(coords, min_size=5, max_size=10), min_size=1, max_size=3)
rles = st.fixed_dictionaries(
    {"size": st.lists(st.integers(0, 12), min_size=2, max_size=2),
     "counts": st.lists(st.integers(0, 60), max_size=6) | st.text(max_size=6)},
)  # fmt: skip
images = st.fixed_dictionaries(
    {"id": small_ids, "file_name": st.text(min_size=1, max_size=5)},
    optional={"width": st.integers(0, 12), "height": st.integers(0, 12)},
)
categories = st.fixed_dictionaries({"id": small_ids, "name": st.text(max_size=5)})


def annotations(image_ids: list[int], category_ids: list[int]) -> st.SearchStrategy:
    """Annotations that mostly point at existing images and categories (-9 exists nowhere)."""
    return st.fixed_dictionaries(
        {"id": st.integers(0, 40), "image_id": st.sampled_from([*image_ids, -9]),
         "category_id": st.sampled_from([*category_ids, -9]), "segmentation": polygons | rles | st.just([])},
        optional={"iscrowd": st.sampled_from([0, 1]), "bbox": st.lists(coords, min_size=4, max_size=4)},
    )  # fmt: skip


@st.composite
def well_formed(draw) -> dict:
    doc = {
        "images": draw(st.lists(images, min_size=1, max_size=4, unique_by=lambda e: e["id"])),
        "categories": draw(st.lists(categories, min_size=1, max_size=4, unique_by=lambda e: e["id"])),
    }
    ids = [[e["id"] for e in doc[table]] for table in ("images", "categories")]
    doc["annotations"] = draw(st.lists(annotations(*ids), max_size=8, unique_by=lambda e: e["id"]))
    return doc


def slots(value) -> list[tuple]:
    """Every ``(container, key)`` inside a JSON value: the places junk can be put."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((value, key))
        found += slots(child)
    return found


@st.composite
def corrupted(draw, well_formed: st.SearchStrategy):
    """A well-formed value with 0 to 3 of its parts replaced by junk or deleted."""
    value = draw(well_formed)
    for _ in range(draw(st.integers(0, 3))):
        places = slots(value)
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(junk)
    return value


documents = corrupted(well_formed())


def assert_one_line(error: InputError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message


def check_coco(path: Path, images_dir: Path, **kw) -> None:
    try:
        ds = read_coco(path, images_dir=images_dir, **kw)
    except InputError as e:
        assert_one_line(e, path)
        return
    assert isinstance(ds, Dataset) and set(ds.skipped) <= set(REASONS)
    doc = json.loads(path.read_bytes())
    assert ds.num_instances + sum(ds.skipped.values()) == len(doc["annotations"])
    assert [c.id for c in ds.classes] == list(range(len(ds.classes)))
    assert [im.image_id for im in ds.images] == sorted(im.image_id for im in ds.images)


@FUZZ
@given(doc=documents, crowd=st.sampled_from(["skip", "include"]), box_masks=st.booleans())
def test_coco_fuzz_documents(doc, crowd, box_masks):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(doc))
        check_coco(path, Path(tmp), crowd=crowd, box_masks=box_masks)


@FUZZ
@given(doc=documents, cut=st.floats(0, 1), noise=st.binary(max_size=8))
def test_coco_fuzz_truncated_and_raw_bytes(doc, cut, noise):
    text = json.dumps(doc).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_bytes(text[: int(len(text) * cut)] + noise)
        check_coco(path, Path(tmp))


# --------------------------------------------------------------------------------------------
# YOLO label lines and data.yaml

number_tokens = st.one_of(
    st.floats(-0.5, 1.5).map(lambda v: f"{v:.4f}"),
    st.integers(-2, 6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "2.0", "0x1", "1,2"]),
)
junk_lines = st.lists(number_tokens | st.text(max_size=3), max_size=12).map(" ".join)
# a class then 2..14 coordinates: boxes, odd counts, < 3 points and polygons all come up
shaped_lines = st.builds(
    lambda cls, xy: " ".join([cls, *xy]),
    st.integers(-1, 4).map(str),
    st.lists(st.floats(-0.2, 1.2).map(lambda v: f"{v:.5f}"), min_size=2, max_size=14),
)
label_texts = st.lists(shaped_lines | junk_lines, max_size=6).map("\n".join)


def nonblank_lines(text: str) -> int:
    return sum(1 for line in text.split("\n") if line.split())


def check_yolo(path: Path, label_lines: int | None, **kw) -> None:
    try:
        ds = read_yolo(path, **kw)
    except InputError as e:
        assert_one_line(e, path)
        return
    assert isinstance(ds, Dataset) and set(ds.skipped) <= set(REASONS)
    if label_lines is not None:
        line_skips = sum(n for reason, n in ds.skipped.items() if reason not in FILE_REASONS)
        assert ds.num_instances + line_skips == label_lines
    ann_ids = [i.ann_id for im in ds.images for i in im.instances]
    assert len(set(ann_ids)) == len(ann_ids)
    assert {i.class_id for im in ds.images for i in im.instances} <= set(range(len(ds.classes)))


@FUZZ
@given(texts=st.lists(label_texts, min_size=1, max_size=3), named=st.booleans(), box_masks=st.booleans())
def test_yolo_fuzz_label_lines(texts, named, box_masks):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "labels").mkdir()
        for k, text in enumerate(texts):
            (root / "images" / f"{k}.jpg").write_bytes(b"")
            (root / "labels" / f"{k}.txt").write_text(text, encoding="utf-8", errors="surrogateescape")
        if named:
            (root / "data.yaml").write_text(yaml.safe_dump({"train": "images", "names": ["a", "b", "c"]}))
        check_yolo(root, sum(nonblank_lines(t) for t in texts), box_masks=box_masks)


yaml_configs = corrupted(
    st.fixed_dictionaries(
        {"train": st.sampled_from(["images", "images/train", "list.txt", "missing"])
                  | st.lists(st.sampled_from(["images", "list.txt", "missing"]), min_size=1, max_size=2),
         "names": st.lists(st.text(max_size=3), max_size=4)
                  | st.dictionaries(st.integers(-1, 4), st.text(max_size=3), max_size=4)},
        optional={"path": st.sampled_from([".", "..", "nope", "images"]), "val": st.sampled_from(["images", "labels"]),
                  "nc": st.integers(-1, 5)},
    )
)  # fmt: skip


@FUZZ
@given(cfg=yaml_configs | junk, raw=st.none() | st.text(max_size=30))
def test_yolo_fuzz_data_yaml(cfg, raw):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "train").mkdir(parents=True)
        (root / "labels" / "train").mkdir(parents=True)
        (root / "images" / "train" / "a.jpg").write_bytes(b"")
        (root / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.5 0.8\n")
        (root / "list.txt").write_text("./images/train/a.jpg\n")
        path = root / "data.yaml"
        path.write_text(raw if raw is not None else yaml.safe_dump(cfg), errors="surrogateescape")
        check_yolo(path, None)


def test_coco_deeply_nested_json_is_an_input_error(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("[" * 100_000 + "]" * 100_000)  # beyond the json module's recursion limit
    with pytest.raises(InputError):
        read_coco(path, images_dir=tmp_path)
