"""SA-1B input: read speed of ``read_sa1b``, the RLE string check, and the build rate on one core.

    .venv/bin/python benchmarks/sa1b.py [--files 2000] [--synthetic 8] [--size 128] [--repeats 3]

Two inputs, written once to a temporary directory:

- ``sample``: data/sample/sa1b (4 COCO images, 36 masks, 375..640 px) repeated with fresh image
  and annotation ids to ``--files`` json files (reads), or 25 times, images included (build).
- ``SA-1B-shaped``: ``--synthetic`` images at SA-1B's size (2250x1500 and 1500x2250 mosaics of the
  sample photos at their own resolution, JPEG q90, ~1 MB) with 100 masks each, as SAM makes them:
  low-resolution regions (a warped Voronoi partition at 1/4 scale, 32, 96 and 256 cells; 20, 40, 40
  masks drawn from them, so 0.4%..3% of the image each, overlapping across scales) upsampled
  bilinearly and thresholded, which gives smooth curved boundaries. Real SA-1B files differ (more
  tiny masks, other boundaries); this is the right size and count, not the real data. For reads,
  its jsons are repeated to ``--files // 4`` files.

Rows (single process; CPU seconds, median of ``--repeats``, arms taking turns):

- read: ``json.loads`` of every file (the floor for any reader in Python), then ``read_sa1b``
  with default options and with the three filters; files/s and masks/s.
- string check: ``check_strings`` over each file's strings (what ``read_sa1b`` does) against
  ``crops.rle_string_to_counts`` (the per-char Python decoder the build runs on each mask).
- build w=1: ``build_bank(read_sa1b(...), workers=1, BuildConfig(size=--size))`` into /tmp, in
  this process (OpenCV single-threaded, as in the build's workers): crops/s and images/s by wall
  time (includes the fsyncs, and waiting for a core on a loaded machine) and by CPU time; and
  the JPEG read + decode alone, the floor of any build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from instbank.build import BuildConfig, build_bank
from instbank.crops import rle_string_to_counts
from instbank.formats import read_sa1b
from instbank.formats.sa1b import check_strings

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "sa1b"
#: SA-1B images are 1500 px on the shorter side (the dataset card: "downsampled ... 1500 pixels").
SHORT, LONG = 1500, 2250
#: (cells of the partition, masks drawn from it) per scale: 100 masks per image.
SCALES = ((32, 20), (96, 40), (256, 40))


def cpu_median(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), result


# --------------------------------------------------------------------------------------------
# inputs


def repeat_jsons(sources: list[Path], out: Path, files: int, images: bool = False) -> int:
    """``files`` json files cycling through ``sources`` with fresh image/annotation ids (and, with
    ``images``, a symlink to the source's image beside each); returns the number of masks."""
    docs = [json.loads(p.read_text()) for p in sources]
    out.mkdir(parents=True)
    masks = 0
    for k in range(files):
        doc = docs[k % len(docs)]
        image = {**doc["image"], "image_id": k, "file_name": f"sa_{k}.jpg"}
        anns = [{**a, "id": k * 1000 + i} for i, a in enumerate(doc["annotations"])]
        (out / f"sa_{k}.json").write_text(json.dumps({"image": image, "annotations": anns}, separators=(",", ":")))
        if images:
            (out / f"sa_{k}.jpg").symlink_to(sources[k % len(sources)].with_name(doc["image"]["file_name"]))
        masks += len(anns)
    return masks


def warped_voronoi(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """int32 label map ``[h, w]``: nearest of ``cells`` random seeds, coordinates warped by smooth noise."""
    h, w = shape
    step = np.sqrt(h * w / cells)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for axis in (xs, ys):
        field = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), step / 3)
        axis += field / (field.std() + 1e-6) * step / 4
    seeds = rng.uniform((0, 0), (h, w), size=(cells, 2)).astype(np.float32)
    best = np.full((h, w), np.inf, np.float32)
    labels = np.zeros((h, w), np.int32)
    for k, (sy, sx) in enumerate(seeds):
        d = (ys - sy) ** 2 + (xs - sx) ** 2
        closer = d < best
        best[closer], labels[closer] = d[closer], k
    return labels


def sam_like_masks(height: int, width: int, rng: np.random.Generator) -> list[np.ndarray]:
    """100 uint8 masks ``[height, width]``: low-res regions upsampled bilinearly, thresholded at 0.5."""
    low = (height // 4, width // 4)
    masks = []
    for cells, count in SCALES:
        labels = warped_voronoi(low, cells, rng)
        for label in rng.choice(cells, size=count, replace=False):
            soft = cv2.resize((labels == label).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            mask = (soft > 0.5).astype(np.uint8)
            if mask.any():
                masks.append(mask)
    return masks


def mosaic(tiles: list[np.ndarray], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 BGR ``[h, w, 3]`` of ``size`` (w, h) tiled with the photos at their own resolution
    (randomly flipped), so that the JPEG holds real photo detail: an upscaled photo is smoother
    than SA-1B's and decodes several times faster."""
    width, height = size
    out = np.empty((height, width, 3), np.uint8)
    y = 0
    while y < height:
        x, row = 0, 0
        while x < width:
            tile = tiles[rng.integers(len(tiles))][:, :: rng.choice([-1, 1])]
            h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
            out[y : y + h, x : x + w] = tile[:h, :w]
            x, row = x + w, max(row, h)
        y += row
    return out


def write_sa1b_shaped(out: Path, num_images: int, seed: int = 0) -> int:
    """SA-1B-sized images and jsons (see the module docstring); returns the number of masks."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    tiles = [cv2.imread(str(p)) for p in sorted(SAMPLE.glob("sa_*.jpg"))]
    total = 0
    for k in range(num_images):
        image = mosaic(tiles, (SHORT, LONG) if k % 2 else (LONG, SHORT), rng)
        cv2.imwrite(str(out / f"sa_{k}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        height, width = image.shape[:2]
        anns = []
        for i, mask in enumerate(sam_like_masks(height, width, rng)):
            rle = mask_utils.encode(np.asfortranarray(mask))
            seg = {"size": [height, width], "counts": rle["counts"].decode()}
            anns.append({"id": k * 1000 + i, "segmentation": seg,
                         "bbox": mask_utils.toBbox(rle).tolist(), "area": int(mask_utils.area(rle)),
                         "predicted_iou": float(rng.uniform(0.8, 1.0)), "stability_score": float(rng.uniform(0.9, 1.0)),
                         "crop_box": [0, 0, width, height], "point_coords": [[width / 2, height / 2]]})  # fmt: skip
        image_entry = {"image_id": k, "width": width, "height": height, "file_name": f"sa_{k}.jpg"}
        doc = {"image": image_entry, "annotations": anns}
        (out / f"sa_{k}.json").write_text(json.dumps(doc, separators=(",", ":")))
        total += len(anns)
    return total


# --------------------------------------------------------------------------------------------
# arms


def json_only(root: Path) -> int:
    files = sorted(root.glob("sa_*.json"))
    return sum(len(json.loads(p.read_bytes())["annotations"]) for p in files)


def read_rows(name: str, root: Path, repeats: int) -> None:
    files = len(list(root.glob("sa_*.json")))
    arms = {
        "json.loads only": lambda: json_only(root),
        "read_sa1b": lambda: read_sa1b(root).num_instances,
        "read_sa1b + 3 filters": lambda: read_sa1b(root, min_predicted_iou=0.88, min_stability_score=0.95,
                                                   min_area=100).num_instances,
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for arm, fn in arms.items():
            t0 = time.process_time()
            fn()
            times[arm].append(time.process_time() - t0)
    masks = json_only(root)
    mb = sum(p.stat().st_size for p in root.glob("sa_*.json")) / 1e6
    print(f"\nread, {name}: {files} json files, {masks} masks, {mb:.1f} MB")
    print(f"  {'arm':28}{'CPU s':>8}{'files/s':>10}{'masks/s':>11}{'MB/s':>8}")
    for arm, t in times.items():
        s = statistics.median(t)
        print(f"  {arm:28}{s:8.3f}{files / s:10.0f}{masks / s:11.0f}{mb / s:8.1f}")


def string_rows(name: str, root: Path, repeats: int) -> None:
    docs = [json.loads(p.read_bytes()) for p in sorted(root.glob("sa_*.json"))]
    per_file = [([a["segmentation"]["counts"] for a in d["annotations"]], d["image"]["width"] * d["image"]["height"])
                for d in docs]  # fmt: skip
    strings = [s for batch, _ in per_file for s in batch]
    t_vec, _ = cpu_median(lambda: [check_strings(b, n) for b, n in per_file], repeats)
    t_py, _ = cpu_median(lambda: [rle_string_to_counts(s) for s in strings], repeats)
    chars = sum(map(len, strings)) / len(strings)
    print(f"\nRLE strings, {name}: {len(strings)} masks, {chars:.0f} chars per mask")
    print(f"  check_strings (numpy, per file)        {t_vec / len(strings) * 1e6:8.1f} us/mask")
    print(f"  crops.rle_string_to_counts (per char)  {t_py / len(strings) * 1e6:8.1f} us/mask")


def decode_only(paths: list[str]) -> int:
    for path in paths:
        with open(path, "rb") as f:
            cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    return len(paths)


def build_rows(name: str, root: Path, size: int, repeats: int) -> None:
    dataset = read_sa1b(root)
    walls, cpus, decodes = [], [], []
    for _ in range(repeats):
        t0 = time.process_time()
        decode_only([im.path for im in dataset.images])
        decodes.append(time.process_time() - t0)
        out = Path(tempfile.mkdtemp(prefix="sa1b-bench-")) / "bank"
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            report = build_bank(dataset, out, BuildConfig(size=size), workers=1)  # in this process
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    wall, cpu, decode = (statistics.median(v) for v in (walls, cpus, decodes))
    n, crops = len(dataset.images), report.num_crops
    print(f"\nbuild w=1, {name}: {n} images, {crops} crops, S={size}")
    kb = sum(os.path.getsize(im.path) for im in dataset.images) / n / 1e3
    print(f"  JPEG read+decode only: CPU {decode / n * 1e3:.0f} ms/image ({kb:.0f} kB a file)")
    print(f"  build: wall {wall:.2f} s (runs {min(walls):.2f}..{max(walls):.2f}): {crops / wall:.0f} crops/s, "
          f"{n / wall:.2f} images/s")
    print(f"         CPU {cpu:.2f} s (runs {min(cpus):.2f}..{max(cpus):.2f}): {crops / cpu:.0f} crops/s, "
          f"{n / cpu:.2f} images/s per CPU-second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="json files for the sample read rows")
    parser.add_argument("--synthetic", type=int, default=8, help="SA-1B-shaped images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shaped = tmp / "shaped"
        t0 = time.perf_counter()
        masks = write_sa1b_shaped(shaped, args.synthetic)
        print(f"SA-1B-shaped set: {args.synthetic} images, {masks} masks (made in {time.perf_counter() - t0:.0f} s)")
        repeat_jsons(sorted(SAMPLE.glob("sa_*.json")), tmp / "sample-reads", args.files)
        repeat_jsons(sorted(SAMPLE.glob("sa_*.json")), tmp / "sample-x25", 100, images=True)
        repeat_jsons(sorted(shaped.glob("sa_*.json")), tmp / "shaped-reads", args.files // 4)
        read_rows("sample repeated", tmp / "sample-reads", args.repeats)
        read_rows("SA-1B-shaped repeated", tmp / "shaped-reads", args.repeats)
        string_rows("sample", SAMPLE, args.repeats)
        string_rows("SA-1B-shaped", shaped, args.repeats)
        build_rows("sample x25", tmp / "sample-x25", args.size, args.repeats)
        build_rows("SA-1B-shaped", shaped, args.size, args.repeats)


if __name__ == "__main__":
    main()
