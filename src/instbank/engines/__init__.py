"""Build engines: where the shards of a build run.

- ``shard``: what one shard's build is (``BuildConfig``, ``build_shard``), the same in every engine
- ``local``: a process pool on this machine (all cores by default)
- ``ray``: Ray Data tasks, on this machine or a cluster

``ENGINES`` is the registry: a plain dict from the name given to ``build_bank(engine=...)`` (and
``instbank build --engine``) to the module, whose ``run(jobs, config, workers, progress,
**options)`` yields each shard's ``ShardResult`` in shard order.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

ENGINES: dict[str, str] = {
    "local": "instbank.engines.local",
    "ray": "instbank.engines.ray",
}


def get_engine(name: str) -> Callable[..., Iterator]:
    """The ``run`` function of engine ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        module = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; valid engines: {', '.join(ENGINES)}") from None
    return importlib.import_module(module).run
