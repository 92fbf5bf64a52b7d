"""Build throughput: instbank's build against bare JPEG decoding and the naive per-instance loop.

    .venv/bin/python benchmarks/build_throughput.py [--coco ANN.json ...] [--yolo DIR] [--size 128]
        [--repeats 3] [--engine ray] [--profile] [--no-memory]

Data: the COCO json files given (default: both splits of ../shared/data/coco_tiny_2017 joined into
one image list, 160 images; data/sample/coco when absent), or a YOLO-seg directory (``--yolo``,
e.g. ../shared/data/coco128-seg). Crowd annotations are skipped, as the build does by default.
Every image file is read once before timing: every arm reads its files from the page cache (none
reads them into RAM ahead of its clock). OpenCV runs single-threaded in every arm
(``cv2.setNumThreads(1)`` here; the build's pool workers do the same), so "1 worker" is one core.

Rows (one run, same images; seconds are the median of ``--repeats`` runs, the arms taking turns so
that load from other processes on the machine falls on each alike):

- ``decode``: read + ``cv2.imdecode`` (IMREAD_COLOR) of every image, one process. The reference.
- ``naive loop``: decode, then per instance a full-image mask (pycocotools frPyObjects + merge +
  decode, what ``COCO.annToMask`` does), its tight box by ``np.nonzero``, a square window of the
  box pixels and mask, one ``cv2.resize``. No hashing or writing: a floor for that design.
- ``build w=1``: ``build_bank(workers=1)`` into a fresh directory under /tmp: decode, masks,
  crops, sha256 of every crop, memmap shards, manifest (fsync'ed). Target ratio >= 0.7.
- ``build w=2``: the same with a 2-process pool; speed-up over w=1 (target >= 1.8 on 2 cores).
- ``build ray w=2`` (``--engine ray``): ``build_bank(engine="ray")``, cold (Ray started and
  stopped inside the call), once; "ray: not available" when ``instbank.engines.ray`` or Ray does
  not import.

Then the build's peak memory (resident high-water mark of a fresh process during a w=1 build, Linux
/proc) on the image list and on the list repeated 4 times: streaming shards keep it flat.
``--profile`` adds cProfile's top functions of one w=1 build.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import multiprocessing as mp
import os
import pstats
import shutil
import statistics
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


def interleaved(arms: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds and the item count of every arm; the arms take turns."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in arms.items():
            t0 = time.perf_counter()
            counts[name] = run()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), counts[name]) for name, t in times.items()}


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


def print_profile(dataset, tmp: Path, size: int, top: int = 18) -> None:
    from instbank.build import BuildConfig, build_bank

    profiler = cProfile.Profile()
    profiler.enable()
    build_bank(dataset, tmp / "profiled", BuildConfig(size=size), workers=1)
    profiler.disable()
    shutil.rmtree(tmp / "profiled")
    print(f"\ncProfile of one w=1 build (top {top} by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", type=Path, nargs="+", default=None, help="COCO instances json(s)")
    ap.add_argument("--yolo", type=Path, default=None, help="YOLO-seg dataset directory (or data.yaml)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: add the Ray engine row")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of one w=1 build")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = ap.parse_args()

    import instbank

    cv2.setNumThreads(1)
    dataset = read_dataset(args.coco, args.yolo)
    for record in dataset.images:  # page cache: every arm reads the same warm files
        Path(record.path).read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="instbank-bench-build-", dir="/tmp"))
    print(f"instbank from {Path(instbank.__file__).parent}; {dataset.source}")
    print(f"{len(dataset.images)} images, {dataset.num_instances} instances, S={args.size}, "
          f"{os.cpu_count()} cores, cv2 {cv2.__version__} threads={cv2.getNumThreads()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    try:
        rounds = iter(range(10**9))
        arms = {
            "decode": lambda: decode_only(dataset),
            "naive loop": lambda: naive_loop(dataset, args.size),
            "build w=1": lambda: build(dataset, tmp / f"w1-{next(rounds)}", args.size, 1),
            "build w=2": lambda: build(dataset, tmp / f"w2-{next(rounds)}", args.size, 2),
        }
        results = interleaved(arms, args.repeats)
        if args.engine == "ray":
            results["build ray w=2 (cold, 1 run)"] = ray_arm(dataset, tmp, args.size)
        print_table(results, len(dataset.images))
        if not args.no_memory:
            print_memory(args, tmp)
        if args.profile:
            print_profile(dataset, tmp, args.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores: above 2, other work shared them)")


def print_table(results: dict, num_images: int) -> None:
    decode_s = results["decode"][0]
    print(f"\n{'arm':<28}{'seconds':>9}{'images/s':>10}{'crops/s':>10}{'ratio to decode':>17}")
    for name, result in results.items():
        if result is None:
            print(f"{name:<28} ray: not available")
            continue
        seconds, crops = result
        crops_s = f"{crops / seconds:10.0f}" if crops else f"{'':>10}"
        print(f"{name:<28}{seconds:9.3f}{num_images / seconds:10.1f}{crops_s}{decode_s / seconds:17.2f}")
    w1, w2 = results["build w=1"][0], results["build w=2"][0]
    print(f"speed-up w=2 / w=1: {w1 / w2:.2f}x")


def print_memory(args, tmp: Path) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter per size: ru_maxrss is a high-water mark
    print("\npeak RSS during a w=1 build (fresh process, VmHWM reset before the build):")
    for repeat in MEMORY_REPEATS:
        with ctx.Pool(1) as pool:
            job = (args.coco, args.yolo, args.size, repeat, str(tmp / f"rss{repeat}"))
            before, after = pool.apply(peak_rss_mb, job)
        print(f"  images x{repeat}: {before:7.1f} MB before, {after:7.1f} MB peak, +{after - before:.1f} MB")


if __name__ == "__main__":
    main()
