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
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

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
    - ``keypoints``: float64 ``[J, 3]`` rows ``x, y, v`` (COCO's visibility: 0 not labeled, then
      ``x = y = 0``; 1 labeled, not visible; 2 visible), in source pixels or, when ``normalized``,
      in ``[0, 1]`` like the polygons; ``None`` when the data set has no keypoints
      (``Dataset.keypoint_spec`` is then ``None`` too). In a data set with keypoints every
      instance has them (all ``v = 0`` for instances of a category without keypoints).
    """

    ann_id: int
    class_id: int
    polygons: tuple[np.ndarray, ...] = ()
    rle: dict[str, Any] | None = None
    normalized: bool = False
    is_crowd: bool = False
    keypoints: np.ndarray | None = None


#: Keypoints per instance at most: far above real layouts (COCO-WholeBody 133, Halpe 136), low
#: enough that a crafted ``kpt_shape`` or manifest cannot ask for absurd arrays.
MAX_KEYPOINTS = 1024


def flip_from_names(names: Sequence[str]) -> tuple[int, ...]:
    """The flip permutation of a keypoint layout from its names: ``left_X`` and ``right_X`` swap
    (COCO's and Ultralytics' naming); every other keypoint, and a ``left_``/``right_`` name whose
    twin is not in the layout, keeps its slot."""
    index = {name: i for i, name in enumerate(names)}
    flip = []
    for name in names:
        twin = None
        for side, other in (("left_", "right_"), ("right_", "left_")):
            if name.startswith(side):
                twin = index.get(other + name[len(side):])
        flip.append(index[name] if twin is None else twin)
    return tuple(flip)


@dataclass(frozen=True)
class KeypointSpec:
    """A bank's keypoint layout (one per bank, docs/formats.md "Keypoints"): ``J`` distinct
    ``names``; ``skeleton``: pairs ``(a, b)`` of 0-based slots to draw as lines (COCO's json
    numbers them from 1); ``flip``: the slot each keypoint takes under a horizontal flip, a
    permutation of ``0..J-1`` (``BankBatch.keypoint_flip``; default ``flip_from_names(names)``).
    ``ValueError`` saying what is wrong when it is not a layout."""

    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    flip: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        names = tuple(self.names)
        if not names or len(names) > MAX_KEYPOINTS or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"keypoint names must be 1..{MAX_KEYPOINTS} non-empty strings, got {list(names)!r:.80}")
        if len(set(names)) != len(names):
            raise ValueError(f"keypoint names must be distinct, got {list(names)!r:.80}")
        j = len(names)
        pairs = tuple(tuple(p) for p in self.skeleton)
        if not all(len(p) == 2 and all(_is_index(v, j) for v in p) for p in pairs):
            raise ValueError(f"skeleton must be pairs of keypoint slots 0..{j - 1}, got {[list(p) for p in pairs]!r:.80}")
        flip = flip_from_names(names) if self.flip is None else tuple(self.flip)
        if not all(_is_index(v, j) for v in flip) or sorted(flip) != list(range(j)):
            raise ValueError(f"flip must be a permutation of 0..{j - 1}, got {list(flip)!r:.80}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "skeleton", tuple((int(a), int(b)) for a, b in pairs))
        object.__setattr__(self, "flip", tuple(int(v) for v in flip))

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "skeleton": [list(p) for p in self.skeleton], "flip": list(self.flip)}

    @classmethod
    def from_json(cls, obj: Any) -> KeypointSpec:
        """The spec of ``to_json``'s object; ``ValueError`` for anything else."""
        if not isinstance(obj, dict) or set(obj) != {"names", "skeleton", "flip"}:
            raise ValueError("keypoints must be an object with exactly names, skeleton and flip")
        if not all(isinstance(obj[k], list) for k in obj) or not all(isinstance(p, list) for p in obj["skeleton"]):
            raise ValueError("keypoints names, skeleton and flip must be lists (skeleton: of pairs)")
        return cls(tuple(obj["names"]), tuple(tuple(p) for p in obj["skeleton"]), tuple(obj["flip"]))


def _is_index(value: Any, n: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < n


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
    instances/images dropped while reading, by reason, with up to ``MAX_SKIP_EXAMPLES`` examples
    per reason in ``skip_examples`` (``SkipLog.example``); ``notes`` are lines for the user (e.g.
    which images directory was guessed). ``images_root``: the folder image paths must resolve
    inside (``None``: no such folder, e.g. image lists with absolute paths). ``lost_instances``:
    instances dropped with their image, by the image's skip reason. ``keypoint_spec``: the data
    set's one keypoint layout (``None``: no keypoints are read; see ``KeypointSpec``).
    """

    source: str
    kind: Literal["coco", "yolo", "sa1b"]
    images: list[ImageRecord]
    classes: list[ClassInfo]
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    skip_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images_root: str | None = None
    lost_instances: Counter = field(default_factory=Counter)
    keypoint_spec: KeypointSpec | None = None

    @property
    def num_instances(self) -> int:
        return sum(len(im.instances) for im in self.images)


#: Examples kept per skip reason: enough to find the files, few enough to read.
MAX_SKIP_EXAMPLES = 5


class SkipLog:
    """Skips counted by reason, each reason with its first ``MAX_SKIP_EXAMPLES`` examples.

    An example is a JSON object: ``file`` (the file at fault: image, label file or annotation
    json), ``image_id`` and ``ann_id`` (None where they do not apply or are malformed), ``detail``.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    @staticmethod
    def example(file: str, image_id: Any = None, ann_id: Any = None, detail: str | None = None) -> dict[str, Any]:
        ids = [v if isinstance(v, int) and not isinstance(v, bool) else None for v in (image_id, ann_id)]
        return {"file": str(file), "image_id": ids[0], "ann_id": ids[1], "detail": detail}

    def add(self, reason: str, file: str, image_id: Any = None, ann_id: Any = None, detail: str | None = None,
            count: int = 1) -> None:
        self.counts[reason] += count
        self.keep(reason, self.example(file, image_id, ann_id, detail))

    def keep(self, reason: str, example: dict[str, Any]) -> None:
        """Keep ``example`` under ``reason`` if there is room (counting is the caller's)."""
        items = self.examples.setdefault(reason, [])
        if len(items) < MAX_SKIP_EXAMPLES:
            items.append(example)

    def update(self, counts: Mapping[str, int], examples: Mapping[str, list[dict[str, Any]]]) -> None:
        """Add another log's counts and examples (in order, still at most ``MAX_SKIP_EXAMPLES``)."""
        self.counts.update(counts)
        for reason, items in examples.items():
            for item in items:
                self.keep(reason, item)


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
    an optional float32 embedding (``None`` when the bank has none) and, for banks with keypoints,
    ``keypoints`` float32 ``[J, 3]`` in crop pixels (as ``BankBatch.keypoints``; else ``None``)."""

    rgba: np.ndarray
    class_id: int
    meta: CropMeta
    embedding: np.ndarray | None = None
    keypoints: np.ndarray | None = None


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

    Keypoints, for banks that have them (both ``None`` otherwise):

    - ``keypoints``: float32 ``[B, K, J, 3]``: ``x, y`` in crop pixel coordinates (``CropMeta``'s
      mapping ``crop_xy = (src_xy - src_box[:2]) * scale + offset``, so they may lie outside the
      canvas when the annotator placed them outside the mask) and COCO's visibility ``v``: 0 not
      labeled (then ``x = y = 0``), 1 labeled but not visible, 2 visible
    - ``keypoint_flip``: int64 ``[J]``: the slot each keypoint takes under a horizontal flip (COCO
      person: ``left_eye <-> right_eye``, ...); ``arange(J)`` when the skeleton has no pairs. Must
      be a permutation of ``0..J-1``: checked here when on CPU, where the sampler stages batches
    """

    pixels: "torch.Tensor"
    class_ids: "torch.Tensor"
    indices: "torch.Tensor"
    src_box: "torch.Tensor"
    scale: "torch.Tensor"
    offset: "torch.Tensor"
    num_classes: int
    keypoints: "torch.Tensor | None" = None
    keypoint_flip: "torch.Tensor | None" = None

    _TENSORS = ("pixels", "class_ids", "indices", "src_box", "scale", "offset", "keypoints", "keypoint_flip")

    def __post_init__(self) -> None:
        if self.keypoints is None and self.keypoint_flip is None:
            return
        if self.keypoints is None or self.keypoint_flip is None:
            raise ValueError("BankBatch: keypoints and keypoint_flip come together (both or neither)")
        b, k = self.pixels.shape[:2]
        shape = tuple(self.keypoints.shape)
        if len(shape) != 4 or shape[:2] != (b, k) or shape[3] != 3:
            raise ValueError(f"BankBatch.keypoints must be [B={b}, K={k}, J, 3], got {shape}")
        self.check_keypoint_flip(self.keypoint_flip, shape[2], "BankBatch.keypoint_flip")

    @staticmethod
    def check_keypoint_flip(flip, j: int, name: str = "keypoint_flip") -> None:
        """Raise ``ValueError`` unless ``flip`` (a tensor or a sequence of ints) has shape ``[j]``
        and, when its values are on the host (a sequence or a CPU tensor), is a permutation of
        ``0..j-1``. A tensor on another device is checked for shape only: reading it would wait
        for the device."""
        shape = tuple(flip.shape) if hasattr(flip, "shape") else (len(flip),)
        if shape != (j,):
            raise ValueError(f"{name} must be [J={j}], got {shape}")
        device = getattr(flip, "device", None)
        if device is not None and device.type != "cpu":
            return
        values = [int(v) for v in (flip.tolist() if hasattr(flip, "tolist") else flip)]
        if sorted(values) != list(range(j)):
            raise ValueError(f"{name} must be a permutation of 0..{j - 1}, got {values}")

    def _map(self, fn) -> BankBatch:
        return BankBatch(
            **{name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in self._TENSORS},
            num_classes=self.num_classes,
        )

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

