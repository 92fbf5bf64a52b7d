"""The Ray Data engine against the local engine on one machine, and the per-core and per-crop
figures behind the paper estimate in docs/scale-out.md.

    .venv/bin/python benchmarks/scaleout.py [--coco ANN.json ...] [--size 128] [--workers 2]
        [--times 16] [--repeats 2] [--dir /tmp/instbank-bench-scaleout]

Data: the COCO json files given (default: both splits of ../shared/data/coco_tiny_2017, joined into
one image list; data/sample/coco when absent), the image list repeated ``--times`` times: the default
plan then cuts shards of 320 images (about 2 s of work each here), which makes Ray's per-task gap
(~0.2 s, its executor polls every 0.1 s) small next to the work, as the up-to-512-image shards of a
real build do. Every image file is read once before timing, so every arm decodes from the page
cache.

Rows (one run, same input, same output config; every arm must produce the same ``version``).
Rows marked (m) are the median of ``--repeats`` runs. Every local arm runs before Ray is started
in this process (see ``main``):

- ``decode`` (m): ``decode_image`` of every image, one process (the part of the build that
  depends on image size, used to scale the estimate to SA-1B's larger images)
- ``local w=1`` (m): the per-core build rate; ``local w=W`` (m): the process pool
- ``ray cold w=W``: ``build_bank(engine="ray")`` with Ray not running: import, ``ray.init``,
  workers, build, shutdown (checks that Ray is stopped afterwards)
- ``ray start-up``: ``ray.init`` plus a first W-task Ray Data job (worker processes starting)
- ``ray warm w=W`` (m): the build on the already started Ray; ratio = ``local w=W`` seconds / these
  seconds (target: Ray within 25% of local, i.e. >= 0.8); the cold row gets the same ratio

Then bytes on disk per crop for each backend at ``--size``: the local bank (memmap) converted to
lmdb and webdataset with their default codecs (whole bank directory / crops).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

# Same input as build_throughput.py (coco_tiny both splits, else the shipped sample): one reader.
from build_throughput import read_dataset  # noqa: E402 - a sibling script on sys.path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ray_startup(workers: int) -> float:
    """Seconds for ``ray.init`` and a first Ray Data job of ``workers`` trivial tasks."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-job log lines in the table

    def start():
        ray.init(num_cpus=workers, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
        items = [{"i": i} for i in range(workers)]
        ray.data.from_items(items, override_num_blocks=workers).map(lambda r: r, num_cpus=1).take_all()

    return timed(start)[1]


def bytes_per_crop(bank: Path, tmp: Path) -> dict[str, float]:
    from instbank.storage import open_bank
    from instbank.storage.convert import convert_bank

    n = len(open_bank(bank))
    sizes = {"memmap": _du(bank) / n}
    for backend in ("lmdb", "webdataset"):
        dst = tmp / f"bank-{backend}"
        convert_bank(bank, dst, backend, overwrite=True)
        sizes[backend] = _du(dst) / n
    return sizes


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", type=Path, nargs="+", default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--times", type=int, default=16, help="repeat the image list this many times (longer runs)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each (m) row; the median is shown")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/instbank-bench-scaleout"))
    args = ap.parse_args()

    from instbank.build import BuildConfig, build_bank
    from instbank.crops import decode_image

    dataset = read_dataset(args.coco, None)
    dataset = dataclasses.replace(dataset, images=dataset.images * args.times)
    for im in dataset.images:  # page cache: every arm reads the same warm files
        Path(im.path).read_bytes()
    cfg = BuildConfig(size=args.size)
    w = args.workers
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)

    def build(name, **kw):
        return build_bank(dataset, args.dir / name, cfg, overwrite=True, **kw)

    rows = {}
    rows["decode"] = statistics.median(timed(lambda: [decode_image(im.path) for im in dataset.images])[1]
                                       for _ in range(args.repeats))
    ones = [timed(lambda: build("local1", workers=1)) for _ in range(args.repeats)]
    local1, rows["local w=1"] = ones[0][0], statistics.median(t for _, t in ones)
    # The local arms run before Ray starts in this process: twice here, a Ray build that followed
    # a forked local pool in a process running Ray never started its tasks.
    pool = [timed(lambda: build("localw", workers=w)) for _ in range(args.repeats)]
    localw, rows[f"local w={w}"] = pool[0][0], statistics.median(t for _, t in pool)
    cold, rows[f"ray cold w={w}"] = timed(lambda: build("raycold", workers=w, engine="ray"))
    import ray

    assert not ray.is_initialized(), "a build that started its own Ray left it running"
    rows["ray start-up"] = ray_startup(w)
    runs = [timed(lambda: build("raywarm", workers=w, engine="ray")) for _ in range(args.repeats)]
    warm, rows[f"ray warm w={w}"] = runs[0][0], statistics.median(t for _, t in runs)
    ray.shutdown()
    versions = {r.version for r in (local1, localw, cold, warm)}
    assert len(versions) == 1, f"engines disagree: {versions}"

    n_img, n_crops = len(dataset.images), local1.num_crops
    print(f"data: {dataset.source}\n{n_img} images, {dataset.num_instances} instances, {n_crops} crops, "
          f"S={args.size}, {local1.num_shards} shards at w=1, {localw.num_shards} at w={w}; version {local1.version}; "
          f"{os.cpu_count()} cores")
    print(f"{'arm':<16}{'seconds':>9}{'images/s':>10}{'crops/s':>10}{'ratio':>8}")
    ref = rows[f"local w={w}"]
    for name, sec in rows.items():
        img = "" if name == "ray start-up" else f"{n_img / sec:.1f}"
        crops = "" if name in ("ray start-up", "decode") else f"{n_crops / sec:.0f}"
        ratio = f"{ref / sec:.2f}" if name.startswith("ray ") and name != "ray start-up" else ""
        print(f"{name:<16}{sec:>9.2f}{img:>10}{crops:>10}{ratio:>8}")
    print(f"ratio = local w={w} seconds / ray seconds (warm >= 0.8: Ray within 25% of local after start-up)")
    per_core_img, per_core_crop = rows["local w=1"] / n_img, rows["local w=1"] / n_crops
    print(f"per core: {1e3 * per_core_img:.1f} ms/image, {1e3 * per_core_crop:.2f} ms/crop, "
          f"decode {1e3 * rows['decode'] / n_img:.1f} ms/image, "
          f"rest {1e3 * (rows['local w=1'] - rows['decode']) / n_crops:.2f} ms/crop")
    sizes = bytes_per_crop(local1.out, args.dir)
    raw = 4 * args.size**2
    print(f"{'backend':<12}{'bytes/crop':>12}{'vs raw RGBA':>13}")
    for name, size in sizes.items():
        print(f"{name:<12}{size:>12.0f}{size / raw:>13.3f}")
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
