"""memmap backend: raw uint8 crops, one flat file per shard, read through ``np.memmap``.

Fastest random access when the bank fits the page cache: ``get_many`` is one numpy fancy-index
gather from the mapped file. Reads are not checksummed (``instbank verify`` recomputes digests).

Payload layout of one shard (beside the common ``meta.npy``/``digests.npy``/``shard.json``):

| file        | dtype | shape          | content                                         |
|-------------|-------|----------------|-------------------------------------------------|
| pixels.u8   | uint8 | [n, 4, S, S]   | RGBA crops, C order, no header (shape from shard.json) |

``shard.json["payload"]`` = ``{"file": "pixels.u8", "shape": [n, 4, S, S]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from instbank.errors import BankError
from instbank.storage.base import MANIFEST, ShardedBank, merge_options, safe_member
from instbank.storage.registry import CODECS as BACKEND_CODECS
from instbank.storage.writebehind import WriteBehindFile

PIXELS = "pixels.u8"
CODECS = BACKEND_CODECS["memmap"]


def writer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The only option is ``codec``, and its only value ``raw``: the pixels are mapped as stored."""
    merged = merge_options("memmap", options, {"codec": "raw"})
    if merged["codec"] not in CODECS:
        raise ValueError(f"memmap codec must be one of {CODECS} (crops are mapped as stored), got {merged['codec']!r}")
    return merged


class Writer:
    """Appends crops to ``pixels.u8`` as they come: memory stays at one batch of crops, and the
    page cache at two 8 MiB chunks (``WriteBehindFile``)."""

    backend_options: Mapping[str, Any] = {"codec": "raw"}

    def __init__(self, shard_dir: Path, crop_size: int, options: Mapping[str, Any]):
        writer_options(options)
        self.path = Path(shard_dir) / PIXELS
        self.crop_size = crop_size
        self._f = WriteBehindFile(self.path)
        self._n = 0

    def append(self, rgba: np.ndarray, meta: np.ndarray, first_index: int, keypoints: np.ndarray | None = None) -> None:
        self._f.write(np.ascontiguousarray(rgba))
        self._n += len(rgba)

    def close(self) -> dict:
        self._f.close()  # fsyncs
        s = self.crop_size
        return {"file": PIXELS, "shape": [self._n, 4, s, s]}

    def abort(self) -> None:
        self._f.abort()


class Reader(ShardedBank):
    backend = "memmap"

    def _open_payload(self, shard_dir: Path, shard: dict) -> np.ndarray:
        path = safe_member(shard_dir, shard["payload"].get("file"), self.path / MANIFEST)
        s = self.crop_size[0]
        shape = (shard["num_crops"], 4, s, s)
        if shard["payload"].get("shape") != list(shape):
            raise BankError(
                f"{self.path / MANIFEST}: shard {shard['dir']} says {path.name} holds {shard['payload'].get('shape')}, "
                f"but the manifest has {shard['num_crops']} crops of 4x{s}x{s} there (crop_size {s})"
            )
        expected = int(np.prod(shape))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BankError(f"{path}: pixel file missing") from None
        if size != expected:
            raise BankError(f"{path}: pixel file has {size} bytes, expected {expected} for {shape} (truncated?)")
        if expected == 0:
            return np.empty(shape, np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)

    def _close_payload(self, handle: Any) -> None:
        # Nothing to close by hand: the mapping goes when the last array view of it does, and
        # closing it under a live view would crash the process.
        pass

    def _read(self, handle: np.ndarray, local: np.ndarray, out: np.ndarray) -> None:
        # mode="clip": with out= and the default mode="raise", numpy gathers into a temporary and
        # copies it over (2 extra copies, 15 -> 21 ms for 512 crops of 128x128); indices were
        # already range-checked by ShardedBank._normalize, so clipping never changes one.
        np.take(handle, local, axis=0, out=out, mode="clip")
