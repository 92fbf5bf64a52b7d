"""Types shared by every layer: records read from a data set, crop geometry, bank items, batches.

No I/O here, and no torch import at module level (``BankBatch`` imports torch lazily), so that the
CLI and the build stay importable and fast on machines without torch.

Coordinate convention (used everywhere in instbank): continuous pixel coordinates, pixel ``(i, j)``
covers ``[j, j+1) x [i, i+1)`` in ``(x, y)``, so pixel centres sit at ``+0.5``. This is the
convention of COCO polygons and of ``cv2.resize``; with it the crop mapping
``crop_xy = (src_xy - src_box[:2]) * scale + offset`` is exact for every point, not just centres.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Progress callback of every long job (build, convert, merge, verify): ``progress(images, crops)``
#: with the images and crops done since the last call (jobs over crops only pass ``images=0``).
ProgressFn = Callable[[int, int], None]

#: One row per crop, in every backend's index file and in ``InstanceBank.meta_table``.
#: Little-endian and packed: a row's bytes are part of each crop's content digest, so this dtype
#: is part of the on-disk format (bump ``FORMAT_VERSION`` in ``storage/base.py`` if it changes).
META_DTYPE = np.dtype(
    [
        ("image_id", "<i8"),
        ("ann_id", "<i8"),
        ("class_id", "<i8"),
        ("src_box", "<i4", (4,)),  # tight box of the mask, x0, y0, x1, y1 (x1/y1 exclusive)
        ("scale", "<f8"),  # crop pixels per source pixel, the same on both axes
        ("offset", "<f8", (2,)),  # ox, oy in crop pixels
        ("area", "<i8"),  # mask pixels at source resolution
        ("truncated", "?"),  # the mask touches the image border
    ]
)


@dataclass(frozen=True)
class ClassInfo:
    """One entry of a bank's class table: contiguous ``id``, the data set's ``source_id``, ``name``."""

    id: int
    source_id: int
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source_id": self.source_id, "name": self.name}


@dataclass(frozen=True)
class InstanceRecord:
    """One annotated instance as read from a data set, before any pixel is touched.

    Exactly one of ``polygons`` / ``rle`` describes the mask.

    - ``polygons``: tuple of float64 ``[n, 2]`` arrays of ``(x, y)`` vertices, ``n >= 3``; several
      parts make one instance. In source pixels, or in ``[0, 1]`` when ``normalized`` (YOLO-seg),
      in which case the crop stage multiplies by the decoded image's ``(width, height)``.
    - ``rle``: COCO RLE ``{"size": [h, w], "counts": list[int] | str}`` (column-major runs).
    """

    ann_id: int
    class_id: int
    polygons: tuple[np.ndarray, ...] = ()
    rle: dict[str, Any] | None = None
    normalized: bool = False
    is_crowd: bool = False


@dataclass(frozen=True)
class ImageRecord:
    """One image and the instances annotated on it. ``width``/``height`` are 0 when the data set
    does not say (YOLO); the decoded file is what counts."""

    image_id: int
    path: str
    width: int
    height: int
    instances: tuple[InstanceRecord, ...]


@dataclass
class Dataset:
    """What a reader in ``instbank.formats`` returns.

    ``images`` are in a deterministic order (COCO: ascending image id; YOLO, SA-1B: sorted file names);
    ``classes`` are contiguous ids ``0..C-1`` in ascending ``source_id`` order; ``skipped`` counts
    instances/images dropped while reading, by reason; ``notes`` are lines for the user (e.g. which
    images directory was guessed).
    """

    source: str
    kind: Literal["coco", "yolo", "sa1b"]
    images: list[ImageRecord]
    classes: list[ClassInfo]
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def num_instances(self) -> int:
        return sum(len(im.instances) for im in self.images)


@dataclass(frozen=True)
class CropMeta:
    """Geometry of one crop: ``crop_xy = (src_xy - src_box[:2]) * scale + offset`` exactly."""

    image_id: int
    ann_id: int
    src_box: tuple[int, int, int, int]
    scale: float
    offset: tuple[float, float]
    area: int
    truncated: bool

    @classmethod
    def from_row(cls, row: np.void) -> CropMeta:
        return cls(
            image_id=int(row["image_id"]),
            ann_id=int(row["ann_id"]),
            src_box=tuple(int(v) for v in row["src_box"]),  # type: ignore[arg-type]
            scale=float(row["scale"]),
            offset=(float(row["offset"][0]), float(row["offset"][1])),
            area=int(row["area"]),
            truncated=bool(row["truncated"]),
        )

    def src_to_crop(self, xy: np.ndarray) -> np.ndarray:
        """Map float ``[..., 2]`` source ``(x, y)`` to crop coordinates."""
        return (np.asarray(xy, np.float64) - np.asarray(self.src_box[:2], np.float64)) * self.scale + np.asarray(
            self.offset
        )

    def crop_to_src(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`src_to_crop`."""
        return (np.asarray(xy, np.float64) - np.asarray(self.offset)) / self.scale + np.asarray(
            self.src_box[:2], np.float64
        )


@dataclass(frozen=True)
class BankCrop:
    """``bank[i]``: ``rgba`` uint8 ``[4, S, S]`` (RGB then alpha), contiguous ``class_id``, geometry,
    and an optional float32 embedding (``None`` when the bank has none)."""

    rgba: np.ndarray
    class_id: int
    meta: CropMeta
    embedding: np.ndarray | None = None


def packed_dtype_for(num_classes: int) -> "torch.dtype":
    """Smallest integer dtype holding pixel values 0..255 and class ids ``0..num_classes-1``."""
    import torch

    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class BankBatch:
    """Crops staged for one training step: ``B`` target images, ``K`` crops each.

    - ``pixels``: uint8 ``[B, K, 4, S, S]`` (RGB, alpha)
    - ``class_ids``: int64 ``[B, K]`` contiguous class ids
    - ``indices``: int64 ``[B, K]`` crop indices into the bank
    - ``src_box``: float32 ``[B, K, 4]`` tight source box ``x0, y0, x1, y1`` (source pixels)
    - ``scale``: float32 ``[B, K]`` crop pixels per source pixel
    - ``offset``: float32 ``[B, K, 2]`` crop-pixel offset of the object in the letterbox
    - ``num_classes``: size of the bank's class table (picks the packed dtype)
    """

    pixels: "torch.Tensor"
    class_ids: "torch.Tensor"
    indices: "torch.Tensor"
    src_box: "torch.Tensor"
    scale: "torch.Tensor"
    offset: "torch.Tensor"
    num_classes: int

    _TENSORS = ("pixels", "class_ids", "indices", "src_box", "scale", "offset")

    def _map(self, fn) -> BankBatch:
        return BankBatch(**{name: fn(getattr(self, name)) for name in self._TENSORS}, num_classes=self.num_classes)

    def to(self, device, non_blocking: bool = True) -> BankBatch:
        """Copy every tensor to ``device``; asynchronous from pinned memory when ``non_blocking``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BankBatch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map(lambda t: t.pin_memory())

    @property
    def object_size(self) -> "torch.Tensor":
        """float32 ``[B, K, 2]``: the object's (width, height) in its source image."""
        return self.src_box[..., 2:] - self.src_box[..., :2]

    def packed(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """``[B, K, 5, S, S]``: RGB, alpha, and a plane filled with the class id.

        ``dtype`` defaults to the smallest integer type that holds both pixels and every class id
        (uint8 up to 256 classes, int16 up to 32768); a dtype that cannot hold them raises
        ``ValueError`` rather than wrapping silently (LVIS has 1203 classes).
        """
        import torch

        chosen = dtype if dtype is not None else packed_dtype_for(self.num_classes)
        max_id = self.num_classes - 1
        if chosen.is_floating_point:
            # every integer up to 2/eps is exact (2**24 for float32, 2048 for float16, 256 for bfloat16)
            limit = int(round(2 / torch.finfo(chosen).eps))
        else:
            limit = torch.iinfo(chosen).max
        if max(max_id, 255) > limit:
            raise ValueError(
                f"packed dtype {chosen} cannot hold class ids up to {max_id}; "
                f"use {packed_dtype_for(self.num_classes)} or wider"
            )
        b, k, _, h, w = self.pixels.shape
        out = torch.empty((b, k, 5, h, w), dtype=chosen, device=self.pixels.device)
        out[:, :, :4] = self.pixels
        out[:, :, 4] = self.class_ids.to(chosen)[:, :, None, None]
        return out
