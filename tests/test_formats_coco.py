"""read_coco on the shipped sample, the shared COCO subset, and generated edge cases."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from instbank.errors import InputError
from instbank.formats import REASONS, read_coco

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "coco" / "annotations.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = SHARED / "coco_tiny_2017"

# --------------------------------------------------------------------------------------------
# helpers

IMAGE = {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


def ann(ann_id: int = 1, image_id: int = 1, category_id: int = 1, **fields) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "segmentation": [SQUARE], "bbox": [10, 10, 20, 20], **fields}  # fmt: skip


def write(tmp_path: Path, doc, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def read_one(tmp_path: Path, annotations: list, images: list | None = None, **kw):
    doc = {"images": images or [IMAGE], "annotations": annotations, "categories": CATEGORIES}
    return read_coco(write(tmp_path, doc), images_dir=tmp_path, **kw)


def instances(dataset) -> list:
    return [inst for im in dataset.images for inst in im.instances]


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


def rle_square(height: int, width: int) -> dict:
    """A compressed RLE (``counts`` a str) of a 10x10 square, as pycocotools writes it."""
    m = np.zeros((height, width), np.uint8)
    m[5:15, 5:15] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def runs_square(height: int, width: int) -> dict:
    """The same square as uncompressed RLE (list ``counts``, column-major runs)."""
    m = np.zeros((height, width), np.uint8)
    m[5:15, 5:15] = 1
    flat = m.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": [height, width], "counts": runs if flat[0] == 0 else [0, *runs]}


def decode(rle: dict) -> np.ndarray:
    """uint8 ``[h, w]`` mask of either RLE form, decoded by pycocotools."""
    h, w = rle["size"]
    if isinstance(rle["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(rle, h, w))
    return mask_utils.decode({"size": [h, w], "counts": rle["counts"].encode("ascii")})


# --------------------------------------------------------------------------------------------
# shipped sample and shared data


def test_sample_counts_order_and_classes():
    raw = json.loads(SAMPLE.read_text())
    ds = read_coco(SAMPLE)
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert ds.kind == "coco" and ds.source == str(SAMPLE)
    assert ds.num_instances == len(raw["annotations"]) - crowd
    assert ds.skipped == Counter({"crowd": crowd})
    assert [im.image_id for im in ds.images] == sorted(im["id"] for im in raw["images"])
    for im in ds.images:
        ids = [inst.ann_id for inst in im.instances]
        assert ids == sorted(ids)
    assert [c.source_id for c in ds.classes] == sorted(c["id"] for c in raw["categories"])
    assert [c.id for c in ds.classes] == list(range(len(raw["categories"])))
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert all(c.name == names[c.source_id] for c in ds.classes)
    assert ds.notes == [f"images: using {SAMPLE.parent / 'images'}"]
    assert all(Path(im.path).is_file() for im in ds.images)


def test_sample_polygons_match_the_json():
    raw = json.loads(SAMPLE.read_text())
    by_id = {a["id"]: a for a in raw["annotations"]}
    class_of = {c.source_id: c.id for c in read_coco(SAMPLE).classes}
    for inst in instances(read_coco(SAMPLE)):
        source = by_id[inst.ann_id]
        assert inst.class_id == class_of[source["category_id"]]
        assert len(inst.polygons) == len(source["segmentation"])
        for arr, part in zip(inst.polygons, source["segmentation"]):
            assert arr.dtype == np.float64 and arr.shape == (len(part) // 2, 2)
            np.testing.assert_array_equal(arr.ravel(), part)


def test_sample_crowd_include_keeps_uncompressed_rle():
    ds = read_coco(SAMPLE, crowd="include")
    crowd = [inst for inst in instances(ds) if inst.is_crowd]
    assert len(crowd) == 1 and not ds.skipped
    (inst,) = crowd
    image = next(im for im in ds.images if any(i is inst for i in im.instances))
    assert inst.polygons == () and inst.rle["size"] == [image.height, image.width]
    assert sum(inst.rle["counts"]) == image.height * image.width


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_tiny_matches_pycocotools(split):
    if not TINY.is_dir():
        pytest.skip("shared data ../shared/data/coco_tiny_2017 not present")
    from pycocotools.coco import COCO

    ann_path = TINY / "annotations" / f"instances_{split}.json"
    coco = COCO(str(ann_path))
    ds = read_coco(ann_path, crowd="include")
    assert ds.notes == [f"images: using {TINY / split}"]
    assert [im.image_id for im in ds.images] == sorted(coco.getImgIds())
    cat_ids = sorted(coco.getCatIds())
    for im in ds.images:
        expected = sorted(coco.getAnnIds(imgIds=[im.image_id]))
        assert [inst.ann_id for inst in im.instances] == expected
        for inst in im.instances:
            source = coco.anns[inst.ann_id]
            assert inst.class_id == cat_ids.index(source["category_id"])
            assert inst.is_crowd == bool(source["iscrowd"])
            parts = source["segmentation"] if isinstance(source["segmentation"], list) else []
            assert len(inst.polygons) == len(parts)
    crowd = sum(a["iscrowd"] for a in coco.anns.values())
    multi = sum(isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1 for a in coco.anns.values())
    assert ds.num_instances == len(coco.anns) == {"train2017": 705, "val2017": 815}[split]
    assert crowd == {"train2017": 6, "val2017": 11}[split]
    assert sum(len(i.polygons) > 1 for i in instances(ds)) == multi == {"train2017": 55, "val2017": 65}[split]
    default = read_coco(ann_path)
    assert default.num_instances == len(coco.anns) - crowd and default.skipped == Counter({"crowd": crowd})


# --------------------------------------------------------------------------------------------
# formats of the segmentation


def test_coco_multi_part_polygon_gives_one_array_per_part(tmp_path):
    other = [50, 50, 60, 50, 60, 60]
    (inst,) = instances(read_one(tmp_path, [ann(segmentation=[SQUARE, other])]))
    assert [p.shape for p in inst.polygons] == [(4, 2), (3, 2)]
    np.testing.assert_array_equal(inst.polygons[1], [[50, 50], [60, 50], [60, 60]])


@pytest.mark.parametrize("iscrowd", [0, 1])
@pytest.mark.parametrize("encode", [rle_square, runs_square], ids=["compressed", "uncompressed"])
def test_coco_rle_is_kept_as_given(tmp_path, iscrowd, encode):
    rle = encode(80, 100)
    (inst,) = instances(read_one(tmp_path, [ann(iscrowd=iscrowd, segmentation=rle)], crowd="include"))
    assert inst.rle == rle and inst.polygons == () and inst.is_crowd == bool(iscrowd)
    decoded = decode(inst.rle)
    assert decoded.sum() == 100 and decoded[5:15, 5:15].all()


def test_coco_crowd_skipped_by_default_and_counted(tmp_path):
    ds = read_one(tmp_path, [ann(1), ann(2, iscrowd=1, segmentation=runs_square(80, 100))])
    assert [i.ann_id for i in instances(ds)] == [1] and ds.skipped == Counter({"crowd": 1})


def test_coco_crowd_include_keeps_crowd_polygons(tmp_path):
    (inst,) = instances(read_one(tmp_path, [ann(iscrowd=1)], crowd="include"))
    assert inst.is_crowd and len(inst.polygons) == 1


def test_coco_bad_crowd_value_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="crowd"):
        read_one(tmp_path, [ann()], crowd="keep")


def test_coco_image_id_0_and_category_id_0_are_valid(tmp_path):
    doc = {
        "images": [{**IMAGE, "id": 0}],
        "annotations": [ann(5, image_id=0, category_id=0)],
        "categories": [{"id": 0, "name": "roboflow-super"}, *CATEGORIES],
    }
    ds = read_coco(write(tmp_path, doc), images_dir=tmp_path)
    assert ds.images[0].image_id == 0
    assert [(c.id, c.source_id) for c in ds.classes] == [(0, 0), (1, 1), (2, 3)]
    assert instances(ds)[0].class_id == 0


def test_coco_unused_categories_stay_in_the_table(tmp_path):
    ds = read_one(tmp_path, [ann(category_id=3)])
    assert [c.name for c in ds.classes] == ["cat", "dog"] and instances(ds)[0].class_id == 1


def test_coco_order_is_by_image_id_then_annotation_id(tmp_path):
    images = [{**IMAGE, "id": i, "file_name": f"{i}.jpg"} for i in (30, 4, 17)]
    anns = [ann(a, image_id=i) for a, i in [(9, 17), (2, 4), (7, 17), (1, 30), (8, 4)]]
    ds = read_one(tmp_path, anns, images=images)
    assert [im.image_id for im in ds.images] == [4, 17, 30]
    assert [[i.ann_id for i in im.instances] for im in ds.images] == [[2, 8], [7, 9], [1]]
    assert ds.images[0].path == str(tmp_path / "4.jpg")


def test_coco_box_masks_makes_a_rectangle(tmp_path):
    ds = read_one(tmp_path, [ann(segmentation=[], bbox=[10, 20, 30, 5])], box_masks=True)
    (inst,) = instances(ds)
    np.testing.assert_array_equal(inst.polygons[0], [[10, 20], [40, 20], [40, 25], [10, 25]])


# --------------------------------------------------------------------------------------------
# bad input: the file


def test_coco_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no such annotation file") as e:
        read_coco(tmp_path / "nope.json", images_dir=tmp_path)
    assert_one_line_naming(e, tmp_path / "nope.json")


def test_coco_not_json_is_an_error(tmp_path):
    path = write(tmp_path, "images:\n  - id: 1\n")
    with pytest.raises(InputError, match="not valid JSON") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


def test_coco_binary_file_is_an_error(tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(InputError) as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


def test_coco_integer_beyond_python_digit_limit_is_an_error(tmp_path):
    path = write(tmp_path, '{"images": [{"id": ' + "9" * 5000 + "}]}")  # json.loads refuses > 4300 digits
    with pytest.raises(InputError) as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


def test_coco_truncated_file_is_an_error(tmp_path):
    full = json.dumps({"images": [IMAGE], "annotations": [ann()], "categories": CATEGORIES})
    path = write(tmp_path, full[: len(full) // 2])
    with pytest.raises(InputError, match="truncated") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("doc", [[], "text", 3, None])
def test_coco_top_level_not_a_dict_is_an_error(tmp_path, doc):
    path = write(tmp_path, json.dumps(doc))
    with pytest.raises(InputError, match="not a COCO json") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("section", ["images", "annotations", "categories"])
@pytest.mark.parametrize("value", ["missing", None, {}, "x"])
def test_coco_missing_section_is_an_error(tmp_path, section, value):
    doc = {"images": [IMAGE], "annotations": [], "categories": CATEGORIES}
    if value == "missing":
        del doc[section]
    else:
        doc[section] = value
    path = write(tmp_path, doc)
    with pytest.raises(InputError, match=f"has no '{section}' list") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


def test_coco_duplicate_image_ids_is_an_error(tmp_path):
    path = write(tmp_path, {"images": [IMAGE, {**IMAGE, "file_name": "b.jpg"}], "annotations": [],
                            "categories": CATEGORIES})  # fmt: skip
    with pytest.raises(InputError, match="duplicate image id 1") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize(
    "second", [ann(7), ann(7, image_id=99), ann(7, segmentation=[])], ids=["kept", "unknown-image", "empty"]
)
def test_coco_duplicate_annotation_ids_is_an_error(tmp_path, second):
    path = write(tmp_path, {"images": [IMAGE], "annotations": [ann(7), second], "categories": CATEGORIES})
    with pytest.raises(InputError, match="duplicate annotation id 7") as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


def test_coco_duplicate_category_ids_is_an_error(tmp_path):
    path = write(tmp_path, {"images": [IMAGE], "annotations": [], "categories": CATEGORIES + [CATEGORIES[0]]})
    with pytest.raises(InputError, match="duplicate category id 1"):
        read_coco(path, images_dir=tmp_path)


@pytest.mark.parametrize(
    "image, problem",
    [("x", "not an object"), ({**IMAGE, "id": "1"}, "integer 'id'"), ({**IMAGE, "id": 2**63}, "integer 'id'"),
     ({**IMAGE, "file_name": 3}, "file_name"), ({**IMAGE, "width": -1}, "width/height"),
     ({**IMAGE, "height": 1.5}, "width/height")],
)  # fmt: skip
def test_coco_malformed_image_entry_is_an_error(tmp_path, image, problem):
    path = write(tmp_path, {"images": [image], "annotations": [], "categories": CATEGORIES})
    with pytest.raises(InputError, match=problem) as e:
        read_coco(path, images_dir=tmp_path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("category, problem", [(1, "not an object"), ({"id": 1.0, "name": "a"}, "integer 'id'"),
                                               ({"id": 2}, "'name' string")])  # fmt: skip
def test_coco_malformed_category_entry_is_an_error(tmp_path, category, problem):
    path = write(tmp_path, {"images": [IMAGE], "annotations": [], "categories": [category]})
    with pytest.raises(InputError, match=problem):
        read_coco(path, images_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# bad input: one annotation (skipped and counted)


def test_coco_unknown_image_is_skipped(tmp_path):
    ds = read_one(tmp_path, [ann(1), ann(2, image_id=99)])
    assert [i.ann_id for i in instances(ds)] == [1] and ds.skipped == Counter({"unknown_image": 1})


def test_coco_unknown_category_is_skipped(tmp_path):
    ds = read_one(tmp_path, [ann(1), ann(2, category_id=2)])
    assert [i.ann_id for i in instances(ds)] == [1] and ds.skipped == Counter({"unknown_category": 1})


@pytest.mark.parametrize("bad_part", [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7], []], ids=["2-points", "odd", "empty"])
def test_coco_bad_polygon_part_is_dropped(tmp_path, bad_part):
    (inst,) = instances(read_one(tmp_path, [ann(segmentation=[bad_part, SQUARE, bad_part])]))
    assert len(inst.polygons) == 1
    np.testing.assert_array_equal(inst.polygons[0].ravel(), SQUARE)


@pytest.mark.parametrize("parts", [[[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6, 7]], [[1, 2, 3, 4], []]])
def test_coco_no_valid_polygon_part_left_is_skipped(tmp_path, parts):
    ds = read_one(tmp_path, [ann(segmentation=parts)])
    assert ds.num_instances == 0 and ds.skipped == Counter({"bad_polygon": 1})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_coco_nan_inf_coordinates_are_skipped(tmp_path, value):
    parts = [SQUARE, [1, 1, 5, 1, value, 5]]  # one bad coordinate spoils the instance, not only its part
    ds = read_one(tmp_path, [ann(segmentation=parts)])
    assert ds.num_instances == 0 and ds.skipped == Counter({"bad_polygon": 1})


def test_coco_coordinates_outside_the_image_are_kept(tmp_path):
    outside = [-20.0, -5.0, 500.0, -5.0, 500.0, 900.0]
    (inst,) = instances(read_one(tmp_path, [ann(segmentation=[outside])]))
    np.testing.assert_array_equal(inst.polygons[0].ravel(), outside)


@pytest.mark.parametrize("size", [[100, 80], [80, 101]])
def test_coco_rle_size_mismatch_is_skipped(tmp_path, size):
    rle = {**rle_square(*size), "size": size}
    ds = read_one(tmp_path, [ann(segmentation=rle)])
    assert ds.num_instances == 0 and ds.skipped == Counter({"rle_size_mismatch": 1})


def test_coco_rle_runs_not_covering_the_image_are_skipped(tmp_path):
    rle = runs_square(80, 100)
    rle["counts"] = rle["counts"][:-1]
    ds = read_one(tmp_path, [ann(segmentation=rle)])
    assert ds.num_instances == 0 and ds.skipped == Counter({"bad_rle": 1})


def test_coco_rle_on_image_without_size_is_not_checked(tmp_path):
    image = {"id": 1, "file_name": "a.jpg"}
    ds = read_one(tmp_path, [ann(segmentation=rle_square(40, 50))], images=[image])
    assert ds.num_instances == 1 and (ds.images[0].width, ds.images[0].height) == (0, 0)


@pytest.mark.parametrize("segmentation", [[], None, "missing"])
def test_coco_empty_segmentation_is_skipped(tmp_path, segmentation):
    a = ann(segmentation=segmentation)
    if segmentation == "missing":
        del a["segmentation"]
    ds = read_one(tmp_path, [a])
    assert ds.num_instances == 0 and ds.skipped == Counter({"no_segmentation": 1})


@pytest.mark.parametrize("bbox", [[1, 2, 0, 5], [1, 2, 5, -3], [math.nan, 2, 5, 5], [1, 2, math.inf, 5], None])
def test_coco_box_masks_with_bad_bbox_is_skipped(tmp_path, bbox):
    a = ann(segmentation=[], bbox=bbox)
    if bbox is None:
        del a["bbox"]
    ds = read_one(tmp_path, [a], box_masks=True)
    assert ds.num_instances == 0 and ds.skipped == Counter({"bad_bbox": 1})


MALFORMED = {
    "annotation is a list": [1, 2],
    "id is a string": ann(ann_id="1"),
    "id too large for int64": ann(ann_id=2**64),
    "image_id is a float": ann(image_id=1.0),
    "category_id is null": ann(category_id=None),
    "iscrowd is 2": ann(iscrowd=2),
    "segmentation is a number": ann(segmentation=3),
    "segmentation is a string": ann(segmentation="poly"),
    "polygon part is a number": ann(segmentation=[5]),
    "polygon coordinates are strings": ann(segmentation=[["1", "2", "3", "4", "5", "6"]]),
    "polygon coordinates are booleans": ann(segmentation=[[True, False, True, True, False, False]]),
    "polygon part is nested": ann(segmentation=[[[1, 2], [3, 4], [5, 6]]]),
    "polygon part is ragged": ann(segmentation=[[[1, 2], 3, 4]]),
    "rle without counts": ann(segmentation={"size": [80, 100]}),
    "rle size is a string": ann(segmentation={"size": "80x100", "counts": "abc"}),
    "rle counts is a dict": ann(segmentation={"size": [80, 100], "counts": {}}),
    "rle counts has floats": ann(segmentation={"size": [80, 100], "counts": [8000.0]}),
}


@pytest.mark.parametrize("bad", list(MALFORMED.values()), ids=list(MALFORMED))
def test_coco_malformed_field_types_are_skipped(tmp_path, bad):
    ds = read_one(tmp_path, [bad, ann(ann_id=1000)], crowd="include")
    assert [i.ann_id for i in instances(ds)] == [1000]
    assert ds.skipped == Counter({"malformed_annotation": 1})


@pytest.mark.parametrize(
    "bbox, reason",
    [("10,10,5,5", "malformed_annotation"), ([1, 2, 3], "malformed_annotation"),
     ([1, 2, "3", 4], "malformed_annotation"), ([1, 2, 3, 2**2000], "bad_bbox")],  # the last: beyond float range
)  # fmt: skip
def test_coco_box_masks_with_malformed_bbox_is_skipped(tmp_path, bbox, reason):
    ds = read_one(tmp_path, [ann(segmentation=[], bbox=bbox)], box_masks=True)
    assert ds.num_instances == 0 and ds.skipped == Counter({reason: 1})


def test_coco_every_skip_reason_is_documented(tmp_path):
    anns = [ann(1, iscrowd=1), ann(2, image_id=9), ann(3, category_id=9), ann(4, segmentation=[]),
            ann(5, segmentation=[[1, 2]]), ann(6, segmentation={"size": [1, 1], "counts": [1]}),
            ann(7, segmentation=runs_square(80, 100) | {"counts": [1]}), ann(8, segmentation=7)]  # fmt: skip
    ds = read_one(tmp_path, anns)
    assert set(ds.skipped) <= set(REASONS) and sum(ds.skipped.values()) == len(anns)


# --------------------------------------------------------------------------------------------
# images directory


def layout(tmp_path: Path, json_rel: str, images_rel: str | None) -> Path:
    """A json at ``json_rel`` whose one image ``a.jpg`` lies in ``images_rel`` (None: nowhere)."""
    path = tmp_path / json_rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path.parent, {"images": [IMAGE], "annotations": [ann()], "categories": CATEGORIES}, path.name)
    if images_rel is not None:
        (tmp_path / images_rel).mkdir(parents=True, exist_ok=True)
        (tmp_path / images_rel / "a.jpg").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "json_rel, images_rel",
    [("annotations/instances_val2017.json", "val2017"), ("annotations/instances_val2017.json", "images/val2017"),
     ("annotations/instances_train2017.json", "images"), ("annotations/instances_train2017.json", "."),
     ("coco/annotations.json", "coco/images"), ("train/_annotations.coco.json", "train")],
)  # fmt: skip
def test_coco_images_dir_is_guessed(tmp_path, json_rel, images_rel):
    ds = read_coco(layout(tmp_path, json_rel, images_rel))
    expected = (tmp_path / images_rel) if images_rel != "." else tmp_path
    assert ds.notes == [f"images: using {expected}"]
    assert ds.images[0].path == str(expected / "a.jpg")


def test_coco_images_dir_guess_prefers_the_split_directory(tmp_path):
    path = layout(tmp_path, "annotations/instances_val2017.json", "val2017")
    layout(tmp_path, "annotations/instances_val2017.json", "images")
    assert read_coco(path).images[0].path == str(tmp_path / "val2017" / "a.jpg")


def test_coco_images_dir_not_found_is_an_error(tmp_path):
    path = layout(tmp_path, "annotations/instances_val2017.json", None)
    (tmp_path / "val2017").mkdir()  # exists, but does not hold the images
    with pytest.raises(InputError, match="cannot find the images") as e:
        read_coco(path)
    assert_one_line_naming(e, path)
    assert str(tmp_path / "val2017") in str(e.value) and str(tmp_path / "images") in str(e.value)


def test_coco_given_images_dir_is_used_without_checking_files(tmp_path):
    path = layout(tmp_path, "ann.json", None)
    (tmp_path / "elsewhere").mkdir()
    ds = read_coco(path, images_dir=tmp_path / "elsewhere")
    assert ds.images[0].path == str(tmp_path / "elsewhere" / "a.jpg") and ds.notes == []


def test_coco_given_images_dir_missing_is_an_error(tmp_path):
    path = layout(tmp_path, "ann.json", None)
    with pytest.raises(InputError, match="images directory does not exist") as e:
        read_coco(path, images_dir=tmp_path / "nope")
    assert_one_line_naming(e, path)


# --------------------------------------------------------------------------------------------
# properties


@settings(max_examples=40, deadline=None)
@given(
    image_ids=st.lists(st.integers(-5, 10**12), min_size=1, max_size=6, unique=True),
    ann_ids=st.lists(st.integers(0, 2**62), max_size=15, unique=True),
    data=st.data(),
)
def test_coco_order_and_conservation_property(tmp_path_factory, image_ids, ann_ids, data):
    """Whatever the order in the json: images by id, instances by id, none lost or invented."""
    tmp = tmp_path_factory.mktemp("prop")
    images = [{**IMAGE, "id": i, "file_name": f"{i}.jpg"} for i in image_ids]
    owners = [data.draw(st.sampled_from(image_ids)) for _ in ann_ids]
    anns = [ann(a, image_id=i) for a, i in zip(ann_ids, owners)]
    ds = read_one(tmp, data.draw(st.permutations(anns)), images=data.draw(st.permutations(images)))
    assert [im.image_id for im in ds.images] == sorted(image_ids)
    for im in ds.images:
        assert [i.ann_id for i in im.instances] == sorted(a for a, o in zip(ann_ids, owners) if o == im.image_id)
    assert ds.num_instances == len(ann_ids) and not ds.skipped
