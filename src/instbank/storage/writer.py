"""Writing a bank: one writer owns the directory, shards are written apart, the manifest comes last.

- ``DirectoryLock``: an exclusive ``fcntl.flock`` on ``BANK/.lock``. Every writer (build fresh,
  ``--overwrite``, ``--resume``, convert, merge, re-shard) takes it **before** it removes or writes
  anything, so a refused second writer leaves the directory exactly as it found it.
- ``BankWriter``: a context manager that takes the lock, prepares the directory for its mode
  (``new``, ``overwrite``, ``resume``), opens ``ShardWriter``s and ``commit``s the manifest from the
  shards' results (``ShardResult``), without reading their ``shard.json`` back.
- ``ShardWriter``: writes one shard (payload, ``meta.npy``, ``digests.npy``, ``keypoints.npy`` in
  banks with keypoints, ``shard.json`` last);
  a context manager that commits on a clean exit and aborts on an exception. Engines open it in
  worker processes or Ray tasks by path: it needs no lock of its own (its directory is the bank
  writer's, and one shard has one writer by construction).

The lock is an advisory ``flock`` held by an open file description: released when the process
(and any child forked while it was held) has closed it, and by the kernel when they die, so a
killed build never leaves a stale lock behind. ``flock`` does not work across NFS clients on all
servers; docs/scale-out.md says what that means for a shared bank directory.

A bank at a URL (``s3://bucket/bank``, any fsspec URL) is written the same way through a local
staging directory: ``shard_dir`` is there, each finished shard is uploaded by ``ShardWriter`` (and
its local copy removed), the manifest is uploaded last, and the lock is a lock object
(``instbank.storage.remote``, which also says how commit-last holds on a store without rename).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from instbank.errors import BankError, BuildError
from instbank.storage.base import (
    DIGEST_BYTES,
    FORMAT_VERSION,
    KEYPOINT_DTYPE,
    KEYPOINTS_FILE,
    LOCK_FILE,
    MANIFEST,
    PLAN_FILE,
    PULL_DIR,
    SHARD_MANIFEST,
    SHARDS_DIR,
    PayloadWriter,
    content_hash,
    crop_digests,
    make_version,
    save_npy_atomic,
    shard_hash,
    write_json_atomic,
)
from instbank.storage.registry import get_backend
from instbank.storage import remote
from instbank.storage.url import RemotePath, is_url, location, make_staging
from instbank.types import META_DTYPE, ClassInfo, KeypointSpec
from instbank.version import __version__

WriteMode = Literal["new", "overwrite", "resume"]
WRITE_MODES = ("new", "overwrite", "resume")
#: What a bank directory may hold; anything else means it is someone else's folder (``PULL_DIR``:
#: where ``instbank pull`` assembles a shard).
_OWN_ENTRIES = frozenset({MANIFEST, PLAN_FILE, SHARDS_DIR, LOCK_FILE, MANIFEST + ".tmp", PLAN_FILE + ".tmp", PULL_DIR})


# --------------------------------------------------------------------------------------------
# the lock


class DirectoryLock:
    """Exclusive, non-blocking ``flock`` on ``directory/.lock`` (the directory must exist).

    A second writer fails at once with ``BuildError`` naming the directory and, when it can be
    read, the process id of the holder (written into the lock file)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BuildError(f"{self.path.parent}: cannot create the lock file ({e.strerror})") from None
        try:
            _flock_or_refuse(fd, self.path)
        except BuildError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    @staticmethod
    def probe(directory: str | os.PathLike) -> None:
        """``BuildError`` (as ``__enter__``'s) when another process holds the lock now; takes
        nothing. For a check before a long read of the input: the real lock is taken later."""
        path = Path(directory) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or unreadable): nothing holds it, or __enter__ will say why
        try:
            _flock_or_refuse(fd, path)
        finally:
            os.close(fd)  # releases the probe's own lock at once


def _flock_or_refuse(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BuildError(
            f"{path.parent}: another instbank writer{_read_pid(fd)} is writing into this directory "
            "(locked); nothing was changed"
        ) from None


def _read_pid(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f" (pid {pid})"


# --------------------------------------------------------------------------------------------
# one shard


@dataclass(frozen=True)
class ShardResult:
    """What one finished shard tells the bank writer: its directory name, its ``shard.json``
    content and its crop digests uint8 ``[n, 32]`` (for the bank's content hash)."""

    dir: str
    info: dict
    digests: np.ndarray = field(repr=False)

    @property
    def num_crops(self) -> int:
        return int(self.info["num_crops"])


def writer_options(backend: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The backend's writer options with defaults, checked; ``BuildError`` naming what is wrong
    (they come from the user: ``--codec``, ``-O KEY=VALUE``)."""
    module = get_backend(backend)  # an unknown name: ValueError listing the valid ones
    try:
        return module.writer_options(dict(options or {}))
    except ValueError as e:
        raise BuildError(f"{backend} backend: {e}") from None


class ShardWriter:
    """Writes one shard: backend payload + ``meta.npy`` + ``digests.npy`` (+ ``keypoints.npy``) +
    ``shard.json`` (last).

    Use as a context manager: a clean exit commits (``result`` is then the ``ShardResult``), an
    exception aborts (the payload is closed unfinished; without ``shard.json`` the shard counts as
    unfinished and is redone on resume). Set ``skipped`` (reason -> count) and ``extra`` (more keys
    for ``shard.json``) before the block ends. Memory is one shard's meta and digests (~100 bytes
    per crop), never its pixels.

    Keypoints: a shard's crops all come with keypoints float32 ``[n, J, 3]`` or none do;
    ``num_keypoints`` (``J``) fixes that up front (a shard of a bank with keypoints then writes
    ``keypoints.npy`` even when it has no crops), else the first ``append`` decides. ``shard.json``
    records ``num_keypoints`` when the shard has keypoints.
    """

    def __init__(self, shard_dir: str | os.PathLike, backend: str, crop_size: int, options: Mapping[str, Any] | None = None,
                 num_keypoints: int | None = None):
        self.shard_dir = Path(shard_dir)
        options = writer_options(backend, options)
        if self.shard_dir.exists():
            shutil.rmtree(self.shard_dir)  # an unfinished shard from an earlier run: redo it
        self.shard_dir.mkdir(parents=True)
        self.crop_size = int(crop_size)
        self.payload: PayloadWriter = get_backend(backend).Writer(self.shard_dir, self.crop_size, options)
        self.skipped: Counter = Counter()
        self.extra: dict[str, Any] = {}
        self.result: ShardResult | None = None
        self._meta: list[np.ndarray] = []
        self._digests: list[np.ndarray] = []
        self._keypoints: list[np.ndarray] = []
        self._num_keypoints = num_keypoints
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.result = self._commit()
            remote.publish_staged(self.shard_dir)  # a shard of a bank at a URL goes there now
        else:
            self.payload.abort()

    def append(self, rgba: np.ndarray, meta: np.ndarray, digests: np.ndarray | None = None,
               keypoints: np.ndarray | None = None) -> None:
        """Append crops uint8 ``[n, 4, S, S]`` with META_DTYPE ``[n]`` rows (digests computed if
        None) and, in a shard with keypoints, their keypoints float32 ``[n, J, 3]``."""
        if len(rgba) == 0:
            return
        s = self.crop_size
        if rgba.dtype != np.uint8 or rgba.shape[1:] != (4, s, s):
            raise ValueError(f"expected uint8 [n,4,{s},{s}] crops, got {rgba.dtype} {rgba.shape}")
        meta = np.ascontiguousarray(meta, META_DTYPE)
        keypoints = self._checked_keypoints(keypoints, len(rgba))
        if digests is None:
            digests = crop_digests(rgba, meta, keypoints=keypoints)
        self.payload.append(rgba, meta, self._count, keypoints)
        self._meta.append(meta)
        self._digests.append(digests)
        if keypoints is not None:
            self._keypoints.append(keypoints)
        self._count += len(rgba)

    def _checked_keypoints(self, keypoints: np.ndarray | None, n: int) -> np.ndarray | None:
        """``keypoints`` as float32 ``[n, J, 3]``; ``ValueError`` when they do not match this shard."""
        if self._count == 0 and self._num_keypoints is None and keypoints is not None:
            self._num_keypoints = int(np.shape(keypoints)[1]) if np.ndim(keypoints) == 3 else -1
        j = self._num_keypoints
        if (keypoints is None) != (j is None):
            raise ValueError(f"{self.shard_dir}: the crops of a shard all have keypoints or none do")
        if keypoints is None:
            return None
        if np.shape(keypoints) != (n, j, 3) or not np.issubdtype(np.asarray(keypoints).dtype, np.floating):
            raise ValueError(f"expected float32 keypoints [{n}, {j}, 3], got {np.asarray(keypoints).dtype} {np.shape(keypoints)}")
        return np.ascontiguousarray(keypoints, KEYPOINT_DTYPE)

    def _commit(self) -> ShardResult:
        payload = self.payload.close()
        meta = np.concatenate(self._meta) if self._meta else np.empty(0, META_DTYPE)
        digests = np.concatenate(self._digests) if self._digests else np.empty((0, DIGEST_BYTES), np.uint8)
        save_npy_atomic(self.shard_dir / "meta.npy", meta)
        save_npy_atomic(self.shard_dir / "digests.npy", digests)
        j = self._num_keypoints
        if j is not None:
            empty = np.empty((0, j, 3), KEYPOINT_DTYPE)
            save_npy_atomic(self.shard_dir / KEYPOINTS_FILE, np.concatenate(self._keypoints) if self._keypoints else empty)
        info = {
            "num_crops": int(len(meta)),
            "hash": shard_hash(digests),
            "class_ids": sorted(Counter(meta["class_id"].tolist()).items()),
            "skipped": dict(self.skipped),
            "payload": payload,
            "backend_options": dict(self.payload.backend_options),
            **({} if j is None else {"num_keypoints": j}),
            **self.extra,
        }
        write_json_atomic(self.shard_dir / SHARD_MANIFEST, info)
        return ShardResult(self.shard_dir.name, info, digests)


def shard_dir_name(index: int) -> str:
    return f"{index:06d}"


def finished_shard(shard_dir: Path) -> ShardResult | None:
    """The result of a finished shard whose digests still match its recorded hash, else None."""
    path = Path(shard_dir) / SHARD_MANIFEST
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        digests = np.load(Path(shard_dir) / "digests.npy")
    except (OSError, ValueError):
        return None
    return checked_result(Path(shard_dir).name, info, digests)


def _result_of_bytes(name: str, info: bytes, digests: bytes) -> ShardResult | None:
    """``finished_shard`` of a shard's ``shard.json`` and ``digests.npy`` read from a URL."""
    try:
        return checked_result(name, json.loads(info), np.load(io.BytesIO(digests)))
    except (OSError, ValueError):
        return None


def checked_result(name: str, info: Any, digests: np.ndarray) -> ShardResult | None:
    """``ShardResult`` of a shard's ``shard.json`` content and digests, when they agree, else None."""
    if not isinstance(info, dict):
        return None
    if digests.dtype != np.uint8 or digests.shape != (info.get("num_crops"), DIGEST_BYTES):
        return None
    if shard_hash(digests) != info.get("hash"):
        return None
    return ShardResult(name, info, digests)


# --------------------------------------------------------------------------------------------
# the bank directory


def check_destination(path: str | os.PathLike, mode: WriteMode, probe_lock: bool = True) -> None:
    """Refuse a destination this mode must not write to (``BuildError``), or one that another
    writer holds now (``probe_lock``); reads, never writes.

    Cheap enough to call before any input is read, so that a typo costs nothing; ``BankWriter``
    checks again under the lock."""
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
    if is_url(path):
        remote.check_destination(RemotePath(path), mode, _OWN_ENTRIES, probe_lock)
        return
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise BuildError(f"{path}: exists and is not a directory")
    if probe_lock:
        DirectoryLock.probe(path)
    if (path / MANIFEST).exists() and mode == "new":
        raise BuildError(f"{path}: a bank already exists here (use --overwrite to replace it)")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _OWN_ENTRIES)
    if foreign:
        raise BuildError(
            f"{path}: holds files that are not an instbank bank's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory"
        )


class BankWriter:
    """Owns a bank directory while writing it (see the module docstring).

    ``mode``: ``"new"`` refuses a finished bank and clears an unfinished one; ``"overwrite"``
    clears a finished one too (its manifest first, so that it stops being a bank before any shard
    goes); ``"resume"`` keeps what is there (``finished_shards`` tells which can be reused).

    ``path`` may be a URL: ``path`` is then a ``RemotePath``, shards are written under
    ``staging`` (a local directory, removed on exit) and uploaded as each is finished.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str,
        crop_size: int,
        options: Mapping[str, Any] | None = None,
        mode: WriteMode = "new",
    ):
        if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
            raise ValueError(f"crop size must be a positive integer, got {crop_size!r}")
        self.path = location(path)
        self.staging: Path | None = None
        self.backend = backend
        self.crop_size = int(crop_size)
        self.options = writer_options(backend, options)  # bad options: BuildError before any write
        self.mode = mode
        check_destination(self.path, mode)
        self._lock: DirectoryLock | None = None

    def __enter__(self) -> BankWriter:
        if isinstance(self.path, RemotePath):
            return self._enter_remote()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(f"{self.path}: cannot create the output directory ({e.strerror})") from None
        lock = DirectoryLock(self.path).__enter__()
        try:
            check_destination(self.path, self.mode, probe_lock=False)  # again: it may have changed meanwhile
            self._prepare()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        self._lock = lock
        return self

    def _enter_remote(self) -> BankWriter:
        lock = remote.StoreLock(self.path).__enter__()
        try:
            check_destination(self.path, self.mode, probe_lock=False)
            remote.prepare(self.path, self.mode)
            self.staging = make_staging(json.dumps({"url": str(self.path), "owner": lock.owner}))
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    def _prepare(self) -> None:
        if self.mode != "resume":
            for name in (MANIFEST, PLAN_FILE, SHARDS_DIR):  # the manifest first: no longer a bank
                child = self.path / name
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.exists():
                    child.unlink()
        (self.path / SHARDS_DIR).mkdir(exist_ok=True)
        if not os.access(self.path, os.W_OK):
            raise BuildError(f"{self.path}: output directory is not writable")

    def shard_dir(self, name: str) -> Path:
        """Where shard ``name`` is written (in the staging directory for a bank at a URL)."""
        return (self.path if self.staging is None else self.staging) / SHARDS_DIR / name

    def shard(self, name: str, num_keypoints: int | None = None) -> ShardWriter:
        """A ``ShardWriter`` for shard ``name`` of this bank (in this process)."""
        return ShardWriter(self.shard_dir(name), self.backend, self.crop_size, self.options, num_keypoints)

    def finished_shards(self, names: Sequence[str]) -> list[ShardResult | None]:
        """Each of the shards ``names`` as an earlier run left it, when finished and intact, else
        None (for resume; at a URL: one listing, concurrent reads)."""
        if isinstance(self.path, RemotePath):
            return [None if pair is None else _result_of_bytes(name, *pair)
                    for name, pair in zip(names, remote.finished_shards(self.path, names))]
        return [finished_shard(self.path / SHARDS_DIR / name) for name in names]

    def read_plan(self) -> dict | None:
        """``build.json`` as an earlier run wrote it, or None when missing or unreadable."""
        if isinstance(self.path, RemotePath):
            return remote.get_json(self.path / PLAN_FILE)
        try:
            return json.loads((self.path / PLAN_FILE).read_text())
        except (OSError, ValueError):
            return None

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        """Write ``build.json`` (the build's plan, for ``--resume``)."""
        if isinstance(self.path, RemotePath):
            remote.put_json(self.path / PLAN_FILE, plan, "build plan")
        else:
            write_json_atomic(self.path / PLAN_FILE, plan)

    def commit(
        self,
        classes: Sequence[ClassInfo],
        shards: Sequence[ShardResult],
        build: Mapping[str, Any],
        skipped: Mapping[str, int],
        keypoints: KeypointSpec | None = None,
    ) -> dict:
        """Write ``manifest.json`` (last, durable) from the shards' results, in index order; returns
        the manifest. Nothing is copied: the shards stay where they were written. ``keypoints``: the
        bank's keypoint layout, which every shard with crops must have (``None``: none may)."""
        if self._lock is None:
            raise RuntimeError("BankWriter.commit outside its `with` block (the directory is not locked)")
        freqs = np.zeros(len(classes), np.int64)
        options: dict[str, Any] = {}
        j = None if keypoints is None else keypoints.num_keypoints
        for shard in shards:
            if shard_hash(shard.digests) != shard.info["hash"] or len(shard.digests) != shard.num_crops:
                raise BankError(f"{self.path / SHARDS_DIR / shard.dir}: digests do not match the shard's hash")
            has = shard.info.get("num_keypoints")
            if shard.num_crops and has != j:
                raise BankError(f"{self.path / SHARDS_DIR / shard.dir}: crops with {has or 'no'} keypoints, but the bank's "
                                f"layout has {j or 'none'} (a shard of another build?)")
            for cid, n in shard.info["class_ids"]:
                if not 0 <= cid < len(classes):
                    raise BankError(f"{self.path / SHARDS_DIR / shard.dir}: class id {cid} outside the class table ({len(classes)} classes)")
                freqs[cid] += n
            options = shard.info.get("backend_options", options)
        chash = content_hash(self.crop_size, classes, [shard.digests for shard in shards], keypoints)
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "crop_size": [self.crop_size, self.crop_size],
            "num_crops": int(sum(shard.num_crops for shard in shards)),
            "num_classes": len(classes),
            "classes": [c.to_json() for c in classes],
            "class_frequencies": freqs.tolist(),
            "content_hash": chash,
            "version": make_version(self.backend, chash),
            "shards": [
                {"dir": s.dir, "num_crops": s.num_crops, "hash": s.info["hash"], "payload": s.info["payload"]} for s in shards
            ],
            "backend_options": options,
            "build": dict(build),
            "skipped": dict(sorted(skipped.items())),
            "has_embeddings": False,
            **({} if keypoints is None else {"keypoints": keypoints.to_json()}),
            "instbank_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if isinstance(self.path, RemotePath):
            remote.commit(self.path, manifest, self._lock)
        else:
            write_json_atomic(self.path / MANIFEST, manifest, durable=True)
        return manifest


def write_bank(
    path: str | os.PathLike,
    backend: str,
    crop_size: int,
    classes: Sequence[ClassInfo],
    shards: Iterable[Iterable[tuple[np.ndarray, ...]]],
    *,
    options: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    keypoints: KeypointSpec | None = None,
) -> dict:
    """Write a bank of crops made elsewhere (tests, benchmarks, a pipeline of your own); returns the
    manifest. ``shards`` gives, per shard, batches ``(rgba, meta)``, ``(rgba, meta, digests)`` or
    ``(rgba, meta, digests or None, keypoints)`` (uint8 ``[n, 4, S, S]``, META_DTYPE ``[n]``, uint8
    ``[n, 32]``, float32 ``[n, J, 3]``; ``ShardWriter.append``'s arguments; keypoints with the
    layout ``keypoints``); the batches are streamed, never held together."""
    j = None if keypoints is None else keypoints.num_keypoints
    with BankWriter(path, backend, crop_size, options, mode="overwrite" if overwrite else "new") as bank:
        results = []
        for batches in shards:
            with bank.shard(shard_dir_name(len(results)), j) as shard:
                for batch in batches:
                    shard.append(*batch)
            results.append(shard.result)
        return bank.commit(classes, results, dict(build or {}), {}, keypoints)
