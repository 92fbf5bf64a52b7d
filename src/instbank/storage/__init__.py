"""Storage backends behind one ``InstanceBank`` protocol (see ``storage/base.py`` for the layout).

``BACKENDS`` is the registry: a plain dict from the name written in ``manifest["backend"]`` to the
module that implements it (a ``Writer`` payload writer and a ``Reader`` bank class). Modules are
imported on first use so that lmdb/webdataset cost nothing to a memmap user.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from instbank.storage.base import FORMAT_VERSION, InstanceBank, ShardedBank, load_manifest

BACKENDS: dict[str, str] = {
    "memmap": "instbank.storage.memmap_bank",
    "lmdb": "instbank.storage.lmdb_bank",
    "webdataset": "instbank.storage.wds_bank",
}

__all__ = ["BACKENDS", "FORMAT_VERSION", "InstanceBank", "ShardedBank", "get_backend", "open_bank"]


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        module = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}") from None
    return importlib.import_module(module)


def open_bank(path: str | os.PathLike) -> ShardedBank:
    """Open a finished bank of any backend (dispatch on ``manifest["backend"]``)."""
    manifest = load_manifest(path)
    return get_backend(manifest["backend"]).Reader(path, manifest)
