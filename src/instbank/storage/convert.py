"""Write a bank again: with another backend or codec, or cut into shards of another size
(``instbank convert``). One streaming copy (``instbank.storage.copy``): the crops, their meta rows
and digests are the same, so the converted bank has the same content hash and its ``version``
differs at most before the ``@``. Either side may be a URL (``s3://bucket/bank``): a source at a
URL is read one shard at a time (``base.reading``), a destination at a URL is written through a
local staging directory (``writer.BankWriter``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from instbank.errors import BankError, BuildError
from instbank.storage.base import FORMAT_VERSION, MANIFEST, content_hash, load_manifest, reading
from instbank.storage.copy import CopySource, copy_banks
from instbank.storage.registry import get_backend
from instbank.storage.url import RemotePath, is_url, location
from instbank.storage.writer import BankWriter
from instbank.types import ProgressFn


def check_apart(sources: list[Path | RemotePath], dst: Path | RemotePath) -> None:
    """``BuildError`` when ``dst`` is, contains or lies inside one of the input banks (URLs are
    compared as written; a bank on disk and one at a URL are apart)."""
    for src in sources:
        if is_url(src) != is_url(dst):
            continue
        if is_url(src):
            a, b = str(src), str(dst)
            overlaps = a == b or b.startswith(a + "/") or a.startswith(b + "/")
        else:
            a, b = src.resolve(), dst.resolve()
            overlaps = a == b or a in b.parents or b in a.parents
        if overlaps:
            raise BuildError(f"{dst}: the output must not be the input bank {src}, inside it, or around it")


def convert_bank(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    backend: str | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check_digests: bool = False,
    shard_crops: int | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Write the bank at ``src_path`` again at ``dst_path``; returns the new manifest.

    ``backend`` (default: the source's) with its writer ``options`` (e.g. ``{"filter": "none"}``
    for lmdb, ``{"codec": "png"}`` for webdataset); ``shard_crops``: cut into shards of that many
    crops (default: one output shard per input shard). An existing bank at ``dst_path`` is refused
    unless ``overwrite`` (``BuildError``), and so is a destination that is, contains or lies inside
    the source; the destination is locked before anything there is removed. ``check_digests``
    recomputes each source crop's digest while copying and stops (``BankError``) at the first that
    differs. ``progress(0, n)`` is called after every chunk of ``n`` crops.
    """
    src_path, dst_path = location(src_path), location(dst_path)
    manifest = load_manifest(src_path)
    backend = backend or manifest["backend"]
    get_backend(backend)  # ValueError naming the valid backends, before anything is written
    check_apart([src_path], dst_path)
    with reading(src_path) as src:
        return _convert(src, src_path, dst_path, backend, options, overwrite, check_digests, shard_crops, progress)


def _convert(src, src_path, dst_path, backend, options, overwrite, check_digests, shard_crops, progress) -> dict:
    crop_size = src.crop_size[0]
    mode = "overwrite" if overwrite else "new"
    # An older format's digests are recomputed with today's (a new content hash): each crop is
    # checked against its stored digest instead of the hash.
    older = src.manifest["format_version"] != FORMAT_VERSION
    with BankWriter(dst_path, backend, crop_size, options, mode=mode) as writer:
        shards = copy_banks(writer, [CopySource(src)], shard_crops=shard_crops, check_digests=check_digests or older,
                            progress=progress)
        # Checked before the manifest is written: a mismatch means the source manifest is wrong.
        if not older and content_hash(crop_size, src.classes, [s.digests for s in shards], src.keypoint_spec) != src.content_hash:
            raise BankError(
                f"{src_path / MANIFEST}: content_hash does not match the bank's crop digests (edited? run instbank verify)"
            )
        build = {**src.manifest.get("build", {}), "converted_from": {"path": str(src_path), "version": src.version}}
        return writer.commit(src.classes, shards, build, src.manifest.get("skipped", {}), src.keypoint_spec)
