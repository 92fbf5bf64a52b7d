"""The distributed build on Ray Data (``build_bank(..., engine="ray")``).

Each shard of the build plan becomes one row of a Ray dataset, and one Ray task (``num_cpus=1``)
runs :func:`instbank.engines.shard.build_shard` on it, writing the shard's files straight into the bank
directory. The driver only collects each shard's result (its ``shard.json`` content and crop digests); the
manifest is assembled from them by ``build_bank`` afterwards, exactly as with the local engine, so the bank (and its ``version``)
is the same whatever engine, worker count or task order produced it.

What a task receives: the shard's ``ImageRecord``s pickled (paths, ids, polygons/RLE), not the
source path and an image range. Pickled records weigh about 4 KB per COCO image (measured on
coco_tiny_2017), 2 MB for a 512-image shard, ~0.5 GB in Ray's object store for all of COCO
train2017; re-reading the source instead would re-parse the 448 MB train2017 json in every task,
6-25 s per shard at the rates ``read_coco`` reaches here (70 MB/s, 37k instances/s).

Shard tasks are idempotent: ``ShardWriter`` clears an unfinished shard directory before writing,
so a task that Ray retries after a lost worker, or a shard redone by ``--resume``, starts clean.

On a cluster (``address=``), every node must see the image files at the same paths. The bank
is either a directory on a shared POSIX filesystem (NFS, Lustre, a FUSE mount), which tasks write
into, or a URL (``s3://``, ``gs://``, any fsspec URL): each task then writes its shard into a
temporary staging directory on its own node and uploads it (``shard.json`` last), and only the
driver writes the manifest. See docs/scale-out.md.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from instbank.engines.shard import BuildConfig, build_shard, opencv_single_threaded
from instbank.errors import BuildError
from instbank.storage.base import DIGEST_BYTES
from instbank.storage.url import staged_destination, staged_marker, staged_shard
from instbank.storage.writer import ShardResult
from instbank.types import ImageRecord, ProgressFn

RAY_MISSING = "engine 'ray' needs Ray Data, which is not installed: pip install 'instbank[ray]'"


class RemoteTraceback(Exception):
    """Carries a Ray task's formatted traceback as the ``__cause__`` of the error re-raised in the
    driver (the same device as ``concurrent.futures``' process pool)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise BuildError(RAY_MISSING) from None
    return ray


def shard_rows(jobs: Sequence[tuple[Sequence[ImageRecord], Path]]) -> list[dict[str, Any]]:
    """One row per shard job: ``{"shard": int, "shard_dir": str, "publish": str, "images": bytes}``
    (pickled records; ``publish``: the staging marker when the bank is at a URL, else "")."""
    return [
        {"shard": i, "shard_dir": str(shard_dir), "publish": staged_marker(shard_dir) or "",
         "images": pickle.dumps(list(images), protocol=pickle.HIGHEST_PROTOCOL)}
        for i, (images, shard_dir) in enumerate(jobs)
    ]


def build_shard_row(row: dict[str, Any], config: BuildConfig, strict: bool = False) -> dict[str, Any]:
    """The Ray Data map function: build one shard; returns ``{"shard", "dir", "info", "digests",
    "error", "traceback"}`` (``info`` as JSON text, ``digests`` as bytes).

    Errors are returned as data (the pickled exception) rather than raised: Ray Data wraps a raised
    exception in ``RayTaskError(UserCodeException)`` and drops the original, and the driver should
    re-raise the project's own one-line ``BuildError`` as it is. Every row has every key, with the
    same types, so the blocks share one Arrow schema.
    """
    try:
        # One CPU per task (num_cpus=1): OpenCV's own per-core pool would oversubscribe.
        with opencv_single_threaded():
            if row["publish"]:  # a bank at a URL: stage on this node (the driver's staging is not here)
                with staged_shard(row["publish"], Path(row["shard_dir"]).name) as shard_dir:
                    result = build_shard(pickle.loads(row["images"]), shard_dir, config, strict=strict)
            else:
                result = build_shard(pickle.loads(row["images"]), row["shard_dir"], config, strict=strict)
    except Exception as e:  # noqa: BLE001 - shipped to the driver and re-raised there
        return {"shard": row["shard"], "dir": "", "info": "", "digests": b"", "error": _pickle_error(e),
                "traceback": traceback.format_exc()}
    return {"shard": row["shard"], "dir": result.dir, "info": json.dumps(result.info), "digests": result.digests.tobytes(),
            "error": b"", "traceback": ""}


def _pickle_error(e: Exception) -> bytes:
    """``e`` pickled, checked to unpickle (exceptions whose ``__init__`` takes other arguments than
    their ``args`` pickle fine and fail to load); otherwise a ``BuildError`` with its text."""
    try:
        data = pickle.dumps(e)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - an exception that cannot cross processes keeps its text
        return pickle.dumps(BuildError(f"{type(e).__name__}: {e}"))


def _raise_task_error(row: dict[str, Any]) -> None:
    raise pickle.loads(row["error"]) from RemoteTraceback(row["traceback"])


@contextmanager
def ray_session(workers: int, address: str | None = None, runtime_env: dict | None = None) -> Iterator[Any]:
    """Yield the ``ray`` module, initialised. An already-initialised Ray (the caller's) is used as it
    is and left running; otherwise join ``address`` or start a local Ray with ``workers`` CPUs, and
    shut it down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, **quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _build_data_context(ray) -> Iterator[None]:
    """Ray Data settings for the build, restored afterwards (the DataContext is process-global):

    - progress bars and per-execution log lines off: instbank reports progress itself;
    - no per-operator resource reservation: it exists so that the operators of a pipeline cannot
      starve each other, but our dataset has a single map operator, and the reservation held it to
      half the CPUs at first (one task at a time on 2 CPUs, measured).
    """
    ctx = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False, "enable_auto_log_stats": False,
                "op_resource_reservation_enabled": False}
    saved = {k: getattr(ctx, k) for k in settings}
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)  # also hides the "progress bars disabled" warning this causes
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        logger.setLevel(level)


def run(
    jobs: Sequence[tuple[Sequence[ImageRecord], Path]],
    config: BuildConfig,
    workers: int,
    progress: ProgressFn | None = None,
    strict: bool = False,
    address: str | None = None,
    runtime_env: dict | None = None,
) -> Iterator[ShardResult]:
    """Run shard jobs as Ray Data tasks, at most ``workers`` at a time; yield shard results in order.

    ``jobs``: ``(images, shard_dir)`` pairs as built by ``build_bank``. ``address``: join that Ray
    cluster (``"auto"``, ``"ray://head:10001"``); ``runtime_env``: passed to ``ray.init`` (e.g.
    ``{"pip": ["instbank"]}`` when the cluster's nodes do not have instbank installed). Each result is
    yielded as soon as it and every shard before it are done. ``progress(images, crops)`` is called
    once per finished shard, in completion order (tasks cannot call back into the driver).
    A task's exception is re-raised here as it was raised there (``BuildError`` for disk full,
    unwritable output), with the task's traceback as ``__cause__``.
    """
    if not jobs:
        return
    with ray_session(workers, address, runtime_env) as ray, _build_data_context(ray):
        rows = shard_rows(jobs)
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block = one task = one shard
        results = dataset.map(
            build_shard_row,
            fn_kwargs={"config": config, "strict": strict},
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(workers, len(rows)))),
        )
        bank = staged_destination(jobs[0][1]) or Path(jobs[0][1]).parent.parent
        yield from _in_shard_order(results.iter_rows(), len(rows), progress, bank)


def _in_shard_order(rows, count: int, progress: ProgressFn | None, bank_dir: Path | str) -> Iterator[ShardResult]:
    done: dict[int, ShardResult] = {}
    next_shard = 0
    for row in rows:
        if row["error"]:
            _raise_task_error(row)
        info = json.loads(row["info"])
        if progress:
            progress(info["num_images"], info["num_crops"])
        digests = np.frombuffer(row["digests"], np.uint8).reshape(-1, DIGEST_BYTES)
        done[row["shard"]] = ShardResult(row["dir"], info, digests)
        while next_shard in done:
            yield done.pop(next_shard)
            next_shard += 1
    if next_shard != count:
        raise BuildError(f"{bank_dir}: Ray returned {next_shard} of {count} shards (a task's result was lost); rerun with --resume")
