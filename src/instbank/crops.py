"""Cut instances into fixed-size RGBA crops (DESIGN "Crop geometry").

For each instance: rasterize its mask at source resolution only inside its box (never a full-image
mask), take the tight box of the mask, scale by ``s = S / max(box_w, box_h)`` (aspect kept) and place
it in an ``S x S`` canvas. RGB = source pixels inside the box, zero in the letterbox; alpha = the
area-resampled mask (uint8). The object is centred up to half a source pixel: the letterbox pad is a
whole number of *source* pixels, which is what makes ``crop_xy = (src_xy - src_box[:2]) * scale +
offset`` exact (one resize of an ``L x L`` source window, ``L = max(box_w, box_h)``, to ``S x S``).

Deviation for large objects (``L >= 2S``), for speed (``_window_side``): the window is halved ``j``
times (exact 2x2 means, OpenCV's SIMD path) before the final area resize, so its side must be a
multiple of ``2**j``: it may grow to ``L' = 2**j * ceil(L / 2**j)``, only while ``L / L' >=
MIN_FILL`` (99.5%). Then ``scale = S / L'`` and the recorded ``scale``/``offset`` are exact for what
was done; the object fills at least 99.5% of the canvas side. The filter stays an area average, but
2x2 blocks straddling the box edge widen the edge's soft band by up to ``2**j - 1`` source pixels
(under one crop pixel). Objects up to ``2S`` get one exact INTER_AREA (or INTER_LINEAR when
enlarged), as before.

Polygons are rasterized by a numpy port of pycocotools' own rasterizer (``polygon_masks``), batched
over all instances of an image and bit-identical to ``mask_utils`` full-image masks.
One decode per image serves all its instances (``decode_image`` then ``cut_image``).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np

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


# COCO's polygon rasterizer, maskApi.c ``rleFrPoly``, ported to numpy and vectorised over every
# part of every instance of an image. It walks each edge on a grid 5x finer than the pixels and
# toggles the mask where the walk crosses a pixel-centre column; we compute only those crossings
# (about 1 in 5 walk points) with the same float64 expressions, so the masks are bit-identical to
# ``mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, H, W)))`` cut to the box,
# and no full-image mask, RLE string or per-instance pycocotools call is made (that path cost
# 0.12 ms per instance on coco_tiny, mostly call overhead; this one 0.063 ms, docs/perf/build.md).
_GRID = 5.0


def _walk_u(sx: np.ndarray, slope: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Minor-axis walk coordinate ``(int)(sx + slope*t + .5)`` (C truncates toward zero)."""
    return np.trunc(sx + slope * t + 0.5)


def _x_major_crossings(sx, sy, slope, steps, width):
    """Crossings of edges walked one grid column per step: ``u = sx + t``, ``v = (int)(sy + s*t + .5)``.
    All float64 ``[e]``; returns ``(edge, column, v_min)`` with ``v_min`` the upper walk point's row."""
    first = np.maximum(np.ceil((sx - 2) / _GRID), 0)  # column c is crossed between u = 5c+2 and 5c+3
    last = np.minimum(np.floor((sx + steps - 3) / _GRID), width - 1)
    edge, column = _expand(first, last)
    t = _GRID * column + 2 - sx[edge]
    v = np.trunc(sy[edge] + slope[edge] * t + 0.5)
    v_next = np.trunc(sy[edge] + slope[edge] * (t + 1) + 0.5)
    return edge, column, np.minimum(v, v_next)


def _y_major_crossings(sx, sy, slope, steps, width):
    """Crossings of edges walked one grid row per step: ``v = sy + t``, ``u = (int)(sx + s*t + .5)``
    (monotone in ``t``, steps of at most 1). Same arrays and result as ``_x_major_crossings``."""
    u0, u1 = _walk_u(sx, slope, 0.0), _walk_u(sx, slope, steps)
    first = np.maximum(np.ceil((np.minimum(u0, u1) - 2) / _GRID), 0)
    last = np.minimum(np.floor((np.maximum(u0, u1) - 3) / _GRID), width - 1)
    edge, column = _expand(first, last)
    sx, s, n = sx[edge], slope[edge], steps[edge]
    rising = s > 0
    boundary = _GRID * column + 2  # last u before the crossing (rising), first u after (falling)

    def before(t):  # is walk point t still on the near side of the column?
        u = _walk_u(sx, s, t)
        return np.where(rising, u <= boundary, u > boundary)

    # Solve u(t) = boundary + .5 for t, then fix the float rounding by one step either way.
    estimate = (boundary + 0.5 - sx) / s
    t = np.clip(np.where(rising, np.ceil(estimate) - 1, np.floor(estimate)), 0, n - 1)
    t = np.where(before(t), t, t - 1)
    t = np.where(before(t + 1) & (t + 1 < n), t + 1, t)
    return edge, column, sy[edge] + t


def _expand(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(edge, value)`` for every integer value in ``[first, last]`` of every edge (float64 bounds)."""
    counts = np.maximum(last - first + 1, 0).astype(np.int64)
    edge = np.repeat(np.arange(len(counts)), counts)
    offset = np.arange(len(edge)) - (np.cumsum(counts) - counts)[edge]
    return edge, first[edge] + offset


def _column_crossings(vertices: np.ndarray, part_sizes: np.ndarray, height: int, width: int):
    """Where each part's boundary toggles the mask, as ``rleFrPoly`` finds it.

    ``vertices`` float64 ``[V, 2]`` (x, y) of every part in turn, ``part_sizes`` int64 ``[P]``.
    Returns int64 ``(part, x, y)``, ``x`` in ``[0, W)``, ``y`` in ``[0, H]``: the mask of the part
    flips at pixel row ``y`` of column ``x`` (an even number of flips per column).
    """
    ends = np.cumsum(part_sizes)
    following = np.arange(1, len(vertices) + 1)
    following[ends - 1] = ends - part_sizes  # the last edge of a part closes it
    q = np.trunc(_GRID * vertices + 0.5)  # (int)(5*x + .5)
    xa, ya = q[:, 0], q[:, 1]
    xb, yb = xa[following], ya[following]
    dx, dy = np.abs(xb - xa), np.abs(yb - ya)
    part = np.repeat(np.arange(len(part_sizes)), part_sizes)
    # The walk runs along the longer axis from its smaller end. An edge with dx = dy = 0 (two
    # vertices quantised to one point) adds one point between two copies of that vertex: no crossing.
    xm = np.flatnonzero((dx >= dy) & (dx > 0))
    ym = np.flatnonzero(dx < dy)
    swap = xa[xm] > xb[xm]
    sx, sy = np.where(swap, xb[xm], xa[xm]), np.where(swap, yb[xm], ya[xm])
    slope = (np.where(swap, ya[xm], yb[xm]) - sy) / dx[xm]
    e1, x1, v1 = _x_major_crossings(sx, sy, slope, dx[xm], width)
    swap = ya[ym] > yb[ym]
    sx, sy = np.where(swap, xb[ym], xa[ym]), np.where(swap, yb[ym], ya[ym])
    slope = (np.where(swap, xa[ym], xb[ym]) - sx) / dy[ym]
    e2, x2, v2 = _y_major_crossings(sx, sy, slope, dy[ym], width)
    v = np.concatenate([v1, v2])
    y = np.ceil(np.clip((v + 0.5) / _GRID - 0.5, 0, height))
    return (np.concatenate([part[xm][e1], part[ym][e2]]), np.concatenate([x1, x2]).astype(np.int64),
            y.astype(np.int64))


def polygon_masks(
    instances: list[tuple[np.ndarray, ...]], height: int, width: int, value: int = 1
) -> list[tuple[np.ndarray, int, int, int] | str]:
    """Rasterize polygon instances (parts float64 ``[n, 2]`` in source pixels) of one image.

    Each entry is ``(mask uint8 [h, w] of 0/value, x0, y0, area)`` cut to the tight box of the
    mask, or a skip reason (``OUTSIDE_IMAGE``: every vertex beyond one border; ``EMPTY_MASK``).
    Parts of an instance are united, as ``mask_utils.merge`` does.
    """
    out: list = [EMPTY_MASK] * len(instances)
    parts = [p for polygons in instances for p in polygons]
    if not parts:
        return out
    sizes = np.array([len(p) for p in parts], np.int64)
    vertices = np.concatenate(parts)
    owner = np.repeat(np.arange(len(instances)), [len(polygons) for polygons in instances])
    inside = _touches_image(vertices, np.repeat(owner, sizes), len(instances), height, width)
    for i in np.flatnonzero(~inside):
        out[i] = OUTSIDE_IMAGE
    part, x, y = _column_crossings(vertices, sizes, height, width)
    keep = inside[owner[part]]
    runs = _runs(part[keep], x[keep], y[keep], owner, height, width)
    if runs is not None:
        for i, found in _fill(*runs, value):
            out[i] = found
    return out


def _touches_image(vertices, owner, n, height, width) -> np.ndarray:
    """bool ``[n]``: the instance's vertices are not all beyond one border of the image."""
    lo = np.full((n, 2), np.inf)
    hi = np.full((n, 2), -np.inf)
    np.minimum.at(lo, owner, vertices)
    np.maximum.at(hi, owner, vertices)
    return (hi[:, 0] > 0) & (hi[:, 1] > 0) & (lo[:, 0] < width) & (lo[:, 1] < height)


def _runs(part, x, y, owner, height, width):
    """Pair each part's flips into non-empty column runs and give each instance its tight box.

    Returns ``(instance [m], box (x0, y0, x1, y1) each [m], runs (box index, column, row0, row1))``
    or None when no instance has a pixel.
    """
    stride = height * width + 1
    key = np.sort(part * stride + x * height + y)  # per part, column-major order: flips pair up
    part = key // stride
    flat = key - part * stride
    start, stop = flat[0::2], flat[1::2]
    nonempty = stop > start
    start, stop, inst = start[nonempty], stop[nonempty], owner[part[0::2][nonempty]]
    if not len(start):
        return None
    column = start // height
    row0, row1 = start - column * height, stop - column * height
    first = _first_of_each(inst)  # runs come grouped by instance
    box = (np.minimum.reduceat(column, first), np.minimum.reduceat(row0, first),
           np.maximum.reduceat(column, first) + 1, np.maximum.reduceat(row1, first))
    group = np.repeat(np.arange(len(first)), np.diff(first, append=len(start)))
    return inst[first], box, (group, column, row0, row1)


def _first_of_each(values: np.ndarray) -> np.ndarray:
    """Index of the first element of each stretch of equal values."""
    new = np.empty(len(values), bool)
    new[0] = True
    np.not_equal(values[1:], values[:-1], out=new[1:])
    return np.flatnonzero(new)


def _fill(instances, box, runs, value):
    """Paint the runs into one column-major buffer (every instance's box in turn, one
    ``np.repeat``) and cut it into row-major masks; yields ``(instance, (mask, x0, y0, area))``."""
    group, column, row0, row1 = runs
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    size = bw * bh
    base = np.cumsum(size) - size
    start = base[group] + (column - x0[group]) * bh[group] + row0 - y0[group]
    stop = start + (row1 - row0)
    order = np.argsort(start, kind="stable")
    start, stop, group = start[order], stop[order], group[order]
    # Parts of one instance may overlap: a run starting inside the reach of the runs before it
    # joins them (union, as mask_utils.merge). Runs of different boxes never overlap.
    reach = np.maximum.accumulate(stop)
    new = np.empty(len(start), bool)
    new[0] = True
    np.greater_equal(start[1:], reach[:-1], out=new[1:])
    last = np.append(new[1:], True)
    start, stop, group = start[new], reach[last], group[new]
    lengths = np.empty(2 * len(start) + 1, np.int64)  # gap, run, gap, ..., run, gap
    lengths[0] = start[0]
    lengths[2:-1:2] = start[1:] - stop[:-1]
    lengths[-1] = size.sum() - stop[-1]
    lengths[1::2] = stop - start
    values = np.zeros(len(lengths), np.uint8)
    values[1::2] = value
    flat = np.repeat(values, lengths)
    area = np.bincount(group, weights=stop - start, minlength=len(size)).astype(np.int64)
    for i, b, n, w, h, x, y, a in zip(instances.tolist(), base.tolist(), size.tolist(), bw.tolist(),
                                      bh.tolist(), x0.tolist(), y0.tolist(), area.tolist()):
        yield i, (cv2.transpose(flat[b : b + n].reshape(w, h)), x, y, a)


def _tighten(mask: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, int, int] | None:
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], x0 + int(cols[0]), y0 + int(rows[0])


def _source_polygons(inst: InstanceRecord, height: int, width: int) -> tuple[np.ndarray, ...]:
    return tuple(p * (width, height) for p in inst.polygons) if inst.normalized else inst.polygons


def _rle_found(inst: InstanceRecord, height: int, width: int, value: int) -> tuple[np.ndarray, int, int, int] | str:
    rle_h, rle_w = (int(v) for v in inst.rle["size"])
    if (rle_h, rle_w) != (height, width):
        return RLE_SIZE_MISMATCH
    found = rle_mask_in_box(inst.rle, height, width)
    if found is None:
        return EMPTY_MASK
    mask, x0, y0 = found
    return mask * np.uint8(value), x0, y0, int(np.count_nonzero(mask))


def image_masks(
    instances: Sequence[InstanceRecord], height: int, width: int, value: int = 1
) -> list[tuple[np.ndarray, int, int, int] | str]:
    """Every instance's mask on one ``height x width`` image: ``(mask uint8 [h, w] of 0/value, x0,
    y0, area)`` cut to its tight box, or a skip reason. All polygon instances are rasterized in one
    batch (``polygon_masks``); RLE instances are decoded over the columns they span."""
    out: list = [None] * len(instances)
    polygon_index = []
    for k, inst in enumerate(instances):
        if inst.rle is not None:
            out[k] = _rle_found(inst, height, width, value)
        else:
            polygon_index.append(k)
    polygons = [_source_polygons(instances[k], height, width) for k in polygon_index]
    for k, found in zip(polygon_index, polygon_masks(polygons, height, width, value)):
        out[k] = found
    return out


def instance_mask(inst: InstanceRecord, height: int, width: int) -> tuple[np.ndarray, int, int] | str:
    """The instance's 0/1 mask cut to its tight box, ``(mask, x0, y0)``, or a skip reason."""
    found = image_masks((inst,), height, width)[0]
    return found if isinstance(found, str) else found[:3]


# ---------------------------------------------------------------------------------------------
# the crop

#: Least fraction of the canvas side the object must fill when its window is widened to a
#: multiple of 2**j for the halving path (``_window_side``).
MIN_FILL = 0.995


def _window_side(side: int, size: int) -> tuple[int, int]:
    """``(window side, halvings)`` for an object whose longer side is ``side`` source pixels.

    OpenCV's INTER_AREA has a SIMD path only for an exact factor of 2 (measured: 0.2 ms for
    640x640x4 -> 320, against 2.0 ms for the generic path to 128). So a large object's window is
    halved ``j`` times before the final resize, which needs a side divisible by ``2**j``: the
    window grows by at most ``2**j - 1`` source pixels, allowed while the object still fills
    ``MIN_FILL`` of the canvas; otherwise one generic resize of the ``side`` window (exact scale).
    """
    best = (side, 0)
    factor = 2
    while factor * size <= side:
        window = factor * -(-side // factor)
        if side >= MIN_FILL * window:
            best = (window, factor.bit_length() - 1)
        factor *= 2
    return best


def _letterbox_into(image_bgr: np.ndarray, alpha: np.ndarray, x0: int, y0: int, out: np.ndarray):
    """Write the RGBA crop of the box ``alpha`` uint8 [h, w] (0..255) at ``(x0, y0)`` into ``out``
    uint8 ``[4, S, S]``; returns ``(scale, (ox, oy))``."""
    h, w = alpha.shape
    size = out.shape[1]
    side, halvings = _window_side(max(h, w), size)
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    window = np.zeros((side, side, 4), np.uint8)
    box = window[pad_y : pad_y + h, pad_x : pad_x + w]
    # cvtColor writes RGB(A) straight into the window, one contiguous pass (the strided numpy
    # copy it replaces took 6 ms for a 640-px window).
    cv2.cvtColor(image_bgr[y0 : y0 + h, x0 : x0 + w], cv2.COLOR_BGR2RGBA, dst=box)
    box[:, :, 3] = alpha
    for _ in range(halvings):  # each one averages exact 2x2 blocks
        window = cv2.resize(window, (window.shape[1] // 2, window.shape[0] // 2), interpolation=cv2.INTER_AREA)
    # INTER_AREA averages source pixels when shrinking (no aliasing); it is not meant for
    # enlarging, where INTER_LINEAR is the usual choice. Both use the pixel-corner convention.
    interp = cv2.INTER_AREA if window.shape[0] > size else cv2.INTER_LINEAR
    resized = cv2.resize(window, (size, size), interpolation=interp)
    cv2.split(resized, list(out))  # channels last -> planes, 2x faster than a numpy transpose copy
    scale = size / side
    return scale, (pad_x * scale, pad_y * scale)


def letterbox_crop(image_bgr: np.ndarray, mask: np.ndarray, x0: int, y0: int, size: int):
    """Cut the tight box ``mask`` [h, w] (0/1) at ``(x0, y0)`` into an RGBA crop.

    Returns ``(rgba uint8 [4, S, S], scale, (ox, oy))`` with ``crop = (src - (x0, y0)) * scale + o``.
    """
    rgba = np.empty((4, size, size), np.uint8)
    scale, offset = _letterbox_into(image_bgr, mask * np.uint8(255), x0, y0, rgba)
    return rgba, scale, offset


def _filter_reason(area: int, box: tuple[int, int, int, int], truncated: bool, f: CropFilters) -> str | None:
    bw, bh = box[2] - box[0], box[3] - box[1]
    if f.min_area and area < f.min_area:
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
    crops = np.empty((len(record.instances), 4, size, size), np.uint8)
    rows, skipped = [], Counter()
    for inst, found in zip(record.instances, image_masks(record.instances, height, width, 255)):
        if isinstance(found, str):
            skipped[found] += 1
            continue
        alpha, x0, y0, area = found
        box = (x0, y0, x0 + alpha.shape[1], y0 + alpha.shape[0])
        truncated = box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height
        reason = _filter_reason(area, box, truncated, filters)
        if reason:
            skipped[reason] += 1
            continue
        scale, offset = _letterbox_into(image_bgr, alpha, x0, y0, crops[len(rows)])
        rows.append((record.image_id, inst.ann_id, inst.class_id, box, scale, offset, area, truncated))
    meta = np.array(rows, dtype=META_DTYPE) if rows else np.empty(0, META_DTYPE)
    return crops[: len(rows)], meta, skipped
