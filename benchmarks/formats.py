"""Reading a data set: ``read_coco`` / ``read_yolo`` against the usual alternatives, same files.

    .venv/bin/python benchmarks/formats.py [--annotations 100000] [--images 5000] [--repeats 3]

Inputs are the shipped samples (data/sample) replicated with fresh ids until they reach the asked
size, written once to a temporary directory (no image pixels: readers do not open images).

COCO (reference = ``pycocotools.coco.COCO(path)``, the index most training code builds):
- ``json.loads`` only: the floor for any json reader in Python.
- ``read_coco``: parse + checks + records (``Dataset``), crowd skipped.

YOLO-seg (reference = a plain loop: read each label file, ``float()`` every token, no checks):
- reading the label bytes only (``os.walk`` + ``open().read()``): the floor.
- ``read_yolo``: the same files from the directory layout, with every check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from instbank.formats import read_coco, read_yolo

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO / "data" / "sample" / "coco" / "annotations.json"
YOLO_SAMPLE = REPO / "data" / "sample" / "yolo" / "labels"


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls of ``fn``.

    Every side is single-threaded, so its CPU time is what it costs; on a shared machine the wall
    time also holds the time spent waiting for a core, and the ratios are taken on CPU time.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def write_coco(out: Path, num_annotations: int) -> Path:
    """The COCO sample replicated until it has ``num_annotations`` annotations (ids made unique)."""
    sample = json.loads(COCO_SAMPLE.read_text())
    images, annotations, copy = [], [], 0
    while len(annotations) < num_annotations:
        offset = copy * 10**7
        images += [{**im, "id": im["id"] + offset, "file_name": f"{copy}_{im['file_name']}"} for im in sample["images"]]
        annotations += [
            {**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset} for a in sample["annotations"]
        ]
        copy += 1
    path = out / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations[:num_annotations],
                                "categories": sample["categories"]}))  # fmt: skip
    return path


def write_yolo(out: Path, num_images: int) -> Path:
    """``num_images`` empty images, each with a copy of one of the sample's label files."""
    labels = [p.read_bytes() for p in sorted(YOLO_SAMPLE.rglob("*.txt"))]
    root = out / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(num_images):
        (root / "images" / f"{i:07d}.jpg").write_bytes(b"")
        (root / "labels" / f"{i:07d}.txt").write_bytes(labels[i % len(labels)])
    return root


def label_files(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root / "labels") for f in files]


def read_bytes_only(root: Path) -> int:
    total = 0
    for f in label_files(root):
        with open(f, "rb") as fh:
            total += len(fh.read())
    return total


def plain_yolo_parse(root: Path) -> int:
    count = 0
    for f in label_files(root):
        with open(f) as fh:
            count += len([[float(v) for v in line.split()] for line in fh if line.strip()])
    return count


def quiet(fn, *args):
    """``fn(*args)`` without its prints (pycocotools reports its progress on stdout)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def table(title: str, rows: list[tuple[str, tuple[float, float]]], reference: str) -> None:
    ref = dict(rows)[reference][1]
    print(f"\n{title}\n{'':2}{'side':50}{'wall s':>9}{'CPU s':>9}{'CPU vs ref':>12}")
    for name, (wall, cpu) in rows:
        print(f"{'':2}{name:50}{wall:9.3f}{cpu:9.3f}{cpu / ref:11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pycocotools.coco import COCO

    out = Path(tempfile.mkdtemp(prefix="instbank-bench-formats-"))
    try:
        coco = write_coco(out, args.annotations)
        (out / "images").mkdir()
        size_mb = coco.stat().st_size / 1e6
        ds = read_coco(coco, images_dir=out / "images")
        print(f"COCO: {args.annotations} annotations, {len(ds.images)} images, {size_mb:.0f} MB json; "
              f"{ds.num_instances} instances kept, skipped {dict(ds.skipped)}")  # fmt: skip
        rows = [
            ("json.loads only (floor)", best_of(lambda: json.loads(coco.read_bytes()), args.repeats)),
            ("pycocotools COCO(path) (ref)", best_of(lambda: quiet(COCO, str(coco)), args.repeats)),
            ("read_coco", best_of(lambda: read_coco(coco, images_dir=out / "images"), args.repeats)),
        ]
        table("COCO json", rows, "pycocotools COCO(path) (ref)")

        root = write_yolo(out, args.images)
        ds = read_yolo(root)
        print(f"\nYOLO: {len(ds.images)} images, {ds.num_instances} instances")
        rows = [
            ("read label bytes only (floor)", best_of(lambda: read_bytes_only(root), args.repeats)),
            ("plain loop: float() per token, no checks (ref)", best_of(lambda: plain_yolo_parse(root), args.repeats)),
            ("read_yolo", best_of(lambda: read_yolo(root), args.repeats)),
        ]
        table("YOLO-seg labels", rows, "plain loop: float() per token, no checks (ref)")
    finally:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
