"""read_sa1b on the shipped SA-1B sample (COCO images and masks written as SA-1B json) and on
generated edge cases; masks through the build path against pycocotools; fuzzing."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from test_formats_fuzz import FUZZ, corrupted, junk

from instbank.build import BuildConfig, build_bank
from instbank.crops import rle_string_to_counts
from instbank.errors import InputError
from instbank.formats import REASONS, read_sa1b
from instbank.formats.sa1b import MAX_NUMBER_CHARS, check_strings
from instbank.storage import open_bank
from instbank.types import CropMeta, Dataset

SAMPLE_SA1B = SAMPLE / "sa1b"

# --------------------------------------------------------------------------------------------
# helpers


def sample_docs() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SAMPLE_SA1B.glob("sa_*.json"))}


def square_rle(height: int = 40, width: int = 60, box=(5, 15, 5, 25)) -> dict:
    """Compressed RLE of a rectangle ``[y0:y1, x0:x1]`` as pycocotools writes it."""
    m = np.zeros((height, width), np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 1
    return {"size": [height, width], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode()}


def annotation(ann_id: int, **fields) -> dict:
    return {"id": ann_id, "segmentation": square_rle(), "bbox": [5, 5, 20, 10], "area": 200,
            "predicted_iou": 0.9, "stability_score": 0.96, "crop_box": [0, 0, 60, 40], "point_coords": [[10, 10]],
            **fields}  # fmt: skip


def write_image_json(root: Path, n: int, annotations: list, width: int = 60, height: int = 40, **image) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    doc = {"image": {"image_id": n, "width": width, "height": height, "file_name": f"sa_{n}.jpg", **image},
           "annotations": annotations}  # fmt: skip
    path = root / f"sa_{n}.json"
    path.write_text(json.dumps(doc))
    return path


def read_one(tmp_path: Path, annotations: list, **kw) -> Dataset:
    write_image_json(tmp_path, 1, annotations)
    return read_sa1b(tmp_path, **kw)


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------
# the shipped sample


def test_sample_counts_ids_and_order_match_the_json_and_pycocotools():
    docs = sample_docs()
    ds = read_sa1b(SAMPLE_SA1B)
    assert ds.kind == "sa1b" and not ds.skipped
    assert [Path(im.path).name for im in ds.images] == [d["image"]["file_name"] for d in docs.values()]
    assert [c.name for c in ds.classes] == ["object"]
    for im, doc in zip(ds.images, docs.values()):
        info = doc["image"]
        assert (im.image_id, im.width, im.height) == (info["image_id"], info["width"], info["height"])
        assert Path(im.path).is_file()
        assert [i.ann_id for i in im.instances] == [a["id"] for a in doc["annotations"]]
        assert all(i.class_id == 0 and i.rle["counts"] == a["segmentation"]["counts"]
                   for i, a in zip(im.instances, doc["annotations"]))  # fmt: skip
    # independent count: every mask that pycocotools decodes to a non-empty mask of the image's size
    expected = sum(
        1 for doc in docs.values() for a in doc["annotations"]
        if a["segmentation"]["size"] == [doc["image"]["height"], doc["image"]["width"]]
        and mask_utils.area(a["segmentation"]) > 0
    )  # fmt: skip
    assert ds.num_instances == expected == 36


def test_sample_masks_are_the_coco_sample_masks():
    """The sample was written from the COCO sample: each mask decodes to the COCO annotation's."""
    coco = json.loads((SAMPLE / "coco" / "annotations.json").read_text())
    by_id = {a["id"]: a for a in coco["annotations"]}
    for doc in sample_docs().values():
        h, w = doc["image"]["height"], doc["image"]["width"]
        for a in doc["annotations"]:
            seg = by_id[a["id"]]["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else (
                mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)  # fmt: skip
            assert np.array_equal(mask_utils.decode(a["segmentation"]), mask_utils.decode(rle))
            assert a["area"] == int(mask_utils.area(a["segmentation"]))


@pytest.fixture(scope="module")
def sa1b_bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("banks") / "sample-sa1b"
    build_bank(read_sa1b(SAMPLE_SA1B), out, BuildConfig(size=64), workers=1)
    return open_bank(out)


def test_build_geometry_equals_pycocotools_decode(sa1b_bank):
    docs = {a["id"]: (a, d["image"]) for d in sample_docs().values() for a in d["annotations"]}
    table = sa1b_bank.meta_table
    assert sorted(table["ann_id"].tolist()) == sorted(docs)
    assert sa1b_bank.class_names == ["object"] and not sa1b_bank.crop_class_ids.any()
    for row in table:
        meta = CropMeta.from_row(row)
        ann, image = docs[meta.ann_id]
        mask = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        assert meta.image_id == image["image_id"]
        assert meta.src_box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert meta.area == int(mask.sum()) == ann["area"]
        h, w = mask.shape
        assert meta.truncated == (xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1)


def test_build_crops_equal_those_of_the_coco_sample(sa1b_bank, sample_coco_bank):
    """Same pixels, same masks (pycocotools-rasterized polygons vs their RLE): same crop bytes and
    geometry, whatever the mask's form in the input."""
    coco_rows = {int(r["ann_id"]): i for i, r in enumerate(sample_coco_bank.meta_table)}
    fields = ["image_id", "ann_id", "src_box", "scale", "offset", "area", "truncated"]
    crowd = 900100277005  # the COCO build skips crowd regions; SA-1B has no crowd flag
    assert crowd in sa1b_bank.meta_table["ann_id"] and crowd not in coco_rows
    for i, row in enumerate(sa1b_bank.meta_table):
        if row["ann_id"] == crowd:
            continue
        j = coco_rows[int(row["ann_id"])]
        assert all(np.array_equal(row[f], sample_coco_bank.meta_table[j][f]) for f in fields)
        assert np.array_equal(sa1b_bank[i].rgba, sample_coco_bank[j].rgba)


def test_missing_image_is_a_counted_build_skip(tmp_path):
    root = tmp_path / "sa1b"
    shutil.copytree(SAMPLE_SA1B, root)
    (root / "sa_223747.jpg").unlink()
    report = build_bank(read_sa1b(root), tmp_path / "bank", BuildConfig(size=32), workers=1)
    assert report.skipped["missing_image"] == 1
    assert report.num_crops == 36 - 3


# --------------------------------------------------------------------------------------------
# filters and classes


def test_filters_skip_and_count_in_order():
    docs = sample_docs()
    iou, stab, area = 0.88, 0.95, 500
    expected: Counter = Counter()
    for doc in docs.values():
        for a in doc["annotations"]:
            reason = ("low_predicted_iou" if a["predicted_iou"] < iou else "low_stability_score"
                      if a["stability_score"] < stab else "small_area" if a["area"] < area else "kept")  # fmt: skip
            expected[reason] += 1
    ds = read_sa1b(SAMPLE_SA1B, min_predicted_iou=iou, min_stability_score=stab, min_area=area)
    kept = expected.pop("kept")
    assert ds.skipped == expected and ds.num_instances == kept
    assert all(n > 0 for n in expected.values()) and kept > 0  # the sample exercises every filter


def test_filters_at_the_threshold_keep(tmp_path):
    ds = read_one(tmp_path, [annotation(1, predicted_iou=0.9, stability_score=0.96)], min_predicted_iou=0.9,
                  min_stability_score=0.96, min_area=200)  # fmt: skip
    assert ds.num_instances == 1 and not ds.skipped


@pytest.mark.parametrize("field", ["predicted_iou", "stability_score"])
@pytest.mark.parametrize("value", [None, "0.9", True, float("nan")])
def test_scores_are_read_only_when_filtered(tmp_path, field, value):
    ann = annotation(1, **{field: value})
    if value is None:
        del ann[field]
    assert read_one(tmp_path, [ann]).num_instances == 1
    ds = read_sa1b(tmp_path, **{f"min_{field}": 0.5})
    assert ds.skipped == {"malformed_annotation": 1}


@pytest.mark.parametrize("kw", [{"min_predicted_iou": float("nan")}, {"min_stability_score": "0.5"},
                                {"min_area": -1}, {"min_area": 1.5}, {"category": ""}])  # fmt: skip
def test_bad_options_are_value_errors(tmp_path, kw):
    write_image_json(tmp_path, 1, [annotation(1)])
    with pytest.raises(ValueError):
        read_sa1b(tmp_path, **kw)


def test_one_named_class(tmp_path):
    ds = read_one(tmp_path, [annotation(1)], category="thing")
    assert [(c.id, c.source_id, c.name) for c in ds.classes] == [(0, 0, "thing")]


def test_class_map_file_names_classes_and_skips_unlisted(tmp_path):
    write_image_json(tmp_path / "data", 1, [annotation(1), annotation(2), annotation(3)])
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps({"1": "dog", "3": "cat", "99": "zebra"}))
    ds = read_sa1b(tmp_path / "data", class_map=class_map)
    assert [c.name for c in ds.classes] == ["cat", "dog", "zebra"]  # unused names keep their id
    assert [(i.ann_id, i.class_id) for i in ds.images[0].instances] == [(1, 1), (3, 0)]
    assert ds.skipped == {"unmapped": 1}
    ds = read_sa1b(tmp_path / "data", class_map={1: "dog"}, category="object")
    assert [c.name for c in ds.classes] == ["dog", "object"]
    assert [(i.ann_id, i.class_id) for i in ds.images[0].instances] == [(1, 0), (2, 1), (3, 1)]
    assert set(REASONS) >= {"unmapped"}


@pytest.mark.parametrize("text, words", [
    ('["dog"]', ["not a class map"]), ('{"a": "dog"}', ["'a'", "not an annotation id"]),
    ('{"01": "dog"}', ["'01'"]), ('{"1_0": "dog"}', ["'1_0'"]), ('{"1": 3}', ["entry 1"]), ('{"1": ""}', ["entry 1"]),
    ('{"1": "dog"', ["not valid JSON"]), ('{"99999999999999999999": "dog"}', ["not an annotation id"]),
])  # fmt: skip
def test_bad_class_map_file_is_an_input_error(tmp_path, text, words):
    write_image_json(tmp_path / "data", 1, [annotation(1)])
    class_map = tmp_path / "classes.json"
    class_map.write_text(text)
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path / "data", class_map=class_map)
    assert_one_line_naming(e, class_map, *words)


@pytest.mark.parametrize("mapping", [{"1": "dog"}, {1: 2}, {1: ""}, {True: "dog"}])
def test_bad_class_map_mapping_is_a_value_error(tmp_path, mapping):
    write_image_json(tmp_path, 1, [annotation(1)])
    with pytest.raises(ValueError, match="class_map"):
        read_sa1b(tmp_path, class_map=mapping)


# --------------------------------------------------------------------------------------------
# layout


def test_nested_tar_directories_sorted_and_other_json_ignored(tmp_path):
    write_image_json(tmp_path / "sa_000001", 20, [annotation(3)])
    write_image_json(tmp_path / "sa_000000", 10, [annotation(2)])
    write_image_json(tmp_path / "sa_000000", 9, [annotation(1)])
    (tmp_path / "sa_000000" / "metadata.json").write_text("not json")
    ds = read_sa1b(tmp_path)
    assert [im.image_id for im in ds.images] == [10, 9, 20]  # sa_10.json < sa_9.json: sorted names
    assert ds.images[0].path == str(tmp_path / "sa_000000" / "sa_10.jpg")
    assert ds.images[2].path == str(tmp_path / "sa_000001" / "sa_20.jpg")


def test_images_dir_keeps_the_relative_directory(tmp_path):
    write_image_json(tmp_path / "ann" / "part1", 1, [annotation(1)])
    (tmp_path / "img").mkdir()
    ds = read_sa1b(tmp_path / "ann", tmp_path / "img")
    assert ds.images[0].path == str(tmp_path / "img" / "part1" / "sa_1.jpg")
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path / "ann", tmp_path / "nope")
    assert_one_line_naming(e, tmp_path / "nope", "does not exist")


def test_missing_or_empty_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path / "nope")
    assert_one_line_naming(e, tmp_path / "nope", "no such SA-1B directory")
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path)
    assert_one_line_naming(e, tmp_path, "sa_*.json")


# --------------------------------------------------------------------------------------------
# malformed files: one-line InputError naming the json


@pytest.mark.parametrize("text, words", [
    ('{"image": {"image_id": 1', ["not valid JSON"]), ("\x80\x81{}", ["not UTF-8"]), ("[]", ["top level is a list"]),
    ('{"annotations": []}', ["no 'image' object"]),
    ('{"image": {"image_id": 1, "width": 6, "height": 4, "file_name": "a.jpg"}}', ["no 'annotations' list"]),
])  # fmt: skip
def test_malformed_json_is_an_input_error(tmp_path, text, words):
    path = tmp_path / "sa_1.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path)
    assert_one_line_naming(e, path, *words)


@pytest.mark.parametrize("image, words", [
    ({"image_id": "1"}, ["image_id"]), ({"image_id": 1.0}, ["image_id"]), ({"image_id": 2**63}, ["image_id"]),
    ({"width": 0}, ["width/height"]), ({"height": 4.0}, ["width/height"]), ({"width": True}, ["width/height"]),
    ({"file_name": ""}, ["file_name"]), ({"file_name": 3}, ["file_name"]),
    ({"file_name": "../x.jpg"}, ["leaves"]), ({"file_name": "/etc/x.jpg"}, ["leaves"]),
    ({"file_name": "a\\..\\..\\x.jpg"}, ["leaves"]),
])  # fmt: skip
def test_bad_image_entry_is_an_input_error(tmp_path, image, words):
    path = write_image_json(tmp_path, 1, [annotation(1)], **image)
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path)
    assert_one_line_naming(e, path, *words)


def test_file_name_in_a_subdirectory_is_kept(tmp_path):
    write_image_json(tmp_path, 1, [annotation(1)], file_name="jpg/sa_1.jpg")
    assert read_sa1b(tmp_path).images[0].path == str(tmp_path / "jpg" / "sa_1.jpg")


def test_duplicate_ids_are_input_errors(tmp_path):
    write_image_json(tmp_path / "a", 1, [annotation(1)])
    second = write_image_json(tmp_path / "b", 1, [annotation(2)])
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path)
    assert_one_line_naming(e, second, "duplicate image id 1")
    second.unlink()
    second = write_image_json(tmp_path / "b", 2, [annotation(1)])
    with pytest.raises(InputError) as e:
        read_sa1b(tmp_path)
    assert_one_line_naming(e, second, "duplicate annotation id 1")


# --------------------------------------------------------------------------------------------
# malformed annotations: counted skips


def rle_with(counts, size=(40, 60)) -> dict:
    return {"size": list(size), "counts": counts}


def encode_counts(counts: list[int]) -> str:
    """Runs -> COCO compressed string (``maskApi.c`` ``rleToString``), for any integers, so that
    strings pycocotools never writes (negative runs) can be made."""
    out = []
    for i, x in enumerate(counts):
        x -= counts[i - 2] if i > 2 else 0
        more = True
        while more:
            c, x = x & 0x1F, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(48 + (c | 0x20 if more else c)))
    return "".join(out)


GOOD = square_rle()["counts"]
ALL_ZERO = encode_counts([2400])
#: 2400 in 9 chars (zero 5-bit groups with the continuation bit): same value, over-long number
OVERLONG = "P[R" + "P" * 5 + "0"


def test_encode_counts_is_pycocotools_encoding():
    assert encode_counts(rle_string_to_counts(GOOD).tolist()) == GOOD
    assert rle_string_to_counts(OVERLONG).tolist() == [2400] and rle_string_to_counts(ALL_ZERO).tolist() == [2400]


@pytest.mark.parametrize("segmentation, reason", [
    (rle_with(GOOD, (40, 61)), "rle_size_mismatch"), (rle_with(GOOD, (60, 40)), "rle_size_mismatch"),
    (rle_with(GOOD[:-1]), "bad_rle"), (rle_with(GOOD + "0"), "bad_rle"), (rle_with(""), "bad_rle"),
    (rle_with(GOOD[:3] + " " + GOOD[4:]), "bad_rle"), (rle_with(GOOD[:3] + "é" + GOOD[4:]), "bad_rle"),
    (rle_with("o" * (MAX_NUMBER_CHARS + 1) + "0"), "bad_rle"), (rle_with("40"), "bad_rle"),
    (rle_with(ALL_ZERO), None), (rle_with(encode_counts([100, 50, 2250])), None),
    # right total, but: a negative run; the string ends inside a number; a 9-char number
    (rle_with(encode_counts([100, -10, 2310])), "bad_rle"), (rle_with(ALL_ZERO + "P"), "bad_rle"),
    (rle_with(OVERLONG), "bad_rle"), (rle_with(ALL_ZERO + "P" * 8 + "0"), "bad_rle"),
    (rle_with([2400]), None), (rle_with([0, 2400]), None), (rle_with([100, 200, 2101]), "bad_rle"),
    (rle_with([-1, 2401]), "bad_rle"), (rle_with([1.0, 2399]), "malformed_annotation"),
    (rle_with(None), "malformed_annotation"), ({"counts": GOOD}, "malformed_annotation"),
    (rle_with(GOOD, (40,)), "malformed_annotation"), (rle_with(GOOD, (40.0, 60)), "malformed_annotation"),
    ([[1, 2, 3, 4, 5, 6]], "malformed_annotation"), (None, "malformed_annotation"),
])  # fmt: skip
def test_bad_segmentation_is_a_counted_skip(tmp_path, segmentation, reason):
    ds = read_one(tmp_path, [annotation(1, segmentation=segmentation), annotation(2)])
    assert ds.num_instances == (2 if reason is None else 1)
    assert ds.skipped == (Counter({reason: 1}) if reason else Counter())
    assert set(ds.skipped) <= set(REASONS)


@pytest.mark.parametrize("bad", [None, 3, [], {"id": "1"}, {"id": 1.0}, {"id": 2**64}])
def test_malformed_annotation_is_a_counted_skip(tmp_path, bad):
    ann = annotation(1, id=bad["id"]) if isinstance(bad, dict) else bad
    ds = read_one(tmp_path, [ann, annotation(2)])
    assert ds.num_instances == 1 and ds.skipped == {"malformed_annotation": 1}


def test_uncompressed_runs_are_kept_with_their_area(tmp_path):
    runs = [300, 100, 2000]  # 100 pixels from column 7 on
    ds = read_one(tmp_path, [annotation(1, segmentation=rle_with(runs))], min_area=101)
    assert ds.skipped == {"small_area": 1}
    ds = read_sa1b(tmp_path, min_area=100)
    assert ds.images[0].instances[0].rle == rle_with(runs)


# --------------------------------------------------------------------------------------------
# the vectorised string check against the per-char decoder


def reference_check(s: str, num_pixels: int) -> tuple[str | None, int]:
    """The checks of ``check_strings`` one char at a time, decoding with ``crops.rle_string_to_counts``."""
    if not s or not s.isascii() or any(not 0 <= ord(c) - 48 <= 63 for c in s) or (ord(s[-1]) - 48) & 0x20:
        return "bad_rle", 0
    number = 0
    for c in s:
        number += 1
        if number > MAX_NUMBER_CHARS:
            return "bad_rle", 0
        if not (ord(c) - 48) & 0x20:
            number = 0
    counts = rle_string_to_counts(s)
    if (counts < 0).any() or counts.sum() != num_pixels:
        return "bad_rle", 0
    return None, int(counts[1::2].sum())


masks = st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda hw: st.lists(st.booleans(), min_size=hw[0] * hw[1], max_size=hw[0] * hw[1]).map(
        lambda v: np.array(v, np.uint8).reshape(hw)))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(masks, min_size=1, max_size=6))
def test_check_strings_areas_equal_pycocotools(batch):
    for m in batch:  # one call per size: the strings of one call share the pixel count
        s = mask_utils.encode(np.asfortranarray(m))["counts"].decode()
        assert check_strings([s, s], m.size) == ([None, None], [int(m.sum())] * 2)


def test_check_strings_on_a_large_mask():
    """SA-1B sized: 2250 x 1500, long runs (multi-char numbers) and a negative delta."""
    m = np.zeros((2250, 1500), np.uint8)
    m[100:2000, 30:1400] = 1
    m[500:510, 700:900] = 0
    s = mask_utils.encode(np.asfortranarray(m))["counts"].decode()
    assert check_strings([s], m.size) == ([None], [int(m.sum())])


@settings(max_examples=300, deadline=None)
@given(strings=st.lists(st.text(st.characters(min_codepoint=40, max_codepoint=115), max_size=12)
                        | st.just(GOOD), min_size=1, max_size=5),
       num_pixels=st.sampled_from([2400, 30, 100]))  # fmt: skip
def test_check_strings_matches_the_per_char_reference(strings, num_pixels):
    expected = [reference_check(s, num_pixels) for s in strings]
    reasons, areas = check_strings(strings, num_pixels)
    assert list(zip(reasons, areas)) == expected


# --------------------------------------------------------------------------------------------
# fuzz: a Dataset with every annotation kept or counted, or a one-line InputError

# weighted towards valid values, so that many examples keep masks; fresh lists every draw
# (`corrupted` mutates what it is given)
def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` in 3 draws of 4 (``one_of`` picks its branches about evenly)."""
    return st.integers(0, 3).flatmap(lambda k: bad if k == 0 else good)


bad_counts = (st.sampled_from([GOOD[:-1], "", "o" * 9, GOOD + "1"]) | st.text(max_size=6)
              | st.lists(st.integers(-5, 2400), max_size=4))  # fmt: skip
sa1b_annotations = st.fixed_dictionaries(
    {"id": st.integers(0, 10**6), "segmentation": st.fixed_dictionaries(
        {"size": st.sampled_from([(40, 60)] * 4 + [(60, 40), (40, 60, 1)]).map(list),
         "counts": mostly(st.just(GOOD), bad_counts)}),
     "predicted_iou": st.floats(0, 1), "stability_score": st.floats(0, 1)},
    optional={"bbox": st.just((0, 0, 1, 1)).map(list)},
)  # fmt: skip
sa1b_docs = corrupted(st.fixed_dictionaries({
    "image": st.fixed_dictionaries({"image_id": st.integers(0, 1000), "width": st.just(60), "height": st.just(40),
                                    "file_name": st.sampled_from(["sa_1.jpg"] * 4 + ["x/sa_1.jpg", "../sa_1.jpg"])}),
    "annotations": st.lists(sa1b_annotations, max_size=6, unique_by=lambda a: a["id"]),
}))  # fmt: skip


@FUZZ
@given(docs=st.lists(mostly(sa1b_docs, junk), min_size=1, max_size=3), iou=st.sampled_from([0.0, 0.5]),
       area=st.sampled_from([0, 100]))  # fmt: skip
def test_sa1b_fuzz_documents(docs, iou, area):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k, doc in enumerate(docs):
            (root / f"sa_{k}.json").write_text(json.dumps(doc))
        try:
            ds = read_sa1b(root, min_predicted_iou=iou, min_stability_score=iou, min_area=area)
        except InputError as e:
            assert "\n" not in str(e) and str(root) in str(e)
            return
    assert set(ds.skipped) <= set(REASONS)
    assert ds.num_instances + sum(ds.skipped.values()) == sum(len(d["annotations"]) for d in docs)
    for im in ds.images:
        for inst in im.instances:  # every kept mask decodes to its recorded size
            assert mask_utils.decode(inst.rle if isinstance(inst.rle["counts"], str) else
                                     mask_utils.frPyObjects(inst.rle, 40, 60)).shape == (40, 60)  # fmt: skip


def test_class_map_from_the_coco_categories_gives_the_coco_classes(tmp_path):
    """A class map written from the COCO sample (annotation id -> category name) gives back the
    COCO class of every mask of the SA-1B sample."""
    coco = json.loads((SAMPLE / "coco" / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps({str(a["id"]): names[a["category_id"]] for a in coco["annotations"]}))
    ds = read_sa1b(SAMPLE_SA1B, class_map=class_map)
    by_id = {a["id"]: names[a["category_id"]] for a in coco["annotations"]}
    got = {i.ann_id: ds.classes[i.class_id].name for im in ds.images for i in im.instances}
    assert got == {k: by_id[k] for k in got} and len(got) == 36 and not ds.skipped
    assert [c.name for c in ds.classes] == sorted({names[a["category_id"]] for a in coco["annotations"]})
