"""Storage backends behind one ``InstanceBank`` protocol (see ``storage/base.py`` for the layout).

- ``registry``: ``BACKENDS`` (a plain dict from the name on disk to its module) and ``get_backend``
- ``base``: format, manifest, content hash, the reader base every backend extends
- ``writer``: the directory lock, ``BankWriter`` (owns a bank directory while writing it) and
  ``ShardWriter``
- ``copy``: the one streaming shard copy behind ``convert``, ``merge`` and re-sharding
- ``memmap_bank``, ``lmdb_bank``, ``wds_bank``: one backend each
"""

from __future__ import annotations

from instbank.storage.base import FORMAT_VERSION, InstanceBank, ShardedBank, load_manifest, open_bank
from instbank.storage.registry import BACKENDS, get_backend

__all__ = ["BACKENDS", "FORMAT_VERSION", "InstanceBank", "ShardedBank", "get_backend", "load_manifest", "open_bank"]
