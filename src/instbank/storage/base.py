"""The bank on disk, common to every backend: layout, manifest, content hash, writer and reader base.

Layout of a bank directory (every backend)::

    BANK/
      manifest.json            written LAST, atomically; a directory without it is not a bank
      build.json               a build's plan (shard ranges, config, input fingerprint), for --resume
      .lock                    flock'ed by the one writer of BANK (build, convert, merge); unlocked after
      shards/
        000000/                one build shard = a contiguous chunk of images
          meta.npy             META_DTYPE [n]        geometry + class id per crop (types.META_DTYPE)
          digests.npy          uint8 [n, 32]         digest of each crop (BLAKE3; sha256 in format 1), see ``crop_digests``
          keypoints.npy        float32 [n, J, 3]     only in banks with keypoints: x, y (crop pixels), v per keypoint
          <payload>            backend-specific pixels (memmap: pixels.u8; lmdb: data.mdb; wds: *.tar)
          shard.json           written last in the shard: counts, class histogram, shard hash,
                               skip report, payload description; a shard without it is unfinished
        000001/ ...

``manifest.json`` (``FORMAT_VERSION`` 2)::

    format_version  int         readers refuse a bank newer than the FORMAT_VERSION they know
    backend         str         key of ``instbank.storage.BACKENDS``
    crop_size       [S, S]
    num_crops       int
    classes         [{id, source_id, name}]    contiguous ids 0..C-1
    class_frequencies [C] ints
    content_hash    sha256 hex (see ``content_hash``), version = "{backend}@{content_hash[:12]}"
    version         str
    shards          [{dir, num_crops, hash, payload}]   in global index order
    backend_options dict        e.g. codec, written by the payload writer
    build           dict        the build configuration (source, filters, size, workers...)
    skipped         {reason: count}
    has_embeddings  bool
    keypoints       {names, skeleton, flip}    only in banks with keypoints: the layout (types.KeypointSpec)
    instbank_version, created

Content hash (DESIGN "version"): each crop's digest is ``BLAKE3(rgba bytes [4,S,S] C-order ||
meta row bytes (META_DTYPE, which includes the class id) || keypoint bytes)`` (``sha256`` of the
same bytes in format-1 banks, ``DIGESTS``), the keypoint bytes (float32 ``[J, 3]`` little-endian,
C order) only in a bank with keypoints; the bank hash is
``sha256(header || digest_0 || digest_1 || ...)`` with ``header`` the canonical JSON of the crop size,
the class table and, only in a bank with keypoints, its layout (``"keypoints"``). So a bank without
keypoints hashes exactly as before keypoints existed. It depends on content and order only, not on
backend, sharding or workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from instbank.errors import BankError
from instbank.storage.registry import BACKENDS, get_backend
from instbank.storage.url import RemotePath, fetch_shard, is_url, location, read_all, safe_name, scratch_dir
from instbank.types import META_DTYPE, BankCrop, ClassInfo, CropMeta, KeypointSpec

#: 2: per-crop digests are BLAKE3 (was sha256 in 1; the layout is unchanged and 1 is still read).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_MANIFEST = "shard.json"
SHARDS_DIR = "shards"
#: The build's plan (shard ranges, config), written first so that a resumed build cuts the same shards.
PLAN_FILE = "build.json"
LOCK_FILE = ".lock"
#: A shard's keypoints, float32 ``[n, J, 3]``, in banks with keypoints only.
KEYPOINTS_FILE = "keypoints.npy"
KEYPOINT_DTYPE = np.dtype("<f4")
#: Where ``instbank pull`` assembles a shard before it is checked and moved into ``shards/``.
PULL_DIR = ".pull"
DIGEST_BYTES = 32


# --------------------------------------------------------------------------------------------
# hashing


#: The per-crop digest of each format version (32 bytes each). BLAKE3 hashes a 64 KiB crop 3.5x
#: faster than sha256 does with SHA-NI (6.7 against 1.9 GB/s, one core; docs/perf/build.md) and
#: is as collision-resistant; the version contract fixes what is hashed, not the function.
DIGESTS = {1: "sha256", 2: "blake3"}


def _digest_factory(format_version: int):
    name = DIGESTS.get(format_version)
    if name is None:
        raise ValueError(f"no crop digest for format version {format_version!r}; known: {sorted(DIGESTS)}")
    if name == "blake3":
        import blake3  # only where crops are hashed: reading a bank needs no hash library

        return blake3.blake3
    return hashlib.sha256


def crop_digests(rgba: np.ndarray, meta: np.ndarray, format_version: int = FORMAT_VERSION,
                 keypoints: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[n, 32]``: the digest (``DIGESTS[format_version]``) of each crop's RGBA bytes
    followed by its META_DTYPE row bytes and, in a bank with keypoints, its float32 ``[J, 3]``
    ``keypoints`` bytes (``keypoints``: ``[n, J, 3]``). Pass a bank's own ``format_version`` to
    check its stored digests; new banks use ``FORMAT_VERSION``."""
    if len(rgba) != len(meta) or (keypoints is not None and len(keypoints) != len(rgba)):
        raise ValueError(f"{len(rgba)} crops but {len(meta)} meta rows"
                         + ("" if keypoints is None else f" and {len(keypoints)} keypoint rows"))
    new = _digest_factory(format_version)
    meta = np.ascontiguousarray(meta, dtype=META_DTYPE)
    points = None if keypoints is None else np.ascontiguousarray(keypoints, KEYPOINT_DTYPE)
    out = np.empty((len(rgba), DIGEST_BYTES), np.uint8)
    for i in range(len(rgba)):
        h = new(np.ascontiguousarray(rgba[i]).data)
        h.update(meta[i : i + 1].tobytes())
        if points is not None:
            h.update(points[i].tobytes())
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def _header_bytes(crop_size: int, classes: Sequence[ClassInfo], keypoints: KeypointSpec | None = None) -> bytes:
    header = {"crop_size": [crop_size, crop_size], "classes": [c.to_json() for c in classes]}
    if keypoints is not None:  # only then: a bank without keypoints keeps its hash
        header["keypoints"] = keypoints.to_json()
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def content_hash(crop_size: int, classes: Sequence[ClassInfo], digest_chunks: Iterable[np.ndarray],
                 keypoints: KeypointSpec | None = None) -> str:
    """Bank content hash over the crop size, the class table, the keypoint layout (when the bank
    has one) and the ordered crop digests."""
    h = hashlib.sha256(_header_bytes(crop_size, classes, keypoints))
    for chunk in digest_chunks:
        h.update(np.ascontiguousarray(chunk, np.uint8).data)
    return h.hexdigest()


def shard_hash(digests: np.ndarray) -> str:
    """Hash of one shard's ordered crop digests (used to check finished shards on resume)."""
    return hashlib.sha256(np.ascontiguousarray(digests, np.uint8).data).hexdigest()


def make_version(backend: str, content: str) -> str:
    return f"{backend}@{content[:12]}"


# --------------------------------------------------------------------------------------------
# small file helpers


# Durability (what survives a power failure; a crash of the process alone loses nothing written).
# The payload (pixels, fsync'ed by each backend's writer) and manifest.json (the commit point:
# fsync of the file and of its directory, so the rename itself is on disk) are durable. The small
# files (meta.npy, digests.npy, shard.json, build.json) are only renamed into place, never seen
# half-written: fsync'ing them costs 3 fsyncs per shard (+1 for build.json), measured 0.05 s of a
# 1.1 s build of 160 images in 4 shards (docs/perf/build.md; at 512-image shards it is < 0.5%).
# The trade-off: after a power failure, a bank committed just before it can miss such a file; it
# then fails with a BankError naming the file (np.load refuses a short or empty .npy; resume
# re-checks shard.json against digests.npy), never serves wrong crops. Rebuild with --overwrite.


def write_json_atomic(path: Path, obj: Any, durable: bool = False) -> None:
    """Write JSON to ``path`` via a temporary file + rename, so readers never see half; with
    ``durable`` (the manifest), the file and the rename are fsync'ed before returning."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` via a temporary file + rename (not fsync'ed: see "Durability" above)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def read_json(path: Path | RemotePath, what: str) -> dict:
    """A JSON object from ``path`` (a file, or an object at a URL); ``BankError`` naming the file
    when it is missing, not JSON, or not an object."""
    try:
        if isinstance(path, RemotePath):
            obj = json.loads(path.read_bytes())
        else:
            with open(path) as f:
                obj = json.load(f)
    except FileNotFoundError:
        raise BankError(f"{path}: missing {what}") from None
    except OSError as e:
        if not isinstance(path, RemotePath):
            raise
        raise BankError(f"{path}: cannot read {what} ({' '.join(str(e).split())})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise BankError(f"{path}: {what} is nested too deeply to be one") from None
    if not isinstance(obj, dict):
        raise BankError(f"{path}: {what} is not a JSON object")
    return obj


def load_npy(path: Path | RemotePath) -> np.ndarray:
    """``np.load`` of a file or of an object at a URL (never a pickle: ``allow_pickle=False``)."""
    if isinstance(path, RemotePath):
        return np.load(io.BytesIO(path.read_bytes()))
    return np.load(path)


def load_shard_array(path: Path | RemotePath, what: str, dtype: np.dtype, shape: tuple[int, ...],
                     data: bytes | None = None) -> np.ndarray:
    """``np.load`` of a shard's index file (or of its bytes ``data``, read already), or a one-line
    ``BankError`` naming it when it cannot be read or has the wrong dtype/shape (a truncated or
    foreign file must never be used)."""
    try:
        array = np.load(io.BytesIO(data)) if data is not None else load_npy(path)
    except (OSError, ValueError) as e:
        raise BankError(f"{path}: cannot read {what} ({e})") from None
    if array.dtype != dtype or array.shape != shape:
        raise BankError(f"{path}: expected {what} of {np.dtype(dtype)} {list(shape)}, found {array.dtype} {list(array.shape)}")
    return array


def load_shard_meta(shard_dir: Path, num_crops: int) -> np.ndarray:
    """META_DTYPE ``[num_crops]`` rows of ``shard_dir/meta.npy`` (checked)."""
    return load_shard_array(location(shard_dir) / "meta.npy", "crop index", META_DTYPE, (num_crops,))


def load_shard_digests(shard_dir: Path, num_crops: int) -> np.ndarray:
    """uint8 ``[num_crops, 32]`` of ``shard_dir/digests.npy`` (checked)."""
    return load_shard_array(location(shard_dir) / "digests.npy", "crop digests", np.dtype(np.uint8), (num_crops, DIGEST_BYTES))


def load_shard_keypoints(shard_dir: Path, num_crops: int, num_keypoints: int, data: bytes | None = None) -> np.ndarray:
    """float32 ``[num_crops, J, 3]`` of ``shard_dir/keypoints.npy`` (or of its bytes ``data``),
    checked: its dtype and shape, finite values, visibilities 0, 1, 2 (a ``BankError`` naming the
    file otherwise). A shard without crops needs no file."""
    if num_crops == 0:
        return np.empty((0, num_keypoints, 3), KEYPOINT_DTYPE)
    path = location(shard_dir) / KEYPOINTS_FILE
    points = load_shard_array(path, "keypoints", KEYPOINT_DTYPE, (num_crops, num_keypoints, 3), data)
    if not np.isfinite(points).all() or not np.isin(points[..., 2], (0, 1, 2)).all():
        raise BankError(f"{path}: keypoints hold a NaN/inf or a visibility other than 0, 1, 2 (run instbank verify)")
    return points


def keypoint_spec_of(manifest: Mapping[str, Any]) -> KeypointSpec | None:
    """The layout of a checked manifest's ``keypoints`` (``None``: a bank without keypoints)."""
    entry = manifest.get("keypoints")
    return None if entry is None else KeypointSpec.from_json(entry)


def classes_from_json(entries: Sequence[Mapping[str, Any]]) -> list[ClassInfo]:
    return [ClassInfo(int(c["id"]), int(c["source_id"]), str(c["name"])) for c in entries]


def load_manifest(bank_dir: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` (of a bank directory or URL); raises ``BankError`` naming
    the file on any problem.

    Every field a reader uses is checked for its type and range (``check_manifest``), so that a
    crafted or damaged manifest can neither point outside the bank directory nor make a reader
    allocate absurd amounts of memory."""
    bank_dir = location(bank_dir)
    path = bank_dir / MANIFEST
    try:
        if not bank_dir.is_dir():
            raise BankError(f"{bank_dir}: no such bank directory")
        if not path.exists():
            raise BankError(f"{bank_dir}: not a finished instbank bank (no {MANIFEST}; an interrupted build?)")
    except OSError as e:  # a URL that cannot be listed (no credentials, no connection, no bucket)
        raise BankError(f"{bank_dir}: cannot read the bank ({' '.join(str(e).split())})") from None
    manifest = read_json(path, "bank manifest")
    check_manifest(manifest, path)
    return manifest


#: Bounds of what a reader accepts: far above any real bank, far below what would exhaust memory.
MAX_CROP_SIZE = 16384
MAX_CROPS = 1 << 40


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def safe_member(directory: Path, name: Any, where: Path) -> Path:
    """``directory / name`` for a file name read from a bank's metadata; ``BankError`` naming
    ``where`` unless ``name`` is one plain path component (no separator, no ``..``)."""
    if not safe_name(name):
        raise BankError(f"{where}: {name!r} is not a plain file name inside the bank")
    return directory / name


def check_manifest(manifest: Any, path: Path) -> None:
    """``BankError`` naming ``path`` and the field when the manifest is not one this instbank reads."""
    if not isinstance(manifest, dict):
        raise BankError(f"{path}: the manifest is not a JSON object")
    version = manifest.get("format_version")
    if not _is_int(version, 1, 1 << 31):
        raise BankError(f"{path}: no integer format_version")
    if version > FORMAT_VERSION:
        raise BankError(
            f"{path}: bank format version {version} is newer than this instbank reads "
            f"({FORMAT_VERSION}); upgrade instbank"
        )
    for key in ("backend", "crop_size", "num_crops", "classes", "shards", "content_hash"):
        if key not in manifest:
            raise BankError(f"{path}: manifest has no '{key}'")
    if not isinstance(manifest["backend"], str) or manifest["backend"] not in BACKENDS:
        raise BankError(f"{path}: unknown backend {manifest['backend']!r} (this instbank reads {', '.join(BACKENDS)})")
    size = manifest["crop_size"]
    if not (isinstance(size, list) and len(size) == 2 and size[0] == size[1] and _is_int(size[0], 1, MAX_CROP_SIZE)):
        raise BankError(f"{path}: crop_size must be [S, S] with S in 1..{MAX_CROP_SIZE}, got {size!r}")
    if not _is_int(manifest["num_crops"], 0, MAX_CROPS):
        raise BankError(f"{path}: num_crops must be an integer in 0..{MAX_CROPS}, got {manifest['num_crops']!r}")
    if not isinstance(manifest["content_hash"], str) or not isinstance(manifest.get("version", ""), str):
        raise BankError(f"{path}: content_hash and version must be strings")
    for key in ("build", "backend_options", "skipped"):
        if not isinstance(manifest.get(key, {}), dict):
            raise BankError(f"{path}: {key} must be a JSON object")
    if not all(_is_int(v, 0, MAX_CROPS) for v in manifest.get("skipped", {}).values()):
        raise BankError(f"{path}: skipped must map reasons to counts")
    _check_classes(manifest, path)
    _check_shards(manifest["shards"], path)
    if "keypoints" in manifest:
        try:
            KeypointSpec.from_json(manifest["keypoints"])
        except ValueError as e:
            raise BankError(f"{path}: keypoints: {e}") from None


def _check_classes(manifest: dict, path: Path) -> None:
    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and _is_int(c.get("id"), 0, MAX_CROPS) and _is_int(c.get("source_id"), -(1 << 63), 1 << 63)
        and isinstance(c.get("name"), str) for c in classes
    ):
        raise BankError(f"{path}: classes must be a list of {{id, source_id, name}} objects")
    if [c["id"] for c in classes] != list(range(len(classes))):
        raise BankError(f"{path}: class ids must be 0..{len(classes) - 1} in order")
    freqs = manifest.get("class_frequencies", [0] * len(classes))
    if not (isinstance(freqs, list) and len(freqs) == len(classes) and all(_is_int(f, 0, MAX_CROPS) for f in freqs)):
        raise BankError(f"{path}: class_frequencies must be {len(classes)} counts, one per class")


def _check_shards(shards: Any, path: Path) -> None:
    if not isinstance(shards, list):
        raise BankError(f"{path}: shards must be a list")
    seen = set()
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("payload"), dict) or not isinstance(shard.get("hash"), str):
            raise BankError(f"{path}: shard entry {k} must be an object with dir, num_crops, hash and payload")
        safe_member(path.parent / SHARDS_DIR, shard.get("dir"), path)
        if shard["dir"] in seen:
            raise BankError(f"{path}: shard directory {shard['dir']!r} is listed twice")
        seen.add(shard["dir"])
        if not _is_int(shard.get("num_crops"), 0, MAX_CROPS):
            raise BankError(f"{path}: shard {shard['dir']}: num_crops must be an integer in 0..{MAX_CROPS}")


def open_bank(path: str | os.PathLike) -> ShardedBank:
    """Open a finished bank of any backend (dispatch on ``manifest["backend"]``).

    ``path`` may be a URL (``s3://bucket/bank``, any fsspec URL) of a bank whose backend reads
    there (``READS_URLS``: WebDataset); a memmap or LMDB bank at a URL is a ``BankError`` saying
    how to pull it (``instbank.storage.open_bank(URL, cache=DIR)`` does)."""
    manifest = load_manifest(path)
    module = get_backend(manifest["backend"])
    if is_url(path) and not getattr(module, "READS_URLS", False):
        raise BankError(f"{path}: a {manifest['backend']} bank is read from local disk: pull it first "
                        f"(instbank pull {path} DIR, or open_bank(URL, cache=DIR)); webdataset banks are read at a URL")
    return module.Reader(path, manifest)


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[ShardedBank]:
    """The bank at ``path`` opened for one pass over its shards in order (convert, merge,
    verify): a local bank as ``open_bank`` opens it; a bank at a URL, of any backend, with each
    shard downloaded into a temporary directory when first read and removed by ``release``."""
    if not is_url(path):
        with open_bank(path) as bank:
            yield bank
        return
    manifest = load_manifest(path)
    with scratch_dir() as scratch, get_backend(manifest["backend"]).Reader(path, manifest) as bank:
        bank.fetch_to(scratch)
        yield bank


# --------------------------------------------------------------------------------------------
# writing


class PayloadWriter(Protocol):
    """What a backend implements to write its pixels for one shard.

    A backend module provides ``writer_options(options) -> dict`` (its defaults merged with the
    user's options, every value checked; ``ValueError`` saying what is wrong) and
    ``Writer(shard_dir: Path, crop_size: int, options: Mapping)``, given those options. ``append``
    receives crops in global order (``first_index`` is the shard-local index of ``rgba[0]``)
    and, in a bank with keypoints, their float32 ``[n, J, 3]`` keypoints (``None`` otherwise; a
    backend may store them in its payload too, as the WebDataset tars do);
    ``close`` finishes the files and returns the JSON-able payload description stored in
    ``shard.json["payload"]``; ``abort`` closes without finishing. ``backend_options`` (class
    attribute or property) is recorded in the bank manifest (e.g. the codec).
    """

    backend_options: Mapping[str, Any]

    def append(self, rgba: np.ndarray, meta: np.ndarray, first_index: int, keypoints: np.ndarray | None = None) -> None: ...

    def close(self) -> dict: ...

    def abort(self) -> None: ...


def merge_options(backend: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A payload writer's ``defaults`` updated with the user's ``options``; ``ValueError`` naming
    the unknown keys and the valid ones (values are each backend's to check)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {backend} backend options {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **options}


# --------------------------------------------------------------------------------------------
# reading


@runtime_checkable
class InstanceBank(Protocol):
    """The read side, the same for every backend (DESIGN "InstanceBank protocol")."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> BankCrop: ...

    def get_many(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...

    @property
    def keypoint_table(self) -> np.ndarray | None: ...

    def get_keypoints(self, indices) -> np.ndarray | None: ...

    @property
    def crop_class_ids(self) -> np.ndarray: ...

    @property
    def class_frequencies(self) -> np.ndarray: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def crop_size(self) -> tuple[int, int]: ...

    @property
    def has_embeddings(self) -> bool: ...

    @property
    def meta_table(self) -> np.ndarray: ...

    @property
    def version(self) -> str: ...


class ShardedBank:
    """Reader base for every backend: index, metadata and worker safety live here; a backend
    implements ``_open_payload`` and ``_read``.

    Worker safety (DESIGN "Workers"): the object holds paths; payload handles are opened on first
    use in each process, reopened when ``os.getpid()`` changes (fork), and dropped by
    ``__getstate__`` (spawn/forkserver pickle only the path and manifest).
    """

    backend = ""

    def __init__(self, path: str | os.PathLike, manifest: dict | None = None):
        self.path = location(path)
        self.manifest = manifest if manifest is not None else load_manifest(self.path)
        if self.manifest["backend"] != self.backend:
            raise BankError(f"{self.path / MANIFEST}: backend is {self.manifest['backend']!r}, not {self.backend!r}")
        self.classes = classes_from_json(self.manifest["classes"])
        self._shards = self.manifest["shards"]
        counts = np.array([s["num_crops"] for s in self._shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._len = int(self._starts[-1])
        if self._len != self.manifest["num_crops"]:
            raise BankError(f"{self.path / MANIFEST}: shards hold {self._len} crops, manifest says {self.manifest['num_crops']}")
        self._s = int(self.manifest["crop_size"][0])
        self._meta: np.ndarray | None = None
        self._keypoints: np.ndarray | None = None
        #: The bank's keypoint layout (``types.KeypointSpec``), ``None`` for a bank without keypoints.
        self.keypoint_spec = keypoint_spec_of(self.manifest)
        self._handles: dict[int, Any] = {}
        self._pid: int | None = None
        self._scratch: Path | None = None

    # ---- per-process payload handles
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_pid"] = None
        state["_meta"] = None  # reloaded from disk: pickles stay a path, not the data
        state["_keypoints"] = None
        return state

    def _handle(self, shard: int) -> Any:
        pid = os.getpid()
        if self._pid != pid:
            # Forked child: the parent's handles are not ours to use or close.
            self._handles = {}
            self._pid = pid
        h = self._handles.get(shard)
        if h is None:
            entry = self._shards[shard]
            try:
                h = self._handles[shard] = self._open_payload(self.payload_dir(shard), entry)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                # A payload description that is not what this backend wrote (damaged or crafted).
                raise BankError(f"{self.path / MANIFEST}: shard {entry['dir']}: malformed payload description ({e!r})") from None
            except BankError as e:
                if self._scratch is None:
                    raise
                raise self._named(e) from None
        return h

    # ---- a bank at a URL read shard by shard (instbank.storage.remote)
    def fetch_to(self, scratch: Path) -> None:
        """Read this bank's payloads from local copies under ``scratch``: each shard is downloaded
        when first read and removed by ``release`` (for a pass over the shards in order)."""
        self._scratch = Path(scratch)

    def payload_dir(self, shard: int) -> Path | RemotePath:
        """Where shard ``shard``'s payload files are read: its directory, or its local copy."""
        sdir = self.path / SHARDS_DIR / self._shards[shard]["dir"]
        if self._scratch is None:
            return sdir
        return fetch_shard(sdir, self._scratch / SHARDS_DIR / self._shards[shard]["dir"])

    def release(self, shard: int) -> None:
        """Close shard ``shard``'s payload in this process and remove its local copy, if any."""
        h = self._handles.pop(shard, None) if self._pid == os.getpid() else None
        if h is not None:
            self._close_payload(h)
        if self._scratch is not None:
            shutil.rmtree(self._scratch / SHARDS_DIR / self._shards[shard]["dir"], ignore_errors=True)

    def _named(self, error: BankError) -> BankError:
        """``error`` naming the bank's URL where it names a local copy of a shard."""
        return BankError(str(error).replace(str(self._scratch), str(self.path)))

    def close(self) -> None:
        """Close payload handles of this process (safe to call more than once)."""
        if self._pid == os.getpid():
            for h in self._handles.values():
                self._close_payload(h)
        self._handles = {}
        self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- backend hooks
    def _open_payload(self, shard_dir: Path, shard: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_payload(self, handle: Any) -> None:
        close = getattr(handle, "close", None)
        if close is not None:
            close()

    def _read(self, handle: Any, local: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
        """Write crops ``local`` (int64 shard-local indices) of one shard into ``out`` [n,4,S,S]."""
        raise NotImplementedError

    # ---- the protocol
    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self._len} crops, {self.version})"

    def _normalize(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"crop indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -self._len or idx.max() >= self._len):
            bad = idx[(idx < -self._len) | (idx >= self._len)][0]
            raise IndexError(f"crop index {bad} out of range for a bank of {self._len} crops")
        return np.where(idx < 0, idx + self._len, idx)

    def get_many(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[n, 4, S, S]`` crops at ``indices`` (any int array shape, flattened), written into
        ``out`` when given (must be C-contiguous uint8 of that shape)."""
        idx = self._normalize(indices)
        s = self._s
        if out is None:
            out = np.empty((len(idx), 4, s, s), np.uint8)
        elif out.shape != (len(idx), 4, s, s) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 {(len(idx), 4, s, s)}, got {out.dtype} {out.shape}")
        if len(idx) == 0:
            return out
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        first = shard_of[0]
        try:
            if (shard_of == first).all():  # the common case: one gather straight into `out`
                self._read(self._handle(int(first)), idx - self._starts[first], out)
                return out
            for shard in np.unique(shard_of):
                pos = np.flatnonzero(shard_of == shard)
                part = np.empty((len(pos), 4, s, s), np.uint8)
                self._read(self._handle(int(shard)), idx[pos] - self._starts[shard], part)
                out[pos] = part
        except BankError as e:
            if self._scratch is None:
                raise
            raise self._named(e) from None
        return out

    def __getitem__(self, i) -> BankCrop:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"bank indices must be integers, got {type(i).__name__} (use get_many for arrays)")
        j = int(self._normalize([i])[0])
        row = self.meta_table[j]
        points = None if self.keypoint_spec is None else self.keypoint_table[j].copy()
        return BankCrop(self.get_many([j])[0], int(row["class_id"]), CropMeta.from_row(row), None, points)

    def __iter__(self):
        for i in range(self._len):
            yield self[i]

    @property
    def meta_table(self) -> np.ndarray:
        """META_DTYPE ``[N]`` structured array, one row per crop (loaded once per process)."""
        if self._meta is None:
            files = [self.path / SHARDS_DIR / s["dir"] / "meta.npy" for s in self._shards]
            blobs = read_all(files)  # at a URL: fetched together, not one request after another
            parts = [load_shard_array(f, "crop index", META_DTYPE, (s["num_crops"],), blob)
                     for f, s, blob in zip(files, self._shards, blobs)]
            meta = np.concatenate(parts) if parts else np.empty(0, META_DTYPE)
            ids = meta["class_id"]
            if len(ids) and (ids.min() < 0 or ids.max() >= len(self.classes)):
                raise BankError(f"{self.path}: crops have class ids outside the class table ({len(self.classes)} classes; run instbank verify)")
            self._meta = meta
        return self._meta

    @property
    def keypoint_table(self) -> np.ndarray | None:
        """float32 ``[N, J, 3]``, every crop's keypoints (``BankBatch.keypoints``' convention),
        loaded once per process like ``meta_table`` (12 bytes per keypoint: 204 per crop for COCO's
        17); ``None`` for a bank without keypoints."""
        if self.keypoint_spec is None:
            return None
        if self._keypoints is None:
            j = self.keypoint_spec.num_keypoints
            dirs = [self.path / SHARDS_DIR / s["dir"] for s in self._shards]
            blobs = read_all([d / KEYPOINTS_FILE for d in dirs])  # at a URL: fetched together
            parts = [load_shard_keypoints(d, s["num_crops"], j, blob) for d, s, blob in zip(dirs, self._shards, blobs)]
            self._keypoints = np.concatenate(parts) if parts else np.empty((0, j, 3), KEYPOINT_DTYPE)
        return self._keypoints

    def get_keypoints(self, indices) -> np.ndarray | None:
        """float32 ``[n, J, 3]`` keypoints of the crops at ``indices`` (any int array shape,
        flattened), in crop pixels; ``None`` for a bank without keypoints."""
        idx = self._normalize(indices)
        table = self.keypoint_table
        return None if table is None else table[idx]

    @property
    def crop_class_ids(self) -> np.ndarray:
        """int64 ``[N]`` class id of every crop (from the index, no pass over pixels)."""
        return self.meta_table["class_id"]

    @property
    def class_frequencies(self) -> np.ndarray:
        """int64 ``[C]`` crops per class."""
        return np.asarray(self.manifest["class_frequencies"], np.int64)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def crop_size(self) -> tuple[int, int]:
        return (self._s, self._s)

    @property
    def has_embeddings(self) -> bool:
        return bool(self.manifest.get("has_embeddings", False))

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def shard_dirs(self) -> list[Path]:
        return [self.path / SHARDS_DIR / s["dir"] for s in self._shards]

    def iter_shards(self):
        """Yield ``(shard_dir, shard_entry, global_start)`` in index order (for convert/verify)."""
        for i, s in enumerate(self._shards):
            yield self.path / SHARDS_DIR / s["dir"], s, int(self._starts[i])
