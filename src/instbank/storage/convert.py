"""Convert a bank to another backend, and verify a bank end to end (``instbank convert/verify``).

``convert_bank`` streams shard by shard: every source shard becomes a destination shard of the same
name and size, read in chunks of at most 64 MiB of pixels, with the crop digests copied from the
source (not recomputed, unless ``check_digests``). The content hash depends only on the crops and
their order, so the converted bank has the same hash: its ``version`` differs only before the ``@``.

``verify_bank`` trusts nothing: it recomputes every crop's digest from the decoded pixels and its
meta row, compares them with ``digests.npy``, recomputes each shard hash and the bank content hash,
and checks the manifest's counts, version and class frequencies. Problems name the file at fault
and, for crops, the first bad global index and its shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from instbank.errors import BankError, BuildError
from instbank.storage import get_backend, open_bank
from instbank.storage.base import (
    MANIFEST,
    SHARD_MANIFEST,
    SHARDS_DIR,
    ShardedBank,
    ShardWriter,
    assemble_manifest,
    classes_from_json,
    load_shard_digests,
    load_shard_meta,
    content_hash,
    crop_digests,
    load_manifest,
    make_version,
    prepare_output,
    read_json,
    shard_hash,
)

#: Pixels held in memory at once while converting or verifying (4096 crops of 64 px, 256 of 256 px).
CHUNK_BYTES = 64 << 20
MAX_CHUNK = 4096
#: Keys of shard.json that ShardWriter writes itself; any other key is copied as it is.
_SHARD_KEYS = {"num_crops", "hash", "class_ids", "skipped", "payload", "backend_options"}

ProgressFn = Callable[[int], None]  # crops done since the last call


def chunk_length(crop_size: int) -> int:
    """Crops per read: at most ``CHUNK_BYTES`` of pixels and ``MAX_CHUNK`` crops."""
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * crop_size * crop_size)))


# --------------------------------------------------------------------------------------------
# convert


def _check_paths(src: Path, dst: Path) -> None:
    src, dst = src.resolve(), dst.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise BuildError(f"{dst}: the destination must not be the source bank {src}, inside it, or around it")


def _first_mismatch(rgba: np.ndarray, meta: np.ndarray, digests: np.ndarray) -> int | None:
    """Position of the first crop whose recomputed digest differs from ``digests``, or None."""
    bad = np.flatnonzero((crop_digests(rgba, meta) != digests).any(axis=1))
    return int(bad[0]) if len(bad) else None


def _convert_shard(
    src: ShardedBank,
    sdir: Path,
    n: int,
    start: int,
    writer: ShardWriter,
    check_digests: bool,
    progress: ProgressFn | None,
) -> np.ndarray:
    """Copy the ``n`` crops of one shard into ``writer``; returns its digests uint8 ``[n, 32]``."""
    shard_meta = load_shard_meta(sdir, n)
    digests = load_shard_digests(sdir, n)
    step = chunk_length(src.crop_size[0])
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rgba = src.get_many(np.arange(start + lo, start + hi))
        meta = shard_meta[lo:hi]
        if check_digests:
            bad = _first_mismatch(rgba, meta, digests[lo:hi])
            if bad is not None:
                raise BankError(
                    f"{sdir}: crop {start + lo + bad} does not match its digest in digests.npy "
                    f"(corrupt source; run instbank verify)"
                )
        writer.append(rgba, meta, digests[lo:hi])
        if progress is not None:
            progress(hi - lo)
    return digests


def convert_bank(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    backend: str,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check_digests: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Write the bank at ``src_path`` again at ``dst_path`` with ``backend`` (and its ``options``,
    e.g. ``{"filter": "none"}`` for lmdb, ``{"codec": "png"}`` for webdataset); returns the new
    manifest. Same shards, same crops, same content hash.

    An existing bank at ``dst_path`` is refused unless ``overwrite`` (``BuildError``), and so is a
    destination that is, contains or lies inside the source. ``check_digests`` recomputes each
    source crop's digest while copying and stops (``BankError``) at the first that differs.
    ``progress(n)`` is called after every chunk of ``n`` crops.
    """
    src_path, dst_path = Path(src_path), Path(dst_path)
    get_backend(backend)  # ValueError naming the valid backends, before anything is written
    src = open_bank(src_path)
    _check_paths(src_path, dst_path)
    prepare_output(dst_path, overwrite=overwrite)
    crop_size = src.crop_size[0]
    names, digest_chunks = [], []
    for sdir, entry, start in src.iter_shards():
        info = read_json(sdir / SHARD_MANIFEST, "shard manifest")
        writer = ShardWriter(dst_path / SHARDS_DIR / entry["dir"], backend, crop_size, options)
        try:
            digest_chunks.append(_convert_shard(src, sdir, entry["num_crops"], start, writer, check_digests, progress))
        except BaseException:
            writer.abort()
            raise
        extra = {k: v for k, v in info.items() if k not in _SHARD_KEYS}
        writer.close(skipped=info.get("skipped"), extra=extra)
        names.append(entry["dir"])
    # Checked before the manifest is written: a mismatch means the source manifest is wrong.
    copied = content_hash(crop_size, src.classes, digest_chunks)
    if copied != src.content_hash:
        raise BankError(
            f"{src_path / MANIFEST}: content_hash does not match the bank's crop digests (edited? run instbank verify)"
        )
    build = {**src.manifest.get("build", {}), "converted_from": {"path": str(src_path), "version": src.version}}
    return assemble_manifest(
        dst_path, backend, crop_size, src.classes, names, build, src.manifest.get("skipped", {})
    )


# --------------------------------------------------------------------------------------------
# verify


@dataclass(frozen=True)
class VerifyProblem:
    """One fault: a one-line ``message`` naming the file, and for crops the first bad global
    ``index``, its ``shard_dir`` and the payload ``file`` that holds it."""

    message: str
    file: Path | None = None
    index: int | None = None
    shard_dir: Path | None = None


@dataclass
class VerifyReport:
    """What ``verify_bank`` found; ``ok`` when ``problems`` is empty."""

    path: Path
    backend: str = "?"
    num_crops: int = 0
    crops_checked: int = 0
    content_hash: str | None = None
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, message: str, **where: Any) -> None:
        self.problems.append(VerifyProblem(message, **where))

    def summary(self) -> str:
        """One line: verdict, counts and hash; the problems follow, one per line."""
        head = (
            f"{self.path}: {self.backend} bank, {self.crops_checked}/{self.num_crops} crops checked, "
            f"{'OK' if self.ok else f'{len(self.problems)} problem(s)'}"
        )
        return "\n".join([head, *(p.message for p in self.problems)])

    def raise_for_problems(self) -> None:
        """``BankError`` with the first problem's message (and how many more there are)."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise BankError(self.problems[0].message + more)


@dataclass
class _ShardFiles:
    dir: Path
    entry: dict
    start: int
    meta: np.ndarray | None = None
    digests: np.ndarray | None = None


def _check_shard_files(sdir: Path, entry: dict, start: int, report: VerifyReport) -> _ShardFiles:
    """shard.json, meta.npy and digests.npy of one shard against the manifest entry."""
    files = _ShardFiles(sdir, entry, start)
    n = entry["num_crops"]
    try:
        info = read_json(sdir / SHARD_MANIFEST, "shard manifest")
        for key in ("num_crops", "hash", "payload"):
            if info.get(key) != entry.get(key):
                report.add(f"{sdir / SHARD_MANIFEST}: '{key}' differs from the bank manifest's entry", file=sdir)
        files.meta = load_shard_meta(sdir, n)
        digests = load_shard_digests(sdir, n)
        if shard_hash(digests) != entry["hash"]:
            raise BankError(f"{sdir / 'digests.npy'}: digests do not match the shard hash in {MANIFEST}")
        files.digests = digests
    except BankError as e:
        report.add(str(e), shard_dir=sdir)
    return files


def _check_manifest(manifest: dict, shards: list[_ShardFiles], report: VerifyReport) -> None:
    path = report.path / MANIFEST
    total = sum(s.entry["num_crops"] for s in shards)
    if manifest["num_crops"] != total:
        report.add(f"{path}: num_crops is {manifest['num_crops']} but the shards hold {total} crops", file=path)
    classes = classes_from_json(manifest["classes"])
    if all(s.digests is not None for s in shards):
        s = int(manifest["crop_size"][0])
        report.content_hash = content_hash(s, classes, [sh.digests for sh in shards])
        if report.content_hash != manifest["content_hash"]:
            report.add(
                f"{path}: content_hash {manifest['content_hash'][:12]}... does not match the crop digests "
                f"({report.content_hash[:12]}...)",
                file=path,
            )
        expected = make_version(manifest["backend"], report.content_hash)
        if manifest.get("version") != expected:
            report.add(f"{path}: version {manifest.get('version')!r} should be {expected!r}", file=path)
    if all(s.meta is not None for s in shards):
        ids = np.concatenate([s.meta["class_id"] for s in shards]) if shards else np.empty(0, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(classes)):
            report.add(f"{path}: crops have class ids outside the class table ({len(classes)} classes)", file=path)
        else:
            counted = np.bincount(ids, minlength=len(classes)).tolist()
            if manifest.get("class_frequencies") != counted:
                report.add(f"{path}: class_frequencies do not match the crops' class ids in meta.npy", file=path)


def _payload_file(sdir: Path, payload: Mapping[str, Any], local: int) -> Path:
    """The file holding crop ``local`` of a shard (memmap/lmdb: one file; webdataset: its tar)."""
    if "file" in payload:
        return sdir / payload["file"]
    try:
        tar = int(np.load(sdir / payload["index"])["tar"][local])
        return sdir / payload["tars"][tar]["file"]
    except (OSError, ValueError, KeyError, IndexError):
        return sdir


def _read_chunk(bank: ShardedBank, indices: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Pixels of ``indices`` and, for crops that cannot be decoded, position -> error message."""
    try:
        return bank.get_many(indices), {}
    except BankError:
        pass
    s = bank.crop_size[0]
    rgba = np.zeros((len(indices), 4, s, s), np.uint8)
    errors = {}
    for k, i in enumerate(indices):
        try:
            bank.get_many([i], out=rgba[k : k + 1])
        except BankError as e:
            errors[k] = str(e)
    return rgba, errors


def _check_pixels(bank: ShardedBank, shard_no: int, files: _ShardFiles, report: VerifyReport, progress) -> None:
    sdir, start, n = files.dir, files.start, files.entry["num_crops"]
    try:
        bank._handle(shard_no)  # open the payload once: a missing or truncated file is one problem
    except BankError as e:
        report.add(str(e), shard_dir=sdir, index=start if n else None)
        return
    step = chunk_length(bank.crop_size[0])
    bad: list[int] = []
    errors: dict[int, str] = {}  # shard-local index -> why it could not be decoded
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rgba, chunk_errors = _read_chunk(bank, np.arange(start + lo, start + hi))
        mismatch = (crop_digests(rgba, files.meta[lo:hi]) != files.digests[lo:hi]).any(axis=1)
        bad.extend(lo + int(k) for k in np.flatnonzero(mismatch))
        errors.update((lo + k, message) for k, message in chunk_errors.items())
        report.crops_checked += hi - lo
        if progress is not None:
            progress(hi - lo)
    if bad:
        local = bad[0]
        file = _payload_file(sdir, files.entry["payload"], local)
        what = f"cannot be decoded ({errors[local]})" if local in errors else "does not match its digest in digests.npy"
        more = f"; {len(bad)} bad crops in this shard" if len(bad) > 1 else ""
        report.add(
            f"{file}: crop {start + local} (shard {sdir.name}, local {local}) {what}{more}",
            file=file,
            index=start + local,
            shard_dir=sdir,
        )


def verify_bank(path: str | os.PathLike, progress: ProgressFn | None = None) -> VerifyReport:
    """Check every crop and every hash of the bank at ``path``; never raises for a bad bank (see
    ``VerifyReport.ok``/``raise_for_problems``). ``progress(n)`` is called per chunk of crops."""
    report = VerifyReport(Path(path))
    try:
        manifest = load_manifest(path)
    except BankError as e:
        report.add(str(e), file=report.path / MANIFEST)
        return report
    report.backend = manifest["backend"]
    report.num_crops = manifest["num_crops"]
    shards, start = [], 0
    for entry in manifest["shards"]:
        shards.append(_check_shard_files(report.path / SHARDS_DIR / entry["dir"], entry, start, report))
        start += entry["num_crops"]
    _check_manifest(manifest, shards, report)
    try:
        # The shards' own count: a hand-edited num_crops (reported above) must not stop the pixel pass.
        bank = get_backend(manifest["backend"]).Reader(path, {**manifest, "num_crops": start})
    except (BankError, ValueError) as e:
        report.add(str(e), file=report.path / MANIFEST)
        return report
    with bank:
        for shard_no, files in enumerate(shards):
            if files.meta is not None and files.digests is not None:
                _check_pixels(bank, shard_no, files, report, progress)
    _check_payload_extras(manifest["backend"], shards, report)
    return report


def _check_payload_extras(backend: str, shards: list[_ShardFiles], report: VerifyReport) -> None:
    """A backend's own ``verify_payload(shard_dir, shard, meta)`` hook, where it has one (the
    webdataset tars carry class ids and meta of their own, outside the digests)."""
    hook = getattr(get_backend(backend), "verify_payload", None)
    if hook is None:
        return
    for files in shards:
        if files.meta is None:
            continue
        for message, file, local in hook(files.dir, files.entry, files.meta):
            if local is None:
                report.add(message, file=file, shard_dir=files.dir)
            else:
                where = f" (crop {files.start + local}, shard {files.dir.name}, local {local})"
                report.add(message + where, file=file, index=files.start + local, shard_dir=files.dir)
