"""Read throughput and size of each storage backend against the bare loop it is built on.

    .venv/bin/python benchmarks/read_throughput.py [--crops 50000] [--sizes 64 128] [--batch 256]
        [--batches 40] [--repeats 3] [--unique 8192] [--stream-tars 4]
        [--dir /tmp/instbank-bench-read] [--real-bank out/demo-bank] [--keep]

Content: ``--crops`` crops per size, ``--unique`` of them distinct, cut from random boxes
(log-uniform side, random aspect) of the JPEGs in data/sample/coco/images, scaled to fit S x S and
letterboxed with zeros as the build does, with an anti-aliased alpha disk. Real texture matters:
compression ratios on constant planes mean nothing; repeats do not, since every crop is compressed
on its own. The same crops (and digests) go into every backend, 4 shards each.

Each row runs the backend side and its bare side alternately (load from other processes hits both
alike), one untimed run each first, then reports the median crops/s over ``--repeats`` and the
ratio backend / bare:

- memmap ``get_many`` vs a numpy fancy-index gather (``np.take(..., out=)``) of the same crops in RAM
- lmdb ``get_many`` vs a bare loop of zstd decompression of the same stored values held in RAM,
  then the same filter inverse (the least any reader of those bytes must do)
- webdataset ``get_many`` (index + mmap) vs the same bare zstd loop over its stored members
- webdataset ``stream()`` of the first ``--stream-tars`` tars (2048 crops each), one process, vs a
  bare ``tarfile`` read of the same tars (members read, grouped by key, pixels zstd-decoded,
  class id and JSON meta parsed)

``get_many`` rows read ``--batches`` random batches of ``--batch`` indices. Bytes on disk are the
payload files (pixels.u8 / data.mdb / tars + index) against raw RGBA (``N*4*S*S``). The filter
table compresses the first 2048 crops (and all crops of ``--real-bank``, a bank built from real
annotations, any backend) with each LMDB filter and a horizontal-delta candidate, and times their
decode. Bank files go under ``--dir``, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import zstandard

from instbank.storage import open_bank
from instbank.storage.base import SHARDS_DIR, crop_digests
from instbank.storage.writer import write_bank as write_crops
from instbank.storage.lmdb_bank import apply_filter, undo_filter
from instbank.testing import default_class_ids, synthetic_meta
from instbank.types import ClassInfo

IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample" / "coco" / "images"
NUM_SHARDS = 4
BACKENDS = {  # label -> (backend, options)
    "memmap": ("memmap", {}),
    "lmdb (up-rgb)": ("lmdb", {}),
    "lmdb (no filter)": ("lmdb", {"filter": "none"}),
    "webdataset (zstd)": ("webdataset", {"maxcount": 2048}),  # tars to stream a few of
}


# --------------------------------------------------------------------------------------------
# content


def load_images() -> list[np.ndarray]:
    import cv2

    paths = sorted(glob.glob(str(IMAGES / "*.jpg")))
    if not paths:
        raise SystemExit(f"{IMAGES}: no JPEG images to cut crops from")
    return [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]


def realistic_crops(n: int, size: int, images: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """uint8 ``[n, 4, S, S]``: image patches letterboxed like the build's crops, alpha disks."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 4, size, size), np.uint8)
    alpha = np.zeros((size, size), np.uint8)
    for k in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = np.exp(rng.uniform(np.log(16), np.log(min(h, w))))  # COCO objects: mostly small
        aspect = np.exp(rng.normal(0, 0.4))
        bw, bh = int(np.clip(side * aspect, 8, w)), int(np.clip(side / aspect, 8, h))
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        s = size / max(bw, bh)
        nw, nh = max(1, round(bw * s)), max(1, round(bh * s))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        patch = cv2.resize(img[y0 : y0 + bh, x0 : x0 + bw], (nw, nh), interpolation=interp)
        ox, oy = (size - nw) // 2, (size - nh) // 2
        out[k, :3, oy : oy + nh, ox : ox + nw] = patch.transpose(2, 0, 1)
        alpha[:] = 0
        radius = int(min(nw, nh) * rng.uniform(0.3, 0.5))
        cv2.circle(alpha, (ox + nw // 2, oy + nh // 2), radius, 255, -1, lineType=cv2.LINE_AA)
        out[k, 3] = alpha
    return out


def write_bank(path: Path, crops: np.ndarray, meta, digests, backend: str, options: dict) -> float:
    """Write ``crops`` as a 4-shard bank; returns seconds."""
    n, s = len(crops), crops.shape[-1]
    t0 = time.perf_counter()
    bounds = np.linspace(0, n, NUM_SHARDS + 1).astype(int)
    shards = (
        ((crops[lo : min(lo + 4096, hi)], meta[lo : min(lo + 4096, hi)], digests[lo : min(lo + 4096, hi)]) for lo in range(lo0, hi, 4096))
        for lo0, hi in zip(bounds[:-1], bounds[1:])
    )
    classes = [ClassInfo(c, c + 1, f"class{c}") for c in range(20)]
    write_crops(path, backend, s, classes, shards, options=options, build={"source": "benchmark"}, overwrite=True)
    return time.perf_counter() - t0


def payload_bytes(path: Path) -> int:
    common = {"meta.npy", "digests.npy", "shard.json"}
    return sum(f.stat().st_size for f in (path / SHARDS_DIR).glob("*/*") if f.name not in common)


# --------------------------------------------------------------------------------------------
# timing


def median_rate(fn, crops: int, repeats: int) -> float:
    """Median crops/s of ``fn()`` (which handles ``crops`` crops) over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return crops / statistics.median(times)


def paired_rates(backend_fn, bare_fn, crops: int, repeats: int) -> tuple[float, float]:
    """Median crops/s of both sides, run alternately (a shared machine's load hits both alike),
    after one untimed run of each (first-touch page faults, lazy opens)."""
    backend_fn(), bare_fn()
    times: dict = {backend_fn: [], bare_fn: []}
    for _ in range(repeats):
        for fn in (backend_fn, bare_fn):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return crops / statistics.median(times[backend_fn]), crops / statistics.median(times[bare_fn])


def bare_zstd_loop(values: list[bytes], batches, out: np.ndarray, filt: str):
    decompressor = zstandard.ZstdDecompressor()
    flat = out.reshape(len(out), -1)

    def run():
        for idx in batches:
            for k, i in enumerate(idx):
                flat[k] = np.frombuffer(decompressor.decompress(values[i]), np.uint8)
            undo_filter(out, filt)

    return run


def bank_loop(bank, batches, out: np.ndarray):
    def run():
        for idx in batches:
            bank.get_many(idx, out=out)

    return run


def lmdb_values(path: Path) -> list[bytes]:
    import lmdb

    values = []
    for sdir in sorted((path / SHARDS_DIR).iterdir()):
        env = lmdb.open(str(sdir / "data.mdb"), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            values.extend(v for _, v in txn.cursor())
        env.close()
    return values


def tar_values(bank) -> list[bytes]:
    values = []
    for sdir, shard, _ in bank.iter_shards():
        index = np.load(sdir / shard["payload"]["index"])
        blobs = [(sdir / t["file"]).read_bytes() for t in shard["payload"]["tars"]]
        values.extend(blobs[t][o : o + s] for t, o, s in index.tolist())
    return values


def bare_tar_read(tars: list[Path], size: int):
    """The same work as ``stream()`` without webdataset: tarfile iteration, grouping, decoding."""
    decompressor = zstandard.ZstdDecompressor()

    def run():
        count = 0
        for path in tars:
            with tarfile.open(path, "r|") as tf:
                sample, key = {}, None
                for member in tf:
                    k, _, ext = member.name.partition(".")
                    if k != key and sample:
                        count += decode(sample)
                        sample = {}
                    key, sample[ext] = k, tf.extractfile(member).read()
                if sample:
                    count += decode(sample)
        return count

    def decode(sample: dict) -> int:
        rgba = np.frombuffer(decompressor.decompress(sample["rgba.zst"]), np.uint8).reshape(4, size, size)
        int(sample["cls"])
        json.loads(sample["json"])
        return 1 if rgba.size else 0

    return run


def stream_epoch(bank, tars: list[Path]):
    def run():
        return sum(1 for _ in bank.stream(urls=[str(t) for t in tars]))

    return run


# --------------------------------------------------------------------------------------------
# the filter choice


def left_delta(crops: np.ndarray) -> np.ndarray:
    """The rejected candidate: R, G, B columns minus the column to their left."""
    out = crops.copy()
    np.subtract(crops[:, :3, :, 1:], crops[:, :3, :, :-1], out=out[:, :3, :, 1:])
    return out


def undo_left_delta(stored: np.ndarray) -> None:
    np.cumsum(stored[:, :3], axis=-1, dtype=np.uint8, out=stored[:, :3])


def filter_table(crops: np.ndarray, repeats: int) -> list[tuple[str, float, float]]:
    """(filter, raw/compressed, decode crops/s incl. inverse) at zstd level 3."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    decompressor = zstandard.ZstdDecompressor()
    candidates = {
        "none": (lambda c: apply_filter(c, "none"), lambda s: undo_filter(s, "none")),
        "up-rgb (default)": (lambda c: apply_filter(c, "up-rgb"), lambda s: undo_filter(s, "up-rgb")),
        "left-rgb (candidate)": (left_delta, undo_left_delta),
    }
    rows = []
    out = np.empty_like(crops)
    flat = out.reshape(len(out), -1)
    for name, (forward, inverse) in candidates.items():
        stored = forward(crops)
        frames = [compressor.compress(stored[i].data) for i in range(len(stored))]

        def decode():
            for k, frame in enumerate(frames):
                flat[k] = np.frombuffer(decompressor.decompress(frame), np.uint8)
            inverse(out)

        rate = median_rate(decode, len(crops), repeats)
        assert np.array_equal(out, crops), name
        rows.append((name, crops.nbytes / sum(map(len, frames)), rate))
    return rows


# --------------------------------------------------------------------------------------------


def bank_content(n: int, size: int, unique: int, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` crops (``unique`` distinct patches, repeated: each crop is compressed on its own, so
    ratios and decode costs are those of the distinct ones), meta rows and digests."""
    pool = realistic_crops(min(n, unique), size, images, seed=size)
    crops = pool[np.arange(n) % len(pool)]
    meta = synthetic_meta(np.arange(n), default_class_ids(n, 20), size)
    return crops, meta, crop_digests(crops, meta)


def run_size(size: int, args, images) -> None:
    n = args.crops
    print(f"\n## S={size}: {n} crops ({n * 4 * size * size / 1e9:.2f} GB raw), random get_many({args.batch}) "
          f"x {args.batches} batches, median of {args.repeats}", flush=True)
    t0 = time.perf_counter()
    crops, meta, digests = bank_content(n, size, args.unique, images)
    print(f"content + digests: {time.perf_counter() - t0:.1f} s", flush=True)

    banks, sizes, values = {}, {}, {}
    print(f"\n{'backend':20s} {'write crops/s':>14s} {'payload MB':>11s} {'/ raw':>7s}")
    for label, (backend, options) in BACKENDS.items():
        path = args.dir / f"s{size}-{label.split()[0]}-{len(banks)}"
        seconds = write_bank(path, crops, meta, digests, backend, options)
        if backend == "lmdb":  # before the bank opens them: one open per file and process
            values[label] = lmdb_values(path)
        banks[label] = open_bank(path)
        sizes[label] = payload_bytes(path)
        print(f"{label:20s} {n / seconds:14.0f} {sizes[label] / 1e6:11.1f} {sizes[label] / crops.nbytes:7.3f}",
              flush=True)

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n, args.batch) for _ in range(args.batches)]
    count = args.batch * args.batches
    out = np.empty((args.batch, 4, size, size), np.uint8)

    def gather():
        for idx in batches:
            np.take(crops, idx, axis=0, out=out)

    rows = [("memmap get_many", bank_loop(banks["memmap"], batches, out), "numpy gather in RAM", gather, count, 0.8)]
    for label, filt in (("lmdb (up-rgb)", "up-rgb"), ("lmdb (no filter)", "none")):
        bare_name = f"bare zstd loop{' + unfilter' if filt != 'none' else ''}"
        bare = bare_zstd_loop(values[label], batches, out, filt)
        rows.append((f"{label} get_many", bank_loop(banks[label], batches, out), bare_name, bare, count, 0.8))
    wds = banks["webdataset (zstd)"]
    bare = bare_zstd_loop(tar_values(wds), batches, out, "none")
    rows.append(("webdataset get_many", bank_loop(wds, batches, out), "bare zstd loop", bare, count, None))
    first_tars = [(sdir / t["file"], t["count"]) for sdir, sh, _ in wds.iter_shards() for t in sh["payload"]["tars"]]
    tars = [path for path, _ in first_tars[: args.stream_tars]]
    streamed = sum(count for _, count in first_tars[: args.stream_tars])
    rows.append(("webdataset stream()", stream_epoch(wds, tars), "bare tarfile read", bare_tar_read(tars, size),
                 streamed, 0.8))

    print(f"\n{'backend side':26s} {'crops/s':>9s}   {'bare side':26s} {'crops/s':>9s} {'ratio':>6s} {'target':>7s}")
    for name, backend_fn, bare_name, bare_fn, crops_per_run, target in rows:
        rate, bare_rate = paired_rates(backend_fn, bare_fn, crops_per_run, args.repeats)
        goal = f">= {target}" if target else ""
        print(f"{name:26s} {rate:9.0f}   {bare_name:26s} {bare_rate:9.0f} {rate / bare_rate:6.2f} {goal:>7s}",
              flush=True)

    print(f"\nfilter choice (zstd level 3, decode = decompress + inverse), {min(n, 2048)} of these crops:")
    print_filters(filter_table(crops[:2048], args.repeats))


def print_filters(rows) -> None:
    print(f"{'filter':22s} {'raw/stored':>10s} {'decode crops/s':>15s}")
    for name, ratio, rate in rows:
        print(f"{name:22s} {ratio:10.2f} {rate:15.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=50_000)
    parser.add_argument("--unique", type=int, default=8192, help="distinct patches among the crops")
    parser.add_argument("--stream-tars", type=int, default=4, help="tars (2048 crops each) to stream")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/instbank-bench-read"))
    parser.add_argument("--real-bank", type=Path, help="also run the filter table on this bank's crops")
    parser.add_argument("--keep", action="store_true", help="keep the banks under --dir")
    args = parser.parse_args()

    images = load_images()
    import webdataset  # noqa: F401  (imports torch: seconds, kept out of the write timing)
    try:
        for size in args.sizes:
            run_size(size, args, images)
        if args.real_bank:
            real = open_bank(args.real_bank)
            crops = real.get_many(np.arange(len(real)))
            print(f"\nfilter choice on {args.real_bank} ({len(real)} real crops, S={real.crop_size[0]}):")
            print_filters(filter_table(crops, args.repeats))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
