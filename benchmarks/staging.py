"""Per-step staging cost: BankStaging from a memmap bank vs a bare numpy gather of the same crops.

    .venv/bin/python benchmarks/staging.py [--crops 20480] [--steps 40] [--repeats 3]

One step is B=64 targets x K=8 crops of S=128 (33.5 MB of RGBA). Both sides get the same indices:
those of ``BankSampler(bank, 64, 8, "class_balanced", seed=0)``.

- ``bare gather``: ``ram[idx.ravel()]`` from the same crops held in one numpy array in RAM (a new
  array per step, as a loader that hands batches out must do). The reference (ratio 1.00).
- ``bare gather, reused buffer``: ``np.take(ram, idx, out=buf)``, the same buffer every step: the
  floor, not a usable loader (every batch overwrites the last one).
- ``BankStaging``: iterate the dataset in this process: draw indices, one ``get_many`` from the
  memmap into a fresh tensor, geometry from the meta table, ``BankBatch``.
- ``numpy_batches``: the same without torch.
- ``DataLoader, N workers``: ``bank_loader(..., num_workers=N)`` (fork), batches/s once the first
  batch is out (worker start-up excluded).

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
from instbank.sampling import BankSampler, BankStaging, bank_loader
from instbank.storage import open_bank
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


def per_step(fn, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per step of ``fn(steps)``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(steps)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def loader_per_step(bank, num_workers: int, steps: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        loader = bank_loader(
            bank, B, K, num_workers=num_workers, multiprocessing_context="fork" if num_workers else None,
            pin_memory=False, weighting="class_balanced", seed=0, steps_per_epoch=steps + 1,
        )
        it = iter(loader)
        next(it)  # workers started and warm
        t0 = time.perf_counter()
        count = sum(1 for _ in it)
        times.append((time.perf_counter() - t0) / count)
    return statistics.median(times)


def staging_table(bank, steps: int, repeats: int) -> list[tuple[str, float]]:
    sampler = BankSampler(bank, B, K, "class_balanced", seed=0, steps_per_epoch=steps)
    indices = list(sampler)
    ram = bank.get_many(np.arange(len(bank)))  # the same crops, in RAM (also warms the page cache)
    buf = np.empty((B * K, 4, S, S), np.uint8)

    def bare(n):
        for idx in indices[:n]:
            ram[idx.ravel()].reshape(B, K, 4, S, S)

    def bare_reused(n):
        for idx in indices[:n]:
            np.take(ram, idx.ravel(), axis=0, out=buf)

    def staging(n):
        for _ in BankStaging(bank, sampler, pin_memory=False):
            pass

    def numpy_batches(n):
        for _ in sampler.numpy_batches():
            pass

    return [
        ("bare gather (reference)", per_step(bare, steps, repeats)),
        ("bare gather, reused buffer", per_step(bare_reused, steps, repeats)),
        ("BankStaging, in process", per_step(staging, steps, repeats)),
        ("numpy_batches", per_step(numpy_batches, steps, repeats)),
        ("DataLoader, 0 workers", loader_per_step(bank, 0, steps, repeats)),
        ("DataLoader, 2 workers (fork)", loader_per_step(bank, 2, steps, repeats)),
    ]


def draw_table(banks: dict[str, object], repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    for label, bank in banks.items():
        sampler = BankSampler(bank, B, K, "class_balanced", seed=0)
        per_crop = np.repeat(sampler.class_probabilities[sampler._active] / sampler._count, sampler._count)
        per_crop /= per_crop.sum()
        rng = np.random.default_rng(0)
        reps = 50

        def two_stage(n):
            for _ in range(n):
                sampler.draw(rng, B)

        def choice(n):
            for _ in range(n):
                rng.choice(sampler._order, size=(B, K), p=per_crop)

        rows.append((label, per_step(two_stage, reps, repeats), per_step(choice, reps, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=20480)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/instbank-bench-staging"))
    args = parser.parse_args()

    bank = bench_bank(args.dir / "bank", args.crops, S, 80)
    lvis_index = bench_bank(args.dir / "lvis-index", 1_200_000, 1, 1203)
    step_mb = B * K * 4 * S * S / 1e6

    print(f"\nstaging: B={B} K={K} S={S} ({step_mb:.1f} MB/step), memmap bank of {len(bank)} crops, "
          f"{args.steps} steps x {args.repeats} repeats (median)")
    print(f"{'side':32s} {'ms/step':>9s} {'GB/s':>7s} {'vs bare':>8s}")
    table = staging_table(bank, args.steps, args.repeats)
    ref = table[0][1]
    for name, sec in table:
        print(f"{name:32s} {sec * 1e3:9.2f} {step_mb / 1e3 / sec:7.2f} {ref / sec:7.2f}x")

    print(f"\nindex draw, {B}x{K} per step, class_balanced (distinct rows for the sampler, i.i.d. for choice)")
    print(f"{'index':28s} {'sampler ms':>10s} {'choice(p) ms':>13s} {'speed-up':>9s}")
    for label, two_stage, choice in draw_table({f"{len(bank)} crops, 80 classes": bank,
                                                f"{len(lvis_index)} crops, 1203 classes": lvis_index}, args.repeats):
        print(f"{label:28s} {two_stage * 1e3:10.3f} {choice * 1e3:13.3f} {choice / two_stage:8.1f}x")


if __name__ == "__main__":
    main()
