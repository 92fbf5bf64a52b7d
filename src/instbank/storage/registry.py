"""The backend registry: the name written in ``manifest["backend"]`` -> the module implementing it
(a ``Writer`` payload writer and a ``Reader`` bank class). Modules are imported on first use, so
that lmdb and webdataset cost nothing to a memmap user."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "memmap": "instbank.storage.memmap_bank",
    "lmdb": "instbank.storage.lmdb_bank",
    "webdataset": "instbank.storage.wds_bank",
}

#: The codecs each backend writes and reads, default first (also what ``instbank build --help``
#: lists without importing a backend).
CODECS: dict[str, tuple[str, ...]] = {
    "memmap": ("raw",),
    "lmdb": ("zstd",),
    "webdataset": ("zstd", "raw", "png"),
}


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name``; ``ValueError`` listing valid names otherwise."""
    try:
        module = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}") from None
    return importlib.import_module(module)
