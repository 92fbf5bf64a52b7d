"""WebDataset backend: standard tar shards, streamable with ``webdataset`` and randomly accessible.

Each build shard holds one or more tar files written by ``webdataset.ShardWriter``; any
WebDataset pipeline (local paths, ``pipe:``/object-storage urls) can stream them, and the bank's
own reader gets random access through an index of member offsets written beside the tars, so a
read is one ``mmap`` slice per crop, with no tar parsing.

Payload layout of one shard (beside the common ``meta.npy``/``digests.npy``/``shard.json``):

| file / member            | layout                                                              |
|--------------------------|---------------------------------------------------------------------|
| bank-%06d.tar            | ustar archives (512-byte header blocks), cut at ``maxcount`` samples |
|                          | or ``maxsize`` bytes, mtime 0 (same crops -> same bytes)             |
| KEY.cls                  | class id, ASCII decimal                                             |
| KEY.json                 | the crop's meta row (``META_DTYPE`` fields) as a JSON object, and in |
|                          | a bank with keypoints ``"keypoints"``: ``[[x, y, v], ...]`` (J rows, |
|                          | the float32 values of ``keypoints.npy``, exact through JSON)         |
| KEY.rgba.zst             | codec ``zstd`` (default): one zstd frame (content size, checksum) of |
|                          | the crop, uint8 ``[4, S, S]`` C order; ``zstd -d`` gives raw RGBA    |
| KEY.rgba                 | codec ``raw``: the crop's ``4*S*S`` bytes as they are                |
| KEY.png                  | codec ``png``: an RGBA PNG (``S x S``), opens in any image viewer     |
| index.npy                | ``INDEX_DTYPE [n]``: per crop, tar number, data offset, data size   |

``KEY`` = ``{shard dir}-{shard-local index:09d}`` (e.g. ``000003-000001234``): unique in the bank,
sorted like the global index, no dot (WebDataset splits the key from the extension at the first
dot). Members of one sample are written in sorted order: ``.cls``, ``.json``, then pixels.

``shard.json["payload"]`` = ``{"tars": [{"file", "size", "count"}], "index": "index.npy",
"codec", "member", "level"}``; the manifest's ``backend_options`` holds codec, level, maxcount and
maxsize. The reader checks that every tar has its recorded size and that the index fits inside.

A bank at a URL (``open_bank("s3://...")``) is read in place: ``get_many`` fetches each crop's
pixel member by a range request (fsspec ``cat_ranges``: the requests of one call run
concurrently), ``stream`` opens each tar with fsspec and reads it once, front to back.
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from instbank.errors import BankError
from instbank.storage.base import (
    MANIFEST, SHARD_MANIFEST, ShardedBank, load_npy, merge_options, safe_member, save_npy_atomic,
)  # fmt: skip
from instbank.storage.codec import frame_compressor, zstd_decode_into
from instbank.storage.registry import CODECS
from instbank.storage.url import RemotePath, filesystem, store_errors
from instbank.types import BankCrop, CropMeta

TAR_PATTERN = "bank-%06d.tar"
INDEX = "index.npy"
INDEX_DTYPE = np.dtype([("tar", "<i4"), ("offset", "<i8"), ("size", "<i8")])
MEMBERS = {"zstd": "rgba.zst", "raw": "rgba", "png": "png"}
assert tuple(MEMBERS) == CODECS["webdataset"], "a codec without its member name (or the other way)"
# One tar per 1 GB by default: big enough for streaming throughput, small enough to spread
# over DataLoader workers and nodes (WebDataset splits a bank by tar file).
DEFAULT_OPTIONS: Mapping[str, Any] = {"codec": "zstd", "level": 3, "maxcount": 100_000, "maxsize": 1_000_000_000}
#: ``open_bank`` reads banks of this backend at a URL (by range requests), without pulling them.
READS_URLS = True


def writer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    merged = merge_options("webdataset", options, DEFAULT_OPTIONS)
    if merged["codec"] not in MEMBERS:
        raise ValueError(f"webdataset codec must be one of {sorted(MEMBERS)}, got {merged['codec']!r}")
    for name in ("maxcount", "maxsize"):
        if not isinstance(merged[name], int) or merged[name] < 1:
            raise ValueError(f"webdataset {name} must be a positive integer, got {merged[name]!r}")
    if merged["codec"] != "zstd":
        del merged["level"]  # recorded only where it means something
    return merged


def check_codec(options: Mapping[str, Any], where: Path) -> None:
    """Refuse a codec this reader does not know (``BankError`` naming ``where``)."""
    if options.get("codec") not in MEMBERS:
        raise BankError(
            f"{where}: unknown webdataset codec {options.get('codec')!r} (this instbank reads {', '.join(MEMBERS)})"
        )


# --------------------------------------------------------------------------------------------
# member codecs


def meta_to_json(row: np.void) -> dict[str, Any]:
    """One META_DTYPE row as plain JSON types (floats round-trip exactly through ``repr``)."""
    return {
        "image_id": int(row["image_id"]),
        "ann_id": int(row["ann_id"]),
        "class_id": int(row["class_id"]),
        "src_box": [int(v) for v in row["src_box"]],
        "scale": float(row["scale"]),
        "offset": [float(v) for v in row["offset"]],
        "area": int(row["area"]),
        "truncated": bool(row["truncated"]),
    }


def sample_json(row: np.void, keypoints: np.ndarray | None) -> dict[str, Any]:
    """The ``.json`` member of one crop: ``meta_to_json`` and, with keypoints float32 ``[J, 3]``,
    ``"keypoints"`` (float32 -> Python float is exact, and back)."""
    out = meta_to_json(row)
    if keypoints is not None:
        out["keypoints"] = keypoints.tolist()
    return out


def encode_png(crop: np.ndarray) -> bytes:
    """uint8 ``[4, S, S]`` RGBA -> RGBA PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(crop[[2, 1, 0, 3]].transpose(1, 2, 0)))  # cv2 is BGRA
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png_into(data, dest: np.ndarray) -> None:
    """Decode an RGBA PNG into ``dest`` uint8 ``[4, S, S]``; ``ValueError`` saying what is wrong."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    s = dest.shape[-1]
    if img is None or img.shape != (s, s, 4) or img.dtype != np.uint8:
        got = "undecodable" if img is None else f"{img.dtype} of shape {img.shape}"
        raise ValueError(f"is {got}, expected a {s}x{s} RGBA PNG")
    dest[...] = img.transpose(2, 0, 1)[[2, 1, 0, 3]]


def decode_member_into(codec: str, data, dest: np.ndarray) -> None:
    """Decode one pixel member (any buffer) into ``dest`` uint8 ``[4, S, S]``; ``ValueError``
    saying what is wrong (the caller names the file)."""
    if codec == "zstd":
        zstd_decode_into(data, dest.reshape(-1))
    elif codec == "raw":
        if len(data) != dest.nbytes:
            raise ValueError(f"has {len(data)} bytes, expected {dest.nbytes}")
        dest.reshape(-1)[:] = np.frombuffer(data, np.uint8)
    else:
        decode_png_into(data, dest)


# --------------------------------------------------------------------------------------------
# writing


class Writer:
    """Writes samples through ``webdataset.ShardWriter``; indexes each tar once it is closed."""

    def __init__(self, shard_dir: Path, crop_size: int, options: Mapping[str, Any]):
        import webdataset as wds

        self.options = writer_options(options)
        self.backend_options = dict(self.options)
        self.shard_dir = Path(shard_dir)
        self.crop_size = crop_size
        self.codec = self.options["codec"]
        self.member = MEMBERS[self.codec]
        if self.codec == "zstd":
            self._compressor = frame_compressor(self.options["level"])
        self._tars: list[dict] = []
        self._index: list[np.ndarray] = []
        self._indexed = 0
        self._n = 0
        self._sink = wds.ShardWriter(
            str(self.shard_dir / TAR_PATTERN), maxcount=self.options["maxcount"], maxsize=self.options["maxsize"],
            post=self._index_tar, verbose=0, mtime=0,
        )  # fmt: skip

    def _encode(self, crop: np.ndarray) -> bytes:
        if self.codec == "zstd":
            return self._compressor.compress(crop.data)
        if self.codec == "raw":
            return crop.tobytes()
        return encode_png(crop)

    def append(self, rgba: np.ndarray, meta: np.ndarray, first_index: int, keypoints: np.ndarray | None = None) -> None:
        rgba = np.ascontiguousarray(rgba)
        prefix = self.shard_dir.name
        for k in range(len(rgba)):
            self._sink.write(
                {
                    "__key__": f"{prefix}-{first_index + k:09d}",
                    "cls": str(int(meta[k]["class_id"])),
                    "json": json.dumps(sample_json(meta[k], None if keypoints is None else keypoints[k])),
                    self.member: self._encode(rgba[k]),
                }
            )
        self._n += len(rgba)

    def _index_tar(self, fname: str) -> None:
        """``post`` hook of ShardWriter: one pass over the closed tar records each pixel member's
        data offset (``TarInfo.offset_data``) and size; then the tar is made durable (fsync)
        before shard.json can say the shard is finished."""
        rows = []
        with tarfile.open(fname) as tf:
            for info in tf:
                key, _, member = info.name.partition(".")
                if member != self.member:
                    continue
                want = self._indexed + len(rows)
                if int(key.rpartition("-")[2]) != want:
                    raise BankError(f"{fname}: member {info.name} is out of order (expected crop {want})")
                rows.append((len(self._tars), info.offset_data, info.size))
        with open(fname, "rb") as f:
            os.fsync(f.fileno())
        self._index.append(np.array(rows, INDEX_DTYPE))
        self._indexed += len(rows)
        self._tars.append({"file": Path(fname).name, "size": Path(fname).stat().st_size, "count": len(rows)})

    def close(self) -> dict:
        self._sink.close()
        index = np.concatenate(self._index) if self._index else np.empty(0, INDEX_DTYPE)
        if len(index) != self._n:
            raise BankError(f"{self.shard_dir}: indexed {len(index)} pixel members in the tars, wrote {self._n}")
        save_npy_atomic(self.shard_dir / INDEX, index)
        return {
            "tars": self._tars,
            "index": INDEX,
            "codec": self.codec,
            "member": self.member,
            **({"level": self.options["level"]} if "level" in self.options else {}),
        }

    def abort(self) -> None:
        self._sink.post = None  # no index for a tar cut short
        self._sink.close()


# --------------------------------------------------------------------------------------------
# reading


class _TarShard:
    """Memory maps of one shard's tars plus its member index."""

    def __init__(self, paths: list[Path], maps: list[mmap.mmap], index: np.ndarray, codec: str):
        self.paths, self.maps, self.index, self.codec = paths, maps, index, codec
        self.views = [np.frombuffer(m, np.uint8) for m in maps]

    def read(self, local: np.ndarray, out: np.ndarray) -> None:
        rows = self.index[local]
        for k, (tar, offset, size) in enumerate(rows.tolist()):
            try:
                decode_member_into(self.codec, self.views[tar][offset : offset + size], out[k])
            except ValueError as e:
                where = f"{self.paths[tar]} member of crop {int(local[k])}"
                raise BankError(f"{where}: stored crop {e} (corrupt)") from None

    def close(self) -> None:
        self.views = []  # the arrays export the maps' buffers: drop them before closing the maps
        for m in self.maps:
            m.close()


class _RemoteTarShard:
    """One shard's tars at a URL plus its member index: a read is one range request per crop."""

    def __init__(self, urls: list[RemotePath], tars: list[dict], index: np.ndarray, codec: str):
        self.urls, self.index, self.codec = urls, index, codec
        self.fs = filesystem(urls[0])[0] if urls else None
        self.keys = [u.fs()[1] for u in urls]
        for url, key, tar in zip(urls, self.keys, tars):
            try:
                with store_errors(url):
                    size = self.fs.size(key)
            except FileNotFoundError:
                raise BankError(f"{url}: tar file missing") from None
            except OSError as e:
                raise BankError(f"{url}: cannot read the tar file ({' '.join(str(e).split())})") from None
            if size != tar["size"]:
                raise BankError(f"{url}: tar file has {size} bytes, expected {tar['size']} (truncated?)")

    def read(self, local: np.ndarray, out: np.ndarray) -> None:
        rows = self.index[local]
        starts = rows["offset"].tolist()
        ends = (rows["offset"] + rows["size"]).tolist()
        with store_errors(self.urls[0]):
            blobs = self.fs.cat_ranges([self.keys[t] for t in rows["tar"].tolist()], starts, ends, on_error="return")
        for k, data in enumerate(blobs):
            tar = int(rows["tar"][k])
            if isinstance(data, BaseException):
                raise BankError(f"{self.urls[tar]} member of crop {int(local[k])}: cannot read ({' '.join(str(data).split())})")
            try:
                decode_member_into(self.codec, data, out[k])
            except ValueError as e:
                raise BankError(f"{self.urls[tar]} member of crop {int(local[k])}: stored crop {e} (corrupt)") from None

    def close(self) -> None:
        pass


def _map_tar(path: Path, expected: int) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size != expected:
                raise BankError(f"{path}: tar file has {size} bytes, expected {expected} (truncated?)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise BankError(f"{path}: tar file missing") from None


def _load_index(path: Path, num_crops: int, tars: list[dict]) -> np.ndarray:
    try:
        index = load_npy(path)
    except (OSError, ValueError) as e:
        raise BankError(f"{path}: cannot read the tar member index ({e})") from None
    if index.dtype != INDEX_DTYPE or len(index) != num_crops:
        raise BankError(f"{path}: expected {num_crops} rows of {INDEX_DTYPE}, found {len(index)} of {index.dtype}")
    if len(index):
        if index["tar"].min() < 0 or index["tar"].max() >= len(tars):
            raise BankError(f"{path}: refers to tar files the shard does not have")
        try:
            sizes = np.array([t["size"] for t in tars], np.int64)
        except OverflowError:  # a crafted size: callers report a malformed payload description
            raise ValueError("tar sizes beyond int64") from None
        if (index["offset"] + index["size"] > sizes[index["tar"]]).any():
            raise BankError(f"{path}: member offsets point past the end of their tar files")
    return index


def _member_crop(info: tarfile.TarInfo, num_crops: int) -> int:
    """Shard-local crop index named by a member (``KEY`` = ``{shard}-{local:09d}``)."""
    local = int(info.name.partition(".")[0].rpartition("-")[2])
    if not 0 <= local < num_crops:
        raise ValueError(f"member {info.name} names crop {local}, the shard has {num_crops}")
    return local


def _check_member(info: tarfile.TarInfo, local: int, tf: tarfile.TarFile, tar_no: int, payload, index, meta,
                  keypoints) -> bool:
    """Check one member against the index, meta rows and keypoints (``ValueError`` saying what
    disagrees); True for the pixel member."""
    member = info.name.partition(".")[2]
    if member == payload["member"]:
        if (tar_no, info.offset_data, info.size) != tuple(index[local].tolist()):
            raise ValueError(f"member {info.name} is not where {INDEX} says")
        return True
    if member == "cls":
        if int(tf.extractfile(info).read()) != int(meta[local]["class_id"]):
            raise ValueError(f"member {info.name} disagrees with meta.npy")
    elif member == "json":
        if json.loads(tf.extractfile(info).read()) != sample_json(meta[local], None if keypoints is None else keypoints[local]):
            raise ValueError(f"member {info.name} disagrees with meta.npy{'' if keypoints is None else ' or keypoints.npy'}")
    else:
        raise ValueError(f"unexpected member {info.name}")
    return False


def _check_tar(path: Path, tar_no: int, tar: dict, payload: dict, index, meta, keypoints) -> tuple[str, Path, int | None] | None:
    current, last, seen = None, None, 0
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                current = _member_crop(info, len(meta))
                seen += _check_member(info, current, tf, tar_no, payload, index, meta, keypoints)
                last, current = current, None
    except (OSError, ValueError, tarfile.TarError) as e:
        return (f"{path}: {e}", path, current)
    if seen != tar["count"]:
        # tarfile ends quietly at a damaged header: the samples after it are out of a stream's reach
        after = f" after crop {last}" if last is not None else ""
        return (f"{path}: {seen} of {tar['count']} samples readable (damaged tar header{after}?)", path, None)
    return None


def verify_payload(shard_dir: Path, shard: dict, meta: np.ndarray,
                   keypoints: np.ndarray | None = None) -> list[tuple[str, Path, int | None]]:
    """Read every tar of a shard as a stream reader would: each sample's ``.cls`` and ``.json`` must
    agree with ``meta.npy`` and ``keypoints`` (float32 ``[n, J, 3]`` of ``keypoints.npy`` in a bank
    with keypoints; the digests cover only the pixels, meta.npy and keypoints.npy), each pixel member
    must sit where the index says, and every sample must be reachable. Returns ``(message, tar
    path, shard-local crop or None)`` for the first fault of each tar (for ``instbank verify``)."""
    payload = shard["payload"]
    where = shard_dir / SHARD_MANIFEST
    try:
        index_path = safe_member(shard_dir, payload.get("index"), where)
        index = _load_index(index_path, shard["num_crops"], payload["tars"])
        tars = [(safe_member(shard_dir, t["file"], where), t) for t in payload["tars"]]
    except BankError as e:
        return [(str(e), where, None)]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return [(f"{where}: malformed payload description ({e!r})", where, None)]
    checks = (_check_tar(path, k, t, payload, index, meta, keypoints) for k, (path, t) in enumerate(tars))
    return [problem for problem in checks if problem is not None]


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"


def decode_sample(sample: dict, crop_size: int, codec: str) -> BankCrop:
    """A WebDataset sample dict (raw member bytes) -> ``BankCrop`` (module-level: picklable)."""
    member = MEMBERS[codec]
    if member not in sample or "json" not in sample:
        raise BankError(f"{_where(sample)}: missing .{member} or .json member (not an instbank {codec} tar?)")
    rgba = np.empty((4, crop_size, crop_size), np.uint8)
    try:
        decode_member_into(codec, sample[member], rgba)
    except ValueError as e:
        raise BankError(f"{_where(sample)}: stored crop {e} (corrupt)") from None
    m = json.loads(sample["json"])
    meta = CropMeta(
        m["image_id"], m["ann_id"], tuple(m["src_box"]), m["scale"], tuple(m["offset"]), m["area"], m["truncated"]
    )
    points = np.asarray(m["keypoints"], np.float32) if "keypoints" in m else None
    return BankCrop(rgba, m["class_id"], meta, None, points)


class Reader(ShardedBank):
    """Random access through the member index; :meth:`stream` for sequential WebDataset reads."""

    backend = "webdataset"

    def __init__(self, path, manifest: dict | None = None):
        super().__init__(path, manifest)
        options = self.manifest.get("backend_options", {})
        check_codec(options, self.path / MANIFEST)
        self.codec = options["codec"]

    def _open_payload(self, shard_dir: Path, shard: dict) -> _TarShard:
        payload = shard["payload"]
        check_codec(payload, shard_dir / SHARD_MANIFEST)
        where = shard_dir / SHARD_MANIFEST
        index = _load_index(safe_member(shard_dir, payload.get("index"), where), shard["num_crops"], payload["tars"])
        paths = [safe_member(shard_dir, t["file"], where) for t in payload["tars"]]
        if isinstance(shard_dir, RemotePath):
            return _RemoteTarShard(paths, payload["tars"], index, payload["codec"])
        maps = [_map_tar(p, t["size"]) for p, t in zip(paths, payload["tars"])]
        return _TarShard(paths, maps, index, payload["codec"])

    def _read(self, handle: _TarShard, local: np.ndarray, out: np.ndarray) -> None:
        handle.read(local, out)

    def tar_paths(self) -> list[Path]:
        """Every tar file of the bank, in global index order."""
        return [safe_member(sdir, t["file"], sdir / SHARD_MANIFEST) for sdir, shard, _ in self.iter_shards()
                for t in shard["payload"]["tars"]]

    def stream(self, shuffle: int = 0, resampled: bool = False, urls=None, seed: int | None = None):
        """A ``webdataset.WebDataset`` pipeline yielding ``BankCrop``s, split by node and worker.

        - ``shuffle``: sample shuffle buffer size (0: bank order within each tar); when > 0 the
          tar order is shuffled too.
        - ``resampled``: draw tars with replacement, forever (for ``with_epoch`` style training).
        - ``urls``: tar urls to read (default: this bank's files, at its URL when it has one); any
          WebDataset url works, e.g. ``pipe:aws s3 cp s3://bucket/bank/shards/000000/bank-000000.tar -``.

        Without ``resampled``, every crop comes once per epoch over all DataLoader workers and
        ranks together (tars are dealt out by ``split_by_node`` then ``split_by_worker``: give at
        least ``workers x ranks`` tars, via ``maxcount``, or some workers stay idle).
        """
        import webdataset as wds

        urls = [str(p) for p in self.tar_paths()] if urls is None else urls
        shard_shuffle = False if (resampled or not shuffle) else max(len(urls), 1)
        pipeline = wds.WebDataset(
            urls, shardshuffle=shard_shuffle, resampled=resampled, nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker, empty_check=False, seed=seed,
        )  # fmt: skip
        if isinstance(self.path, RemotePath):
            _open_with_fsspec(pipeline)
        if shuffle:
            pipeline = pipeline.shuffle(shuffle)
        return pipeline.map(partial(decode_sample, crop_size=self._s, codec=self.codec))


class OpenWithFsspec:
    """A WebDataset pipeline stage: ``{"url"}`` -> ``{"url", "stream"}``, each tar opened with
    fsspec (WebDataset's own opener knows local files and its ``gopen`` schemes, not ``s3://``
    or most fsspec protocols). Module-level: pickles into DataLoader workers."""

    def __call__(self, sources):
        for source in sources:
            url = source["url"] if isinstance(source, dict) else source
            fs, path = filesystem(url)
            with store_errors(url):
                stream = fs.open(path, "rb")
            yield {"url": url, "stream": stream}


def _open_with_fsspec(pipeline) -> None:
    """Replace the pipeline's tar opener (``webdataset.cache.StreamingOpen``) by ``OpenWithFsspec``."""
    from webdataset.cache import StreamingOpen

    stages = [k for k, stage in enumerate(pipeline.pipeline) if isinstance(stage, StreamingOpen)]
    if len(stages) != 1:  # WDS_CACHE set (a FileCache opener), or a webdataset that builds pipelines otherwise
        raise BankError(f"cannot stream a bank at a URL with this webdataset pipeline ({len(stages)} StreamingOpen stages; unset WDS_CACHE)")
    pipeline.pipeline[stages[0]] = OpenWithFsspec()
