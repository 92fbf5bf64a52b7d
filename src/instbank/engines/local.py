"""The local engine: shards on this machine, in this process for one worker, else in a process
pool (fork on Linux: workers inherit the image list without pickling it) with single-threaded
OpenCV in each worker."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator, Sequence

import cv2

from instbank.engines.shard import BuildConfig, build_shard, opencv_single_threaded
from instbank.storage.writer import ShardResult
from instbank.types import ImageRecord, ProgressFn

_progress_queue = None


def run(
    jobs: Sequence[tuple[Sequence[ImageRecord], Path]],
    config: BuildConfig,
    workers: int,
    progress: ProgressFn | None = None,
) -> Iterator[ShardResult]:
    """Build the shards ``jobs`` (``(images, shard_dir)`` pairs) with ``workers`` processes;
    yields their results in order."""
    if workers <= 1 or len(jobs) <= 1:
        for images, shard_dir in jobs:
            yield build_shard(images, shard_dir, config, progress)
        return
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
        futures = [pool.submit(_shard_job, images, shard_dir, config) for images, shard_dir in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, progress)
        time.sleep(0.05)  # the queue's feeder thread may still be flushing the last updates
        _drain(q, progress)
    for f in futures:
        yield f.result()


def _init_worker(queue, fresh_interpreter: bool) -> None:
    global _progress_queue
    _progress_queue = queue
    if fresh_interpreter:  # spawn: this process's OpenCV has no thread pool yet, safe to configure
        cv2.setNumThreads(1)


def _shard_job(images, shard_dir, config: BuildConfig) -> ShardResult:
    return build_shard(images, shard_dir, config, _worker_progress)


def _worker_progress(images: int, crops: int) -> None:
    _progress_queue.put((images, crops))


def _drain(q, progress: ProgressFn | None) -> None:
    while progress:
        try:
            progress(*q.get_nowait())
        except queue_mod.Empty:
            return
