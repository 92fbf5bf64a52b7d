"""Build throughput as a user sees it: ``instbank build`` against bare JPEG decoding, whole processes.

    .venv/bin/python benchmarks/build_throughput.py [--repeat 3] [--sizes 128 64] [--rounds 3]
        [--profile] [--no-memory] [--naive] [--engine ray] [--baseline SRC]

Data (issue #15): the images of ../shared/data/coco_tiny_2017 (both splits, 160 real COCO images,
1503 non-crowd instances) listed ``--repeat`` times (default 3: 480 images) in one COCO json with
new image and annotation ids, written to a temporary directory; the shipped sample when absent.
Every file is read once before timing (page cache warm for every arm).

Arms, each a fresh process started by this script (Python start-up and imports included), taking
turns for ``--rounds`` rounds so that load from other processes falls on each alike; wall seconds
and the process's CPU seconds (user + system, from ``getrusage(RUSAGE_CHILDREN)``):

- ``decode``: ``import cv2``, then ``cv2.imread`` (full decode, IMREAD_COLOR) of every listed file,
  OpenCV single-threaded. The reference: what reading the data set costs at least.
- ``build S w=1``: ``instbank build --coco JSON --images ROOT --workers 1 --size S`` into a fresh
  directory: json, masks, crops, BLAKE3 of every crop, memmap shards, fsync'ed manifest.
  The share of images decoded reduced in the DCT domain (shard.json ``decoded_reduced``) is printed.
- ``build 128 w=2``: the same with ``--workers 2`` (speed-up over w=1 on the same set).
- ``before S w=1`` (``--baseline SRC``): ``build S w=1`` with instbank imported from another tree's
  ``src/`` (an earlier commit: ``git worktree add /tmp/old REV``), in the same rounds.

Ratios are decode / build (1.0 = the build costs what decoding costs; targets: >= 0.8 at S=128 with
one worker, w=2 / w=1 >= 1.8x). Then, unless ``--no-memory``: the build's peak memory (resident
high-water mark of a fresh process during an in-process w=1 build) on coco_tiny and on it listed 4
times: streaming shards keep it flat. ``--profile``: cProfile of one ``instbank build --workers 1``
process (S = the first size), top functions by own time. ``--naive``: in-process, the per-instance
full-image-mask loop (pycocotools, no hashing or writing) against in-process decoding.
``--engine ray``: one cold ``build_bank(engine="ray")``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "data" / "coco_tiny_2017" / "annotations"
DEFAULT_COCO = [TINY / "instances_val2017.json", TINY / "instances_train2017.json"]
SAMPLE = REPO / "data" / "sample" / "coco" / "annotations.json"
MEMORY_REPEATS = (1, 4)

BASELINE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv.pop(1))
from instbank.cli import main
sys.argv[0] = "instbank"
main()
"""


def read_dataset(coco: list[Path] | None, yolo: Path | None):
    """One Dataset: the YOLO directory, or the images of every COCO json (equal class tables)."""
    from instbank.formats.coco import read_coco
    from instbank.formats.yolo import read_yolo

    if yolo is not None:
        return read_yolo(yolo)
    paths = coco or (DEFAULT_COCO if all(p.exists() for p in DEFAULT_COCO) else [SAMPLE])
    datasets = [read_coco(p) for p in paths]
    for d in datasets[1:]:
        if d.classes != datasets[0].classes:
            raise SystemExit(f"{d.source}: class table differs from {datasets[0].source}; give one json")
    images = [im for d in datasets for im in d.images]
    return dataclasses.replace(datasets[0], images=images, source=" + ".join(str(p) for p in paths))


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


def decode_only(dataset) -> int:
    for record in dataset.images:
        read_image(record.path)
    return 0


def naive_loop(dataset, size: int) -> int:
    """The per-instance full-image design; returns the number of crops cut."""
    import pycocotools.mask as mask_utils

    count = 0
    for record in dataset.images:
        image = read_image(record.path)
        height, width = image.shape[:2]
        for inst in record.instances:
            if inst.rle is not None:
                counts = inst.rle["counts"]
                rle = inst.rle if isinstance(counts, str) else mask_utils.frPyObjects(inst.rle, height, width)
            else:
                scale = (width, height) if inst.normalized else (1, 1)
                parts = [(p * scale).ravel().tolist() for p in inst.polygons]
                rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
            mask = mask_utils.decode(rle)  # uint8 [H, W]: a full-image mask per instance
            ys, xs = np.nonzero(mask)
            if not len(xs):
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            side = max(x1 - x0, y1 - y0)
            window = np.zeros((side, side, 4), np.uint8)
            window[: y1 - y0, : x1 - x0, :3] = image[y0:y1, x0:x1, ::-1]
            window[: y1 - y0, : x1 - x0, 3] = mask[y0:y1, x0:x1] * 255
            interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
            cv2.resize(window, (size, size), interpolation=interp)
            count += 1
    return count


def build(dataset, out: Path, size: int, workers: int, engine: str = "local") -> int:
    from instbank.build import BuildConfig, build_bank

    try:
        return build_bank(dataset, out, BuildConfig(size=size), workers=workers, engine=engine).num_crops
    finally:
        shutil.rmtree(out, ignore_errors=True)


def ray_arm(dataset, tmp: Path, size: int) -> tuple[float, int] | None:
    try:
        import instbank.engines.ray  # noqa: F401  (the engine module; it imports Ray lazily)
        import ray  # noqa: F401
    except ImportError:
        return None
    t0 = time.perf_counter()
    crops = build(dataset, tmp / "ray", size, 2, engine="ray")
    return time.perf_counter() - t0, crops


def peak_rss_mb(coco, yolo, size: int, repeat: int, out: str) -> tuple[float, float]:
    """In a fresh process: (MB resident before the build, MB peak resident during it) of a w=1
    build of the image list repeated ``repeat`` times (the repeated records share their objects).

    The peak is the kernel's high-water mark (VmHWM), reset just before the build by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0): reading the json peaks higher than the build does, so
    ``ru_maxrss`` alone would only show that."""
    cv2.setNumThreads(1)
    dataset = read_dataset(coco, yolo)
    dataset = dataclasses.replace(dataset, images=dataset.images * repeat)
    import instbank.build  # noqa: F401  (imports count as baseline, not as build memory)

    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    build(dataset, Path(out), size, 1)
    return before, _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


DECODE_SCRIPT = """
import sys, cv2
cv2.setNumThreads(1)
for path in open(sys.argv[1]).read().splitlines():
    if cv2.imread(path, cv2.IMREAD_COLOR) is None:
        raise SystemExit(f"{path}: not decoded")
"""


def write_repeated_coco(out_dir: Path, repeat: int) -> tuple[Path, Path, int]:
    """(json, images root, image count): coco_tiny's two splits listed ``repeat`` times with new ids
    (file names relative to the coco_tiny root), or the shipped sample when coco_tiny is absent."""
    if all(p.exists() for p in DEFAULT_COCO):
        root, splits = TINY.parent, [(p, p.stem.split("_")[1]) for p in DEFAULT_COCO]
    else:
        root, splits = SAMPLE.parent, [(SAMPLE, "images")]
    images, annotations, categories = [], [], None
    for _ in range(repeat):
        for ann_path, folder in splits:
            data = json.loads(ann_path.read_text())
            categories = data["categories"]
            new_id = {}
            for im in data["images"]:
                new_id[im["id"]] = len(images) + 1
                images.append({**im, "id": len(images) + 1, "file_name": f"{folder}/{im['file_name']}"})
            for ann in data["annotations"]:
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_id[ann["image_id"]]})
    path = out_dir / "coco-repeated.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, root, len(images)


def timed_process(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def reduced_share(bank: Path) -> tuple[int, int]:
    """(images decoded reduced, images) summed over the bank's shard.json files."""
    reduced = images = 0
    for info in bank.glob("shards/*/shard.json"):
        entry = json.loads(info.read_text())
        reduced += entry.get("decoded_reduced", 0)
        images += entry.get("num_images", 0)
    return reduced, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="list coco_tiny this many times (3: 480 images)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile of one `instbank build --workers 1` process")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--naive", action="store_true", help="add the in-process naive per-instance loop")
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: add one cold Ray build")
    ap.add_argument("--baseline", type=Path, default=None, metavar="SRC",
                    help="add 'before' arms (w=1, every size): instbank imported from SRC, another tree's src/ "
                         "(e.g. `git worktree add /tmp/old REV`, then /tmp/old/src)")
    args = ap.parse_args()

    import instbank

    tmp = Path(tempfile.mkdtemp(prefix="instbank-bench-build-", dir="/tmp"))
    try:
        ann, root, num_images = write_repeated_coco(tmp, args.repeat)
        paths = [str(root / im["file_name"]) for im in json.loads(ann.read_text())["images"]]
        (tmp / "paths.txt").write_text("\n".join(paths))
        for path in set(paths):  # page cache: every arm reads the same warm files
            Path(path).read_bytes()
        cli = str(Path(sys.executable).with_name("instbank"))
        print(f"instbank {instbank.__version__} from {Path(instbank.__file__).parent}")
        print(f"{num_images} images ({ann.name}: coco_tiny x{args.repeat}, new ids), sizes {args.sizes}, "
              f"{os.cpu_count()} cores, cv2 {cv2.__version__}, load average {os.getloadavg()[0]:.1f} at start")
        arms: dict[str, list[str]] = {"decode": [sys.executable, "-c", DECODE_SCRIPT, str(tmp / "paths.txt")]}
        counter = iter(range(10**9))

        def build_cmd(size: int, workers: int, src: Path | None = None) -> list[str]:
            # another tree: the same CLI, its package first on sys.path (ahead of the editable install)
            entry = [cli] if src is None else [sys.executable, "-c", BASELINE_SCRIPT, str(src)]
            return entry + ["build", "--coco", str(ann), "--images", str(root), "--out", str(tmp / f"bank-{next(counter)}"),
                            "--workers", str(workers), "--size", str(size)]

        for size in args.sizes:
            arms[f"build {size} w=1"] = ("build", size, 1)
            if args.baseline:
                arms[f"before {size} w=1"] = ("build", size, 1, args.baseline)
        arms[f"build {args.sizes[0]} w=2"] = ("build", args.sizes[0], 2)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
        shares: dict[int, tuple[int, int]] = {}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                if arm[0] == "build":
                    cmd = build_cmd(*arm[1:])
                    times[name].append(timed_process(cmd))
                    shares[arm[1]] = reduced_share(Path(cmd[cmd.index("--out") + 1]))
                    shutil.rmtree(cmd[cmd.index("--out") + 1])
                else:
                    times[name].append(timed_process(arm))
            print(f"  round done, load average {os.getloadavg()[0]:.1f}")
        print_process_table(times, num_images, shares, args.sizes[0])
        if args.naive:
            print_naive(args.sizes[0])
        if args.engine == "ray":
            result = ray_arm(read_dataset(None, None), tmp, args.sizes[0])
            print(f"\nbuild ray w=2 (cold, 1 run, in-process): {result[0]:.2f} s" if result else "\nray: not available")
        if not args.no_memory:
            print_memory(args, tmp)
        if args.profile:
            profile_process(build_cmd(args.sizes[0], 1), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores: above 2, other work shared them)")


def print_process_table(times: dict, num_images: int, shares: dict, first_size: int) -> None:
    med = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}
    span = {name: (min(w for w, _ in t), max(w for w, _ in t), min(c for _, c in t), max(c for _, c in t))
            for name, t in times.items()}
    dw, dc = med["decode"]
    print(f"\n{'arm (whole process)':<22}{'wall s (range)':>22}{'CPU s (range)':>22}{'images/s':>10}"
          f"{'decode/build wall':>19}{'CPU':>7}")
    for name, (w, c) in med.items():
        lo_w, hi_w, lo_c, hi_c = span[name]
        print(f"{name:<22}{w:8.2f} ({lo_w:.2f}-{hi_w:.2f}){c:10.2f} ({lo_c:.2f}-{hi_c:.2f}){num_images / w:10.1f}"
              f"{dw / w:19.2f}{dc / c:7.2f}")
    for size, (reduced, images) in sorted(shares.items(), reverse=True):
        print(f"S={size}: {reduced} of {images} images decoded reduced in the DCT domain ({reduced / max(images, 1):.0%})")
    w1, w2 = med[f"build {first_size} w=1"], med[f"build {first_size} w=2"]
    print(f"speed-up w=2 / w=1 at S={first_size}: {w1[0] / w2[0]:.2f}x wall")


def print_naive(size: int) -> None:
    dataset = read_dataset(None, None)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    decode_only(dataset)
    t1 = time.perf_counter()
    crops = naive_loop(dataset, size)
    t2 = time.perf_counter()
    print(f"\nin-process, {len(dataset.images)} images: decode {t1 - t0:.2f} s, naive per-instance loop "
          f"{t2 - t1:.2f} s ({crops} crops), ratio {(t1 - t0) / (t2 - t1):.2f}")


def profile_process(cmd: list[str], tmp: Path, top: int = 25) -> None:
    out = tmp / "build.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), *cmd], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    print(f"\ncProfile of `instbank build --workers 1 --size {cmd[cmd.index('--size') + 1]}` (whole process, top {top} by own time):")
    pstats.Stats(str(out)).sort_stats("tottime").print_stats(top)


def print_memory(args, tmp: Path) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter per size: ru_maxrss is a high-water mark
    print("\npeak RSS during an in-process w=1 build of coco_tiny (fresh process, VmHWM reset before the build):")
    for repeat in MEMORY_REPEATS:
        with ctx.Pool(1) as pool:
            job = (None, None, args.sizes[0], repeat, str(tmp / f"rss{repeat}"))
            before, after = pool.apply(peak_rss_mb, job)
        print(f"  images x{repeat}: {before:7.1f} MB before, {after:7.1f} MB peak, +{after - before:.1f} MB")


if __name__ == "__main__":
    main()
