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

import dataclasses
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
from instbank.crops import MISSING_IMAGE
from instbank.engines.shard import POLICY_REASONS, BuildConfig, strict_fault
from instbank.errors import BuildError, BuildInterrupted
from instbank.storage.base import FORMAT_VERSION, PLAN_FILE
from instbank.storage.writer import BankWriter, ShardResult, shard_dir_name
from instbank.types import Dataset, ProgressFn, SkipLog

__all__ = ["BuildConfig", "BuildReport", "admit_images", "build_bank", "default_shard_images", "shard_plan"]

#: An image whose path resolves outside the images root (``..``, an absolute path, a symlink).
OUTSIDE_ROOT = "outside_root"

@dataclass
class BuildReport:
    """What a build did. ``skipped``: every skip by reason (images and instances); of those,
    ``skipped_images`` are images dropped whole, with ``lost_instances`` instances on them;
    ``skip_examples``: up to 5 per reason (``SkipLog.example`` objects)."""

    out: Path
    version: str
    num_images: int
    num_crops: int
    num_shards: int
    reused_shards: int
    skipped: Counter
    skip_examples: dict[str, list[dict[str, Any]]]
    seconds: float
    notes: list[str]
    skipped_images: Counter
    lost_instances: Counter

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
    # The format version too: shards of an older format (another digest) must not be resumed into
    # a bank of this one.
    return {"source": dataset.source, "kind": dataset.kind, "num_images": len(dataset.images),
            "num_instances": dataset.num_instances, "num_classes": len(dataset.classes), "format_version": FORMAT_VERSION,
            **({"keypoints": dataset.keypoint_spec.to_json()} if dataset.keypoint_spec is not None else {})}


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


def _make_plan(dataset: Dataset, bank: BankWriter, config: BuildConfig, workers: int, resume: bool) -> dict:
    fingerprint = _dataset_fingerprint(dataset)
    if resume:
        old = bank.read_plan()
        if old is not None:
            changed = _differences(old.get("config", {}), config.to_json(), "") + _differences(old.get("dataset", {}), fingerprint, "input ")
            if changed:
                raise BuildError(f"{bank.path / PLAN_FILE}: --resume with another input or configuration than the interrupted build: "
                                 + "; ".join(changed) + " (rerun with the same options, or without --resume to start over)")
            return old
    shard_images = config.shard_images or default_shard_images(len(dataset.images), workers)
    plan = {"config": config.to_json(), "dataset": fingerprint, "shards": shard_plan(len(dataset.images), shard_images)}
    bank.write_plan(plan)
    return plan


def _refuse_faults(skipped: Counter, source: str) -> None:
    faults = {k: v for k, v in skipped.items() if k not in POLICY_REASONS and v}
    if faults:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(faults.items()))
        raise BuildError(f"{source}: --strict and {sum(faults.values())} fault(s) in the data ({detail}); no manifest written")


# ---------------------------------------------------------------------------------------------
# before anything is written: where the images are


def admit_images(dataset: Dataset, max_missing: float, allow_outside_root: bool, strict: bool) -> Dataset:
    """The dataset without images whose path resolves outside ``dataset.images_root`` (``..``,
    absolute paths, symlinks: counted as ``outside_root``, their instances as lost), unless
    ``allow_outside_root``; ``BuildError`` naming the folder and an example when more than
    ``max_missing`` of the images are missing (a wrong ``--images`` must not build an empty bank),
    or, with ``strict``, when any is. One ``stat`` per image (and a ``realpath``): ~1 s per 100k."""
    images, outside = list(dataset.images), SkipLog()
    lost = 0
    if dataset.images_root is not None and not allow_outside_root:
        root = os.path.realpath(dataset.images_root)
        images = []
        for image in dataset.images:
            resolved = os.path.realpath(image.path)
            if resolved == root or resolved.startswith(root + os.sep):
                images.append(image)
            else:
                outside.add(OUTSIDE_ROOT, image.path, image.image_id, detail=f"resolves to {resolved}, outside {root}")
                lost += len(image.instances)
        if strict and outside.counts:
            example = outside.examples[OUTSIDE_ROOT][0]
            raise strict_fault(OUTSIDE_ROOT, f"{example['file']} ({example['detail']})")
    missing = [image.path for image in images if not os.path.exists(image.path)]
    if missing and strict:
        raise strict_fault(MISSING_IMAGE, f"{missing[0]} ({len(missing)} of {len(images)} images are missing)")
    if len(missing) > max_missing * len(images):
        where = dataset.images_root or os.path.dirname(missing[0])
        raise BuildError(f"{where}: {len(missing)} of {len(images)} images are missing, e.g. {missing[0]}; "
                         f"is the images folder right? (--max-missing-images allows {max_missing:.0%})")
    if not outside.counts:
        return dataset
    examples = {**dataset.skip_examples, **outside.examples}
    return dataclasses.replace(dataset, images=images, skipped=dataset.skipped + outside.counts,
                               skip_examples=examples, lost_instances=Counter({OUTSIDE_ROOT: lost}))


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
    max_missing: float = 0.5,
    allow_outside_root: bool = False,
) -> BuildReport:
    """Build a bank from ``dataset`` into ``out``; see the module docstring.

    ``workers``: processes for the local engine (default: all cores). ``resume``: keep finished
    shards of an interrupted build with the same plan. ``strict``: the first fault of the data (a
    skip not in ``POLICY_REASONS``: a broken, missing or corrupt file or annotation) is an error
    (``BuildError``) and no manifest is written; faults found while reading fail before anything is
    written. ``engine``: a key of ``instbank.engines.ENGINES``, with its ``engine_options``.
    ``max_missing``, ``allow_outside_root``: see ``admit_images``.
    """
    run = get_engine(engine)  # unknown engine: ValueError before anything is written
    if not 0 <= max_missing <= 1:
        raise ValueError(f"max_missing is a fraction of the images, in [0, 1]; got {max_missing!r}")
    if strict:
        _refuse_faults(dataset.skipped, dataset.source)
    dataset = admit_images(dataset, max_missing, allow_outside_root, strict)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    with BankWriter(out, config.backend, config.size, config.backend_options, mode=mode) as bank:
        plan = _make_plan(dataset, bank, config, workers, resume)
        ranges = [tuple(r) for r in plan["shards"]]
        names = [shard_dir_name(i) for i in range(len(ranges))]
        results: list[ShardResult | None] = bank.finished_shards(names) if resume else [None] * len(ranges)
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
    finished = bank.finished_shards([shard_dir_name(i) for i in range(len(ranges))])
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
    log = SkipLog()
    log.update(dataset.skipped, dataset.skip_examples)
    skipped_images = Counter({k: v for k, v in dataset.skipped.items() if k in dataset.lost_instances})
    lost = Counter(dataset.lost_instances)
    for r in results:
        log.update(r.info["skipped"], r.info.get("skip_examples", {}))
        skipped_images.update(r.info.get("skipped_images", {}))
        lost.update(r.info.get("lost_instances", {}))
    rotated = sum(r.info.get("exif_rotated", 0) for r in results)
    size_mismatch = sum(r.info.get("size_mismatch", 0) for r in results)
    reduced = sum(r.info.get("decoded_reduced", 0) for r in results)
    notes = []  # what the build itself found; the reader's notes are in dataset.notes
    if reduced:
        notes.append(f"{reduced} of {len(dataset.images)} image(s) decoded at 1/2, 1/4 or 1/8 scale in the DCT domain "
                     "(every crop of theirs shrinks at least that much)")
    if rotated:
        notes.append(f"{rotated} image(s) carried an EXIF orientation; pixels were {'rotated to follow it' if config.exif == 'follow' else 'kept as stored (--exif ignore)'}")
    if size_mismatch:
        notes.append(f"{size_mismatch} image file(s) differ in size from their annotation's width/height; "
                     "the file was followed (see skip_examples['size_mismatch'])")
    if strict:  # the shards stop at their first fault; this catches what a resumed shard recorded
        _refuse_faults(log.counts, dataset.source)
    num_images = len(dataset.images) + sum(dataset.skipped[k] for k in dataset.lost_instances)  # as read
    build_info = {**config.to_json(), "source": dataset.source, "kind": dataset.kind, "workers": workers,
                  "num_images": num_images, "skip_examples": log.examples,
                  "skipped_images": dict(sorted(skipped_images.items())), "lost_instances": dict(sorted(lost.items())),
                  "notes": dataset.notes + notes}
    manifest = bank.commit(dataset.classes, results, build_info, log.counts, dataset.keypoint_spec)
    return BuildReport(bank.path, manifest["version"], num_images, manifest["num_crops"], len(results), reused,
                       log.counts, log.examples, time.perf_counter() - t0, notes, skipped_images, lost)
