"""Merge banks into one (``instbank merge BANK... --out DIR``): e.g. banks built on separate
machines from parts of a data set, or from two data sets with overlapping class names.

The crops are concatenated in the order the banks are given, each bank's shards in its own order:
every input shard becomes one output shard (renumbered ``000000``, ``000001``, ...), or shards of
``shard_crops``, streamed by the one copy of ``instbank.storage.copy``; memory never holds a shard.

Class tables are unioned **by name**: the first bank's classes keep their ids and order, then each
name not seen yet gets the next id, in order of appearance (bank by bank, each in id order). A
name keeps the ``source_id`` of the first bank that has it. So merging banks whose class tables are
equal changes no id, and the merged bank of the parts of a build has the same content hash (and
``version``) as the whole build. Each crop's ``class_id`` in ``meta.npy`` is remapped; where an id
changes, the crop's digest (which covers it) is recomputed from the pixels, else it is copied.
Inputs and output may be URLs (``s3://bucket/bank``), as for ``convert``. Banks with keypoints
merge only with banks of the same keypoint layout (names, skeleton, flip): a bank holds one.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from instbank.errors import BankError, BuildError
from instbank.storage.base import reading
from instbank.storage.convert import check_apart
from instbank.storage.copy import CopySource, copy_banks
from instbank.storage.registry import get_backend
from instbank.storage.url import location
from instbank.storage.writer import BankWriter
from instbank.types import ClassInfo, ProgressFn


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


def merge_banks(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    backend: str | None = None,
    overwrite: bool = False,
    options: Mapping[str, Any] | None = None,
    shard_crops: int | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Merge the banks at ``paths`` (same crop size) into a new bank at ``out``; returns its manifest.

    ``backend`` defaults to the first bank's; ``options`` are that backend's writer options (as for
    ``convert_bank``); ``shard_crops`` re-shards as ``convert_bank`` does. An existing bank at
    ``out`` is refused unless ``overwrite``; so is an ``out`` that is, contains or lies inside an
    input. Different crop sizes, or a class name twice in one bank's table, raise ``BuildError``
    before anything is written; ``out`` is locked before anything there is removed.
    ``progress(0, n)`` is called after every chunk of ``n`` crops. The manifest is written last:
    an interrupted merge leaves no bank.
    """
    paths, out = [location(p) for p in paths], location(out)
    if not paths:
        raise BuildError(f"{out}: nothing to merge (give at least one bank)")
    check_apart(paths, out)
    with ExitStack() as stack:
        banks = [stack.enter_context(reading(p)) for p in paths]
        return _merge(paths, banks, out, backend, overwrite, options, shard_crops, progress)


def _merge(paths, banks, out: Path, backend, overwrite, options, shard_crops, progress) -> dict:
    sizes = {str(p): b.crop_size[0] for p, b in zip(paths, banks)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p} (S={s})" for p, s in sizes.items())
        raise BuildError(f"{out}: cannot merge banks of different crop sizes: {listed}")
    check_keypoint_layouts(paths, banks, out)
    backend = backend or banks[0].manifest["backend"]
    get_backend(backend)  # unknown backend: ValueError naming the valid ones, before writing
    classes, remaps = union_classes([b.classes for b in banks], [str(p) for p in paths])
    skipped: Counter = Counter()
    for bank in banks:
        skipped.update(bank.manifest.get("skipped", {}))
    mode = "overwrite" if overwrite else "new"
    with BankWriter(out, backend, banks[0].crop_size[0], options, mode=mode) as writer:
        sources = [CopySource(bank, remap) for bank, remap in zip(banks, remaps)]
        shards = copy_banks(writer, sources, shard_crops=shard_crops, progress=progress)
        build = {"merged_from": [{"path": str(p), "version": b.version, "num_crops": len(b)} for p, b in zip(paths, banks)]}
        return writer.commit(classes, shards, build, skipped, banks[0].keypoint_spec)


def check_keypoint_layouts(paths, banks, out) -> None:
    """``BuildError`` naming the first bank whose keypoint layout differs from the first bank's."""
    first = banks[0].keypoint_spec
    for path, bank in zip(paths[1:], banks[1:]):
        other = bank.keypoint_spec
        if other != first:
            theirs = ("the same names, another skeleton or flip" if first is not None and other is not None
                      and other.names == first.names else _layout(other))
            raise BuildError(f"{out}: cannot merge banks of different keypoint layouts: {paths[0]} "
                             f"({_layout(first)}) and {path} ({theirs}); a bank holds one")


def _layout(spec) -> str:
    return "no keypoints" if spec is None else f"{spec.num_keypoints} keypoints: {', '.join(spec.names[:3])}, ..."
