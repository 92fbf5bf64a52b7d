"""Cut instances into fixed-size RGBA crops (DESIGN "Crop geometry").

For each instance: rasterize its mask at source resolution only inside its box (never a full-image
mask), take the tight box of the mask, scale by ``s = S / max(box_w, box_h)`` (aspect kept) and place
it in an ``S x S`` canvas. RGB = source pixels inside the box, zero in the letterbox; alpha = the
area-resampled mask (uint8). The object is centred up to half a source pixel: the letterbox pad is a
whole number of *source* pixels, which is what makes ``crop_xy = (src_xy - src_box[:2]) * scale +
offset`` exact (one resize of an ``L x L`` source window, ``L = max(box_w, box_h)``, to ``S x S``).

One decode per image serves all its instances (``decode_image`` then ``cut_image``).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from instbank.types import META_DTYPE, ImageRecord, InstanceRecord

# Skip reasons written in the build report (short keys; docs/formats.md and docs/reliability.md).
EMPTY_MASK = "empty_mask"
OUTSIDE_IMAGE = "outside_image"
RLE_SIZE_MISMATCH = "rle_size_mismatch"
SMALL_AREA = "small_area"
SMALL_SIDE = "small_side"
ASPECT = "aspect"
TRUNCATED = "truncated"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TRUNCATED_IMAGE = "truncated_image"


@dataclass(frozen=True)
class CropFilters:
    """Which instances to keep. ``min_area``: mask pixels at source; ``min_side``: shorter side of the
    tight box in source pixels; ``max_aspect``: longer/shorter side (0 = no limit)."""

    min_area: int = 0
    min_side: int = 0
    max_aspect: float = 0.0
    skip_truncated: bool = False


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is its skip key in the build report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# decoding


def _exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1 = upright) of a JPEG, read from its header only."""
    if b"Exif\x00\x00" not in data[:65536]:  # cheap test first: most files carry no EXIF
        return 1
    from PIL import Image

    try:
        return int(Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block: the pixels may still be fine; treat as upright
        return 1


def decode_image(path: str, exif: Literal["follow", "ignore"] = "follow") -> tuple[np.ndarray, int]:
    """Decode ``path`` to uint8 BGR ``[H, W, 3]`` (BGR: OpenCV's order; crops flip to RGB only
    inside each box, which is cheaper than converting the whole image).

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit files become 8-bit BGR. Returns the
    image and its EXIF orientation (1 = none). ``exif="follow"`` rotates the pixels as the tag says
    (what viewers show); ``"ignore"`` keeps the stored pixel order (what some annotation tools
    labelled). Raises ``ImageSkip`` for missing, empty, truncated or undecodable files.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageSkip(MISSING_IMAGE, f"{path}: image file not found") from None
    except OSError as e:
        raise ImageSkip(UNREADABLE_IMAGE, f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise ImageSkip(UNREADABLE_IMAGE, f"{path}: empty file")
    is_jpeg = data[:2] == b"\xff\xd8"
    # libjpeg fills a truncated JPEG with grey and only warns: the EOI marker is the reliable test.
    if is_jpeg and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageSkip(TRUNCATED_IMAGE, f"{path}: truncated JPEG (no end-of-image marker)")
    orientation = _exif_orientation(data) if is_jpeg else 1
    flags = cv2.IMREAD_COLOR
    if exif == "ignore" or orientation == 1:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise ImageSkip(UNREADABLE_IMAGE, f"{path}: not a decodable image")
    return image, orientation


# ---------------------------------------------------------------------------------------------
# masks inside their box


def rle_string_to_counts(s: str | bytes) -> np.ndarray:
    """Decode COCO's compressed RLE string (``maskApi.c`` ``rleFrString``) to int64 run lengths."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return np.asarray(counts, np.int64)


def rle_mask_in_box(rle: dict, height: int, width: int) -> tuple[np.ndarray, int, int] | None:
    """Decode a COCO RLE only over the columns its foreground spans.

    Returns ``(mask uint8 [h_box, w_box], x0, y0)`` of the tight box, or None when empty. The
    decode touches a strip of ``H x (columns spanned)``, never a full-image array per instance.
    """
    counts = rle["counts"]
    counts = rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    fg_start, fg_end = starts[1::2], ends[1::2]  # runs alternate 0s, 1s, 0s, ... (column-major)
    keep = fg_end > fg_start
    fg_start, fg_end = np.minimum(fg_start[keep], height * width), np.minimum(fg_end[keep], height * width)
    if fg_start.size == 0:
        return None
    col0 = int(fg_start.min() // height)
    col1 = int((fg_end.max() - 1) // height) + 1
    edges = np.zeros((col1 - col0) * height + 1, np.int32)
    np.add.at(edges, fg_start - col0 * height, 1)
    np.add.at(edges, fg_end - col0 * height, -1)
    strip = (np.cumsum(edges[:-1]) > 0).reshape(col1 - col0, height).T  # [H, cols]
    return _tighten(strip.astype(np.uint8), col0, 0)


def polygon_mask_in_box(
    polygons: tuple[np.ndarray, ...], height: int, width: int
) -> tuple[np.ndarray, int, int] | None:
    """Rasterize polygon parts (source pixels) with COCO's own rasterizer, inside their clipped box.

    ``maskApi.c`` ``rleFrPoly`` first quantizes each vertex to ``(int)(5*x + .5)`` in doubles, then
    works in exact integer arithmetic, which is invariant to shifts by whole pixels. Shifting the
    float vertices would change that first rounding at large coordinates (212.7*5 rounds to 1063.5,
    (212.7-212)*5 to 3.4999...), so we quantize in image coordinates, shift the integers, and pass
    values that quantize back to exactly those integers. The edge walk that follows still adds the
    absolute start row in doubles (``(int)(ys + s*t + .5)``), so a boundary pixel can differ from
    the full-image mask where that sum ties at .5 (measured: a few pixels in 1 of ~300 instances).
    """
    pts = np.concatenate(polygons)
    x0 = max(int(np.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    shifted = [_coco_shifted(p, x0, y0).ravel().tolist() for p in polygons]
    rles = mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)
    mask = mask_utils.decode(mask_utils.merge(rles))
    return _tighten(mask, x0, y0)


def _coco_shifted(poly: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Vertices whose ``rleFrPoly`` quantization equals that of ``poly`` shifted by ``(x0, y0)``."""
    q = np.trunc(5.0 * poly + 0.5) - 5.0 * np.array([x0, y0])  # C's (int) truncates toward zero
    # trunc(5*v + .5) == q needs v = q/5 for q >= 0, and 5*v + .5 in (q-1, q] for q < 0.
    return np.where(q >= 0, q / 5.0, (q - 0.75) / 5.0)


def _tighten(mask: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, int, int] | None:
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], x0 + int(cols[0]), y0 + int(rows[0])


def instance_mask(inst: InstanceRecord, height: int, width: int) -> tuple[np.ndarray, int, int] | str:
    """The instance's mask cut to its tight box, ``(mask, x0, y0)``, or a skip reason."""
    if inst.rle is not None:
        rle_h, rle_w = (int(v) for v in inst.rle["size"])
        if (rle_h, rle_w) != (height, width):
            return RLE_SIZE_MISMATCH
        found = rle_mask_in_box(inst.rle, height, width)
        return EMPTY_MASK if found is None else found
    polygons = inst.polygons
    if inst.normalized:
        polygons = tuple(p * (width, height) for p in polygons)
    pts = np.concatenate(polygons)
    if pts[:, 0].max() <= 0 or pts[:, 1].max() <= 0 or pts[:, 0].min() >= width or pts[:, 1].min() >= height:
        return OUTSIDE_IMAGE
    found = polygon_mask_in_box(polygons, height, width)
    return EMPTY_MASK if found is None else found


# ---------------------------------------------------------------------------------------------
# the crop


def letterbox_crop(image_bgr: np.ndarray, mask: np.ndarray, x0: int, y0: int, size: int):
    """Cut the tight box ``mask`` [h, w] at ``(x0, y0)`` into an RGBA crop.

    Returns ``(rgba uint8 [4, S, S], scale, (ox, oy))`` with ``crop = (src - (x0, y0)) * scale + o``.
    """
    h, w = mask.shape
    side = max(h, w)
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    window = np.zeros((side, side, 4), np.uint8)
    window[pad_y : pad_y + h, pad_x : pad_x + w, :3] = image_bgr[y0 : y0 + h, x0 : x0 + w, ::-1]
    window[pad_y : pad_y + h, pad_x : pad_x + w, 3] = mask * np.uint8(255)
    # INTER_AREA averages source pixels when shrinking (no aliasing); it is not meant for
    # enlarging, where INTER_LINEAR is the usual choice. Both use the pixel-corner convention.
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    resized = cv2.resize(window, (size, size), interpolation=interp)
    scale = size / side
    return np.ascontiguousarray(resized.transpose(2, 0, 1)), scale, (pad_x * scale, pad_y * scale)


def _filter_reason(mask: np.ndarray, box: tuple[int, int, int, int], truncated: bool, f: CropFilters) -> str | None:
    bw, bh = box[2] - box[0], box[3] - box[1]
    if f.min_area and int(mask.sum()) < f.min_area:
        return SMALL_AREA
    if f.min_side and min(bw, bh) < f.min_side:
        return SMALL_SIDE
    if f.max_aspect and max(bw, bh) / min(bw, bh) > f.max_aspect:
        return ASPECT
    if f.skip_truncated and truncated:
        return TRUNCATED
    return None


def cut_image(
    image_bgr: np.ndarray, record: ImageRecord, size: int, filters: CropFilters = CropFilters()
) -> tuple[np.ndarray, np.ndarray, Counter]:
    """All kept crops of one decoded image: ``(rgba uint8 [n, 4, S, S], META_DTYPE [n], skipped)``."""
    height, width = image_bgr.shape[:2]
    crops, rows, skipped = [], [], Counter()
    for inst in record.instances:
        found = instance_mask(inst, height, width)
        if isinstance(found, str):
            skipped[found] += 1
            continue
        mask, x0, y0 = found
        box = (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])
        truncated = box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height
        reason = _filter_reason(mask, box, truncated, filters)
        if reason:
            skipped[reason] += 1
            continue
        rgba, scale, offset = letterbox_crop(image_bgr, mask, x0, y0, size)
        crops.append(rgba)
        rows.append((record.image_id, inst.ann_id, inst.class_id, box, scale, offset, int(mask.sum()), truncated))
    meta = np.array(rows, dtype=META_DTYPE) if rows else np.empty(0, META_DTYPE)
    pixels = np.stack(crops) if crops else np.empty((0, 4, size, size), np.uint8)
    return pixels, meta, skipped
