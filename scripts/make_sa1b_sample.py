#!/usr/bin/env python
"""Write ``data/sample/sa1b/``: four images of the shipped COCO sample in SA-1B layout.

    .venv/bin/python scripts/make_sa1b_sample.py [--out data/sample/sa1b]

Each image is copied unchanged as ``sa_<COCO image id>.jpg``; ``sa_<id>.json`` holds every COCO
annotation of it (crowd regions included: SA-1B masks have no crowd flag) as SA-1B writes a mask:
the mask is rasterized by pycocotools and re-encoded as compressed RLE, ``bbox`` and ``area`` come
from that mask, ``crop_box`` is the whole image, ``point_coords`` is one mask pixel (the middle
one in column-major order). ``predicted_iou`` and ``stability_score`` are synthetic (SAM's scores
do not exist for COCO masks): drawn from a seeded generator in ranges that put some masks under
SAM's default thresholds (0.88 and 0.95), so that the reader's filters have something to drop.
The output is the same on every run (fixed seed, sorted ids, fixed json layout).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "data" / "sample" / "coco"
#: Small files (37-248 kB), 36 masks in all, one with a crowd region (uncompressed RLE in COCO).
IMAGE_IDS = (168974, 223747, 277005, 349184)
SEED = 17


def coco_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """uint8 ``[h, w]`` mask of a COCO annotation (polygons or either RLE form), by pycocotools."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def sa1b_annotation(ann_id: int, mask: np.ndarray, rng: np.random.Generator) -> dict:
    height, width = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask))
    xs, ys = np.nonzero(mask.T)  # column-major order, as RLE runs go
    middle = len(xs) // 2
    return {
        "id": ann_id,
        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
        "predicted_iou": round(float(rng.uniform(0.80, 1.0)), 4),
        "stability_score": round(float(rng.uniform(0.90, 1.0)), 4),
        "crop_box": [0.0, 0.0, float(width), float(height)],
        "point_coords": [[float(xs[middle]) + 0.5, float(ys[middle]) + 0.5]],  # pixel centre, (x, y)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "sample" / "sa1b")
    args = parser.parse_args()
    coco = json.loads((COCO / "annotations.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    rng = np.random.default_rng(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    for image_id in IMAGE_IDS:
        im = images[image_id]
        name = f"sa_{image_id}"
        shutil.copyfile(COCO / "images" / im["file_name"], args.out / f"{name}.jpg")
        anns = sorted((a for a in coco["annotations"] if a["image_id"] == image_id), key=lambda a: a["id"])
        doc = {
            "image": {"image_id": image_id, "width": im["width"], "height": im["height"], "file_name": f"{name}.jpg"},
            "annotations": [sa1b_annotation(a["id"], coco_mask(a, im["height"], im["width"]), rng) for a in anns],
        }
        (args.out / f"{name}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{name}: {im['width']}x{im['height']}, {len(anns)} masks")


if __name__ == "__main__":
    main()
