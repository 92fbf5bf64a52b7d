"""WebDataset bank read from a local S3 server (moto, a subprocess on 127.0.0.1) against the same
bank on local disk: ``stream()`` (each tar read once, front to back) and random ``get_many``
(one range request per crop), crops/s.

    .venv/bin/python benchmarks/remote_read.py [--crops 8192] [--size 128] [--tar-crops 2048]
        [--batch 64] [--batches 2] [--repeats 3] [--dir /tmp/instbank-bench-remote]

Content: ``--crops`` realistic crops (image patches of the shipped sample, letterboxed, alpha
disks: read_throughput.py's) written as a WebDataset bank (zstd) on disk, 4 shards, tars cut at
``--tar-crops`` samples, then converted to ``s3://bench/bank`` on the server (the upload rate is
printed too). Each row runs the S3 side and the disk side alternately, one untimed run each
first, median of ``--repeats``; the ratio is S3 / disk. Both sides read in this one process.

What the S3 side measures: instbank's reader over s3fs/botocore over HTTP on loopback, served by
moto, a Python server (one request at a time per connection, in-memory objects). A real object
store has 10-50 ms to the first byte per request, far more aggregate bandwidth, and is reached
over a network: the streaming figure is an upper bound of the client's own cost per crop, the
random-access figure a lower bound of what request latency costs (see docs/scale-out.md).

Last, the requests a build makes: the shipped COCO sample built to the server (one worker,
``--shard-images 2``: 4 shards) per backend, every s3fs call counted by operation (s3fs logs each
as ``CALL: <operation>``), with the bank's bytes; docs/scale-out.md scales them to SA-1B.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from read_throughput import load_images, realistic_crops  # noqa: E402
from test_object_storage import moto_server, s3_environment  # noqa: E402

from instbank.storage import open_bank  # noqa: E402
from instbank.storage.base import crop_digests  # noqa: E402
from instbank.storage.convert import convert_bank  # noqa: E402
from instbank.storage.remote import bytes_stored  # noqa: E402
from instbank.storage.url import RemotePath  # noqa: E402
from instbank.storage.writer import write_bank  # noqa: E402
from instbank.testing import default_class_ids, synthetic_meta  # noqa: E402
from instbank.types import ClassInfo  # noqa: E402

NUM_SHARDS = 4


def make_bank(path: Path, n: int, size: int, tar_crops: int) -> None:
    crops = realistic_crops(n, size, load_images())
    meta = synthetic_meta(np.arange(n), default_class_ids(n, 20), size)
    digests = crop_digests(crops, meta)
    bounds = np.linspace(0, n, NUM_SHARDS + 1).astype(int)
    shards = ([(crops[lo:hi], meta[lo:hi], digests[lo:hi])] for lo, hi in zip(bounds[:-1], bounds[1:]))
    classes = [ClassInfo(c, c + 1, f"class{c}") for c in range(20)]
    write_bank(path, "webdataset", size, classes, shards, options={"maxcount": tar_crops}, overwrite=True)


def stream_all(bank) -> int:
    return sum(1 for _ in bank.stream())


def random_reads(bank, batches: list[np.ndarray]) -> int:
    for idx in batches:
        bank.get_many(idx)
    return sum(len(b) for b in batches)


def timed(fn) -> float:
    """crops/s of one call of ``fn`` (which returns the number of crops it read)."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def alternate(s3_fn, disk_fn, repeats: int) -> tuple[float, float]:
    s3_fn(), disk_fn()  # untimed: connections, page cache, imports
    s3, disk = [], []
    for _ in range(repeats):
        s3.append(timed(s3_fn))
        disk.append(timed(disk_fn))
    return statistics.median(s3), statistics.median(disk)


def count_requests(url: str) -> None:
    """Requests of a build of the shipped sample to ``url`` per backend, by operation."""
    from conftest import SAMPLE_COCO

    from instbank.build import BuildConfig, build_bank
    from instbank.formats.coco import read_coco

    calls: Counter = Counter()

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("CALL:"):
                calls[record.args[0]] += 1

    logger = logging.getLogger("s3fs")
    handler = Count()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    dataset = read_coco(SAMPLE_COCO)
    print("\n| backend, S=128, 8 images, 4 shards | bytes | requests by operation (whole build) |")
    print("|---|---:|---|")
    for backend in ("memmap", "lmdb", "webdataset"):
        calls.clear()
        out = f"{url}/{backend}"
        build_bank(dataset, out, BuildConfig(size=128, backend=backend, shard_images=2), workers=1)
        listed = ", ".join(f"{op} {n}" for op, n in sorted(calls.items())) + f" (total {sum(calls.values())})"
        print(f"| {backend} | {bytes_stored(RemotePath(out)):,} | {listed} |")  # after: du lists too
    logger.removeHandler(handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=8192)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--tar-crops", type=int, default=2048)
    # Few random reads: moto answers a range request in ~7 ms on a 1 MB object and ~50 ms on a
    # 50 MB one (it copies the whole object), one at a time.
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/instbank-bench-remote"))
    args = ap.parse_args()

    local = args.dir / "bank"
    make_bank(local, args.crops, args.size, args.tar_crops)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with moto_server() as endpoint:
        os.environ.update(s3_environment(endpoint))
        import fsspec

        fsspec.filesystem("s3").mkdir("bench")
        t0 = time.perf_counter()
        convert_bank(local, "s3://bench/bank")
        upload = args.crops / (time.perf_counter() - t0)
        disk, s3 = open_bank(local), open_bank("s3://bench/bank")
        assert s3.version == disk.version
        mb = sum(f.stat().st_size for f in local.rglob("*.tar")) / 1e6
        print(f"{args.crops} crops, S={args.size}, {mb:.1f} MB of tars in {len(disk.tar_paths())} tars; "
              f"convert disk -> s3 (upload): {upload:,.0f} crops/s")
        rows = [("stream()", *alternate(lambda: stream_all(s3), lambda: stream_all(disk), args.repeats))]
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, args.crops, args.batch) for _ in range(args.batches)]
        rows.append((f"get_many({args.batch}) random", *alternate(lambda: random_reads(s3, batches),
                                                                   lambda: random_reads(disk, batches), args.repeats)))
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
        print("| read | S3 (moto, loopback) crops/s | local disk crops/s | S3 / disk |")
        print("|---|---:|---:|---:|")
        for name, s3_rate, disk_rate in rows:
            print(f"| {name} | {s3_rate:,.0f} | {disk_rate:,.0f} | {s3_rate / disk_rate:.2f} |")
        count_requests("s3://bench")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
