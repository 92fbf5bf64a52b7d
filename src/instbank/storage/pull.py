"""Copy a bank from a URL to a local directory (``instbank pull URL DIR``; ``open_bank(URL,
cache=DIR)``): memmap and LMDB banks are read from local disk, and a WebDataset bank reads faster
from there too.

Shard by shard, with the build's commit-last protocol: a shard's files are downloaded into
``DIR/.pull/shards/NNNNNN``, checked as ``instbank verify`` checks them (``shard.json``,
``meta.npy``, ``keypoints.npy`` and the digests against the manifest, every crop against its digest, the backend's
payload hook), then moved into ``DIR/shards/``. After the last shard the content hash over all
digests must be the manifest's, and ``manifest.json`` is written last. An interrupted pull keeps
the shards it finished: running it again fetches only the rest (a shard counts as there when its
``shard.json`` and digests agree with the manifest's hash, as ``--resume`` decides for a build).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from instbank.errors import BankError, BuildError, BuildInterrupted
from instbank.storage.base import (
    MANIFEST, PULL_DIR, SHARDS_DIR, classes_from_json, content_hash, keypoint_spec_of, load_manifest, load_npy,
    write_json_atomic,
)  # fmt: skip
from instbank.storage.registry import get_backend
from instbank.storage.url import RemotePath, fetch_dir, is_url, why
from instbank.storage.verify import VerifyReport, verify_shard
from instbank.storage.writer import DirectoryLock, check_destination, finished_shard
from instbank.types import ProgressFn


def pull_bank(url: str, dest: str | os.PathLike, progress: ProgressFn | None = None) -> tuple[dict, int]:
    """Copy the bank at ``url`` into the local directory ``dest`` (see the module docstring);
    returns its manifest and how many shards were there already.

    ``dest`` is locked while pulling; a ``dest`` holding another bank or foreign files is refused
    (``BuildError``); a shard at the URL that fails its checks is a ``BankError`` naming the
    object, and nothing of it is kept. ``progress(0, n)`` is called per shard of ``n`` crops."""
    if not is_url(url):
        raise BuildError(f"{url}: pull copies a bank from a URL (s3://..., gs://...); for a local bank use instbank convert")
    src = RemotePath(url)
    manifest = load_manifest(src)
    dest = Path(dest)
    check_destination(dest, "resume")
    if (dest / MANIFEST).exists():
        have = load_manifest(dest)
        if have["content_hash"] == manifest["content_hash"] and have["backend"] == manifest["backend"]:
            return have, len(have["shards"])  # pulled before (the same crops, perhaps in other shards)
        raise BuildError(f"{dest}: holds another bank ({have['version']}); pull {manifest['version']} into a new or empty directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{dest}: cannot create the directory ({e.strerror})") from None
    with DirectoryLock(dest):
        (dest / SHARDS_DIR).mkdir(exist_ok=True)
        reused = _pull_shards(src, dest, manifest, progress)
        digests = [load_npy(dest / SHARDS_DIR / s["dir"] / "digests.npy") for s in manifest["shards"]]
        chash = content_hash(int(manifest["crop_size"][0]), classes_from_json(manifest["classes"]), digests,
                             keypoint_spec_of(manifest))
        if chash != manifest["content_hash"]:
            raise BankError(f"{src / MANIFEST}: content_hash does not match the shards' crop digests (edited? run instbank verify)")
        write_json_atomic(dest / MANIFEST, manifest, durable=True)
    return manifest, reused


def _pull_shards(src: RemotePath, dest: Path, manifest: dict, progress: ProgressFn | None) -> int:
    """Pull every shard not there yet; returns how many were."""
    staging = dest / PULL_DIR
    shutil.rmtree(staging, ignore_errors=True)
    # The checker reads the staged shards with the manifest at the URL (whose entries it checks).
    checker = get_backend(manifest["backend"]).Reader(staging, manifest)
    reused = done = 0
    try:
        for k, entry in enumerate(manifest["shards"]):
            final = dest / SHARDS_DIR / entry["dir"]  # a plain name: check_manifest made sure
            have = finished_shard(final)
            if have is not None and have.info.get("hash") == entry["hash"] and have.info.get("payload") == entry["payload"]:
                reused += 1
            else:
                _pull_shard(src, staging, final, k, entry, checker)
            done += 1
            if progress is not None:
                progress(0, entry["num_crops"])
    except KeyboardInterrupt as e:
        raise BuildInterrupted(f"{dest}: pull of {src} interrupted with {done} of {len(manifest['shards'])} shards "
                               "pulled and kept; run the same command again to continue",
                               getattr(e, "signum", 2), resumable=False) from None
    finally:
        checker.close()
        shutil.rmtree(staging, ignore_errors=True)
    return reused


def _pull_shard(src: RemotePath, staging: Path, final: Path, k: int, entry: dict, checker) -> None:
    remote = src / SHARDS_DIR / entry["dir"]
    part = staging / SHARDS_DIR / entry["dir"]
    shutil.rmtree(part, ignore_errors=True)
    try:
        fetch_dir(remote, part)
    except OSError as e:
        raise BankError(f"{remote}: cannot download the shard ({why(e)})") from None
    report = VerifyReport(src)
    verify_shard(checker, k, report)
    if not report.ok:
        shutil.rmtree(part, ignore_errors=True)
        raise BankError(f"{report.problems[0].message.replace(str(staging), str(src))} (nothing of this shard was kept)")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(part, final)
