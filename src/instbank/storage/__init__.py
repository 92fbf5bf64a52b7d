"""Storage backends behind one ``InstanceBank`` protocol (see ``storage/base.py`` for the layout).

- ``registry``: ``BACKENDS`` (a plain dict from the name on disk to its module) and ``get_backend``
- ``base``: format, manifest, content hash, the reader base every backend extends
- ``writer``: the directory lock, ``BankWriter`` (owns a bank directory while writing it) and
  ``ShardWriter``
- ``copy``: the one streaming shard copy behind ``convert``, ``merge`` and re-sharding
- ``memmap_bank``, ``lmdb_bank``, ``wds_bank``: one backend each
- ``url``, ``remote``, ``pull``: banks at a URL (object storage through fsspec): locations, the
  writer's side (staging, upload, the lock object), ``pull_bank``
"""

from __future__ import annotations

import os

from instbank.storage import base
from instbank.storage.base import FORMAT_VERSION, InstanceBank, ShardedBank, load_manifest
from instbank.storage.registry import BACKENDS, get_backend


def open_bank(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> ShardedBank:
    """Open a finished bank of any backend (dispatch on ``manifest["backend"]``).

    ``path`` may be a URL (``s3://bucket/bank``, any fsspec URL): a WebDataset bank is then read
    in place (range requests, or ``stream()``); with ``cache``, a local directory, the bank at the
    URL is pulled there first (``instbank pull``: resumable, every crop checked) and opened from
    disk, which memmap and LMDB banks need."""
    if cache is not None and base.is_url(path):
        from instbank.storage.pull import pull_bank

        pull_bank(str(path), cache)
        path = cache
    return base.open_bank(path)


__all__ = ["BACKENDS", "FORMAT_VERSION", "InstanceBank", "ShardedBank", "get_backend", "load_manifest", "open_bank"]
