"""Per-step staging cost: BankStaging from a memmap bank vs a bare numpy gather of the same crops.

    .venv/bin/python benchmarks/staging.py [--crops 20480] [--steps 40] [--repeats 5]

One step is B=64 targets x K=8 crops of S=128 (33.5 MB of RGBA). Both sides get the same indices:
those of ``BankSampler(bank, 64, 8, "class_balanced", seed=0)``.

- ``bare gather, RAM array``: ``ram[idx.ravel()]`` (a new array per step, as a loader that hands
  batches out must have) from a copy of the bank's pixels in anonymous memory.
- ``bare gather, bank's memmap``: the same from the bank's own mapped ``pixels.u8`` (page cache).
  The "vs" columns are throughput ratios against these two (higher is faster), on CPU time of
  this process (``time.process_time``: waiting for a core, on a shared machine, does not count);
  the DataLoader rows work in other processes and are compared on wall time.
- ``bank.get_many, reused buffer``: the backend's read alone, into one buffer (not a usable
  loader: every batch would overwrite the last).
- ``BankStaging, in process``: iterate the dataset in this process: draw indices, one
  ``get_many`` into a recycled buffer, geometry from the meta table, ``BankBatch``.
- ``numpy_batches``: the same without torch (a new array per step).
- ``BankStaging, take(mode=clip)``: the same over ``ClipTakeReader`` below: the memmap reader
  with a one-line change proposed for ``storage/memmap_bank.py``.
- ``stage, fresh torch.empty/step`` and ``stage, fresh shared mem/step``: ``BankStaging.stage``
  of the same indices into a new buffer every step instead of a recycled one: plain memory (what
  the main process would pay without the recycling), shared memory (what a worker pays).
- ``DataLoader, N workers``: ``DataLoader(BankStaging(...), batch_size=None, num_workers=N)``
  (fork, persistent workers warmed by one epoch: start-up excluded); workers stage into fresh
  shared memory, which the main process receives without a copy (and does not read here).

A second table compares drawing the indices: the sampler's two-stage draw (class from a CDF, then a
crop of it) vs ``Generator.choice(pool, p=per-crop probabilities)``, on this bank and on an
LVIS-sized index (1.2M crops, 1203 long-tailed classes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from instbank.errors import BankError
from instbank.sampling import BankSampler, BankStaging
from instbank.sampling import _shared_empty  # what a DataLoader worker stages into, for one row
from instbank.storage import memmap_bank, open_bank
from instbank.testing import write_synthetic_bank

B, K, S = 64, 8, 128


def bench_bank(path: Path, n: int, size: int, num_classes: int):
    """Open the synthetic bank at ``path``, writing it first unless it already has this shape."""
    try:
        bank = open_bank(path)
        if len(bank) == n and bank.crop_size == (size, size) and len(bank.class_names) == num_classes:
            return bank
    except BankError:  # not there yet, or a leftover unfinished directory: write it
        pass
    print(f"writing {n} crops of {size}x{size} to {path} ...", flush=True)
    return write_synthetic_bank(path, n, size=size, num_classes=num_classes, chunk=1024)


def timed(fn, steps: int):
    """A run of ``fn(steps)``: returns its mean (wall, CPU of this process) seconds per step."""

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(steps)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    return run


def interleaved(cases: dict[str, object], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per step of every case, ``repeats`` runs each, the cases taking turns
    so that load from other processes on the machine falls on every side alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(run())
    return times


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def loader_run(bank, num_workers: int, steps: int):
    """One epoch of ``steps`` batches per run through a DataLoader over BankStaging. Workers are
    persistent and warmed by one epoch first: a fresh worker maps the bank anew, and its first
    touches of each page fault, a start-up cost that a training run amortises."""
    import torch

    sampler = BankSampler(bank, B, K, "class_balanced", seed=0, steps_per_epoch=steps)
    loader = torch.utils.data.DataLoader(
        BankStaging(bank, sampler, pin_memory=False), batch_size=None, num_workers=num_workers,
        multiprocessing_context="fork" if num_workers else None, persistent_workers=num_workers > 0,
    )
    for _ in loader:
        pass

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        count = sum(1 for _ in loader)
        wall, cpu = (time.perf_counter() - t0) / count, (time.process_time() - c0) / count
        return wall, cpu if num_workers == 0 else float("nan")  # with workers, the work is elsewhere

    return run


def fresh_torch(shape):
    import torch

    return torch.empty(shape, dtype=torch.uint8)


class ClipTakeReader(memmap_bank.Reader):
    """The memmap reader with ``np.take(..., mode="clip")``: what-if row for a one-line backend
    change. With ``out=`` and the default ``mode="raise"`` numpy buffers the whole output and
    copies it again; the reader has already range-checked the indices (``_normalize``)."""

    def _read(self, handle: np.ndarray, local: np.ndarray, out: np.ndarray) -> None:
        np.take(handle, local, axis=0, out=out, mode="clip")


def bank_pixels_memmap(bank) -> np.ndarray:
    """The bank's own pixel array: its one shard's ``pixels.u8``, mapped (page cache, no copy)."""
    (shard_dir, shard, _), = bank.iter_shards()
    payload = shard["payload"]
    return np.memmap(shard_dir / payload["file"], np.uint8, "r", shape=tuple(payload["shape"]))


def staging_cases(bank, steps: int) -> dict[str, object]:
    sampler = BankSampler(bank, B, K, "class_balanced", seed=0, steps_per_epoch=steps)
    indices = list(sampler)
    mapped = bank_pixels_memmap(bank)
    ram = np.array(mapped)  # the same crops in anonymous memory (also warms the page cache)
    buf = np.empty((B * K, 4, S, S), np.uint8)

    def bare(array):
        def gather(n):
            for idx in indices[:n]:
                array[idx.ravel()].reshape(B, K, 4, S, S)

        return gather

    def get_many_reused(n):
        for idx in indices[:n]:
            bank.get_many(idx.ravel(), out=buf)

    def staging(n):
        for _ in BankStaging(bank, sampler, pin_memory=False):
            pass

    def numpy_batches(n):
        for _ in sampler.numpy_batches():
            pass

    clip_bank = ClipTakeReader(bank.path)
    staging_in_process = BankStaging(bank, sampler, pin_memory=False)

    def stage_into(alloc):
        def run(n):
            for idx in indices[:n]:
                staging_in_process.stage(idx, alloc)

        return run

    def staging_clip(n):
        for _ in BankStaging(clip_bank, sampler, pin_memory=False):
            pass

    return {
        "bare gather, RAM array": timed(bare(ram), steps),
        "bare gather, bank's memmap": timed(bare(mapped), steps),
        "bank.get_many, reused buffer": timed(get_many_reused, steps),
        "BankStaging, in process": timed(staging, steps),
        "numpy_batches": timed(numpy_batches, steps),
        "BankStaging, take(mode=clip)": timed(staging_clip, steps),
        "stage, fresh torch.empty/step": timed(stage_into(fresh_torch), steps),
        "stage, fresh shared mem/step": timed(stage_into(_shared_empty), steps),
        "DataLoader, 0 workers": loader_run(bank, 0, steps),
        "DataLoader, 2 workers (fork)": loader_run(bank, 2, steps),
    }


def draw_cases(label: str, bank) -> dict[str, object]:
    sampler = BankSampler(bank, B, K, "class_balanced", seed=0)
    cids = bank.crop_class_ids  # no filters: every crop is in the pool
    counts = np.maximum(np.bincount(cids, minlength=len(sampler.class_probabilities)), 1)
    per_crop = (sampler.class_probabilities / counts)[cids]
    per_crop /= per_crop.sum()
    pool = np.arange(len(bank))
    rng = np.random.default_rng(0)

    def two_stage(n):
        for _ in range(n):
            sampler.draw(rng, B)

    def choice(n):
        for _ in range(n):
            rng.choice(pool, size=(B, K), p=per_crop)

    return {(label, "sampler"): timed(two_stage, 50), (label, "choice"): timed(choice, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=20480)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/instbank-bench-staging"))
    args = parser.parse_args()

    bank = bench_bank(args.dir / "bank", args.crops, S, 80)
    lvis_index = bench_bank(args.dir / "lvis-index", 1_200_000, 1, 1203)
    step_mb = B * K * 4 * S * S / 1e6

    print(f"\nstaging: B={B} K={K} S={S} ({step_mb:.1f} MB/step), memmap bank of {len(bank)} crops, "
          f"{args.steps} steps/run, {args.repeats} interleaved runs per side")
    times = interleaved(staging_cases(bank, args.steps), args.repeats)
    med = {name: medians(runs) for name, runs in times.items()}
    ram_ref, mapped_ref = med["bare gather, RAM array"], med["bare gather, bank's memmap"]
    print(f"{'side':30s} {'wall ms':>8s} {'CPU ms':>7s} {'GB/s':>6s} {'vs RAM':>7s} {'vs memmap':>9s}  (CPU ratios)")
    for name, (wall, cpu) in med.items():
        ratios = f"{ram_ref[1] / cpu:6.2f}x {mapped_ref[1] / cpu:8.2f}x" if cpu == cpu else f"{'-':>7s} {'-':>9s}"
        print(f"{name:30s} {wall * 1e3:8.2f} {cpu * 1e3:7.2f} {step_mb / 1e3 / wall:6.2f} {ratios}")
    print("wall ratios (workers included): " + ", ".join(
        f"{name}: {ram_ref[0] / wall:.2f}x RAM, {mapped_ref[0] / wall:.2f}x memmap" for name, (wall, _) in med.items()
        if med[name][1] != med[name][1]))

    print(f"\nindex draw, {B}x{K} per step, class_balanced (sampler: distinct rows; choice: i.i.d.), median CPU ms")
    print(f"{'index':28s} {'sampler':>8s} {'choice(p)':>10s} {'speed-up':>9s}")
    labels = {f"{len(bank)} crops, 80 classes": bank, f"{len(lvis_index)} crops, 1203 classes": lvis_index}
    cases = {key: run for label, b in labels.items() for key, run in draw_cases(label, b).items()}
    draws = {key: medians(runs)[1] for key, runs in interleaved(cases, args.repeats).items()}
    for label in labels:
        two_stage, choice = draws[label, "sampler"], draws[label, "choice"]
        print(f"{label:28s} {two_stage * 1e3:8.3f} {choice * 1e3:10.3f} {choice / two_stage:8.1f}x")

if __name__ == "__main__":
    main()
