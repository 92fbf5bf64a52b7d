"""The build pipeline: images -> crops -> shards -> manifest (written last).

The image list is cut into contiguous *shards* (chunks of images). Each shard is built on its own
by ``instbank.engines.shard.build_shard``, in an engine chosen from ``instbank.engines.ENGINES``
(a local process pool, or Ray Data), or again after a kill (``resume``: finished shards whose hash
checks out are kept). The manifest is assembled from the results the engine yields, in shard
order; the content hash depends only on the crops and their order, so it is the same for any
worker count, engine or shard size.

The bank directory is owned by a ``BankWriter`` for the whole build: its lock is taken before
anything is removed or written. ``build.json`` (written first, beside ``manifest.json``) records
the shard plan and the config, so that a resumed build cuts the same shards.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instbank.engines import get_engine
from instbank.engines.shard import POLICY_REASONS, BuildConfig, count_skips
from instbank.errors import BuildError, BuildInterrupted
from instbank.storage.base import PLAN_FILE, write_json_atomic
from instbank.storage.writer import BankWriter, ShardResult, shard_dir_name
from instbank.types import Dataset, ProgressFn

__all__ = ["BuildConfig", "BuildReport", "build_bank", "default_shard_images", "shard_plan"]

@dataclass
class BuildReport:
    out: Path
    version: str
    num_images: int
    num_crops: int
    num_shards: int
    reused_shards: int
    skipped: Counter
    skip_examples: dict[str, list[str]]
    seconds: float
    notes: list[str]

    @property
    def crops_per_s(self) -> float:
        return self.num_crops / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# planning


def default_shard_images(num_images: int, workers: int) -> int:
    """About 4 shards per worker (load balance), 16..512 images each (bounded part-file size)."""
    return max(16, min(512, math.ceil(num_images / (4 * max(workers, 1)))))


def shard_plan(num_images: int, shard_images: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` image ranges, one per shard."""
    return [(lo, min(lo + shard_images, num_images)) for lo in range(0, num_images, shard_images)] or [(0, 0)]


def _dataset_fingerprint(dataset: Dataset) -> dict[str, Any]:
    return {"source": dataset.source, "kind": dataset.kind, "num_images": len(dataset.images),
            "num_instances": dataset.num_instances, "num_classes": len(dataset.classes)}


def _read_plan(out: Path) -> dict | None:
    try:
        return json.loads((out / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _differences(old: dict, new: dict, prefix: str) -> list[str]:
    """``"size was 128, now 64"`` for every key whose value differs (nested dicts by dotted key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return out


def _make_plan(dataset: Dataset, out: Path, config: BuildConfig, workers: int, resume: bool) -> dict:
    fingerprint = _dataset_fingerprint(dataset)
    if resume:
        old = _read_plan(out)
        if old is not None:
            changed = _differences(old.get("config", {}), config.to_json(), "") + _differences(old.get("dataset", {}), fingerprint, "input ")
            if changed:
                raise BuildError(f"{out / PLAN_FILE}: --resume with another input or configuration than the interrupted build: "
                                 + "; ".join(changed) + " (rerun with the same options, or without --resume to start over)")
            return old
    shard_images = config.shard_images or default_shard_images(len(dataset.images), workers)
    plan = {"config": config.to_json(), "dataset": fingerprint, "shards": shard_plan(len(dataset.images), shard_images)}
    write_json_atomic(out / PLAN_FILE, plan)
    return plan


def _refuse_faults(skipped: Counter, source: str) -> None:
    faults = {k: v for k, v in skipped.items() if k not in POLICY_REASONS and v}
    if faults:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(faults.items()))
        raise BuildError(f"{source}: --strict and {sum(faults.values())} fault(s) in the data ({detail}); no manifest written")


# ---------------------------------------------------------------------------------------------
# the whole build


def build_bank(
    dataset: Dataset,
    out: str | os.PathLike,
    config: BuildConfig = BuildConfig(),
    *,
    workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    engine: str = "local",
    engine_options: dict | None = None,
    progress: ProgressFn | None = None,
) -> BuildReport:
    """Build a bank from ``dataset`` into ``out``; see the module docstring.

    ``workers``: processes for the local engine (default: all cores). ``resume``: keep finished
    shards of an interrupted build with the same plan. ``strict``: the first fault of the data (a
    skip not in ``POLICY_REASONS``: a broken, missing or corrupt file or annotation) is an error
    (``BuildError``) and no manifest is written; faults found while reading fail before anything is
    written. ``engine``: a key of ``instbank.engines.ENGINES``, with its ``engine_options``.
    """
    run = get_engine(engine)  # unknown engine: ValueError before anything is written
    if strict:
        _refuse_faults(dataset.skipped, dataset.source)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    with BankWriter(out, config.backend, config.size, config.backend_options, mode=mode) as bank:
        plan = _make_plan(dataset, bank.path, config, workers, resume)
        ranges = [tuple(r) for r in plan["shards"]]
        results: list[ShardResult | None] = [bank.finished(shard_dir_name(i)) if resume else None for i in range(len(ranges))]
        todo = [i for i, r in enumerate(results) if r is None]
        reused_images = sum(hi - lo for (lo, hi), r in zip(ranges, results) if r is not None)
        if progress and reused_images:
            progress(reused_images, 0)
        jobs = [(dataset.images[ranges[i][0] : ranges[i][1]], bank.shard_dir(shard_dir_name(i))) for i in todo]
        try:
            with closing(run(jobs, config, workers, progress, strict=strict, **(engine_options or {}))) as shards:
                for i, result in zip(todo, shards):
                    results[i] = result
        except KeyboardInterrupt as e:
            raise _interrupted(e, bank, ranges) from None
        return _finish(dataset, bank, config, results, len(ranges) - len(todo), strict, t0, workers)


def _interrupted(e: KeyboardInterrupt, bank: BankWriter, ranges: list) -> BuildInterrupted:
    """How far the build got (finished shards on disk, which ``--resume`` keeps), as the
    ``BuildInterrupted`` the CLI prints in one line."""
    signum = getattr(e, "signum", signal.SIGINT)
    finished = [bank.finished(shard_dir_name(i)) for i in range(len(ranges))]
    images = sum(hi - lo for (lo, hi), r in zip(ranges, finished) if r is not None)
    total = sum(hi - lo for lo, hi in ranges)
    done = [r for r in finished if r is not None]
    return BuildInterrupted(
        f"{bank.path}: interrupted by {signal.Signals(signum).name} with {len(done)} of {len(ranges)} shards finished "
        f"({images} of {total} images, {sum(r.num_crops for r in done)} crops), kept on disk",
        signum, resumable=True,
    )


def _finish(dataset: Dataset, bank: BankWriter, config: BuildConfig, results: list[ShardResult], reused: int,
            strict: bool, t0: float, workers: int) -> BuildReport:
    shard_skips, examples = count_skips(results)
    skipped = Counter(dataset.skipped) + shard_skips
    rotated = sum(r.info.get("exif_rotated", 0) for r in results)
    size_mismatch = sum(r.info.get("size_mismatch", 0) for r in results)
    notes = []  # what the build itself found; the reader's notes are in dataset.notes
    if rotated:
        notes.append(f"{rotated} image(s) carried an EXIF orientation; pixels were {'rotated to follow it' if config.exif == 'follow' else 'kept as stored (--exif ignore)'}")
    if size_mismatch:
        notes.append(f"{size_mismatch} image file(s) differ in size from their annotation's width/height; "
                     "the file was followed (see skip_examples['size_mismatch'])")
    if strict:  # the shards stop at their first fault; this catches what a resumed shard recorded
        _refuse_faults(skipped, dataset.source)
    build_info = {**config.to_json(), "source": dataset.source, "kind": dataset.kind, "workers": workers,
                  "num_images": len(dataset.images), "skip_examples": examples, "notes": dataset.notes + notes}
    manifest = bank.commit(dataset.classes, results, build_info, skipped)
    return BuildReport(bank.path, manifest["version"], len(dataset.images), manifest["num_crops"], len(results), reused,
                       skipped, examples, time.perf_counter() - t0, notes)
