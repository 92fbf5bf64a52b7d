"""Merge banks into one (``instbank merge BANK... --out DIR``): e.g. banks built on separate
machines from parts of a data set, or from two data sets with overlapping class names.

The crops are concatenated in the order the banks are given, each bank's shards in its own order:
every input shard becomes one output shard (renumbered ``000000``, ``000001``, ...), streamed in
chunks of at most 64 MiB of pixels through ``ShardWriter``; memory never holds a whole shard.

Class tables are unioned **by name**: the first bank's classes keep their ids and order, then each
name not seen yet gets the next id, in order of appearance (bank by bank, each in id order). A
name keeps the ``source_id`` of the first bank that has it. So merging banks whose class tables are
equal changes no id, and the merged bank of the parts of a build has the same content hash (and
``version``) as the whole build. Each crop's ``class_id`` in ``meta.npy`` is remapped, and since
the class id is part of each crop digest, digests are recomputed from the pixels, never copied:
that also checks the input pixels once more.
"""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from instbank.build import BuildLock
from instbank.errors import BankError, BuildError
from instbank.storage import get_backend, open_bank
from instbank.storage.base import (
    SHARD_MANIFEST,
    SHARDS_DIR,
    ShardedBank,
    ShardWriter,
    assemble_manifest,
    load_shard_meta,
    prepare_output,
    read_json,
    shard_dir_name,
)
from instbank.storage.convert import chunk_length
from instbank.types import ClassInfo

ProgressFn = Callable[[int], None]  # crops done since the last call
#: Keys of shard.json that ShardWriter writes itself; any other key (num_images, skip_examples,
#: exif_rotated) describes the source images and is copied as it is.
_SHARD_KEYS = {"num_crops", "hash", "class_ids", "skipped", "payload", "backend_options"}


def union_classes(tables: Sequence[Sequence[ClassInfo]], names: Sequence[str]) -> tuple[list[ClassInfo], list[np.ndarray]]:
    """Union class tables by name (order: see the module docstring).

    Returns the merged table and, per input table, an int64 ``[C_i]`` array mapping its ids to
    merged ids. ``names`` name the banks in errors: a name appearing twice in one table would make
    two classes one, so it is a ``BuildError``; ids that are not ``0..C-1`` are a ``BankError``.
    """
    merged: list[ClassInfo] = []
    by_name: dict[str, int] = {}
    remaps = []
    for table, bank in zip(tables, names):
        seen = Counter(c.name for c in table)
        dup = next((name for name, n in seen.items() if n > 1), None)
        if dup is not None:
            raise BuildError(f"{bank}: class name {dup!r} appears {seen[dup]} times; merge unions classes by name")
        if sorted(c.id for c in table) != list(range(len(table))):
            raise BankError(f"{bank}: class ids in the manifest are not contiguous 0..{len(table) - 1}")
        remap = np.empty(len(table), np.int64)
        for c in sorted(table, key=lambda c: c.id):
            if c.name not in by_name:
                by_name[c.name] = len(merged)
                merged.append(ClassInfo(len(merged), c.source_id, c.name))
            remap[c.id] = by_name[c.name]
        remaps.append(remap)
    return merged, remaps


def _check_inputs(paths: Sequence[Path], out: Path, banks: Sequence[ShardedBank]) -> None:
    if not banks:
        raise BuildError(f"{out}: nothing to merge (give at least one bank)")
    sizes = {str(p): b.crop_size[0] for p, b in zip(paths, banks)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p} (S={s})" for p, s in sizes.items())
        raise BuildError(f"{out}: cannot merge banks of different crop sizes: {listed}")
    target = out.resolve()
    for p in paths:
        src = p.resolve()
        if src == target or src in target.parents or target in src.parents:
            raise BuildError(f"{out}: the output must not be the input bank {p}, inside it, or around it")


def _load_shard_meta(sdir: Path, num_crops: int, num_classes: int) -> np.ndarray:
    """The shard's crop index, whose class ids must lie in the bank's table (they index ``remap``)."""
    meta = load_shard_meta(sdir, num_crops)
    path = sdir / "meta.npy"
    ids = meta["class_id"]
    if len(ids) and (ids.min() < 0 or ids.max() >= num_classes):
        raise BankError(f"{path}: class ids outside the bank's class table ({num_classes} classes)")
    return meta


def _copy_shard(bank: ShardedBank, sdir: Path, entry: dict, start: int, remap: np.ndarray, writer: ShardWriter, progress) -> None:
    """Stream one input shard into ``writer`` with class ids remapped (digests recomputed)."""
    meta = _load_shard_meta(sdir, entry["num_crops"], len(remap))
    step = chunk_length(bank.crop_size[0])
    for lo in range(0, len(meta), step):
        hi = min(lo + step, len(meta))
        rows = meta[lo:hi].copy()
        rows["class_id"] = remap[rows["class_id"]]
        writer.append(bank.get_many(np.arange(start + lo, start + hi)), rows)
        if progress is not None:
            progress(hi - lo)


def merge_banks(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    backend: str | None = None,
    overwrite: bool = False,
    options: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Merge the banks at ``paths`` (same crop size) into a new bank at ``out``; returns its manifest.

    ``backend`` defaults to the first bank's; ``options`` are that backend's writer options (as for
    ``convert_bank``). An existing bank at ``out`` is refused unless ``overwrite``; so is an ``out``
    that is, contains or lies inside an input. Different crop sizes, or a class name twice in one
    bank's table, raise ``BuildError`` before anything is written. ``progress(n)`` is called after
    every chunk of ``n`` crops. The manifest is written last: an interrupted merge leaves no bank.
    """
    paths, out = [Path(p) for p in paths], Path(out)
    banks = [open_bank(p) for p in paths]
    _check_inputs(paths, out, banks)
    backend = backend or banks[0].manifest["backend"]
    get_backend(backend)  # unknown backend: ValueError naming the valid ones, before writing
    classes, remaps = union_classes([b.classes for b in banks], [str(p) for p in paths])
    crop_size = banks[0].crop_size[0]
    prepare_output(out, overwrite=overwrite)
    names: list[str] = []
    skipped: Counter = Counter()
    with BuildLock(out):
        for bank, remap in zip(banks, remaps):
            skipped.update(bank.manifest.get("skipped", {}))
            with bank:
                for sdir, entry, start in bank.iter_shards():
                    names.append(shard_dir_name(len(names)))
                    open_writer = partial(ShardWriter, out / SHARDS_DIR / names[-1], backend, crop_size, options)
                    _merge_shard(bank, sdir, entry, start, remap, open_writer, progress)
        build = {"merged_from": [{"path": str(p), "version": b.version, "num_crops": len(b)} for p, b in zip(paths, banks)]}
        return assemble_manifest(out, backend, crop_size, classes, names, build, skipped)


def _merge_shard(bank, sdir: Path, entry: dict, start: int, remap, open_writer: Callable[[], ShardWriter], progress) -> None:
    """One input shard -> one output shard, keeping what its ``shard.json`` says about its images."""
    info = read_json(sdir / SHARD_MANIFEST, "shard manifest")
    writer = open_writer()
    try:
        _copy_shard(bank, sdir, entry, start, remap, writer, progress)
    except BaseException:
        writer.abort()
        raise
    writer.close(skipped=info.get("skipped"), extra={k: v for k, v in info.items() if k not in _SHARD_KEYS})
