"""Self-describing synthetic banks for tests and benchmarks.

Crop ``i`` encodes its own index in its pixels, so any read can be checked without a reference
copy: ``R, G, B`` planes hold the three low bytes of ``i`` (constant over the plane) and alpha is
a disk whose radius depends on ``i``. ``decode_index(rgba)`` reads the index back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from instbank.storage.writer import write_bank
from instbank.types import META_DTYPE, ClassInfo


def synthetic_crops(indices: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[n, 4, S, S]``: crop ``i`` has RGB = bytes 0..2 of ``i`` and a disk of alpha 255."""
    idx = np.asarray(indices, np.int64)
    out = np.zeros((len(idx), 4, size, size), np.uint8)
    for c in range(3):
        out[:, c] = ((idx >> (8 * c)) & 0xFF).astype(np.uint8)[:, None, None]
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2
    radius = size / 4 + (idx % 7)[:, None, None] * size / 32
    out[:, 3] = np.where(r2[None] <= radius**2, 255, 0).astype(np.uint8)
    return out


def decode_index(rgba: np.ndarray) -> np.ndarray:
    """Inverse of ``synthetic_crops`` for ``[..., 4, S, S]``: int64 index per crop."""
    rgba = np.asarray(rgba)
    px = rgba[..., :3, 0, 0].astype(np.int64)
    return px[..., 0] | (px[..., 1] << 8) | (px[..., 2] << 16)


def synthetic_meta(indices: np.ndarray, class_ids: np.ndarray, size: int) -> np.ndarray:
    """META_DTYPE rows consistent with a square object of side ``size`` at the source."""
    idx = np.asarray(indices, np.int64)
    meta = np.zeros(len(idx), META_DTYPE)
    meta["image_id"] = idx // 4
    meta["ann_id"] = idx
    meta["class_id"] = class_ids
    x0 = (idx % 50).astype(np.int32)
    meta["src_box"] = np.stack([x0, x0, x0 + size, x0 + size], axis=1)
    meta["scale"] = 1.0
    meta["offset"] = 0.0
    meta["area"] = (size * size * 3) // 4 + idx % 11
    meta["truncated"] = idx % 5 == 0
    return meta


def default_class_ids(n: int, num_classes: int) -> np.ndarray:
    """A long-tailed class assignment: class ``c`` gets about ``1/(c+1)`` of the crops."""
    weights = 1.0 / np.arange(1, num_classes + 1)
    bounds = np.cumsum(weights / weights.sum())
    u = (np.arange(n) * 0.6180339887498949) % 1.0  # deterministic, well spread
    return np.minimum(np.searchsorted(bounds, u, side="right"), num_classes - 1).astype(np.int64)


def write_synthetic_bank(
    path: str | os.PathLike,
    n: int,
    *,
    size: int = 16,
    num_classes: int = 5,
    backend: str = "memmap",
    shard_sizes: Sequence[int] | None = None,
    class_ids: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
    chunk: int = 4096,
):
    """Write a bank of ``n`` self-describing crops and open it.

    ``shard_sizes`` splits the crops into shards (default: one shard); ``class_ids`` defaults to
    ``default_class_ids`` (long-tailed, every class present when ``n`` is large enough).
    """
    from instbank.storage import open_bank

    path = Path(path)
    shard_sizes = list(shard_sizes) if shard_sizes is not None else [n]
    if sum(shard_sizes) != n:
        raise ValueError(f"shard sizes {shard_sizes} do not add up to {n}")
    cids = default_class_ids(n, num_classes) if class_ids is None else np.asarray(class_ids, np.int64)
    classes = [ClassInfo(c, c + 1, f"class{c}") for c in range(num_classes)]
    starts = np.concatenate([[0], np.cumsum(shard_sizes)]).tolist()

    def batches(lo: int, hi: int):
        for first in range(lo, hi, chunk):
            idx = np.arange(first, min(first + chunk, hi))
            yield synthetic_crops(idx, size), synthetic_meta(idx, cids[idx], size)

    shards = (batches(lo, hi) for lo, hi in zip(starts[:-1], starts[1:]))
    write_bank(path, backend, size, classes, shards, options=options, build={"source": "synthetic"}, overwrite=True)
    return open_bank(path)
