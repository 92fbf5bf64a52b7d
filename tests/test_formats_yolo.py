"""read_yolo on the shipped sample, the shared YOLO-seg sets, and generated edge cases."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from instbank.errors import InputError
from instbank.formats import FILE_REASONS, REASONS, read_yolo
from instbank.formats.yolo import LINES_PER_FILE, label_path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "yolo"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

TRIANGLE = "0.1 0.1 0.9 0.1 0.5 0.8"


# --------------------------------------------------------------------------------------------
# helpers


def make(root: Path, images: list[str] = (), labels: dict[str, str] | None = None) -> Path:
    """Empty image files and label files with the given text, under ``root``."""
    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    for rel, text in (labels or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def one_image(root: Path, text: str, names: tuple | dict = ("a", "b", "c"), **kw):
    """A data set of one image with label ``text``, read through a data.yaml with ``names``."""
    make(root, ["images/x.jpg"], {"labels/x.txt": text})
    cfg = {"path": ".", "train": "images", "names": list(names) if isinstance(names, tuple) else names}
    return read_yolo(write_yaml(root, cfg), **kw)


def write_yaml(root: Path, cfg, name: str = "data.yaml") -> Path:
    path = root / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def instances(ds) -> list:
    return [inst for im in ds.images for inst in im.instances]


def count_lines(label_files) -> int:
    """Independent count: non-blank lines of the given label files."""
    return sum(1 for f in label_files for line in Path(f).read_text().splitlines() if line.strip())


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message


# --------------------------------------------------------------------------------------------
# shipped sample and shared data


def test_sample_yaml_counts_ids_and_names():
    ds = read_yolo(SAMPLE / "data.yaml")
    cfg = yaml.safe_load((SAMPLE / "data.yaml").read_text())
    image_files = sorted(str(p.resolve()) for p in (SAMPLE / "images").rglob("*.jpg"))
    assert ds.kind == "yolo" and [im.path for im in ds.images] == image_files
    assert [im.image_id for im in ds.images] == list(range(8))
    assert ds.num_instances == count_lines((SAMPLE / "labels").rglob("*.txt")) == 30
    assert [(c.id, c.source_id, c.name) for c in ds.classes] == [(i, i, n) for i, n in enumerate(cfg["names"])]
    assert not ds.skipped and ds.notes == []
    for im in ds.images:
        assert (im.width, im.height) == (0, 0)
        lines = Path(label_path(im.path)).read_text().splitlines()
        assert [i.ann_id for i in im.instances] == [im.image_id * LINES_PER_FILE + n for n in range(len(lines))]
        for inst, line in zip(im.instances, lines):
            values = [float(v) for v in line.split()]
            assert inst.normalized and inst.rle is None and inst.class_id == int(values[0])
            assert inst.polygons[0].dtype == np.float64
            np.testing.assert_array_equal(inst.polygons[0].ravel(), values[1:])


def test_sample_directory_with_data_yaml_reads_the_yaml():
    ds = read_yolo(SAMPLE)
    assert ds.num_instances == 30 and len(ds.classes) == 80
    assert ds.notes == [f"classes and splits: using {SAMPLE / 'data.yaml'}"]


@pytest.mark.parametrize("splits", [["val"], "val", ("val", "val")])
def test_sample_one_split(splits):
    ds = read_yolo(SAMPLE / "data.yaml", splits=splits)
    assert len(ds.images) == 4 and all(f"{os.sep}val{os.sep}" in im.path for im in ds.images)


@pytest.mark.parametrize("splits", [["validation"], [], "all"])
def test_unknown_split_name_is_value_error(splits):
    with pytest.raises(ValueError, match="splits"):
        read_yolo(SAMPLE / "data.yaml", splits=splits)


def shared(name: str) -> Path:
    if not (SHARED / name).is_dir():
        pytest.skip(f"shared data ../shared/data/{name} not present")
    return SHARED / name


def test_coco8_seg_directory_keeps_yolo_ids_as_bank_ids():
    root = shared("coco8-seg")
    ds = read_yolo(root)
    label_files = list((root / "labels").rglob("*.txt"))
    seen = sorted({int(line.split()[0]) for f in label_files for line in f.read_text().splitlines() if line.strip()})
    assert len(ds.images) == 8 and ds.num_instances == count_lines(label_files) == 30
    # Without a data.yaml the YOLO index is the bank id (class 16 stays 16), unused ids are empty
    # classes, and the reader says so: pasted labels keep matching the user's own labels.
    assert [(c.id, c.source_id, c.name) for c in ds.classes] == [(i, i, f"class{i}") for i in range(max(seen) + 1)]
    assert {r.class_id for im in ds.images for r in im.instances} == set(seen)
    assert len(seen) == 12 and "kept as bank ids 0..75, named class<index> (64 of them unused)" in ds.notes[0]
    assert not ds.skipped


def test_coco128_seg_background_images_and_orphan_labels():
    root = shared("coco128-seg")
    ds = read_yolo(root)
    images = {p.stem for p in (root / "images" / "train2017").glob("*.jpg")}
    labels = {p.stem for p in (root / "labels" / "train2017").glob("*.txt")}
    assert len(ds.images) == len(images) == 128
    matched = [root / "labels" / "train2017" / f"{stem}.txt" for stem in labels & images]
    assert ds.num_instances == count_lines(matched) == 929
    expected = {"image_without_label": len(images - labels), "label_without_image": len(labels - images)}
    assert ds.skipped == Counter(expected)
    assert len(images - labels) == 2 and len(labels - images) == 2
    empty = {Path(im.path).stem for im in ds.images if not im.instances}
    assert empty == images - labels == {"000000000250", "000000000508"}


# --------------------------------------------------------------------------------------------
# label files


def test_label_path_follows_the_ultralytics_rule():
    sep = os.sep
    assert label_path(f"{sep}d{sep}images{sep}train{sep}x.v2.JPG") == f"{sep}d{sep}labels{sep}train{sep}x.v2.txt"
    nested = f"{sep}d{sep}images{sep}a{sep}images{sep}x.png"
    assert label_path(nested) == f"{sep}d{sep}images{sep}a{sep}labels{sep}x.txt"  # the LAST images component
    assert label_path(f"{sep}d{sep}imgs{sep}x.jpg") == f"{sep}d{sep}imgs{sep}x.txt"  # none: beside the image


def test_image_extensions_are_case_insensitive_and_others_ignored(tmp_path):
    names = ["a.JPG", "b.Png", "c.webp", "d.tiff", "e.heic"]
    make(tmp_path, [f"images/{n}" for n in names] + ["images/notes.txt", "images/f.gif", "images/jpg"])
    make(tmp_path, labels={f"labels/{Path(n).stem}.txt": f"0 {TRIANGLE}" for n in names})
    ds = read_yolo(tmp_path)
    assert [Path(im.path).name for im in ds.images] == sorted(names)
    assert ds.num_instances == 5 and not ds.skipped


def test_ann_ids_are_image_id_times_a_million_plus_line_number(tmp_path):
    labels = {"labels/a.txt": f"0 {TRIANGLE}", "labels/b.txt": f"\n1 {TRIANGLE}\nbad\n2 {TRIANGLE}\n"}
    make(tmp_path, ["images/a.jpg", "images/b.jpg"], labels)
    ds = read_yolo(write_yaml(tmp_path, {"train": "images", "names": ["a", "b", "c"]}))
    assert [[i.ann_id for i in im.instances] for im in ds.images] == [[0], [1_000_001, 1_000_003]]
    assert [i.class_id for i in ds.images[1].instances] == [1, 2]


def test_box_only_line_is_skipped_and_counted(tmp_path):
    ds = one_image(tmp_path, f"0 0.5 0.5 0.2 0.4\n1 {TRIANGLE}\n")
    assert [i.class_id for i in instances(ds)] == [1] and ds.skipped == Counter({"box_only": 1})


def test_box_masks_turns_a_box_line_into_a_rectangle(tmp_path):
    (inst,) = instances(one_image(tmp_path, "2 0.5 0.5 0.2 0.4\n", box_masks=True))
    assert inst.class_id == 2 and inst.normalized
    np.testing.assert_allclose(inst.polygons[0], [[0.4, 0.3], [0.6, 0.3], [0.6, 0.7], [0.4, 0.7]])


BAD_LINES = {
    "not numbers": "0 a b c d e f",
    "comma separated": "0,0.1,0.1,0.9,0.1,0.5,0.8",
    "odd coordinate count": "0 0.1 0.1 0.9 0.1 0.5 0.8 0.3",
    "one point": "0 0.1 0.2",
    "class only": "0",
    "nan coordinate": "0 0.1 nan 0.9 0.1 0.5 0.8",
    "inf coordinate": "0 0.1 0.1 inf 0.1 0.5 0.8",
    "non-integer class": f"1.5 {TRIANGLE}",
    "nan class": f"nan {TRIANGLE}",
    "undecodable bytes": "0 0.1 0.1 0.9 0.1 0.5 \udcff",
}


@pytest.mark.parametrize("line", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_label_line_is_skipped_and_counted(tmp_path, line):
    text = f"{line}\n1 {TRIANGLE}\n"
    make(tmp_path, ["images/x.jpg"])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "x.txt").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    ds = read_yolo(write_yaml(tmp_path, {"train": "images", "names": ["a", "b"]}))
    assert [i.ann_id for i in instances(ds)] == [1] and ds.skipped == Counter({"bad_label_line": 1})


@pytest.mark.parametrize("box", ["0.5 0.5 0 0.4", "0.5 0.5 0.2 -0.1", "0.5 nan 0.2 0.2"])
def test_box_masks_with_an_empty_box_is_a_bad_line(tmp_path, box):
    ds = one_image(tmp_path, f"0 {box}\n", box_masks=True)
    assert ds.num_instances == 0 and ds.skipped == Counter({"bad_label_line": 1})


@pytest.mark.parametrize("cls", ["3", "-1", "1e9"])
def test_class_out_of_range_is_skipped_and_counted(tmp_path, cls):
    ds = one_image(tmp_path, f"{cls} {TRIANGLE}\n2 {TRIANGLE}\n")
    assert [i.class_id for i in instances(ds)] == [2] and ds.skipped == Counter({"class_out_of_range": 1})


def test_integral_float_class_is_accepted(tmp_path):
    (inst,) = instances(one_image(tmp_path, f"2.0 {TRIANGLE}\n"))
    assert inst.class_id == 2


def test_coordinates_outside_0_1_are_kept(tmp_path):
    (inst,) = instances(one_image(tmp_path, "0 -0.2 0.1 1.5 0.1 0.5 3.0\n"))
    np.testing.assert_array_equal(inst.polygons[0], [[-0.2, 0.1], [1.5, 0.1], [0.5, 3.0]])


@pytest.mark.parametrize("text", ["", "\n\n", "  \t\n"])
def test_empty_label_file_keeps_the_image_and_is_counted(tmp_path, text):
    ds = one_image(tmp_path, text)
    assert len(ds.images) == 1 and ds.num_instances == 0
    assert ds.skipped == Counter({"empty_label_file": 1})


def test_image_without_label_is_kept_and_counted(tmp_path):
    make(tmp_path, ["images/train/a.jpg", "images/train/b.jpg"], {"labels/train/a.txt": f"0 {TRIANGLE}"})
    ds = read_yolo(tmp_path)
    assert [len(im.instances) for im in ds.images] == [1, 0]
    assert ds.skipped == Counter({"image_without_label": 1})


def test_label_without_image_is_counted(tmp_path):
    labels = {"labels/train/a.txt": f"0 {TRIANGLE}", "labels/train/orphan.txt": f"0 {TRIANGLE}",
              "labels/val/orphan2.txt": f"0 {TRIANGLE}"}  # fmt: skip
    make(tmp_path, ["images/train/a.jpg", "images/val/b.jpg"], labels)
    ds = read_yolo(tmp_path)
    assert ds.num_instances == 1
    assert ds.skipped == Counter({"label_without_image": 2, "image_without_label": 1})
    assert read_yolo(tmp_path, splits=["train"]).skipped == Counter({"label_without_image": 1})


def test_label_file_that_is_a_directory_is_an_error(tmp_path):
    make(tmp_path, ["images/x.jpg"])
    (tmp_path / "labels" / "x.txt").mkdir(parents=True)
    with pytest.raises(InputError, match="cannot read the label file") as e:
        read_yolo(tmp_path)
    assert_one_line_naming(e, tmp_path / "labels" / "x.txt")


def test_file_level_reasons_are_flagged():
    assert FILE_REASONS <= set(REASONS)
    assert {"image_without_label", "label_without_image", "empty_label_file"} == FILE_REASONS


# --------------------------------------------------------------------------------------------
# directory layout


def test_directory_split_subdirs_and_splits_selection(tmp_path):
    splits = [("train", "a"), ("val", "b"), ("test", "c")]
    labels = {f"labels/{s}/{n}.txt": f"{i} {TRIANGLE}" for i, (s, n) in enumerate(splits)}
    make(tmp_path, [f"images/{s}/{n}.jpg" for s, n in splits], labels)
    assert len(read_yolo(tmp_path).images) == 3
    ds = read_yolo(tmp_path, splits=["val", "train"])
    assert [Path(im.path).name for im in ds.images] == ["a.jpg", "b.jpg"]  # sorted paths, not split order
    assert [c.name for c in ds.classes] == ["class0", "class1"]


def test_directory_missing_split_subdir_is_an_error(tmp_path):
    make(tmp_path, ["images/train/a.jpg"], {"labels/train/a.txt": ""})
    with pytest.raises(InputError, match="images/val") as e:
        read_yolo(tmp_path, splits=["val"])
    assert_one_line_naming(e, tmp_path)


@pytest.mark.parametrize("missing", ["images", "labels"])
def test_directory_without_images_or_labels_is_an_error(tmp_path, missing):
    (tmp_path / ({"images", "labels"} - {missing}).pop()).mkdir()
    with pytest.raises(InputError, match=f"no {missing}/") as e:
        read_yolo(tmp_path)
    assert_one_line_naming(e, tmp_path)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no such") as e:
        read_yolo(tmp_path / "nope.yaml")
    assert_one_line_naming(e, tmp_path / "nope.yaml")


def test_class_ids_without_names_are_the_yolo_indices(tmp_path):
    make(tmp_path, ["images/a.jpg"], {"labels/a.txt": f"7 {TRIANGLE}\n2 {TRIANGLE}\n7 {TRIANGLE}\n"})
    ds = read_yolo(tmp_path)
    assert [(c.id, c.source_id, c.name) for c in ds.classes] == [(i, i, f"class{i}") for i in range(8)]
    assert [i.class_id for i in instances(ds)] == [7, 2, 7]


# --------------------------------------------------------------------------------------------
# data.yaml


def test_yaml_relative_root_is_relative_to_the_yaml(tmp_path):
    make(tmp_path / "ds", ["images/train/a.jpg"], {"labels/train/a.txt": f"0 {TRIANGLE}"})
    (tmp_path / "cfg").mkdir()
    ds = read_yolo(write_yaml(tmp_path / "cfg", {"path": "../ds", "train": "images/train", "names": ["a"]}))
    assert ds.num_instances == 1 and ds.images[0].path == str(tmp_path / "ds" / "images" / "train" / "a.jpg")


def test_yaml_absolute_root_and_no_root(tmp_path):
    make(tmp_path, ["images/a.jpg"], {"labels/a.txt": f"0 {TRIANGLE}"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = write_yaml(elsewhere, {"path": str(tmp_path), "train": "images", "names": ["a"]})
    assert read_yolo(absolute).num_instances == 1
    assert read_yolo(write_yaml(tmp_path, {"train": "images", "names": ["a"]})).num_instances == 1


def test_yaml_missing_root_is_an_error(tmp_path):
    path = write_yaml(tmp_path, {"path": "../nowhere", "train": "images", "names": ["a"]})
    with pytest.raises(InputError, match="nowhere") as e:
        read_yolo(path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("entry", ["images/missing", ["images", "images/missing"], "list.txt"])
def test_yaml_missing_split_path_is_an_error(tmp_path, entry):
    make(tmp_path, ["images/a.jpg"])
    path = write_yaml(tmp_path, {"train": entry, "names": ["a"]})
    with pytest.raises(InputError, match="train path") as e:
        read_yolo(path)
    assert_one_line_naming(e, path)
    assert (entry if isinstance(entry, str) else entry[1]) in str(e.value)


@pytest.mark.parametrize("text", ["train: [images\nnames: {", "a: b: c", "\tkey: value"])
def test_unreadable_yaml_is_an_error(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(InputError, match="not valid YAML") as e:
        read_yolo(path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("text", ["- train\n- val\n", "just text", ""])
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(InputError, match="not a mapping") as e:
        read_yolo(path)
    assert_one_line_naming(e, path)


def test_binary_yaml_is_an_error(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_bytes(b"\xff\xfe\x80\x81")
    with pytest.raises(InputError, match="cannot read") as e:
        read_yolo(path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize(
    "cfg, problem",
    [({"names": ["a"]}, "names no split"), ({"train": 3, "names": ["a"]}, "not a path"),
     ({"train": [], "names": ["a"]}, "not a path"), ({"path": 3, "train": "images"}, "'path' is not a string"),
     ({"train": "images", "names": "a b"}, "'names'"), ({"train": "images", "names": [["a"]]}, "'names'"),
     ({"train": "images", "names": {0: "a", 2: "c"}}, "0..1"), ({"train": "images", "names": {"x": "a"}}, "0..0"),
     ({"train": "images", "names": ["a", "b"], "nc": 3}, "disagrees"), ({"train": "images", "nc": "3"}, "'nc'")],
)  # fmt: skip
def test_malformed_yaml_fields_are_errors(tmp_path, cfg, problem):
    make(tmp_path, ["images/a.jpg"])
    path = write_yaml(tmp_path, cfg)
    with pytest.raises(InputError, match=problem) as e:
        read_yolo(path)
    assert_one_line_naming(e, path)


def test_requested_split_absent_from_yaml_is_an_error(tmp_path):
    make(tmp_path, ["images/a.jpg"])
    with pytest.raises(InputError, match="no 'test' split"):
        read_yolo(write_yaml(tmp_path, {"train": "images", "names": ["a"]}), splits=["test"])


@pytest.mark.parametrize("names", [{0: "a", 1: "b"}, {"0": "a", "1": "b"}, ("a", "b")])
def test_yaml_names_as_list_or_mapping(tmp_path, names):
    ds = one_image(tmp_path, f"1 {TRIANGLE}\n", names=names)
    assert [c.name for c in ds.classes] == ["a", "b"] and instances(ds)[0].class_id == 1


def test_yaml_nc_without_names_and_neither(tmp_path):
    make(tmp_path, ["images/a.jpg"], {"labels/a.txt": f"1 {TRIANGLE}\n"})
    ds = read_yolo(write_yaml(tmp_path, {"train": "images", "nc": 3}))
    assert [c.name for c in ds.classes] == ["class0", "class1", "class2"]
    ds = read_yolo(write_yaml(tmp_path, {"train": "images"}))
    assert [(c.id, c.source_id) for c in ds.classes] == [(0, 0), (1, 1)] and "kept as bank ids 0..1" in ds.notes[0]


def test_yaml_txt_list_split_and_duplicates_read_once(tmp_path):
    make(tmp_path, ["images/train/a.jpg", "images/train/b.jpg", "images/val/c.jpg"],
         {"labels/train/a.txt": f"0 {TRIANGLE}", "labels/train/b.txt": f"0 {TRIANGLE}",
          "labels/val/c.txt": f"0 {TRIANGLE}"})  # fmt: skip
    (tmp_path / "train.txt").write_text("./images/train/a.jpg\nimages/train/b.jpg\n\nREADME.md\n")
    cfg = {"train": "train.txt", "val": ["images/val", "images/train"], "names": ["x"]}
    ds = read_yolo(write_yaml(tmp_path, cfg))
    assert [Path(im.path).name for im in ds.images] == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.num_instances == 3 and not ds.skipped
    assert any("train.txt" in note for note in ds.notes)
    assert len(read_yolo(write_yaml(tmp_path, cfg), splits=["train"]).images) == 2


def test_yaml_splits_default_to_all_present(tmp_path):
    make(tmp_path, ["images/train/a.jpg", "images/val/b.jpg"])
    ds = read_yolo(write_yaml(tmp_path, {"train": "images/train", "val": "images/val", "test": None, "names": ["x"]}))
    assert len(ds.images) == 2 and ds.skipped == Counter({"image_without_label": 2})
