"""The one streaming copy of crops from banks into a ``BankWriter``: ``convert`` (another backend),
``merge`` (several banks, class ids remapped) and re-sharding (``shard_crops``) are all this copy.

Crops are read in chunks of at most ``CHUNK_BYTES`` of pixels, so memory never holds a shard.
Output shards are numbered ``000000, 000001, ...``; with ``shard_crops=None`` each input shard
becomes one output shard and keeps what its ``shard.json`` says about its source images
(``num_images``, skip counts and examples); with ``shard_crops=N`` the crops are cut into shards of
``N`` (the last one shorter), and per-shard image notes are dropped (the bank manifest keeps the
totals).

Keypoints (``keypoints.npy``) travel with their crops; every source must have the same keypoint
layout (``BuildError``; ``merge`` says which banks differ first).

Digests: copied as they are when the class ids do not change (the crops, their meta rows and
keypoints are the same bytes); recomputed from the pixels when a remap changes a class id (it is part of each
crop's digest). ``check_digests`` also recomputes each input crop's digest and stops at the first
that differs from its ``digests.npy`` (``BankError``): a corrupt input is never copied into a bank
whose hashes would then vouch for it.

Each input shard is released once copied (``ShardedBank.release``): its payload is closed and, for
a bank at a URL (read shard by shard, ``base.reading``), its local copy removed, so a copy from
object storage needs local disk for one input shard and one output shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from instbank.errors import BankError, BuildError
from instbank.storage.base import (
    FORMAT_VERSION, SHARD_MANIFEST, ShardedBank, crop_digests, load_shard_digests, load_shard_keypoints,
    load_shard_meta, read_json,
)  # fmt: skip
from instbank.storage.writer import BankWriter, ShardResult, shard_dir_name
from instbank.types import ProgressFn

#: Pixels held in memory at once while copying or verifying (4096 crops of 64 px, 256 of 256 px).
CHUNK_BYTES = 64 << 20
MAX_CHUNK = 4096
#: Keys of shard.json that ShardWriter writes itself; any other key describes the shard's source
#: images (num_images, skip_examples, exif_rotated, ...) and is copied as it is.
SHARD_KEYS = frozenset({"num_crops", "hash", "class_ids", "skipped", "payload", "backend_options", "num_keypoints"})


def chunk_length(crop_size: int) -> int:
    """Crops per read: at most ``CHUNK_BYTES`` of pixels and ``MAX_CHUNK`` crops."""
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * crop_size * crop_size)))


class Piece(NamedTuple):
    """Consecutive crops on their way: uint8 ``[n, 4, S, S]``, META_DTYPE ``[n]``, uint8 ``[n, 32]``
    and, in a bank with keypoints, float32 ``[n, J, 3]``."""

    rgba: np.ndarray
    meta: np.ndarray
    digests: np.ndarray
    keypoints: np.ndarray | None = None

    def split(self, n: int) -> tuple[Piece, Piece]:
        return Piece(*(None if a is None else a[:n] for a in self)), Piece(*(None if a is None else a[n:] for a in self))


class CopySource(NamedTuple):
    """One input bank and, for merge, its class remap int64 ``[C_in]`` (old id -> new id)."""

    bank: ShardedBank
    remap: np.ndarray | None = None


def copy_banks(
    writer: BankWriter,
    sources: Sequence[CopySource],
    *,
    shard_crops: int | None = None,
    check_digests: bool = False,
    progress: ProgressFn | None = None,
) -> list[ShardResult]:
    """Copy every crop of ``sources``, in order, into ``writer``'s bank; returns the output shards'
    results in order (``writer.commit`` makes them a bank). See the module docstring."""
    if shard_crops is not None and shard_crops < 1:
        raise ValueError(f"shard_crops must be a positive number of crops, got {shard_crops}")
    specs = {source.bank.keypoint_spec for source in sources}
    if len(specs) > 1:
        raise BuildError(f"{writer.path}: the banks have different keypoint layouts; one bank holds one")
    spec = specs.pop() if specs else None
    groups = _input_shards(sources, check_digests, progress)
    if shard_crops is not None:
        groups = _regroup((piece for pieces, _ in groups for piece in pieces), shard_crops)
    results = []
    for pieces, info in groups:
        with writer.shard(shard_dir_name(len(results)), None if spec is None else spec.num_keypoints) as shard:
            for piece in pieces:
                shard.append(*piece)
            shard.skipped.update(info.get("skipped", {}))
            shard.extra.update({k: v for k, v in info.items() if k not in SHARD_KEYS})
        results.append(shard.result)
    return results


def _input_shards(sources, check_digests: bool, progress) -> Iterator[tuple[Iterator[Piece], dict]]:
    """Per input shard: its pieces (lazily) and its ``shard.json``."""
    for source in sources:
        bank, remap = source
        changes_ids = remap is not None and not np.array_equal(remap, np.arange(len(remap)))
        for shard_no, (sdir, entry, start) in enumerate(bank.iter_shards()):
            info = read_json(sdir / SHARD_MANIFEST, "shard manifest")
            skipped = info.get("skipped", {})
            if not (isinstance(skipped, dict) and all(isinstance(v, int) for v in skipped.values())):
                raise BankError(f"{sdir / SHARD_MANIFEST}: 'skipped' must map reasons to counts")
            pieces = _pieces(bank, sdir, entry["num_crops"], start, remap if changes_ids else None, check_digests, progress)
            yield _released(pieces, bank, shard_no), info


def _released(pieces: Iterator[Piece], bank: ShardedBank, shard_no: int) -> Iterator[Piece]:
    try:
        yield from pieces
    finally:
        bank.release(shard_no)


def _pieces(bank: ShardedBank, sdir: Path, n: int, start: int, remap, check_digests: bool, progress) -> Iterator[Piece]:
    meta = load_shard_meta(sdir, n)
    digests = load_shard_digests(sdir, n)
    spec = bank.keypoint_spec
    points = None if spec is None else load_shard_keypoints(sdir, n, spec.num_keypoints)
    version = bank.manifest["format_version"]
    if remap is not None:
        ids = meta["class_id"]
        if len(ids) and (ids.min() < 0 or ids.max() >= len(remap)):
            raise BankError(f"{sdir / 'meta.npy'}: class ids outside the bank's class table ({len(remap)} classes)")
    step = chunk_length(bank.crop_size[0])
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rgba = bank.get_many(np.arange(start + lo, start + hi))
        rows, sums = meta[lo:hi], digests[lo:hi]
        kp = None if points is None else points[lo:hi]
        if check_digests:
            bad = np.flatnonzero((crop_digests(rgba, rows, version, kp) != sums).any(axis=1))
            if len(bad):
                raise BankError(
                    f"{sdir}: crop {start + lo + int(bad[0])} does not match its digest in digests.npy "
                    "(corrupt input; run instbank verify)"
                )
        if remap is not None:
            rows = rows.copy()
            rows["class_id"] = remap[rows["class_id"]]
        if remap is not None or version != FORMAT_VERSION:  # the output's digests: new ids, or today's digest
            sums = crop_digests(rgba, rows, keypoints=kp)
        yield Piece(rgba, rows, sums, kp)
        if progress is not None:
            progress(0, hi - lo)


def _regroup(pieces: Iterator[Piece], size: int) -> Iterator[tuple[Iterator[Piece], dict]]:
    """The same crops cut into groups of ``size`` (one per output shard), still streamed."""
    pieces = iter(pieces)
    pending: list[Piece] = []

    def one_group() -> Iterator[Piece]:
        room = size
        while room and pending:
            head, tail = pending.pop().split(room)
            room -= len(head.rgba)
            yield head
            if len(tail.rgba):
                pending.append(tail)
            elif room:
                pending.extend(_next(pieces))

    while True:
        if not pending:
            pending.extend(_next(pieces))
            if not pending:
                return
        yield one_group(), {}


def _next(pieces: Iterator[Piece]) -> list[Piece]:
    """The next non-empty piece, as a list of zero or one."""
    for piece in pieces:
        if len(piece.rgba):
            return [piece]
    return []
