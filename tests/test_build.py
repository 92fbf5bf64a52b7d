"""The build end to end: counts against an independent pycocotools count, geometry back to the source
masks, determinism across workers and shard sizes, overwrite/strict/lock behaviour."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from conftest import SAMPLE_COCO, SAMPLE_YOLO, shared_path
from instbank.build import BuildConfig, build_bank
from instbank.storage.writer import DirectoryLock
from instbank.crops import CropFilters
from instbank.errors import BuildError
from instbank.formats.coco import read_coco
from instbank.formats.yolo import read_yolo
from instbank.storage import open_bank
from instbank.types import CropMeta

FILTERS = CropFilters(min_area=20, min_side=3, max_aspect=15)


def _coco_masks(ann_path: Path) -> dict[int, tuple[np.ndarray, dict]]:
    """Independent path: pycocotools' full-image masks of every non-crowd annotation."""
    data = json.loads(ann_path.read_text())
    images = {im["id"]: im for im in data["images"]}
    out = {}
    for a in data["annotations"]:
        if a.get("iscrowd"):
            continue
        im = images[a["image_id"]]
        h, w = im["height"], im["width"]
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        out[a["id"]] = (mask_utils.decode(rle), a)
    return out


def _passes(mask: np.ndarray, f: CropFilters) -> bool:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return False
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return mask.sum() >= f.min_area and min(bw, bh) >= f.min_side and max(bw, bh) / min(bw, bh) <= f.max_aspect


def _alpha_back_to_source(rgba: np.ndarray, meta: CropMeta, shape) -> np.ndarray:
    """Resample the crop's alpha at every source pixel centre of its box through the geometry."""
    x0, y0, x1, y1 = meta.src_box
    xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    crop = meta.src_to_crop(np.stack([xs, ys], -1))
    # remap samples at pixel-centre index coordinates: crop coordinate c lands on index c - 0.5
    mx, my = (crop[..., 0] - 0.5).astype(np.float32), (crop[..., 1] - 0.5).astype(np.float32)
    alpha = cv2.remap(rgba[3], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    back = np.zeros(shape, bool)
    back[y0:y1, x0:x1] = alpha >= 128
    return back


def _check_geometry_and_counts(ann_path: Path, images_dir: Path, tmp_path: Path, size: int = 128):
    masks = _coco_masks(ann_path)
    expected = sorted(ann for ann, (m, _) in masks.items() if _passes(m, FILTERS))
    report = build_bank(read_coco(ann_path, images_dir), tmp_path / "bank", BuildConfig(size=size, filters=FILTERS), workers=1)
    bank = open_bank(report.out)
    assert sorted(bank.meta_table["ann_id"].tolist()) == expected
    ious, small_ok = [], []
    pixels = bank.get_many(np.arange(len(bank)))
    for i, row in enumerate(bank.meta_table):
        meta = CropMeta.from_row(row)
        src, ann = masks[meta.ann_id]
        back = _alpha_back_to_source(pixels[i], meta, src.shape)
        iou = (back & (src > 0)).sum() / max((back | (src > 0)).sum(), 1)
        ious.append(iou)
        if src.sum() >= 32 * 32 and iou < 0.8:  # "instance >= 32 px": COCO's small/medium area bound
            small_ok.append((meta.ann_id, iou))
        # The mask is rasterized in its box, bit-identical to pycocotools' full-image mask
        # (crops.polygon_masks): exact tight box and area.
        ys, xs = np.nonzero(src)
        assert meta.src_box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert meta.area == int(src.sum())
    assert np.mean(ious) >= 0.95, np.mean(ious)
    assert not small_ok, small_ok[:5]
    return bank


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_tiny_counts_and_geometry(split, tmp_path):
    root = shared_path("coco_tiny_2017")
    _check_geometry_and_counts(root / "annotations" / f"instances_{split}.json", root / split, tmp_path)


def test_sample_counts_and_geometry(tmp_path):
    _check_geometry_and_counts(SAMPLE_COCO, SAMPLE_COCO.parent / "images", tmp_path, size=64)


def test_coco128_seg_counts_match_polygon_parsing(tmp_path):
    """Independent count: label lines with >= 3 points for images that exist, rasterized with
    pycocotools at the decoded size, non-empty and passing the filters."""
    root = shared_path("coco128-seg")
    expected = 0
    for label in sorted((root / "labels" / "train2017").glob("*.txt")):
        image = root / "images" / "train2017" / f"{label.stem}.jpg"
        if not image.exists():
            continue
        h, w = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).shape
        for line in label.read_text().splitlines():
            v = [float(t) for t in line.split()]
            if len(v) < 7 or (len(v) - 1) % 2:
                continue
            poly = (np.array(v[1:]).reshape(-1, 2) * (w, h)).ravel().tolist()
            expected += _passes(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))), FILTERS)
    report = build_bank(read_yolo(root), tmp_path / "bank", BuildConfig(size=32, filters=FILTERS), workers=2)
    assert report.num_crops == expected
    assert report.skipped.get("label_without_image") == 2 and report.skipped.get("image_without_label") == 2


def test_yolo_sample_builds(tmp_path):
    report = build_bank(read_yolo(SAMPLE_YOLO), tmp_path / "bank", BuildConfig(size=32), workers=1)
    bank = open_bank(report.out)
    assert len(bank) == 30 and bank.num_classes == 80
    assert bank.crop_size == (32, 32) and bank.version.startswith("memmap@")


def test_version_independent_of_workers_and_sharding(tmp_path):
    ds = read_coco(SAMPLE_COCO)
    versions = set()
    for i, (workers, shard_images) in enumerate([(1, None), (2, 1), (2, 3), (1, 8)]):
        cfg = BuildConfig(size=32, shard_images=shard_images)
        report = build_bank(ds, tmp_path / f"b{i}", cfg, workers=workers)
        versions.add(report.version)
    assert len(versions) == 1
    bank = open_bank(tmp_path / "b1")
    assert len(bank.manifest["shards"]) == 8


def test_refuses_existing_bank_unless_overwrite(tmp_path):
    ds = read_coco(SAMPLE_COCO)
    build_bank(ds, tmp_path / "b", BuildConfig(size=16), workers=1)
    with pytest.raises(BuildError, match="already exists"):
        build_bank(ds, tmp_path / "b", BuildConfig(size=16), workers=1)
    report = build_bank(ds, tmp_path / "b", BuildConfig(size=24), workers=1, overwrite=True)
    assert open_bank(report.out).crop_size == (24, 24)


def test_missing_image_is_counted_and_strict_fails_without_manifest(tmp_path):
    data = json.loads(SAMPLE_COCO.read_text())
    data["images"][0]["file_name"] = "does-not-exist.jpg"
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    ds = read_coco(ann, SAMPLE_COCO.parent / "images")
    report = build_bank(ds, tmp_path / "b", BuildConfig(size=16), workers=1)
    assert report.skipped["missing_image"] == 1
    example = report.skip_examples["missing_image"][0]
    assert example["file"].endswith("does-not-exist.jpg") and example["image_id"] == data["images"][0]["id"]
    assert report.skipped_images == {"missing_image": 1}
    on_it = sum(1 for a in data["annotations"] if a["image_id"] == data["images"][0]["id"] and not a["iscrowd"])
    assert report.lost_instances == {"missing_image": on_it}
    with pytest.raises(BuildError, match="strict"):  # found before anything is written
        build_bank(ds, tmp_path / "s", BuildConfig(size=16), workers=1, strict=True)
    assert not (tmp_path / "s").exists()


def test_second_build_into_same_dir_is_locked_out(tmp_path):
    ds = read_coco(SAMPLE_COCO)
    (tmp_path / "b").mkdir()
    with DirectoryLock(tmp_path / "b"):
        with pytest.raises(BuildError, match="another instbank writer"):
            build_bank(ds, tmp_path / "b", BuildConfig(size=16), workers=1)


def test_resume_keeps_finished_shards(tmp_path):
    ds = read_coco(SAMPLE_COCO)
    cfg = BuildConfig(size=16, shard_images=2)
    clean = build_bank(ds, tmp_path / "clean", cfg, workers=1)
    # an interrupted build: every shard finished but the last, no manifest
    out = tmp_path / "b"
    build_bank(ds, out, cfg, workers=1)
    (out / "manifest.json").unlink()
    (out / "shards" / "000003" / "shard.json").unlink()
    resumed = build_bank(ds, out, cfg, workers=1, resume=True)
    assert resumed.reused_shards == 3 and resumed.version == clean.version


def test_crops_in_bank_keep_ids_and_classes(sample_coco_bank):
    data = json.loads(SAMPLE_COCO.read_text())
    by_ann = {a["id"]: a for a in data["annotations"]}
    source_ids = sorted(c["id"] for c in data["categories"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    bank = sample_coco_bank
    assert bank.class_names == [names[s] for s in source_ids]
    per_class = defaultdict(int)
    for row in bank.meta_table:
        ann = by_ann[int(row["ann_id"])]
        assert source_ids[row["class_id"]] == ann["category_id"] and row["image_id"] == ann["image_id"]
        per_class[int(row["class_id"])] += 1
    assert [per_class[c] for c in range(bank.num_classes)] == bank.class_frequencies.tolist()
