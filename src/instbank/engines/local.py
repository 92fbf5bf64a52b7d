"""The local engine: shards on this machine, in this process for one worker, else in a process
pool (fork on Linux: workers inherit the image list without pickling it) with single-threaded
OpenCV in each worker.

Stopping. Workers ignore SIGINT (a Ctrl-C reaches the whole process group: only the main process
should act on it) and take SIGTERM's default action (end, no traceback). When anything ends the
main process's wait (an interrupt, a shard's error) the workers are killed at once and the pool is
left without waiting: ``ProcessPoolExecutor``'s own shutdown waits for running tasks and, after a
``KeyboardInterrupt``, has been seen to wait forever for workers that wait for work. A killed
worker leaves an unfinished shard (no ``shard.json``), which ``--resume`` redoes.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import cv2

from instbank.engines.shard import BuildConfig, build_shard, opencv_single_threaded
from instbank.storage.writer import ShardResult
from instbank.types import ImageRecord, ProgressFn

_progress_queue = None
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(
    jobs: Sequence[tuple[Sequence[ImageRecord], Path]],
    config: BuildConfig,
    workers: int,
    progress: ProgressFn | None = None,
    strict: bool = False,
) -> Iterator[ShardResult]:
    """Build the shards ``jobs`` (``(images, shard_dir)`` pairs) with ``workers`` processes;
    yields their results in order (``strict``: see ``build_shard``)."""
    if workers <= 1 or len(jobs) <= 1:
        for images, shard_dir in jobs:
            yield build_shard(images, shard_dir, config, progress, strict)
        return
    ctx = mp.get_context(_start_method())
    q = ctx.Queue()
    before = set(mp.active_children())
    pool = ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=(q, ctx.get_start_method() != "fork")
    )
    try:
        with opencv_single_threaded():
            with _signals_blocked():  # a fork inherits the mask: no signal lands before _init_worker
                futures = [pool.submit(_shard_job, images, shard_dir, config, strict) for images, shard_dir in jobs]
            _wait_all(futures, q, progress, sum(len(images) for images, _ in jobs))
    except BaseException:
        _stop(pool, before)
        raise
    pool.shutdown(wait=True)
    for f in futures:
        yield f.result()


def _start_method() -> str:
    if "fork" not in mp.get_all_start_methods():
        return "spawn"
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        # Forking a process that runs a Ray driver has been seen to leave later Ray tasks unstarted
        # (docs/scale-out.md); forkserver children start from a clean process instead.
        return "forkserver"
    return "fork"


def _wait_all(futures, q, progress: ProgressFn | None, num_images: int) -> None:
    """Wait for every future, feeding progress; the first error (a shard's) is raised at once.

    A worker's last updates may still sit in its queue's feeder thread when its result arrives, so
    the end is topped up from the results (``num_images`` and each shard's crops) instead of
    waiting for them: a fixed wait here was 50 ms of every parallel build's serial part."""
    seen = [0, 0]

    def count(images: int, crops: int) -> None:
        seen[0] += images
        seen[1] += crops
        progress(images, crops)

    tally = count if progress else None
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        _drain(q, tally)
        for f in done:
            if f.exception() is not None:
                raise f.exception()
    _drain(q, tally)
    if progress:
        images, crops = num_images - seen[0], sum(f.result().num_crops for f in futures) - seen[1]
        if images or crops:
            progress(images, crops)


def _stop(pool: ProcessPoolExecutor, before: set) -> None:
    """Kill this pool's workers and leave the pool; repeated if a second Ctrl-C interrupts it."""
    while True:
        try:
            for process in set(mp.active_children()) - before:
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            return
        except KeyboardInterrupt:
            continue


@contextmanager
def _signals_blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_worker(queue, fresh_interpreter: bool) -> None:
    global _progress_queue
    _progress_queue = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what a Ctrl-C does
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited from the main process
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if fresh_interpreter:  # spawn: this process's OpenCV has no thread pool yet, safe to configure
        cv2.setNumThreads(1)


def _shard_job(images, shard_dir, config: BuildConfig, strict: bool) -> ShardResult:
    return build_shard(images, shard_dir, config, _worker_progress, strict)


def _worker_progress(images: int, crops: int) -> None:
    _progress_queue.put((images, crops))


def _drain(q, progress: ProgressFn | None) -> None:
    while progress:
        try:
            progress(*q.get_nowait())
        except queue_mod.Empty:
            return
