"""The reference of paste compositing: the specification, the CPU path, and a torch path for
other devices.

``instbank.paste.triton_kernel.paste_image`` implements the same function; both must agree (uint8
images within 1 level, masks exactly). ``instbank.paste.cpu_kernel.paste_image`` is this module's
CPU path compiled by numba (whole batch in one call): bit-identical results.

Signature::

    paste_image(images, crops, plan, padding_mask=None, value_range=None)
        -> (out_images like images, visible masks bool [B, K, H, W])

- ``images``: ``[B, 3, H, W]`` uint8, float16, bfloat16 or float32, contiguous or channels_last
  (the output keeps the input's memory format). ``B`` may be 0. Not modified in place.
- ``crops``: uint8 ``[B, K, 4, S, S]`` (RGB, alpha). ``K`` may be 0. Alpha pre-processing (hard
  threshold or Gaussian feathering, ``instbank.paste.prepare_alpha``) happens BEFORE this call, in
  torch code shared by both impls, so both see the same uint8 alpha.
- ``plan``: ``instbank.paste.plan.PastePlan``; read here: ``apply`` bool ``[B, K]``, ``inv_scale``
  float32 ``[B, K]`` (``1 / scale``, computed once by the plan: no impl divides itself, so
  coordinates are bit-identical), ``translate`` float32 ``[B, K, 2]`` (target ``(x, y)`` of the
  canvas corner ``(0, 0)``), ``flip`` bool ``[B, K]``.
- ``padding_mask``: optional bool ``[B, H, W]``, True = padding: nothing is pasted there.
- ``value_range``: ``None`` -> 255 for uint8 images, 1.0 for float images; float images live in
  ``[0, value_range]``; crop RGB is scaled by ``value_range / 255``.

Per output pixel ``(x, y)`` (integers, pixel centre at ``x + 0.5``), for each paste ``k = 0..K-1``
in order (back to front; later pastes on top)::

    u  = (x + 0.5 - translate[b,k,0]) * inv_scale[b,k]       # float32, continuous crop coordinate
    if flip[b,k]: u = S - u
    v  = (y + 0.5 - translate[b,k,1]) * inv_scale[b,k]
    uf = u - 0.5 ; vf = v - 0.5                                # pixel-centre index space
    x0 = floor(uf) ; y0 = floor(vf)                            # int
    fx = floor((uf - x0) * 256) ; fy = floor((vf - y0) * 256) # int, clamped to 0..255
    taps (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1):
      alpha: a tap outside [0,S)x[0,S) reads 0
      RGB:   a tap reads the pixel at its coordinates clamped to [0,S-1]x[0,S-1]
    wx0 = 256 - fx, wx1 = fx, wy0 = 256 - fy, wy1 = fy         # integer weights, sum 256 each
    A  = (a00*wx0 + a10*wx1)*wy0 + (a01*wx0 + a11*wx1)*wy1    # int32, 0 .. 255*65536
         (a_ij = alpha at (x0+i, y0+j))
    raw_k   = apply[b,k] & (A >= 128*65536) & ~padding[b,y,x]            # bool, exact in both impls
    alpha_k = where(apply & ~padding, A / (255*65536), 0)                # float32 in [0, 1]
    rgb_k   = ((c00*wx0 + c10*wx1)*wy0 + (c01*wx0 + c11*wx1)*wy1) / 65536  # per channel, float32
              (integer sums in int32 -- at most 255*65536 -- then converted to float32 and divided)
    out     = out * (1 - alpha_k) + (rgb_k * value_range / 255) * alpha_k   # float32 accumulation

``out`` starts as the images converted to float32. At the end: uint8 -> ``floor(out + 0.5)``
clamped to ``[0, 255]``; float dtypes -> cast. Visible masks:
``vis_k = raw_k & ~(raw_{k+1} | ... | raw_{K-1})``. Pixels a paste cannot reach (outside its
canvas's target rectangle) have alpha 0.

Why this shape: integer bilinear weights (OpenCV's ``INTER_LINEAR`` fixed point uses the same idea)
make the mask threshold exact across implementations as long as ``u``, ``v`` and the fractions are
computed with the same float32 op sequence (subtract, multiply by ``inv_scale``, ``S - u`` for flip,
subtract 0.5, floor, multiply by 256, floor); ``inv_scale`` precomputed avoids divide differences
(Triton's fp32 divide is approximate on GPU); back-to-front alpha blending is what Simple
Copy-Paste (Ghiasi et al. 2021, arXiv:2012.07177) does. RGB taps are clamped to the canvas edge
rather than read as 0: the colour is weighted by alpha once, so the ring of pixels where an object
touches the canvas edge keeps its colour (zero RGB there gave colour x alpha^2, a dark rim).

Two implementations of the same arithmetic, chosen by the images' device:

- CPU (``composite_rects``, numpy): the plan gives every paste's target rectangle (the target
  image of the crop's non-zero alpha, its support); only that rectangle is warped, blended and
  thresholded, in a float32 tile per group of overlapping pastes. The bilinear sample is
  separable (``u`` depends on ``x`` only, ``v`` on ``y`` only): two row gathers of the crop along
  ``y`` weighted in uint16 (``a*wy0 + b*wy1 <= 255*256``), then two column gathers along ``x``
  weighted in float32 on integers below 2**24 (RGB's weights times 2**-16, a power of two): the
  exact int32 sums of the spec, summed in the other order. numpy rather than torch because at
  these sizes (~80 x 64 pixels per paste) torch's per-call overhead, its uint8/float comparisons
  and its last-axis ``index_select`` cost 2-10x more (torch 2.13, one thread). Visible masks are
  written front to back inside the same rectangles. ``instbank.paste.cpu_kernel`` is this path
  compiled.
- Other devices (``_paste_dense``, torch): each paste is evaluated over the whole image,
  vectorised over the batch, with no host synchronisation (the Triton kernel is the fast path
  there).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import torch

from instbank.paste.plan import PastePlan

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
ONE = 65536  # 256 * 256: the integer weights of one bilinear sample sum to this
ALPHA_MAX = 255 * ONE
ALPHA_THRESHOLD = 128 * ONE
# Pixels beyond the reach computed in ``_paste_windows`` that a float32 rounding could still bring
# into it; two pixels is far more than any rounding of coordinates below 2**22.
RECT_MARGIN = 2


class Paste(NamedTuple):
    """One applied paste that changes pixels: image ``b``, crop ``k``, target rectangle
    ``[x0, x1) x [y0, y1)`` and the paste's raw mask there (numpy bool ``[y1 - y0, x1 - x0]``)."""

    b: int
    k: int
    x0: int
    y0: int
    x1: int
    y1: int
    raw: np.ndarray


def paste_image(
    images: torch.Tensor,
    crops: torch.Tensor,
    plan: PastePlan,
    padding_mask: torch.Tensor | None = None,
    value_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite ``K`` crops into each image, back to front (see the module docstring).

    Args:
        images: ``[B, 3, H, W]`` uint8 / float16 / bfloat16 / float32.
        crops: uint8 ``[B, K, 4, S, S]``.
        plan: placement (``apply``, ``inv_scale``, ``translate``, ``flip`` are read).
        padding_mask: optional bool ``[B, H, W]``, True = padding.
        value_range: 255 for uint8 / 1.0 for floats when ``None``.

    Returns:
        ``(out, visible)``: ``out`` like ``images`` (same dtype, shape and memory format), and
        bool ``[B, K, H, W]`` visible masks of the pastes.
    """
    check_inputs(images, crops, plan, padding_mask)
    vrange = default_value_range(images.dtype, value_range)
    if images.device.type != "cpu":
        return _paste_dense(images, crops, plan, padding_mask, vrange)
    return paste_rects(images, crops, plan, padding_mask, vrange)


def paste_rects(images, crops, plan, padding_mask, vrange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path of ``paste_image`` (inputs checked)."""
    b, _, h, w = images.shape
    out = torch.empty_like(images)  # images without pastes are final: floor(x + 0.5) = x, cast(x) = x
    visible = torch.zeros((b, crops.shape[1], h, w), dtype=torch.bool)
    planes = visible.numpy()
    for group in composite_rects(out, images, crops, plan, padding_mask, vrange):
        for p, vis in zip(group, group_visible(group)[0]):
            planes[p.b, p.k, p.y0 : p.y1, p.x0 : p.x1] = vis
    return out, visible


def default_value_range(dtype: torch.dtype, value_range: float | None) -> float:
    """255 for uint8 images, 1.0 for floating images, unless given."""
    if value_range is not None:
        return float(value_range)
    return 255.0 if dtype == torch.uint8 else 1.0


def check_inputs(images, crops, plan, padding_mask) -> None:
    """Raise ``ValueError`` naming the first argument whose shape, dtype or device is wrong."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"images dtype must be one of {IMAGE_DTYPES}, got {images.dtype}")
    b, _, h, w = images.shape
    if crops.dtype != torch.uint8 or crops.dim() != 5 or crops.shape[2] != 4 or crops.shape[0] != b:
        raise ValueError(f"crops must be uint8 [B={b}, K, 4, S, S], got {crops.dtype} {tuple(crops.shape)}")
    if crops.shape[-1] != crops.shape[-2]:
        raise ValueError(f"crops must be square, got {tuple(crops.shape[-2:])}")
    bk = tuple(crops.shape[:2])
    for name in ("apply", "inv_scale", "flip"):
        if tuple(getattr(plan, name).shape) != bk:
            raise ValueError(f"plan.{name} must be {list(bk)}, got {tuple(getattr(plan, name).shape)}")
    if tuple(plan.translate.shape) != (*bk, 2):
        raise ValueError(f"plan.translate must be {[*bk, 2]}, got {tuple(plan.translate.shape)}")
    if padding_mask is not None and tuple(padding_mask.shape) != (b, h, w):
        raise ValueError(f"padding_mask must be [{b}, {h}, {w}], got {tuple(padding_mask.shape)}")
    placed = [(f"plan.{name}", getattr(plan, name)) for name in ("apply", "inv_scale", "translate", "flip")]
    for name, t in [("crops", crops), *placed, ("padding_mask", padding_mask)]:
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} is on {t.device} but images are on {images.device}")


def visible_masks(raw: torch.Tensor) -> torch.Tensor:
    """The spec's ``vis_k = raw_k & ~(raw_{k+1} | ... | raw_{K-1})`` over whole bool masks
    ``[B, K, H, W]``; front to back, one pass per paste (``cummax`` over K was 50x slower on CPU)."""
    visible = torch.empty_like(raw)
    covered = torch.zeros_like(raw[:, 0])
    for k in reversed(range(raw.shape[1])):
        torch.logical_and(raw[:, k], ~covered, out=visible[:, k])
        covered |= raw[:, k]
    return visible


# ------------------------------------------------------------------------------------------------
# CPU: rectangles, numpy


def composite_rects(
    out: torch.Tensor,
    images: torch.Tensor,
    crops: torch.Tensor,
    plan: PastePlan,
    padding_mask: torch.Tensor | None,
    vrange: float,
) -> list[list[Paste]]:
    """Copy ``images`` into ``out`` (CPU, like ``images``) and blend every paste into it
    (``blend_rect``); return the pastes, with their raw masks, as overlap groups: the pastes of
    one image whose rectangles overlap (directly or through others), back to front, groups
    ordered by image.

    Each image is copied just before its pastes are blended, so that the tiles read it from the
    cache (0.1 ms per 512^2 image less than copying the whole batch first).

    Each group is blended in its own float32 tile (the group's bounding box), so a paste that
    overlaps no other is warped, blended and rounded in contiguous arrays (numpy's strided
    arithmetic on a rectangle of a full-size canvas cost 3-4x more per pixel).
    """
    h, w = images.shape[-2:]
    table = _paste_windows(plan, crops[:, :, 3], h, w)
    rows_of = itertools.groupby(enumerate(table.tolist()), key=lambda item: item[1][0])
    by_image = {bi: list(rows) for bi, rows in rows_of}
    taps_x, taps_y = _rect_taps(plan, table, crops.shape[-1]) if by_image else ((), ())
    dst = _pixels(out)
    kind = _pixel_kind(images.dtype)
    crop_px = crops.numpy()
    keep = None if padding_mask is None else ~padding_mask.to(torch.bool).numpy()
    gain = None if vrange == 255.0 else np.float32(vrange / 255.0)
    groups = []
    for bi in range(images.shape[0]):
        out[bi].copy_(images[bi])  # just before its pastes read it: in cache for the tiles below
        rows = by_image.get(bi, [])
        for members in _overlap_groups([row[2:6] for _, row in rows]):
            box = _bounding_box([rows[i][1][2:6] for i in members])
            gx0, gy0, gx1, gy1 = box
            tile = _load_tile(dst[bi], box, kind)
            region = None if keep is None else keep[bi, gy0:gy1, gx0:gx1]
            group = []
            for i in members:
                p, (_, ki, x0, y0, x1, y1, *window) = rows[i]
                local = (x0 - gx0, y0 - gy0, x1 - gx0, y1 - gy0)
                raw = blend_rect(tile, crop_px[bi, ki], taps_x, taps_y, p, region, gain, local, tuple(window))
                group.append(Paste(bi, ki, x0, y0, x1, y1, raw))
            for rect in [box] if len(group) == 1 else [q[2:6] for q in group]:
                _store_rect(dst[bi], tile, rect, box, kind, vrange)
            groups.append(group)
    return groups


def group_visible(group: list[Paste]) -> tuple[list[np.ndarray], np.ndarray, tuple[int, int, int, int]]:
    """The visible masks of a (back-to-front) overlap group, rectangle-sized, in the order of the
    group; the union of its raw masks over its bounding box; and that box ``x0, y0, x1, y1``."""
    if len(group) == 1:
        p = group[0]
        return [p.raw], p.raw, (p.x0, p.y0, p.x1, p.y1)
    box = gx0, gy0, gx1, gy1 = _bounding_box([p[2:6] for p in group])
    covered = np.zeros((gy1 - gy0, gx1 - gx0), dtype=bool)
    shown = []
    for p in reversed(group):  # front to back
        region = covered[p.y0 - gy0 : p.y1 - gy0, p.x0 - gx0 : p.x1 - gx0]
        shown.append(p.raw & ~region)
        region |= p.raw
    return shown[::-1], covered, box


def _overlap_groups(rects: list) -> list[list[int]]:
    """Indices of ``rects`` (``x0, y0, x1, y1``) in connected components of overlap, each in
    increasing order, components ordered by their first index (union-find; K rects: K^2/2 tests)."""
    parent = list(range(len(rects)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (ax0, ay0, ax1, ay1) in enumerate(rects):
        for j in range(i):
            bx0, by0, bx1, by1 = rects[j]
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(rects)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _bounding_box(rects: list) -> tuple[int, int, int, int]:
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def _pixel_kind(dtype: torch.dtype) -> str:
    return {torch.uint8: "uint8", torch.bfloat16: "bfloat16"}.get(dtype, "float")


def _pixels(images: torch.Tensor) -> np.ndarray:
    """numpy view of CPU images (any strides); bfloat16, which numpy lacks, as its uint16 bits."""
    if images.dtype == torch.bfloat16:
        return images.view(torch.int16).numpy().view(np.uint16)
    return images.numpy()


def _load_tile(image: np.ndarray, box, kind: str) -> np.ndarray:
    """float32 ``[3, y1 - y0, x1 - x0]`` C-contiguous copy of ``image[:, box]`` (exact for every
    image dtype)."""
    x0, y0, x1, y1 = box
    pixels = image[:, y0:y1, x0:x1]
    if kind == "bfloat16":  # a bfloat16 is the top half of a float32
        return np.left_shift(pixels.astype(np.uint32, order="C"), 16).view(np.float32)
    return pixels.astype(np.float32, order="C")


def _store_rect(image: np.ndarray, tile: np.ndarray, rect, box, kind: str, vrange: float) -> None:
    """The spec's final conversion of ``rect`` of ``tile`` (whose origin is ``box[:2]``) into
    ``image[:, rect]``.

    uint8: ``floor(out + 0.5)`` clamped to ``[0, 255]`` is the truncating float -> uint8 cast of
    ``out + 0.5`` (every blend is a convex combination of values in ``[0, 255]`` when
    ``value_range <= 255``, so the clamp is needed only for larger ranges). bfloat16: rounded to
    nearest even on the float32 bits, as torch rounds (finite values only occur here).
    """
    x0, y0, x1, y1 = rect
    values = tile[:, y0 - box[1] : y1 - box[1], x0 - box[0] : x1 - box[0]]
    if kind == "uint8":
        values = values + np.float32(0.5)
        if vrange > 255:
            np.clip(values, 0, 255, out=values)
    elif kind == "bfloat16":
        bits = values.view(np.uint32)
        values = (bits + (np.right_shift(bits, 16) & 1) + 0x7FFF) >> 16
    image[:, y0:y1, x0:x1] = values


def _paste_windows(plan: PastePlan, alpha: torch.Tensor, h: int, w: int) -> np.ndarray:
    """Every applied paste that can change a pixel, as int64 rows ``(b, k, x0, y0, x1, y1, cx0,
    cy0, cx1, cy1)`` ordered by ``b`` then ``k``: the target rectangle and the crop window read.

    Outside the box of the crop's non-zero alpha (its support) every alpha tap reads 0, so a
    target pixel whose taps all fall outside it keeps its value and is not in the mask. The target
    rect ``(x0, y0, x1, y1)`` holds every pixel with a tap in the support ``[cx0, cx1)``: ``uf`` in
    ``[cx0 - 1, cx1)``, i.e. the pixel centre within ``tx + [cx0 - 1/2, cx1 + 1/2) * scale``
    (mirrored to ``S - cx1 .. S - cx0`` when flipped); ``RECT_MARGIN`` covers float32 rounding.
    The crop window read is the support grown by one pixel (clamped to the canvas): a pixel with
    alpha > 0 has one tap in the support, so its other tap, clamped to the canvas as RGB taps
    are, lies next to it; a pixel with alpha 0 keeps its value whatever RGB it reads.
    """
    s = alpha.shape[-1]
    support = _support_boxes(alpha)
    flip = plan.flip.numpy()
    lo_x = np.where(flip, s - support[..., 2], support[..., 0])
    hi_x = np.where(flip, s - support[..., 0], support[..., 2])
    scale = 1.0 / plan.inv_scale.numpy().astype(np.float64)  # bounds only: pixels follow the spec
    t = plan.translate.numpy().astype(np.float64)
    x0 = np.floor(t[..., 0] + (lo_x - 0.5) * scale - 0.5) - RECT_MARGIN
    y0 = np.floor(t[..., 1] + (support[..., 1] - 0.5) * scale - 0.5) - RECT_MARGIN
    x1 = np.ceil(t[..., 0] + (hi_x + 0.5) * scale - 0.5) + RECT_MARGIN + 1
    y1 = np.ceil(t[..., 1] + (support[..., 3] + 0.5) * scale - 0.5) + RECT_MARGIN + 1
    rect = [np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)]
    grown = [np.maximum(support[..., 0] - 1, 0), np.maximum(support[..., 1] - 1, 0)]
    grown += [np.minimum(support[..., 2] + 1, s), np.minimum(support[..., 3] + 1, s)]
    nonempty = (rect[2] > rect[0]) & (rect[3] > rect[1]) & (support[..., 2] > support[..., 0])
    chosen = plan.apply.numpy() & nonempty
    bs, ks = np.nonzero(chosen)  # row-major: b, then k increasing
    return np.stack([bs, ks, *(v[chosen].astype(np.int64) for v in rect + grown)], axis=1)


def _support_boxes(alpha: torch.Tensor) -> np.ndarray:
    """float64 ``[B, K, 4]``: the tight box ``x0, y0, x1, y1`` of the non-zero pixels of uint8
    alpha ``[B, K, S, S]`` (zeros when there are none): torch's ``amax`` along each axis, then
    numpy on the small results (``plan.tight_boxes`` takes 3x longer at B=1, all in torch)."""
    s = alpha.shape[-1]
    cols = alpha.amax(dim=-2).numpy() != 0
    rows = alpha.amax(dim=-1).numpy() != 0
    first = [cols.argmax(-1), rows.argmax(-1)]
    past_last = [s - cols[..., ::-1].argmax(-1), s - rows[..., ::-1].argmax(-1)]
    box = np.stack(first + past_last, axis=-1)
    return np.where(cols.any(-1)[..., None], box, 0).astype(np.float64)


def _rect_taps(plan: PastePlan, table: np.ndarray, s: int) -> tuple:
    """Bilinear taps of every paste (``table`` from ``_paste_windows``), padded to the widest
    (tallest) rect, along x then y, each ``(i0, i1, w0, w1)``: the two taps of target pixel ``j``
    as int64 ``[P, n]`` indices into the crop window (clamped into it), and their integer weights
    ``256 - f``, ``f`` per channel (alpha's zero for a tap outside the window), float32
    ``[P, 4, 1, n]`` along x (RGB's divided by 65536: exact) and uint16 ``[P, 4, n, 1]`` along y.

    Both axes in one pass, in the float32 op order of the spec. The window holds the support, so
    an alpha tap out of it reads 0; see ``_paste_windows`` for why clamping RGB taps into it
    changes no pixel.
    """
    b, k = table[:, 0], table[:, 1]
    inv = plan.inv_scale.numpy()[b, k][:, None, None]
    start = table[:, 2:4, None].astype(np.float32)  # [P, 2 (x, y), 1]
    count = int((table[:, 4:6] - table[:, 2:4]).max())
    u = (start + np.arange(count, dtype=np.float32) + np.float32(0.5) - plan.translate.numpy()[b, k][..., None]) * inv
    flip = plan.flip.numpy()[b, k]
    u[:, 0] = np.where(flip[:, None], np.float32(s) - u[:, 0], u[:, 0])
    uf = u - np.float32(0.5)
    i0f = np.floor(uf)
    frac = np.floor((uf - i0f) * np.float32(256.0))  # uf - floor(uf) is exact and in [0, 1): 0..255
    first = i0f.astype(np.int64)
    lo, hi = table[:, 6:8, None], table[:, 8:10, None]
    taps = []
    for tap, weight in ((first, 256 - frac), (first + 1, frac)):
        alpha = np.where((tap >= lo) & (tap < hi), weight, 0)
        index = np.minimum(np.maximum(tap, lo), hi - 1) - lo
        taps.append((index, np.stack([weight] * 3 + [alpha], axis=1)))  # [P, 2, n], [P, 4, 2, n]
    (ia, wa), (ib, wb) = taps
    rgb = np.array([1 / ONE] * 3 + [1.0], np.float32)[:, None]  # x weights of RGB / 65536
    taps_x = (ia[:, 0], ib[:, 0], (wa[:, :, 0] * rgb)[:, :, None], (wb[:, :, 0] * rgb)[:, :, None])
    taps_y = (ia[:, 1], ib[:, 1], wa[:, :, 1, :, None].astype(np.uint16), wb[:, :, 1, :, None].astype(np.uint16))
    return taps_x, taps_y


def blend_rect(tile, crop, taps_x, taps_y, p, keep, gain, rect, window) -> np.ndarray:
    """Blend paste ``p``'s crop (uint8 ``[4, S, S]``) into ``tile`` (float32 ``[3, h, w]``) over
    ``rect`` ``(x0, y0, x1, y1)`` (tile coordinates), reading the crop ``window`` ``(cx0, cy0, cx1,
    cy1)``; return its raw mask there (bool ``[y1 - y0, x1 - x0]``). ``taps_x``, ``taps_y``: every
    paste's taps from ``_rect_taps``; ``keep``: bool ``[h, w]`` over the tile, False = padding, or
    None; ``gain``: float32 ``value_range / 255``, or None for 1.

    Along y: two row gathers of the crop window, weighted in uint16 (at most ``255 * 256``); along
    x: two column gathers, weighted in float32 (integers at most ``255 * 65536 < 2**24``: exact).
    """
    x0, y0, x1, y1 = rect
    cx0, cy0, cx1, cy1 = window
    ya, yb, wya, wyb = (t[p] for t in taps_y)
    xa, xb, wxa, wxb = (t[p] for t in taps_x)
    h, w = y1 - y0, x1 - x0
    win = crop[:, cy0:cy1, cx0:cx1]
    rows = win[:, ya[:h], :] * wya[:, :h]
    rows += win[:, yb[:h], :] * wyb[:, :h]
    total = rows[:, :, xa[:w]] * wxa[..., :w]
    total += rows[:, :, xb[:w]] * wxb[..., :w]
    a = total[3]
    raw = a >= ALPHA_THRESHOLD
    alpha = a / np.float32(ALPHA_MAX)
    if keep is not None:
        region = keep[y0:y1, x0:x1]
        raw &= region
        alpha *= region
    colour = total[:3]  # rgb_k (the x weights of RGB carry the 1 / 65536)
    if gain is not None:
        colour *= gain
    colour *= alpha
    target = tile[:, y0:y1, x0:x1]
    # numpy runs one inner loop per row of a strided view (4x slower here): blend a contiguous copy
    blended = target if target.flags.c_contiguous else target.copy()
    blended *= 1 - alpha  # then + colour: not a fused multiply-add, which rounds differently
    blended += colour
    if blended is not target:
        target[...] = blended
    return raw


# ------------------------------------------------------------------------------------------------
# other devices: whole images, torch, no host synchronisation


def _paste_dense(images, crops, plan, padding_mask, vrange) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec evaluated at every pixel for every paste, vectorised over the batch: no host
    synchronisation, ``O(B * 4 * (S + H) * W)`` float32 scratch per paste."""
    b, _, h, w = images.shape
    k, s = crops.shape[1], crops.shape[-1]
    out = images.to(torch.float32)  # keeps the memory format
    raw = torch.zeros((b, k, h, w), dtype=torch.bool, device=images.device)
    xs = torch.arange(w, device=images.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=images.device, dtype=torch.float32) + 0.5
    keep = None if padding_mask is None else ~padding_mask.to(torch.bool)
    gain = vrange / 255.0 / ONE
    for ki in range(k):
        inv = plan.inv_scale[:, ki, None]
        u = (xs - plan.translate[:, ki, 0, None]) * inv
        u = torch.where(plan.flip[:, ki, None], float(s) - u, u)
        v = (ys - plan.translate[:, ki, 1, None]) * inv
        total = _dense_sample(crops[:, ki], _dense_taps(u, s), _dense_taps(v, s))  # [B, 4, H, W]
        ok = plan.apply[:, ki, None, None].expand(b, h, w)
        if keep is not None:
            ok = ok & keep
        a = total[:, 3]
        raw[:, ki] = ok & (a >= ALPHA_THRESHOLD)
        alpha = torch.where(ok, a / float(ALPHA_MAX), 0.0)[:, None]
        out = out * (1.0 - alpha) + total[:, :3].mul_(gain).mul_(alpha)
    if images.dtype == torch.uint8:
        out = (out + 0.5).clamp_(0, 255)  # the truncating cast below then rounds half up
    result = torch.empty_like(images)  # the images' memory format, whatever the blend's layout
    result.copy_(out)
    return result, visible_masks(raw)


def _dense_taps(u: torch.Tensor, s: int) -> tuple:
    """Per-axis taps of continuous crop coordinates ``u`` ``[B, n]``: canvas indices ``i0, i1``
    (int64, clamped to the canvas as RGB taps are) and weights ``[B, 4, n]`` (alpha's zero for a
    tap outside the canvas)."""
    uf = u - 0.5
    i0f = torch.floor(uf)
    frac = torch.floor((uf - i0f) * 256.0).clamp(0, 255)
    i0 = i0f.clamp(-2, s + 1).long()  # far-away pixels stay outside the canvas
    alpha0 = torch.where((i0 >= 0) & (i0 < s), 256.0 - frac, 0.0)
    alpha1 = torch.where((i0 + 1 >= 0) & (i0 + 1 < s), frac, 0.0)
    w0 = torch.stack([256.0 - frac] * 3 + [alpha0], dim=1)
    w1 = torch.stack([frac] * 3 + [alpha1], dim=1)
    return i0.clamp(0, s - 1), (i0 + 1).clamp(0, s - 1), w0, w1


def _dense_sample(crop: torch.Tensor, taps_x: tuple, taps_y: tuple) -> torch.Tensor:
    """Integer bilinear sums float32 ``[B, 4, H, W]`` of uint8 crops ``[B, 4, S, S]`` (exact:
    integers below 2**24)."""
    b, c, s, _ = crop.shape
    xa, xb, wxa, wxb = taps_x
    ya, yb, wya, wyb = taps_y
    w, h = xa.shape[1], ya.shape[1]

    def columns(index):
        return crop.gather(3, index[:, None, None, :].expand(b, c, s, w)).to(torch.float32)

    across = columns(xa) * wxa[:, :, None, :] + columns(xb) * wxb[:, :, None, :]  # [B, 4, S, W]

    def rows(index):
        return across.gather(2, index[:, None, :, None].expand(b, c, h, w))

    return rows(ya) * wya[..., None] + rows(yb) * wyb[..., None]
