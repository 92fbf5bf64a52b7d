"""Verify a bank end to end (``instbank verify``).

``verify_bank`` trusts nothing: it recomputes every crop's digest from the decoded pixels, its
meta row and (in a bank with keypoints) its keypoints, compares them with ``digests.npy``,
recomputes each shard hash and the bank content hash, and checks the manifest's counts, version and class frequencies. Problems name the file at fault
and, for crops, the first bad global index and its shard.

A bank at a URL is verified the same way, one shard at a time: its small files are read where they
are, each shard's payload is downloaded into a temporary directory, checked and removed; problems
name the objects at the URL.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from instbank.errors import BankError
from instbank.storage.base import (
    MANIFEST,
    SHARD_MANIFEST,
    SHARDS_DIR,
    ShardedBank,
    classes_from_json,
    content_hash,
    crop_digests,
    load_manifest,
    load_npy,
    keypoint_spec_of,
    load_shard_digests,
    load_shard_keypoints,
    load_shard_meta,
    make_version,
    read_json,
    safe_member,
    shard_hash,
)
from instbank.storage.copy import chunk_length
from instbank.storage.registry import get_backend
from instbank.storage.url import RemotePath, location, scratch_dir
from instbank.types import ProgressFn


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
    keypoints: np.ndarray | None = None


def _check_shard_files(sdir: Path, entry: dict, start: int, report: VerifyReport, num_keypoints: int | None) -> _ShardFiles:
    """shard.json, meta.npy, digests.npy and keypoints.npy (``num_keypoints``: the bank's ``J``,
    ``None`` without keypoints) of one shard against the manifest entry."""
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
    if num_keypoints is not None:
        try:
            files.keypoints = load_shard_keypoints(sdir, n, num_keypoints)
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
        report.content_hash = content_hash(s, classes, [sh.digests for sh in shards], keypoint_spec_of(manifest))
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
    try:
        if "file" in payload:
            return safe_member(sdir, payload["file"], sdir)
        tar = int(load_npy(safe_member(sdir, payload["index"], sdir))["tar"][local])
        return safe_member(sdir, payload["tars"][tar]["file"], sdir)
    except (OSError, ValueError, KeyError, IndexError, TypeError, BankError):
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
        points = None if files.keypoints is None else files.keypoints[lo:hi]
        mismatch = (crop_digests(rgba, files.meta[lo:hi], bank.manifest["format_version"], points)
                    != files.digests[lo:hi]).any(axis=1)
        bad.extend(lo + int(k) for k in np.flatnonzero(mismatch))
        errors.update((lo + k, message) for k, message in chunk_errors.items())
        report.crops_checked += hi - lo
        if progress is not None:
            progress(0, hi - lo)
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
    ``VerifyReport.ok``/``raise_for_problems``). ``progress(0, n)`` is called per chunk of ``n`` crops."""
    report = VerifyReport(location(path))
    try:
        manifest = load_manifest(path)
    except BankError as e:
        report.add(str(e), file=report.path / MANIFEST)
        return report
    report.backend = manifest["backend"]
    report.num_crops = manifest["num_crops"]
    shards, start = [], 0
    spec = keypoint_spec_of(manifest)
    num_keypoints = None if spec is None else spec.num_keypoints
    for entry in manifest["shards"]:
        shards.append(_check_shard_files(report.path / SHARDS_DIR / entry["dir"], entry, start, report, num_keypoints))
        start += entry["num_crops"]
    _check_manifest(manifest, shards, report)
    try:
        # The shards' own count: a hand-edited num_crops (reported above) must not stop the pixel pass.
        bank = get_backend(manifest["backend"]).Reader(path, {**manifest, "num_crops": start})
    except (BankError, ValueError) as e:
        report.add(str(e), file=report.path / MANIFEST)
        return report
    with ExitStack() as stack:
        stack.enter_context(bank)
        if isinstance(report.path, RemotePath):
            bank.fetch_to(stack.enter_context(scratch_dir()))
        extras: list[VerifyProblem] = []  # reported after every shard's pixels, as they always were
        for shard_no, files in enumerate(shards):
            _check_shard_payload(bank, shard_no, files, report, extras, progress)
        report.problems.extend(extras)
    return report


def verify_shard(bank: ShardedBank, shard_no: int, report: VerifyReport, progress: ProgressFn | None = None) -> None:
    """``verify_bank``'s checks of one shard of ``bank`` (its files against the manifest entry,
    every crop against its digest, the backend's own payload check), problems added to
    ``report``; the bank-wide checks (content hash, class frequencies) are the caller's."""
    entry = bank.manifest["shards"][shard_no]
    spec = bank.keypoint_spec
    files = _check_shard_files(bank.path / SHARDS_DIR / entry["dir"], entry, int(bank._starts[shard_no]), report,
                               None if spec is None else spec.num_keypoints)
    extras: list[VerifyProblem] = []
    _check_shard_payload(bank, shard_no, files, report, extras, progress)
    report.problems.extend(extras)


def _check_shard_payload(bank: ShardedBank, shard_no: int, files: _ShardFiles, report: VerifyReport,
                         extras: list[VerifyProblem], progress) -> None:
    """Pixels against digests (problems to ``report``), then the backend's payload hook (problems
    to ``extras``); the shard is released afterwards (its local copy removed, at a URL)."""
    try:
        if files.meta is not None and files.digests is not None and (files.keypoints is not None or bank.keypoint_spec is None):
            _check_pixels(bank, shard_no, files, report, progress)
        if files.meta is not None and (files.keypoints is not None or bank.keypoint_spec is None):
            extras.extend(_payload_extras(bank, shard_no, files))
    finally:
        bank.release(shard_no)


def _payload_extras(bank: ShardedBank, shard_no: int, files: _ShardFiles) -> list[VerifyProblem]:
    """A backend's own ``verify_payload(shard_dir, shard, meta, keypoints)`` hook, where it has one
    (the webdataset tars carry class ids, meta and keypoints of their own, outside the digests)."""
    hook = getattr(get_backend(bank.manifest["backend"]), "verify_payload", None)
    if hook is None:
        return []
    try:
        local_dir = bank.payload_dir(shard_no)  # at a URL: the shard's local copy
    except BankError as e:  # a shard at a URL that cannot be downloaded
        return [VerifyProblem(str(e), shard_dir=files.dir)]
    problems = []
    for message, file, local in hook(local_dir, files.entry, files.meta, files.keypoints):
        message, file = _at_url(bank, message), _at_url(bank, file)
        if local is None:
            problems.append(VerifyProblem(message, file=file, shard_dir=files.dir))
        else:
            where = f" (crop {files.start + local}, shard {files.dir.name}, local {local})"
            problems.append(VerifyProblem(message + where, file=file, index=files.start + local, shard_dir=files.dir))
    return problems


def _at_url(bank: ShardedBank, value):
    """A message or path that names a shard's local copy, naming the bank's URL instead."""
    if bank._scratch is None or value is None:
        return value
    text = str(value).replace(str(bank._scratch), str(bank.path))
    return text if isinstance(value, str) else location(text)
