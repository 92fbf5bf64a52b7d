"""LMDB backend: one zstd frame per crop in one LMDB environment per build shard.

Smaller on disk than memmap (3.2x smaller than raw on real 128 px COCO crops with the default
``up-rgb`` filter, docs/perf/backends.md) at the cost of one zstd decode per crop read.

**One environment per build shard**, not one per bank: shards are written by independent processes
or Ray tasks and a killed build resumes shard by shard, which one shared environment (one writer
at a time) would serialise. Each environment is a single file (``subdir=False``) opened with
``lock=False``: a bank is immutable once its manifest exists and each shard has exactly one writer,
so LMDB's lock file and reader table would only add a second file per shard and a reader limit.

Payload layout of one shard (beside the common ``meta.npy``/``digests.npy``/``shard.json``):

| file / record | layout                                                                           |
|---------------|----------------------------------------------------------------------------------|
| data.mdb      | LMDB environment file (``subdir=False``, no lock file), one unnamed database      |
| key           | 8 bytes: shard-local crop index, big-endian uint64 (sorted = written order)      |
| value         | one zstd frame (content size and xxhash64 checksum in the frame) of the filtered |
|               | crop: uint8 ``[4, S, S]`` C order, i.e. ``4*S*S`` bytes once decompressed        |

Filters (``backend_options["filter"]``), applied before compression and undone after reading:

| filter   | stored bytes                                                                        |
|----------|-------------------------------------------------------------------------------------|
| none     | the crop as is                                                                      |
| up-rgb   | R, G, B rows ``r >= 1`` hold ``row[r] - row[r-1]`` mod 256 (PNG "Up"); row 0 and    |
|          | alpha as is. Undone by a running sum over rows, one vectorised add per row          |

``up-rgb`` is the default: on real crops it makes values 1.4x smaller than plain zstd (3.61x vs
2.58x raw at S=128) for 1.4-1.5x the decode time; a horizontal delta compresses no better and is
5x slower to undo in numpy (a prefix sum along the contiguous axis). Alpha is left alone: a delta
makes it no smaller. Values over ~2 KB take whole 4 KiB overflow pages (+12% at S=128, +38% at
S=64 over the frames). Measured in docs/perf/backends.md.

``shard.json["payload"]`` = ``{"file": "data.mdb", "size": bytes, "entries": n, "codec": "zstd",
"level": 3, "filter": "up-rgb"}``; the bank manifest's ``backend_options`` holds the same codec,
level and filter. Readers refuse a codec or filter they do not know.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from instbank.errors import BankError
from instbank.storage.base import MANIFEST, SHARD_MANIFEST, ShardedBank, merge_options, safe_member
from instbank.storage.codec import frame_compressor, zstd_decode_into
from instbank.storage.registry import CODECS as BACKEND_CODECS

DATA = "data.mdb"
CODECS = BACKEND_CODECS["lmdb"]
FILTERS = ("none", "up-rgb")
DEFAULT_OPTIONS: Mapping[str, Any] = {"codec": "zstd", "level": 3, "filter": "up-rgb"}
#: First map size of a writer; doubled on MapFullError. Without ``writemap`` the file grows with
#: the data, not with the map size, and readers map only what the file holds.
INITIAL_MAP_SIZE = 64 << 20


# --------------------------------------------------------------------------------------------
# filters


def apply_filter(rgba: np.ndarray, name: str) -> np.ndarray:
    """uint8 ``[n, 4, S, S]`` -> the bytes to compress (a new C-contiguous array for ``up-rgb``)."""
    rgba = np.ascontiguousarray(rgba)
    if name == "none":
        return rgba
    out = rgba.copy()
    np.subtract(rgba[:, :3, 1:], rgba[:, :3, :-1], out=out[:, :3, 1:])  # uint8: wraps mod 256
    return out


def undo_filter(stored: np.ndarray, name: str) -> None:
    """Invert ``apply_filter`` in place on uint8 ``[n, 4, S, S]``."""
    if name == "none":
        return
    rgb = stored[:, :3]
    # One add per row over every crop and channel: 40k crops/s at S=128, 5x np.cumsum (measured).
    for r in range(1, rgb.shape[2]):
        np.add(rgb[:, :, r], rgb[:, :, r - 1], out=rgb[:, :, r])


def check_codec(options: Mapping[str, Any], where: Path) -> None:
    """Refuse a codec or filter this reader does not know (``BankError`` naming ``where``)."""
    codec, filt = options.get("codec"), options.get("filter", "none")
    if codec not in CODECS:
        raise BankError(f"{where}: unknown LMDB codec {codec!r} (this instbank reads {', '.join(CODECS)})")
    if filt not in FILTERS:
        raise BankError(f"{where}: unknown LMDB filter {filt!r} (this instbank reads {', '.join(FILTERS)})")


def writer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    merged = merge_options("lmdb", options, DEFAULT_OPTIONS)
    if merged["codec"] not in CODECS:
        raise ValueError(f"lmdb codec must be one of {CODECS}, got {merged['codec']!r}")
    if merged["filter"] not in FILTERS:
        raise ValueError(f"lmdb filter must be one of {FILTERS}, got {merged['filter']!r}")
    if not isinstance(merged["level"], int) or not 1 <= merged["level"] <= 22:
        raise ValueError(f"zstd level must be an integer in 1..22, got {merged['level']!r}")
    return merged


def encode_keys(local: np.ndarray) -> list[bytes]:
    """Shard-local indices -> 8-byte big-endian keys (byte order = numeric order, so appends sort)."""
    raw = np.asarray(local, np.int64).astype(">u8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


# --------------------------------------------------------------------------------------------
# writing


class Writer:
    """Compresses each appended batch and appends it to the shard's LMDB file in one transaction."""

    def __init__(self, shard_dir: Path, crop_size: int, options: Mapping[str, Any]):
        import lmdb

        self.options = writer_options(options)
        self.backend_options = dict(self.options)
        self.path = Path(shard_dir) / DATA
        self.crop_size = crop_size
        self._compressor = frame_compressor(self.options["level"])
        # sync off while appending, one fsync in close(): a crashed shard is redone anyway.
        self._env = lmdb.open(
            str(self.path), subdir=False, lock=False, map_size=INITIAL_MAP_SIZE, sync=False, metasync=False,
            readahead=False, meminit=False,
        )  # fmt: skip
        self._n = 0

    def append(self, rgba: np.ndarray, meta: np.ndarray, first_index: int, keypoints: np.ndarray | None = None) -> None:
        stored = apply_filter(rgba, self.options["filter"])
        values = [self._compressor.compress(stored[i].data) for i in range(len(stored))]
        items = list(zip(encode_keys(np.arange(first_index, first_index + len(values))), values))
        self._put_all(items)
        self._n += len(items)

    def _put_all(self, items: list[tuple[bytes, bytes]]) -> None:
        import lmdb

        while True:
            try:
                with self._env.begin(write=True) as txn:
                    txn.cursor().putmulti(items, append=True)
                return
            except lmdb.MapFullError:  # the transaction was aborted: grow the map and redo it
                self._env.set_mapsize(2 * self._env.info()["map_size"])

    def close(self) -> dict:
        self._env.sync(True)
        self._env.close()
        return {"file": DATA, "size": self.path.stat().st_size, "entries": self._n, **self.options}

    def abort(self) -> None:
        self._env.close()


# --------------------------------------------------------------------------------------------
# reading: one environment per file per process, closed before fork


class StaleHandle(Exception):
    """The environment of a handle was closed by a fork since the handle was made (internal)."""


class _EnvPool:
    """This process's LMDB environments, one per file, shared by every Reader, closed before fork.

    lmdb >= 2.0 refuses to open one file twice in a process (keyed by device and inode), and a
    forked child inherits that registry. So Readers of one process share environments (a bank
    opened twice, an unpickled copy), and before a fork every environment is closed, once reads
    running in other threads are done (closing unmaps the values they decode); Readers drop their
    handles and reopen lazily, the parent as well as the child.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.envs: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) -> [environment, users]
        self.active_reads = 0
        self.generation = 0  # +1 at every fork: handles from before are stale
        self.readers: weakref.WeakSet = weakref.WeakSet()

    def acquire(self, path: Path, key: tuple[int, int]) -> tuple[Any, int]:
        """The shared environment of ``path`` and the generation it belongs to."""
        import lmdb

        with self.cond:
            entry = self.envs.get(key)
            if entry is None:
                try:
                    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
                except lmdb.Error as e:
                    raise BankError(f"{path}: cannot open LMDB file ({e})") from None
                entry = self.envs[key] = [env, 0]
            entry[1] += 1
            return entry[0], self.generation

    def release(self, key: tuple[int, int], env) -> None:
        with self.cond:
            entry = self.envs.get(key)
            if entry is None or entry[0] is not env:  # closed by a fork already
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self.envs[key]
                env.close()

    @contextmanager
    def reading(self, generation: int):
        """Around every read: refuses a stale handle, and holds off a fork until it is done."""
        with self.cond:
            if generation != self.generation:
                raise StaleHandle
            self.active_reads += 1
        try:
            yield
        finally:
            with self.cond:
                self.active_reads -= 1
                if not self.active_reads:
                    self.cond.notify_all()

    def before_fork(self) -> None:
        self.cond.acquire()
        while self.active_reads:
            self.cond.wait()
        self.generation += 1
        for reader in list(self.readers):
            reader._handles = {}
            reader._pid = None
        for env, _ in self.envs.values():
            env.close()
        self.envs.clear()

    def after_fork_in_parent(self) -> None:
        self.cond.release()

    def after_fork_in_child(self) -> None:
        self.cond = threading.Condition()  # the inherited one is held by the forking thread
        self.active_reads = 0


_POOL = _EnvPool()
os.register_at_fork(
    before=_POOL.before_fork, after_in_parent=_POOL.after_fork_in_parent, after_in_child=_POOL.after_fork_in_child
)


class _ShardEnv:
    """A reader's view of one shard: the shared environment and how to decode its values."""

    def __init__(self, shard_dir: Path, shard: dict, path: Path, key: tuple[int, int]):
        self.shard_dir, self.shard, self.path, self.key = shard_dir, shard, path, key
        self.filter = shard["payload"].get("filter", "none")
        self.env, self.generation = _POOL.acquire(path, key)

    def read(self, local: np.ndarray, out: np.ndarray) -> None:
        import lmdb

        flat = out.reshape(len(local), -1)
        keys = encode_keys(local)
        try:
            # buffers=True: values are views into the map, decompressed without a copy; one read
            # transaction per batch.
            with _POOL.reading(self.generation), self.env.begin(buffers=True) as txn:
                for k, key in enumerate(keys):
                    value = txn.get(key)
                    if value is None:
                        raise BankError(f"{self.path}: no value for key {int(local[k])} (corrupt shard)")
                    try:
                        zstd_decode_into(value, flat[k])
                    except ValueError as e:
                        raise BankError(f"{self.path} key {int(local[k])}: stored crop {e} (corrupt)") from None
        except lmdb.Error as e:
            raise BankError(f"{self.path}: LMDB read failed ({e})") from None
        undo_filter(out, self.filter)

    def close(self) -> None:
        _POOL.release(self.key, self.env)


class Reader(ShardedBank):
    """LMDB bank reader; ``get_many`` decodes each crop straight into the output batch."""

    backend = "lmdb"

    def __init__(self, path, manifest: dict | None = None):
        super().__init__(path, manifest)
        check_codec(self.manifest.get("backend_options", {}), self.path / MANIFEST)
        _POOL.readers.add(self)

    def _open_payload(self, shard_dir: Path, shard: dict) -> _ShardEnv:
        payload = shard["payload"]
        check_codec(payload, shard_dir / SHARD_MANIFEST)
        path = safe_member(shard_dir, payload.get("file"), shard_dir / SHARD_MANIFEST)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BankError(f"{path}: LMDB file missing") from None
        if st.st_size != payload["size"]:
            # Checked before mapping it: a page past the end of a truncated file is a SIGBUS.
            raise BankError(f"{path}: LMDB file has {st.st_size} bytes, expected {payload['size']} (truncated?)")
        handle = _ShardEnv(shard_dir, shard, path, (st.st_dev, st.st_ino))
        entries = handle.env.stat()["entries"]
        if entries != shard["num_crops"]:
            handle.close()
            raise BankError(f"{path}: holds {entries} crops, the manifest says {shard['num_crops']}")
        return handle

    def _read(self, handle: _ShardEnv, local: np.ndarray, out: np.ndarray) -> None:
        try:
            handle.read(local, out)
        except StaleHandle:  # another thread forked between this call's handle lookup and its read
            fresh = self._open_payload(handle.shard_dir, handle.shard)
            try:
                fresh.read(local, out)
            finally:
                fresh.close()
