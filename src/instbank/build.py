"""The build pipeline: images -> crops -> shards -> manifest (written last).

The image list is cut into contiguous *shards* (chunks of images). ``build_shard`` turns one chunk
into its own part files (a ``ShardWriter``), streaming: memory is one image and its crops, plus
~100 bytes of index per crop. Shards are independent, so the same function runs in a local process
pool (``engine="local"``), on Ray Data (``instbank.engines.ray``), or again after a kill
(``resume``: finished shards whose hash checks out are kept). The manifest is assembled from the
shard manifests in order; the content hash depends only on the crops and their order, so it is the
same for any worker count, engine or shard size.

``build.json`` (written first, beside ``manifest.json``) records the shard plan and the config, so
that a resumed build cuts the same shards.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import cv2

from instbank.crops import CropFilters, ImageSkip, cut_image, decode_image
from instbank.errors import BuildError
from instbank.storage.base import (
    SHARDS_DIR,
    ShardWriter,
    assemble_manifest,
    prepare_output,
    read_shard_info,
    shard_dir_name,
    write_json_atomic,
)
from instbank.types import Dataset, ImageRecord

#: Counted in the report but nothing is dropped: the image is kept with no instances.
KEPT_IMAGE_REASONS = frozenset({"image_without_label", "empty_label_file"})

PLAN_FILE = "build.json"
LOCK_FILE = ".lock"
#: Skip examples kept per reason in the report (enough to find the files, small enough to read).
MAX_EXAMPLES = 5

ProgressFn = Callable[[int, int], None]  # (images done, crops written) increments


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides a build's output (recorded in the manifest's ``build``)."""

    size: int = 128
    backend: str = "memmap"
    backend_options: dict = field(default_factory=dict)
    filters: CropFilters = CropFilters()
    exif: Literal["follow", "ignore"] = "follow"
    shard_images: int | None = None  # images per shard; None: from the image and worker counts

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["filters"] = asdict(self.filters)
        return out


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
# one shard


def build_shard(
    images: Sequence[ImageRecord], shard_dir: str | os.PathLike, config: BuildConfig, progress: ProgressFn | None = None
) -> dict:
    """Decode ``images`` in order, cut their instances, write one shard; returns its ``shard.json``."""
    writer = ShardWriter(Path(shard_dir), config.backend, config.size, config.backend_options)
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    rotated = size_mismatch = 0
    try:
        for record in images:
            try:
                image, orientation = decode_image(record.path, config.exif)
            except ImageSkip as skip:
                skipped[skip.reason] += 1
                examples.setdefault(skip.reason, [])
                if len(examples[skip.reason]) < MAX_EXAMPLES:
                    examples[skip.reason].append(str(skip))
                if progress:
                    progress(1, 0)
                continue
            rotated += orientation != 1
            if record.width and (record.width, record.height) != (image.shape[1], image.shape[0]):
                # The file wins (it is what gets cut); the annotations may be off, so say so.
                size_mismatch += 1
                _example(examples, "size_mismatch", f"{record.path}: file is {image.shape[1]}x{image.shape[0]}, "
                         f"annotations say {record.width}x{record.height}")
            pixels, meta, instance_skips = cut_image(image, record, config.size, config.filters)
            writer.append(pixels, meta)
            skipped.update(instance_skips)
            for reason in instance_skips:
                examples.setdefault(reason, [])
                if len(examples[reason]) < MAX_EXAMPLES:
                    examples[reason].append(f"{record.path} (image id {record.image_id})")
            if progress:
                progress(1, len(pixels))
    except OSError as e:
        writer.abort()
        raise _write_error(e, shard_dir) from None
    except BaseException:
        writer.abort()
        raise
    try:
        return writer.close(skipped, {"num_images": len(images), "skip_examples": examples, "exif_rotated": rotated,
                                       "size_mismatch": size_mismatch})
    except OSError as e:
        raise _write_error(e, shard_dir) from None


def _example(examples: dict[str, list[str]], reason: str, text: str) -> None:
    items = examples.setdefault(reason, [])
    if len(items) < MAX_EXAMPLES:
        items.append(text)


def _write_error(e: OSError, where: str | os.PathLike) -> BuildError:
    name = e.filename or where
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: a file size limit (ulimit -f)
        return BuildError(f"{name}: disk full while writing the bank (no manifest written; free space and rerun with --resume)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BuildError(f"{name}: output is not writable ({e.strerror})")
    return BuildError(f"{name}: write failed ({e.strerror})")


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


class BuildLock:
    """An exclusive ``fcntl`` lock on ``BANK/.lock`` for the duration of a build: a second build
    into the same directory fails at once instead of interleaving files."""

    def __init__(self, bank_dir: Path):
        self.path = Path(bank_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BuildError(f"{self.path.parent}: another build is writing into this directory (locked)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock


def _read_plan(out: Path) -> dict | None:
    try:
        return json.loads((out / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


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
    shards of an interrupted build with the same plan. ``strict``: any skipped instance or image is
    an error (``BuildError``), and no manifest is written.
    """
    from instbank.storage import get_backend

    get_backend(config.backend)  # unknown backend: ValueError before anything is written
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    prepare_output(out, overwrite=overwrite, resume=resume)
    with BuildLock(out):
        plan = _make_plan(dataset, out, config, workers, resume)
        ranges = [tuple(r) for r in plan["shards"]]
        names = [shard_dir_name(i) for i in range(len(ranges))]
        todo, reused = [], 0
        for i, (lo, hi) in enumerate(ranges):
            if resume and read_shard_info(out / SHARDS_DIR / names[i]) is not None:
                reused += 1
                if progress:
                    progress(hi - lo, 0)
            else:
                todo.append(i)
        jobs = [(dataset.images[ranges[i][0] : ranges[i][1]], out / SHARDS_DIR / names[i]) for i in todo]
        run = _engine(engine)
        for _ in run(jobs, config, workers, progress, **(engine_options or {})):
            pass
        return _finish(dataset, out, config, names, ranges, reused, strict, t0, workers)


def _make_plan(dataset: Dataset, out: Path, config: BuildConfig, workers: int, resume: bool) -> dict:
    fingerprint = _dataset_fingerprint(dataset)
    if resume:
        old = _read_plan(out)
        if old is not None:
            if old["config"] != config.to_json() or old["dataset"] != fingerprint:
                raise BuildError(f"{out / PLAN_FILE}: --resume with a different input or configuration than the interrupted build")
            return old
    shard_images = config.shard_images or default_shard_images(len(dataset.images), workers)
    plan = {"config": config.to_json(), "dataset": fingerprint, "shards": shard_plan(len(dataset.images), shard_images)}
    write_json_atomic(out / PLAN_FILE, plan)
    return plan


def _finish(dataset, out, config, names, ranges, reused, strict, t0, workers) -> BuildReport:
    skipped: Counter = Counter(dataset.skipped)
    examples: dict[str, list[str]] = {}
    rotated = size_mismatch = 0
    for name in names:
        info = json.loads((out / SHARDS_DIR / name / "shard.json").read_text())
        skipped.update(info["skipped"])
        rotated += info.get("exif_rotated", 0)
        size_mismatch += info.get("size_mismatch", 0)
        for reason, items in info.get("skip_examples", {}).items():
            examples.setdefault(reason, []).extend(items[: MAX_EXAMPLES - len(examples.get(reason, []))])
    notes = []  # what the build itself found; the reader's notes are in dataset.notes
    if rotated:
        notes.append(f"{rotated} image(s) carried an EXIF orientation; pixels were {'rotated to follow it' if config.exif == 'follow' else 'kept as stored (--exif ignore)'}")
    if size_mismatch:
        notes.append(f"{size_mismatch} image file(s) differ in size from their annotation's width/height; "
                     "the file was followed (see skip_examples['size_mismatch'])")
    # Background images (no label file, or an empty one) are kept, not lost: not a --strict failure.
    lost = {k: v for k, v in skipped.items() if k not in KEPT_IMAGE_REASONS}
    if strict and lost:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(lost.items()))
        raise BuildError(f"{dataset.source}: --strict and {sum(lost.values())} item(s) were skipped ({detail}); no manifest written")
    build_info = {**config.to_json(), "source": dataset.source, "kind": dataset.kind, "workers": workers,
                  "num_images": len(dataset.images), "skip_examples": examples, "notes": dataset.notes + notes}
    manifest = assemble_manifest(out, config.backend, config.size, dataset.classes, names, build_info, skipped)
    return BuildReport(out, manifest["version"], len(dataset.images), manifest["num_crops"], len(names), reused,
                       skipped, examples, time.perf_counter() - t0, notes)


# ---------------------------------------------------------------------------------------------
# engines


def _engine(name: str) -> Callable[..., Iterator[dict]]:
    if name == "local":
        return run_local
    if name == "ray":
        from instbank.engines.ray import run_ray

        return run_ray
    raise ValueError(f"unknown engine {name!r}; valid engines: local, ray")


def _shard_job(args) -> dict:
    images, shard_dir, config = args
    return build_shard(images, shard_dir, config, _worker_progress)


_progress_queue = None


def _init_worker(queue, fresh_interpreter: bool) -> None:
    global _progress_queue
    _progress_queue = queue
    if fresh_interpreter:  # spawn: this process's OpenCV has no thread pool yet, safe to configure
        cv2.setNumThreads(1)


@contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV runs resize/cvtColor on its own pool of ``cv2.getNumThreads()`` (= cores) threads;
    next to one process per core those threads only oversubscribe the cores. Set it to one in
    this process *before* forking the workers: ``cv2.setNumThreads`` in a forked child whose parent
    had started the pool deadlocks (the child waits on pool threads it does not have).
    Restored afterwards."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _worker_progress(images: int, crops: int) -> None:
    _progress_queue.put((images, crops))


def run_local(jobs, config: BuildConfig, workers: int, progress: ProgressFn | None = None) -> Iterator[dict]:
    """Run shard jobs on this machine: in-process for one worker, else a process pool (fork on
    Linux: workers inherit the image list without pickling it) with single-threaded OpenCV.
    Yields shard infos in order."""
    if workers <= 1 or len(jobs) <= 1:
        for images, shard_dir in jobs:
            yield build_shard(images, shard_dir, config, progress)
        return
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ray = sys.modules.get("ray")
    if method == "fork" and ray is not None and getattr(ray, "is_initialized", lambda: False)():
        # Forking a process that runs a Ray driver has been seen to leave later Ray tasks unstarted
        # (docs/scale-out.md); forkserver children start from a clean process instead.
        method = "forkserver"
    ctx = mp.get_context(method)
    q = ctx.Queue()
    with opencv_single_threaded(), ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=(q, method != "fork")
    ) as pool:
        futures = [pool.submit(_shard_job, (images, shard_dir, config)) for images, shard_dir in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, progress, queue_mod.Empty)
        time.sleep(0.05)  # the queue's feeder thread may still be flushing the last updates
        _drain(q, progress, queue_mod.Empty)
    for f in futures:
        yield f.result()


def _drain(q, progress: ProgressFn | None, empty: type[Exception]) -> None:
    while progress:
        try:
            progress(*q.get_nowait())
        except empty:
            return
