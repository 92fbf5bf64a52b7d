"""Cut instances into fixed-size RGBA crops (DESIGN "Crop geometry").

For each instance: rasterize its mask at source resolution only inside its box (never a full-image
mask), take the tight box of the mask, scale by ``s = S / max(box_w, box_h)`` (aspect kept) and place
it in an ``S x S`` canvas. RGB = source pixels inside the box, zero in the letterbox; alpha = the
area-resampled mask (uint8). The object is centred up to half a source pixel: the letterbox pad is a
whole number of *source* pixels, which is what makes ``crop_xy = (src_xy - src_box[:2]) * scale +
offset`` exact (an ``L x L`` source window, ``L = max(box_w, box_h)``, resampled to ``S x S``).

Resampling, for speed at the cost of the crop's own size (``_letterbox_into``, docs/perf/build.md):
objects up to ``S`` are enlarged bilinearly; larger ones go bilinearly to ``2S x 2S`` then by exact
2x2 means to ``S`` (0.4-0.5 levels from one exact INTER_AREA on average, at a quarter of its cost),
from the level of the image's pyramid (exact 2x2 means, ``Pyramid``) where that first step shrinks
by less than 2. A level pixel on the box edge mixes in up to ``2**j - 1`` source pixels of context
(under one crop pixel).

Polygons are rasterized by a numpy port of pycocotools' own rasterizer (``polygon_masks``), batched
over all instances of an image and bit-identical to ``mask_utils`` full-image masks.
One decode per image serves all its instances: ``read_image_file`` reads the header (size limit,
EXIF), ``plan_crops`` finds the masks from the size alone, and the JPEG is then decoded by
libjpeg-turbo, at 1/2, 1/4 or 1/8 in the DCT domain when every kept crop shrinks that much, with its
warnings about damaged data as errors (``cut_file``; ``decode_image`` + ``cut_image`` for arrays).

Keypoints (``InstanceRecord.keypoints``) go with their crop by the crop's own geometry
(``CropPlan.keypoints``, ``FileCut.keypoints``); an instance with a labeled keypoint outside the
image is skipped (``keypoint_outside_image``).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

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
CORRUPT_IMAGE = "corrupt_image"
TOO_LARGE = "too_large"
#: A labeled keypoint (``v > 0``) outside ``[0, W] x [0, H]``: the annotation is wrong somewhere,
#: and a keypoint cannot be moved into the image without inventing its position.
KEYPOINT_OUTSIDE_IMAGE = "keypoint_outside_image"


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

#: Default ``max_image_pixels`` (width x height, read from the file's header before decoding):
#: 2**29 = 537 M pixels, e.g. 23170 x 23170. The largest images of real instance-segmentation sets
#: fit (iSAID/DOTA aerial scenes reach 20000 x 20000 = 400 M pixels; COCO, LVIS, Objects365 and
#: SA-1B stay under 20 M); a decoded image costs 3 bytes per pixel, so one worker holds at most
#: 1.6 GB for an image. A 700-byte JPEG whose header claims 30000 x 30000 (900 M) is skipped
#: ``too_large`` without allocating anything. OpenCV refuses over 2**30 on its own.
MAX_IMAGE_PIXELS = 1 << 29
#: libjpeg-turbo's DCT-domain scalings we use: 1/2, 1/4, 1/8 (exact pixel-corner geometry).
MAX_REDUCTION = 8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1 = upright) of a JPEG, read from its header only."""
    if b"Exif\x00\x00" not in data[:65536]:  # cheap test first: most files carry no EXIF
        return 1
    from PIL import Image

    try:
        orientation = int(Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block: the pixels may still be fine; treat as upright
        return 1
    return orientation if 1 <= orientation <= 8 else 1


# EXIF orientation -> the transform that shows the stored pixels upright (as cv2.imdecode does):
# flip codes of cv2.flip, ``"t"`` a transpose first. 5..8 swap width and height.
_ORIENT = {2: (None, 1), 3: (None, -1), 4: (None, 0), 5: ("t", None), 6: ("t", 1), 7: ("t", -1), 8: ("t", 0)}


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    transpose, flip = _ORIENT.get(orientation, (None, None))
    if transpose:
        image = cv2.transpose(image)
    return image if flip is None else cv2.flip(image, flip)


@dataclass(frozen=True)
class ImageFile:
    """An image file read and checked from its header, not yet decoded.

    ``width``/``height``: the size of the decoded image (after the EXIF rotation when followed);
    ``orientation``: the EXIF tag (1 = upright) whether followed or not; ``kind``: "jpeg", "png"
    or "other"; ``jpeg_colorspace``: libjpeg's name ("YCbCr", "Gray", "CMYK", ...) for JPEGs.
    """

    path: str
    data: bytes = field(repr=False)
    kind: str
    width: int
    height: int
    orientation: int
    rotate: bool
    jpeg_colorspace: str = ""

    def can_reduce(self) -> bool:
        """Whether ``decode`` can scale in the DCT domain (a JPEG libjpeg-turbo converts to BGR,
        stored upright: a rotation would move the partial last block to the other side)."""
        return self.kind == "jpeg" and self.jpeg_colorspace in ("YCbCr", "Gray") and not self.rotate

    def decode(self, reduction: int = 1) -> np.ndarray:
        """uint8 BGR ``[ceil(H / r), ceil(W / r), 3]`` (``r = reduction``, 1, 2, 4 or 8; > 1 only when
        ``can_reduce()``): pixel ``i`` covers source pixels ``[r*i, r*i + r)``, so geometry maps by
        ``/ r`` exactly. Raises ``ImageSkip`` (``corrupt_image``) when libjpeg reports damaged data
        (OpenCV would return a half-grey image) or a PNG fails its checks."""
        if reduction > 1 and not self.can_reduce():
            raise ValueError(f"{self.path}: cannot decode reduced (not a plain upright JPEG)")
        if self.kind == "jpeg" and self.jpeg_colorspace in ("YCbCr", "Gray"):
            image = self._decode_jpeg(reduction)
        else:  # PNG, CMYK/YCCK JPEG, BMP, TIFF, WebP...: OpenCV
            flags = cv2.IMREAD_COLOR | (cv2.IMREAD_IGNORE_ORIENTATION if not self.rotate else 0)
            image = cv2.imdecode(np.frombuffer(self.data, np.uint8), flags)
            if image is None and self.kind in ("png", "jpeg"):  # its header was read: damaged data
                raise ImageSkip(CORRUPT_IMAGE, f"{self.path}: corrupt {self.kind.upper()} data (decoder error)")
            if image is None or image.ndim != 3 or image.shape[2] != 3:
                raise ImageSkip(UNREADABLE_IMAGE, f"{self.path}: not a decodable image")
        if self.kind != "other" and image.shape[:2] != (-(-self.height // reduction), -(-self.width // reduction)):
            raise ImageSkip(CORRUPT_IMAGE, f"{self.path}: decoded {image.shape[1]}x{image.shape[0]}, header says "
                            f"{self.width}x{self.height}")
        return image

    def _decode_jpeg(self, reduction: int) -> np.ndarray:
        import simplejpeg  # libjpeg-turbo: reports corrupt data (strict) and scales in the DCT domain

        stored_w, stored_h = (self.height, self.width) if self.orientation >= 5 and self.rotate else (self.width, self.height)
        try:
            image = simplejpeg.decode_jpeg(self.data, "BGR", min_width=-(-stored_w // reduction),
                                           min_height=-(-stored_h // reduction), strict=True)
        except ValueError as e:  # libjpeg's own words, e.g. "Corrupt JPEG data: premature end of data segment"
            if "Unsupported" in str(e):  # e.g. a lossless or 12-bit JPEG: not damaged, just not turbo's
                raise ImageSkip(UNREADABLE_IMAGE, f"{self.path}: not a decodable image ({e})") from None
            raise ImageSkip(CORRUPT_IMAGE, f"{self.path}: corrupt JPEG data ({e})") from None
        return _orient(image, self.orientation) if self.rotate else image


def read_image_file(path: str, exif: Literal["follow", "ignore"] = "follow", max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFile:
    """Read ``path`` and its size from the header, without decoding.

    Raises ``ImageSkip`` for missing, empty or unreadable files, truncated JPEGs (no end-of-image
    marker) and images of more than ``max_pixels`` pixels (``too_large``; 0 = no limit)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageSkip(MISSING_IMAGE, f"{path}: image file not found") from None
    except OSError as e:
        raise ImageSkip(UNREADABLE_IMAGE, f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise ImageSkip(UNREADABLE_IMAGE, f"{path}: empty file")
    colorspace = ""
    orientation = 1
    if data[:2] == b"\xff\xd8":
        # libjpeg fills a truncated JPEG with grey and only warns: the EOI marker is the reliable test.
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageSkip(TRUNCATED_IMAGE, f"{path}: truncated JPEG (no end-of-image marker)")
        import simplejpeg

        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise ImageSkip(CORRUPT_IMAGE, f"{path}: corrupt JPEG header ({e})") from None
        kind = "jpeg"
        orientation = _exif_orientation(data)
    elif data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        kind, width, height = "png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    else:
        kind, (width, height) = "other", _pillow_size(data)
    rotate = exif == "follow" and orientation != 1
    if rotate and orientation >= 5:
        width, height = height, width
    if max_pixels and width * height > max_pixels:
        raise ImageSkip(TOO_LARGE, f"{path}: {width}x{height} = {width * height / 1e6:.0f} M pixels, over "
                        f"max_image_pixels {max_pixels / 1e6:.0f} M (header; not decoded)")
    return ImageFile(path, data, kind, width, height, orientation, rotate, colorspace)


def _pillow_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of a BMP, TIFF, WebP, GIF... file; (0, 0) when Pillow does
    not know it (OpenCV may: its own limit of 2**30 pixels then applies)."""
    from PIL import Image

    # Pillow's own bomb check would refuse (or warn) above 89 M pixels from its header alone; the
    # limit here is max_image_pixels, so read the size without it (this process, this call only).
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # not a format Pillow knows, or a broken header: OpenCV decides
        return 0, 0
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def decode_image(
    path: str, exif: Literal["follow", "ignore"] = "follow", max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, int]:
    """Decode ``path`` to uint8 BGR ``[H, W, 3]`` (BGR: OpenCV's order; crops flip to RGB only
    inside each box, which is cheaper than converting the whole image).

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit files become 8-bit BGR. Returns the
    image and its EXIF orientation (1 = none). ``exif="follow"`` rotates the pixels as the tag says
    (what viewers show); ``"ignore"`` keeps the stored pixel order (what some annotation tools
    labelled). Raises ``ImageSkip`` for missing, empty, truncated, corrupt, too large
    (``max_pixels``, from the header) or undecodable files.
    """
    file = read_image_file(path, exif, max_pixels)
    return file.decode(), file.orientation


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


def _level_of(side: int, size: int) -> int:
    """The coarsest pyramid level ``j`` with ``2**j * size <= side`` (0 when ``side < 2 * size``)."""
    j = 0
    while (2 << j) * size <= side:
        j += 1
    return j


def _halve(image: np.ndarray) -> np.ndarray:
    """Exact 2x2 means (OpenCV's SIMD INTER_AREA path, rounded as it rounds) to ``ceil(h/2) x
    ceil(w/2)``: an odd last row/column is averaged with itself (edge replicated), so level pixel
    ``i`` always covers source pixels ``[2i, 2i + 2)`` (measured 0.12 ms for 640x480x3)."""
    h, w = image.shape[:2]
    he, we = h & ~1, w & ~1
    out = np.empty(((h + 1) // 2, (w + 1) // 2) + image.shape[2:], np.uint8)
    if he and we:
        cv2.resize(image[:he, :we], (we // 2, he // 2), dst=out[: he // 2, : we // 2], interpolation=cv2.INTER_AREA)
    if w & 1 and he:
        column = image[:he, -1].astype(np.uint16)
        out[: he // 2, -1] = (column[0::2] + column[1::2] + 1) >> 1
    if h & 1 and we:
        row = image[-1, :we].astype(np.uint16)
        out[-1, : we // 2] = (row[0::2] + row[1::2] + 1) >> 1
    if h & 1 and w & 1:
        out[-1, -1] = image[-1, -1]
    return out


class Pyramid:
    """Levels of one decoded image, made on first use: level ``j`` is the image shrunk ``2**j``
    times by exact 2x2 means; level ``first`` is what was decoded (libjpeg's DCT scaling)."""

    def __init__(self, image: np.ndarray, first: int = 0):
        self.first = first
        self._levels = {first: image}

    def level(self, j: int) -> np.ndarray:
        if j < self.first:
            raise ValueError(f"level {j} is finer than the decoded level {self.first}")
        if j not in self._levels:
            self._levels[j] = _halve(self.level(j - 1))
        return self._levels[j]


def _window_rgba(image_bgr, alpha, x0, y0, side, pad_x, pad_y) -> np.ndarray:
    """The ``side x side`` RGBA window at source resolution: the box at ``(pad_x, pad_y)``, zeros around."""
    h, w = alpha.shape
    window = np.zeros((side, side, 4), np.uint8)
    box = window[pad_y : pad_y + h, pad_x : pad_x + w]
    # cvtColor writes RGB(A) straight into the window, one contiguous pass (the strided numpy
    # copy it replaces took 6 ms for a 640-px window).
    cv2.cvtColor(image_bgr[y0 : y0 + h, x0 : x0 + w], cv2.COLOR_BGR2RGBA, dst=box)
    box[:, :, 3] = alpha
    return window


def _level_rgba(pyramid: Pyramid, j: int, alpha, x0, y0) -> tuple[np.ndarray, int, int]:
    """The box on level ``j``: RGBA of the level pixels it touches, ``(rgba, lx, ly)`` with
    ``(lx, ly)`` their first level pixel. RGB is the level's (a level pixel on the box edge
    averages the box with up to ``2**j - 1`` source pixels of context, under one crop pixel);
    alpha is the mask's exact ``2**j`` box means (zero outside the box)."""
    n = 1 << j
    h, w = alpha.shape
    lx, ly = x0 >> j, y0 >> j
    lw, lh = -(-(x0 + w) // n) - lx, -(-(y0 + h) // n) - ly
    rgba = cv2.cvtColor(pyramid.level(j)[ly : ly + lh, lx : lx + lw], cv2.COLOR_BGR2RGBA)
    mask = np.zeros((lh * n, lw * n), np.uint8)
    mask[y0 - ly * n : y0 - ly * n + h, x0 - lx * n : x0 - lx * n + w] = alpha
    rgba[:, :, 3] = cv2.resize(mask, (lw, lh), interpolation=cv2.INTER_AREA)  # integer factor: exact means
    return rgba, lx, ly


def _shrink_2x(rgba_2s: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(rgba_2s, (size, size), interpolation=cv2.INTER_AREA)  # exact 2x2 means (SIMD path)


def _letterbox_into(pyramid: Pyramid, alpha: np.ndarray, x0: int, y0: int, out: np.ndarray):
    """Write the RGBA crop of the box ``alpha`` uint8 [h, w] (0..255) at ``(x0, y0)`` (source
    pixels) into ``out`` uint8 ``[4, S, S]``; returns ``(scale, (ox, oy))``.

    The window is the ``L x L`` square (``L = max(h, w)``) with the box at a whole number of source
    pixels from its corner; ``scale = S / L`` exactly. How it is resampled (docs/perf/build.md):

    - ``L <= S``: one bilinear enlargement of the window (INTER_LINEAR; scale 1 is a copy);
    - ``S < L``: bilinear to ``2S x 2S``, then exact 2x2 means to ``S``, from the pyramid level
      where the first step shrinks by less than 2 (``2**j * 2S <= L``; level 0 below ``4S``), or
      from the decoded level when the image was decoded reduced. OpenCV's INTER_AREA has no SIMD
      path for factors that are not whole (0.2-0.5 ms per 128-px crop); this costs 0.1 ms and
      differs from it by 0.4-0.5 levels on average on COCO crops (p99 5-6).
    """
    h, w = alpha.shape
    size = out.shape[1]
    side = max(h, w)
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    scale = size / side
    j = max(_level_of(side, 2 * size) if side > size else 0, pyramid.first)
    if j == 0:
        window = _window_rgba(pyramid.level(0), alpha, x0, y0, side, pad_x, pad_y)
        if side <= size:
            # INTER_LINEAR for enlarging (INTER_AREA is not meant for it); pixel-corner convention.
            resized = cv2.resize(window, (size, size), interpolation=cv2.INTER_LINEAR)
        else:
            resized = _shrink_2x(cv2.resize(window, (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR), size)
    else:
        rgba, lx, ly = _level_rgba(pyramid, j, alpha, x0, y0)
        n = 1 << j
        k = side / (2 * size * n)  # level pixels per pixel of the 2S x 2S intermediate
        tx, ty = (x0 - pad_x) / n - lx, (y0 - pad_y) / n - ly  # the window's corner in rgba pixels
        # corner coordinates c_src = k * c_dst + t; warpAffine maps pixel centres (index + 0.5)
        m = np.array([[k, 0, tx + 0.5 * k - 0.5], [0, k, ty + 0.5 * k - 0.5]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        resized = _shrink_2x(cv2.warpAffine(rgba, m, (2 * size, 2 * size), flags=flags, borderMode=cv2.BORDER_CONSTANT), size)
    cv2.split(resized, list(out))  # channels last -> planes, 2x faster than a numpy transpose copy
    return scale, (pad_x * scale, pad_y * scale)


def letterbox_crop(image_bgr: np.ndarray, mask: np.ndarray, x0: int, y0: int, size: int):
    """Cut the tight box ``mask`` [h, w] (0/1) at ``(x0, y0)`` into an RGBA crop.

    Returns ``(rgba uint8 [4, S, S], scale, (ox, oy))`` with ``crop = (src - (x0, y0)) * scale + o``.
    """
    rgba = np.empty((4, size, size), np.uint8)
    scale, offset = _letterbox_into(Pyramid(image_bgr), mask * np.uint8(255), x0, y0, rgba)
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


@dataclass
class CropPlan:
    """The kept instances of one image, found from its size alone (before decoding): their masks
    and boxes, the skip counts, and ``reduction``: the largest DCT scaling (1, 2, 4, 8) at which
    every kept crop is still shrunk, i.e. cut from a level at or above its own scale."""

    record: ImageRecord
    size: int
    kept: list  # (instance, alpha uint8 [h, w] 0/255, x0, y0, area, box, truncated)
    skips: list[tuple[str, int]]  # (reason, ann_id) of each instance not kept, in order
    reduction: int
    image_size: tuple[int, int] = (0, 0)  # (height, width) the instances were placed on

    @property
    def skipped(self) -> Counter:
        """Instance skips by reason."""
        return Counter(reason for reason, _ in self.skips)

    def keypoints(self, meta: np.ndarray) -> np.ndarray | None:
        """float32 ``[n, J, 3]``: the kept instances' keypoints in crop pixels, by the geometry of
        their META_DTYPE rows ``meta`` (``CropMeta``'s ``crop_xy = (src_xy - src_box[:2]) * scale +
        offset``, in float64, then rounded once to float32); ``x = y = 0`` where ``v = 0``. ``None``
        when the instances carry no keypoints (or none is kept)."""
        records = [kept[0] for kept in self.kept]
        if not records or records[0].keypoints is None:
            return None
        height, width = self.image_size
        src = np.stack([_source_keypoints(r, height, width) for r in records])  # float64 [n, J, 3]
        xy = (src[..., :2] - meta["src_box"][:, None, :2]) * meta["scale"][:, None, None] + meta["offset"][:, None, :]
        out = np.concatenate([xy, src[..., 2:]], axis=-1)
        out[src[..., 2] == 0] = 0
        return out.astype(np.float32)

    def cut(self, pyramid: Pyramid) -> tuple[np.ndarray, np.ndarray]:
        """``(rgba uint8 [n, 4, S, S], META_DTYPE [n])`` of the kept instances, cut from ``pyramid``."""
        crops = np.empty((len(self.kept), 4, self.size, self.size), np.uint8)
        rows = []
        for k, (inst, alpha, x0, y0, area, box, truncated) in enumerate(self.kept):
            scale, offset = _letterbox_into(pyramid, alpha, x0, y0, crops[k])
            rows.append((self.record.image_id, inst.ann_id, inst.class_id, box, scale, offset, area, truncated))
        meta = np.array(rows, dtype=META_DTYPE) if rows else np.empty(0, META_DTYPE)
        return crops, meta


def plan_crops(record: ImageRecord, height: int, width: int, size: int, filters: CropFilters = CropFilters()) -> CropPlan:
    """Masks, boxes and filters of every instance of ``record`` on a ``height x width`` image."""
    kept, skips = [], []
    level = _level_of(MAX_REDUCTION * size, size)
    for inst, found in zip(record.instances, image_masks(record.instances, height, width, 255)):
        if isinstance(found, str):
            skips.append((found, inst.ann_id))
            continue
        alpha, x0, y0, area = found
        box = (x0, y0, x0 + alpha.shape[1], y0 + alpha.shape[0])
        truncated = box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height
        reason = _filter_reason(area, box, truncated, filters) or _keypoint_reason(inst, height, width)
        if reason:
            skips.append((reason, inst.ann_id))
            continue
        kept.append((inst, alpha, x0, y0, area, box, truncated))
        level = min(level, _level_of(max(alpha.shape), size))
    return CropPlan(record, size, kept, skips, 1 << level, (height, width))


def _source_keypoints(inst: InstanceRecord, height: int, width: int) -> np.ndarray:
    """float64 ``[J, 3]`` keypoints of ``inst`` in source pixels (normalised ones scaled as polygons)."""
    return inst.keypoints * (width, height, 1) if inst.normalized else inst.keypoints


def _keypoint_reason(inst: InstanceRecord, height: int, width: int) -> str | None:
    """``KEYPOINT_OUTSIDE_IMAGE`` when a labeled keypoint of ``inst`` lies outside the image."""
    if inst.keypoints is None:
        return None
    x, y, v = _source_keypoints(inst, height, width).T
    outside = (v > 0) & ((x < 0) | (x > width) | (y < 0) | (y > height))
    return KEYPOINT_OUTSIDE_IMAGE if outside.any() else None


def cut_image(
    image_bgr: np.ndarray, record: ImageRecord, size: int, filters: CropFilters = CropFilters()
) -> tuple[np.ndarray, np.ndarray, Counter]:
    """All kept crops of one decoded image: ``(rgba uint8 [n, 4, S, S], META_DTYPE [n], skipped)``."""
    plan = plan_crops(record, image_bgr.shape[0], image_bgr.shape[1], size, filters)
    crops, meta = plan.cut(Pyramid(image_bgr))
    return crops, meta, plan.skipped


class FileCut(NamedTuple):
    """What ``cut_file`` made of one image file."""

    rgba: np.ndarray  # uint8 [n, 4, S, S]
    meta: np.ndarray  # META_DTYPE [n]
    skips: list[tuple[str, int]]  # (reason, ann_id) of each instance not kept
    width: int  # the decoded image's size (after the EXIF rotation when followed)
    height: int
    orientation: int  # EXIF tag, 1 = upright
    reduction: int  # 1, or 2/4/8: decoded at that scale in the DCT domain
    keypoints: np.ndarray | None = None  # float32 [n, J, 3] in crop pixels (CropPlan.keypoints), or None


def cut_file(
    path: str,
    record: ImageRecord,
    size: int,
    filters: CropFilters = CropFilters(),
    exif: Literal["follow", "ignore"] = "follow",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> FileCut:
    """``cut_image`` of the file at ``path``, decoding only as much as its crops need: the masks are
    found from the header's size first, then a JPEG is decoded at 1/2, 1/4 or 1/8 in the DCT domain
    (libjpeg-turbo) when every kept crop shrinks by at least that much, and at 1/8 when none is
    kept (the decode still checks the data). Raises ``ImageSkip`` like ``decode_image``."""
    file = read_image_file(path, exif, max_pixels)
    if not file.width or not file.height:  # a format whose header Pillow could not read: decode first
        image = file.decode()
        plan = plan_crops(record, image.shape[0], image.shape[1], size, filters)
        rgba, meta = plan.cut(Pyramid(image))
        return FileCut(rgba, meta, plan.skips, image.shape[1], image.shape[0], file.orientation, 1, plan.keypoints(meta))
    plan = plan_crops(record, file.height, file.width, size, filters)
    reduction = plan.reduction if file.can_reduce() else 1
    image = file.decode(reduction)
    rgba, meta = plan.cut(Pyramid(image, reduction.bit_length() - 1))
    return FileCut(rgba, meta, plan.skips, file.width, file.height, file.orientation, reduction, plan.keypoints(meta))
