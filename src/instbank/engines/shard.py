"""One shard of a build: decode its images in order, cut their instances, write the shard.

Every engine runs ``build_shard`` as it is, in this process, a pool worker or a Ray task, so the
bank (and its ``version``) does not depend on the engine. Memory is one image and its crops, plus
~100 bytes of index per crop.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import cv2

from instbank.crops import (
    ASPECT, MAX_IMAGE_PIXELS, SMALL_AREA, SMALL_SIDE, TRUNCATED, CropFilters, ImageSkip, cut_file,
)  # fmt: skip
from instbank.errors import BuildError
from instbank.storage.writer import ShardResult, ShardWriter
from instbank.types import ImageRecord, ProgressFn, SkipLog

MIN_SIZE, MAX_SIZE = 8, 4096
#: Skips that follow the user's own choices (filters, crowd policy, a class map, background images
#: that are kept): counted, but not faults of the data, so ``--strict`` lets them pass.
POLICY_REASONS = frozenset({
    "crowd", SMALL_AREA, SMALL_SIDE, ASPECT, TRUNCATED, "low_predicted_iou", "low_stability_score", "unmapped",
    "image_without_label", "empty_label_file",
})  # fmt: skip


def strict_fault(reason: str, where: str) -> BuildError:
    """The one line ``--strict`` stops with at the first fault of the data."""
    return BuildError(f"{where}: {reason} (--strict stops at the first fault of the data; no manifest written)")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides a build's output (recorded in the manifest's ``build``)."""

    size: int = 128
    backend: str = "memmap"
    backend_options: dict = field(default_factory=dict)
    filters: CropFilters = CropFilters()
    exif: Literal["follow", "ignore"] = "follow"
    shard_images: int | None = None  # images per shard; None: from the image and worker counts
    #: Images with more pixels (width x height, read from the header before decoding) are skipped
    #: ``too_large``; 0 = no limit. Default 2**29 (crops.MAX_IMAGE_PIXELS, docs/reliability.md).
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        # A crop under 8 px holds no object worth pasting; over 4096 px one crop is 64 MiB.
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size (crop side S) must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {self.size!r}")
        if self.exif not in ("follow", "ignore"):
            raise ValueError(f"exif must be 'follow' or 'ignore', got {self.exif!r}")
        if self.shard_images is not None and (not isinstance(self.shard_images, int) or self.shard_images < 1):
            raise ValueError(f"shard_images must be a positive integer, got {self.shard_images!r}")
        f = self.filters
        for name in ("min_area", "min_side"):
            value = getattr(f, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not f.max_aspect >= 0:  # also refuses NaN
            raise ValueError(f"max_aspect must be >= 0 (0: no limit), got {f.max_aspect!r}")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be an integer >= 0 (0: no limit), got {self.max_image_pixels!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["filters"] = asdict(self.filters)
        return out


def build_shard(
    images: Sequence[ImageRecord],
    shard_dir: str | os.PathLike,
    config: BuildConfig,
    progress: ProgressFn | None = None,
    strict: bool = False,
) -> ShardResult:
    """Decode ``images`` in order, cut their instances, write one shard; returns its result.

    Unusable images and instances are counted by reason in ``shard.json["skipped"]`` with up to
    ``MAX_SKIP_EXAMPLES`` examples each (``skip_examples``); images dropped whole are also counted
    in ``skipped_images``, with the instances on them in ``lost_instances``. ``strict`` raises
    ``BuildError`` at the first skip that is a fault (not in ``POLICY_REASONS``) instead. Write
    faults raise a one-line ``BuildError``."""
    log, skipped_images, lost = SkipLog(), Counter(), Counter()
    rotated = size_mismatch = reduced = 0
    try:
        with ShardWriter(Path(shard_dir), config.backend, config.size, config.backend_options) as writer:
            for record in images:
                try:
                    cut = cut_file(record.path, record, config.size, config.filters, config.exif, config.max_image_pixels)
                except ImageSkip as skip:
                    if strict and skip.reason not in POLICY_REASONS:
                        raise strict_fault(skip.reason, str(skip)) from None
                    log.add(skip.reason, record.path, record.image_id, detail=str(skip).removeprefix(f"{record.path}: "))
                    skipped_images[skip.reason] += 1
                    lost[skip.reason] += len(record.instances)
                    if progress:
                        progress(1, 0)
                    continue
                rotated += cut.orientation != 1
                reduced += cut.reduction > 1
                if record.width and (record.width, record.height) != (cut.width, cut.height):
                    # The file wins (it is what gets cut); the annotations may be off, so say so.
                    size_mismatch += 1
                    log.keep("size_mismatch", log.example(record.path, record.image_id, detail=(
                        f"file is {cut.width}x{cut.height}, annotations say {record.width}x{record.height}")))
                for reason, ann_id in cut.skips:
                    if strict and reason not in POLICY_REASONS:
                        raise strict_fault(reason, f"{record.path} (image id {record.image_id}, annotation {ann_id})")
                    log.add(reason, record.path, record.image_id, ann_id)
                writer.append(cut.rgba, cut.meta, keypoints=cut.keypoints)
                if progress:
                    progress(1, len(cut.rgba))
            writer.skipped.update(log.counts)
            writer.extra.update(num_images=len(images), skip_examples=log.examples, skipped_images=dict(skipped_images),
                                lost_instances=dict(lost), exif_rotated=rotated, size_mismatch=size_mismatch,
                                decoded_reduced=reduced)
    except OSError as e:
        raise write_error(e, shard_dir) from None
    return writer.result


def write_error(e: OSError, where: str | os.PathLike) -> BuildError:
    """A write fault as the one line the user needs: disk full, not writable, or what failed."""
    name = e.filename or where
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: a file size limit (ulimit -f)
        return BuildError(f"{name}: disk full while writing the bank (no manifest written; free space and rerun with --resume)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BuildError(f"{name}: output is not writable ({e.strerror})")
    return BuildError(f"{name}: write failed ({e.strerror})")


@contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV runs resize/cvtColor on its own pool of ``cv2.getNumThreads()`` (= cores) threads;
    next to one process per core those threads only oversubscribe the cores. Set it to one in
    this process *before* forking the workers: ``cv2.setNumThreads`` in a forked child whose parent
    had started the pool deadlocks (the child waits on pool threads it does not have).
    Restored afterwards."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)
