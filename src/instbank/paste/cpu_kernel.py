"""Compiled CPU paste (numba): the whole CPU paste of a batch in one compiled call, compositing and,
for ``BankCopyPaste``, the annotations.

Same signature, outputs and arithmetic as the reference ``instbank.paste.reference.paste_image``
(whose module docstring is the specification), and bit-identical results on CPU: images and masks
equal, for every image dtype (tested with hypothesis), and every output of ``BankCopyPaste`` equal
to the reference path's (``instbank.paste.annotations.paste_annotate_rects``). The structure is the
reference's CPU path, compiled: per image, the rectangle each paste can change (the target image of
its crop's non-zero alpha), overlap groups of rectangles, one float32 tile per group (in the image's
layout: ``[h, w, 3]`` for channels-last images), pastes blended back to front, rounding on store;
then visible masks front to back (in a scratch over the group's box, copied into the output planes
when they are asked for; the semantic map painted there), and existing masks cut, inside the
group's rectangle. One call per batch instead of ~60 numpy operations per paste and ~150 per
call around them: at B=1 those cost more than the pixels (docs/perf/paste.md).

Per paste (``rect`` of ``h x w`` target pixels, crop window ``wh x ww``):

1. The bilinear taps of every target column and row, computed here in the spec's float32 op order
   (``(x + 0.5 - tx) * inv_scale``, ``S - u`` when flipped, ``- 0.5``, floor, ``* 256``, floor):
   the same values as the reference's numpy taps.
2. Along y, for each target row, the two crop rows of its taps weighted in integers, uint16
   ``[h, ww, 4]`` (channels last, so that a pixel's four channels sit in one 8-byte word for
   step 3); contiguous inner loops, which LLVM vectorises.
3. Along x, per target pixel: the two taps of all four channels, the exact int32 sums of the spec
   as float32 (integers below 2**24, and RGB's weights carry the 2**-16: exact), the threshold,
   ``alpha = A / (255 * 65536)``, and the blend ``out * (1 - alpha) + colour * alpha`` with the
   reference's op order and no fused multiply-add (numba leaves LLVM's ``contract`` flag off
   unless ``fastmath`` is set). Pixels with ``A == 0`` are skipped: the spec leaves them as they
   are (``out * 1 + colour * 0``).

Annotations: existing masks are copied as 0/1 into the output with per-row and per-column counts of
their set pixels; a cut clears pixels and decrements those counts, so the area left and the refit
box come from the counts (no second pass over the plane), and the tight boxes and emptiness of the
input masks, when not given, come from the same copy.

The kernel sees C-contiguous uint8 or float32 arrays only, ``[B, 3, H, W]`` or, for channels_last
images, ``[B, H, W, 3]`` (two compiled variants): other dtypes (float16, bfloat16) are converted to
float32 around it (exact both ways: the reference rounds its float32 tiles the same way), other
layouts copied. The first call in a process compiles (about 10 s for the first image dtype, 3 s for
the second); ``cache=True`` stores the machine code beside this file, or in numba's user cache
directory when the package directory is read-only, so later processes (DataLoader workers) load it
in milliseconds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

try:
    import numba
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "instbank.paste.cpu_kernel needs numba: pip install 'instbank[numba]', "
        "or use the reference (impl='torch')"
    ) from exc

from instbank.paste.annotations import Instances, occlusion_outcome, paste_validity
from instbank.paste.plan import PastePlan
from instbank.paste.reference import ALPHA_MAX, ALPHA_THRESHOLD, RECT_MARGIN, check_inputs, default_value_range

# ``A / ALPHA_MAX`` for every integer ``A`` in ``0 .. ALPHA_MAX`` is the float32 rounding of
# ``float64(A) * INV_ALPHA_MAX``: the float64 product is within 2**-52 (relative) of ``A / ALPHA_MAX``,
# which lies at least 2**-33 (relative) from every float32 rounding boundary. Checked for all
# 16.7M values of ``A`` in tests/test_paste_cpu_kernel.py; a multiply vectorises, a divide does not.
INV_ALPHA_MAX = 1.0 / ALPHA_MAX
RGB_WEIGHT = np.float32(1.0 / 65536)  # RGB's x weights carry the 2**-16 of the spec's division
KERNEL_DTYPES = (torch.uint8, torch.float32)


class Pasted(NamedTuple):
    """What ``paste_batch`` computed, besides the images (numpy; ``B`` images, ``K`` pastes, ``N``
    existing instances):

    - ``masks``: uint8 0/1 ``[B, N+K, H, W]``: the existing masks cut by the pastes, then the
      visible masks of the pastes (``[B, N, H, W]``, the existing ones only, when ``paste_batch``
      was called ``with_masks=False``)
    - ``rects``: int64 ``[B, K, 4]`` the target rectangle ``x0, y0, x1, y1`` each paste could
      change (zeros where it changed nothing): its visible mask lies inside
    - ``area`` int64 ``[B, K]`` and ``boxes`` float32 ``[B, K, 4]``: pixels and tight box of each
      visible mask; ``object_px`` int64 ``[B, K]``: crop pixels with stored alpha >= 128
    - ``before``, ``lost`` int64 ``[B, N]``: set pixels of each existing mask, and those the pastes
      cut; ``refit`` float32 ``[B, N, 4]``: the tight box of what is left where ``lost > 0``;
      ``mask_boxes`` float32 ``[B, N, 4]``: the tight box of each existing mask before the cut
    """

    masks: np.ndarray
    rects: np.ndarray
    area: np.ndarray
    boxes: np.ndarray
    object_px: np.ndarray
    before: np.ndarray
    lost: np.ndarray
    refit: np.ndarray
    mask_boxes: np.ndarray


def paste_image(
    images: torch.Tensor,
    crops: torch.Tensor,
    plan: PastePlan,
    padding_mask: torch.Tensor | None = None,
    value_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``instbank.paste.reference.paste_image``, for CPU tensors: ``(out like images, visible
    bool [B, K, H, W])``."""
    check_inputs(images, crops, plan, padding_mask)
    if images.device.type != "cpu":
        raise ValueError(f"the numba kernel runs on CPU tensors, got images on {images.device}")
    vrange = default_value_range(images.dtype, value_range)
    none = torch.zeros((images.shape[0], 0, *images.shape[2:]), dtype=torch.bool)
    out, pasted = paste_batch(images, crops, crops[:, :, 3], plan, padding_mask, vrange, none)
    return out, torch.from_numpy(pasted.masks).view(torch.bool)


def paste_annotate_rects(images, crops, alpha, plan, padding_mask, vrange, existing: Instances, min_visible, semantic=None,
                         with_masks: bool = True, inplace: bool = False):
    """``BankCopyPaste``'s CPU path, compiled: the signature and results of
    ``instbank.paste.annotations.paste_annotate_rects`` (the reference's; ``with_masks=False``:
    both ``Instances`` without masks, and no ``[B, K, H, W]`` planes allocated for them;
    ``inplace``: ``images`` and ``semantic`` are painted and returned, no copies made).

    ``existing``'s ``boxes`` and ``valid`` may be None: the tight boxes and "not empty" of its masks
    (bool or uint8 ``[B, N, H, W]``) are then taken from the kernel's copy of them.
    """
    painted = semantic
    if semantic is not None and not (inplace and semantic.is_contiguous()):  # the kernel paints a contiguous map
        painted = torch.empty(semantic.shape, dtype=semantic.dtype).copy_(semantic)
    out, pasted = paste_batch(images, crops, alpha, plan, padding_mask, vrange, existing.masks, painted, with_masks,
                              inplace)
    if inplace and painted is not semantic:
        painted = semantic.copy_(painted)
    boxes = pasted.mask_boxes if existing.boxes is None else existing.boxes.to(torch.float32).numpy()
    valid = pasted.before > 0 if existing.valid is None else existing.valid.to(torch.bool).numpy()
    after = pasted.before - pasted.lost
    given = Instances(existing.masks, boxes, existing.labels, valid)
    kept_boxes, kept_valid = occlusion_outcome(pasted.before, after, pasted.refit, after > 0, given, min_visible)
    pasted_valid = paste_validity(pasted.area, pasted.area > 0, pasted.object_px, plan, min_visible)
    n = boxes.shape[1]
    masks = torch.from_numpy(pasted.masks) if with_masks else None
    if with_masks and existing.masks.dtype == torch.bool:
        masks = masks.view(torch.bool)
    paste_boxes, paste_valid = torch.from_numpy(pasted.boxes), torch.from_numpy(pasted_valid)
    merged = Instances(
        masks,
        torch.from_numpy(np.concatenate([kept_boxes, pasted.boxes], axis=1)),
        torch.cat([existing.labels.to(torch.int64), plan.labels], dim=1),
        torch.from_numpy(np.concatenate([kept_valid, pasted_valid], axis=1)),
    )
    paste_part = Instances(masks[:, n:].view(torch.bool) if with_masks else None, paste_boxes, plan.labels, paste_valid)
    return out, merged, paste_part, painted


def paste_batch(images, crops, alpha, plan, padding_mask, vrange, given, semantic=None,
                with_masks: bool = True, inplace: bool = False) -> tuple[torch.Tensor, Pasted]:
    """Composite (``crops``' RGB with the prepared ``alpha`` uint8 ``[B, K, S, S]``) and annotate
    a checked CPU batch; ``given``: the existing masks, bool or uint8 ``[B, N, H, W]``. Returns the
    images (like ``images``) and a ``Pasted`` (its ``masks`` without the pastes' planes when not
    ``with_masks``). ``semantic``: a contiguous integer map ``[B, H, W]``, painted in place with
    each paste's label (``plan.labels`` cast to its dtype) where its visible mask is set, as
    ``annotations.paint_semantic`` does. ``inplace``: the pastes are written into ``images``
    (returned), with no copy of the pixels no paste reaches. Each overlap group's tile is read from
    the output, which holds the input's pixels and the earlier groups' pastes (a group's box, the
    box of its rectangles, can reach into another group's rectangles), and only the pastes change
    the pixels of a tile, so storing it whole is exact."""
    b, _, h, w = images.shape
    k, n = crops.shape[1], given.shape[1]
    out = images if inplace else torch.empty_like(images)
    work = images if images.dtype in KERNEL_DTYPES else images.float()  # float16/bfloat16: exact in float32
    channels_last = not work.is_contiguous() and work.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last or work.is_contiguous()):  # another layout (a view): a contiguous copy
        work = work.contiguous()
    result = out if work is images and out.stride() == images.stride() else torch.empty_like(work)
    if result is not images:
        result.copy_(work)  # pixels no paste reaches are final (a memcpy: numba's copy took 4x longer)
    dst = result.permute(0, 2, 3, 1) if channels_last else result  # the input's pixels: tiles read them here
    keep = _NO_PADDING if padding_mask is None else np.ascontiguousarray(~padding_mask.to(torch.bool).numpy())
    pasted = Pasted(
        # zeros from calloc: above glibc's mmap threshold (a B=8 batch of COCO images padded to
        # 44 instances: 109 MB) fresh zero pages, untouched wherever a mask is empty; below it a
        # reused heap chunk, cleared (an anonymous mapping of our own instead cost 4 us per page
        # written on the development VM: 1.8 ms per image against 1.1-1.3)
        masks=np.zeros((b, n + k if with_masks else n, h, w), np.uint8),
        rects=np.zeros((b, k, 4), np.int64),
        area=np.zeros((b, k), np.int64),
        boxes=np.zeros((b, k, 4), np.float32),
        object_px=np.zeros((b, k), np.int64),
        before=np.zeros((b, n), np.int64),
        lost=np.zeros((b, n), np.int64),
        refit=np.zeros((b, n, 4), np.float32),
        mask_boxes=np.zeros((b, n, 4), np.float32),
    )
    _paste_batch(
        dst.numpy(),
        channels_last,
        _contiguous(crops),
        _contiguous(alpha),
        plan.apply.numpy(),
        plan.inv_scale.numpy(),
        plan.translate.numpy(),
        plan.flip.numpy(),
        keep,
        np.float32(1.0 if vrange == 255.0 else vrange / 255.0),
        images.dtype == torch.uint8,
        _contiguous(given.view(torch.uint8) if given.dtype == torch.bool else given),
        *_paint_bytes(semantic, plan, b, w),
        *pasted,
    )
    if result is not out:
        out.copy_(result)
    return out, pasted


_NO_PADDING = np.zeros((0, 0, 0), np.bool_)
_NO_PAINT = np.zeros((0, 0, 0), np.uint8)


def _paint_bytes(semantic: torch.Tensor | None, plan: PastePlan, b: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The semantic map as bytes ``[B, H, W * itemsize]`` and each paste's label in its dtype as
    bytes ``[B, K, itemsize]``: the kernel paints by copying bytes, so that one compiled variant
    serves every integer dtype (another dtype in the signature would cost a 10 s compile each)."""
    if semantic is None:
        return _NO_PAINT, _NO_PAINT
    size, (h, k) = semantic.element_size(), (semantic.shape[1], plan.labels.shape[1])
    ids = np.ascontiguousarray(plan.labels.to(semantic.dtype).numpy()).view(np.uint8)
    return semantic.numpy().view(np.uint8).reshape(b, h, w * size), ids.reshape(b, k, size)


def _contiguous(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())


# ------------------------------------------------------------------------------------------------
# compiled


@numba.njit(cache=True, nogil=True)
def _paste_batch(dst, channels_last, crops, alpha, apply, inv_scale, translate, flip, keep, gain, is_u8, given,
                 paint, paint_ids, masks, rects, area, boxes, object_px, before, lost, refit, mask_boxes):  # pragma: no cover
    b_count, k_count = apply.shape
    n = given.shape[1]
    h, w = masks.shape[2], masks.shape[3]
    masks_out = masks.shape[1] > n  # the pastes' planes are asked for
    rows = np.zeros((n, h), np.int32)  # set pixels per row / column of each existing mask
    cols = np.zeros((n, w), np.int32)
    table = np.zeros((k_count, 8), np.int64)  # rect x0, y0, x1, y1, crop window cx0, cy0, cx1, cy1
    painting = paint.shape[0] > 0
    no_rows, no_label = np.zeros((0, 0), np.uint8), np.zeros(0, np.uint8)  # (numba's global arrays are read-only)
    for b in range(b_count):
        paint_b = paint[b] if painting else no_rows
        _copy_masks(given[b], masks[b], rows, cols, before[b], mask_boxes[b])
        chosen = np.zeros(k_count, np.bool_)
        for k in range(k_count):
            if apply[b, k]:
                chosen[k] = _paste_window(alpha[b, k], inv_scale[b, k], translate[b, k], flip[b, k], h, w, table[k])
                if chosen[k]:
                    object_px[b, k] = _count_object(crops[b, k, 3])
        for group in _overlap_groups(table, chosen):
            gx0, gy0 = table[group[0], 0], table[group[0], 1]
            gx1, gy1 = table[group[0], 2], table[group[0], 3]
            for k in group:
                gx0, gy0 = min(gx0, table[k, 0]), min(gy0, table[k, 1])
                gx1, gy1 = max(gx1, table[k, 2]), max(gy1, table[k, 3])
            # from the output, which holds the earlier groups: a group's box (the union of its
            # rectangles' box) can reach into another group's rectangles, and is stored whole
            tile = _load(dst[b], channels_last, gx0, gy0, gx1, gy1)
            # each paste's raw, then visible, mask over the group's box: written into the [H, W]
            # planes of the output only when asked for (without them a batch of 8 at 512^2 with
            # K = 8 allocates and faults in 17 MB less)
            planes = np.zeros((len(group), gy1 - gy0, gx1 - gx0), np.uint8)
            for i in range(len(group)):
                k = group[i]
                _blend(tile, channels_last, gx0, gy0, crops[b, k], alpha[b, k], planes[i], keep, b, table[k],
                       inv_scale[b, k], translate[b, k], flip[b, k], gain)
            _store(dst[b], channels_last, tile, gx0, gy0, is_u8)
            covered = np.zeros((gy1 - gy0, gx1 - gx0), np.uint8)
            for i in range(len(group) - 1, -1, -1):  # front to back
                k = group[i]
                label = paint_ids[b, k] if painting else no_label
                area[b, k] = _visible(planes[i], covered, gx0, gy0, table[k], boxes[b, k], paint_b, label)
                if masks_out and area[b, k] > 0:
                    _put_box(planes[i], gx0, gy0, boxes[b, k], masks[b, n + k])
                rects[b, k] = table[k, :4]
            _cut(masks[b, :n], covered, gx0, gy0, rows, cols, lost[b], mask_boxes[b])
        for i in range(n):
            if lost[b, i] > 0 and before[b, i] > lost[b, i]:
                _box_from_counts(rows[i], cols[i], refit[b, i])


@numba.njit(cache=True, nogil=True)
def _copy_masks(given, masks, rows, cols, before, mask_boxes):  # pragma: no cover
    """``masks[i] = given[i] != 0`` as 0/1 for the ``N`` existing masks (``masks`` zero before: an
    empty row is only read), with the per-row and per-column counts of set pixels, each mask's
    total, and its tight box."""
    for i in range(given.shape[0]):
        col = cols[i]
        col[:] = 0
        total = 0
        for y in range(given.shape[1]):
            src, out = given[i, y], masks[i, y]
            rows[i, y] = 0
            seen = np.uint8(0)
            for x in range(given.shape[2]):  # an OR over bytes: 32 per AVX2 operation
                seen |= src[x]
            if seen == 0:
                continue
            count = 0
            for x in range(given.shape[2]):
                v = np.uint8(src[x] != 0)
                out[x] = v
                col[x] += v
                count += v
            rows[i, y] = count
            total += count
        before[i] = total
        if total:
            _box_from_counts(rows[i], col, mask_boxes[i])


@numba.njit(cache=True, nogil=True)
def _count_object(alpha):  # pragma: no cover
    """Pixels of a stored alpha ``[S, S]`` at or above 128 (its top bit: a shift and a sum, which
    vectorise; ``np.sum(alpha >= 128)`` made a temporary array per crop, 0.2 ms per batch of 64)."""
    total = 0
    for y in range(alpha.shape[0]):
        line = alpha[y]
        count = np.int32(0)
        for x in range(alpha.shape[1]):
            count += np.int32(line[x] >> 7)
        total += count
    return total


@numba.njit(cache=True, nogil=True)
def _box_from_counts(rows, cols, box):  # pragma: no cover
    """``x0, y0, x1, y1`` (pixel corners) of a non-empty mask from its row and column counts."""
    y0, y1 = 0, rows.shape[0]
    while rows[y0] == 0:
        y0 += 1
    while rows[y1 - 1] == 0:
        y1 -= 1
    x0, x1 = 0, cols.shape[0]
    while cols[x0] == 0:
        x0 += 1
    while cols[x1 - 1] == 0:
        x1 -= 1
    box[0], box[1], box[2], box[3] = x0, y0, x1, y1


@numba.njit(cache=True, nogil=True)
def _paste_window(alpha, inv_scale, translate, flipped, h, w, row) -> bool:  # pragma: no cover
    """``reference._paste_windows`` for one paste: into ``row``, the target rectangle holding every
    pixel with a tap in the support of ``alpha`` (its non-zero pixels) and the crop window read
    (the support grown by one pixel); False when the paste changes no pixel."""
    s = alpha.shape[0]
    col_max = np.zeros(s, np.uint8)
    sy0, sy1 = s, 0
    for y in range(s):
        line = alpha[y]
        peak = np.uint8(0)
        for x in range(s):
            peak = max(peak, line[x])
            col_max[x] = max(col_max[x], line[x])
        if peak:
            sy0, sy1 = min(sy0, y), y + 1
    if sy1 == 0:
        return False
    sx0, sx1 = 0, s
    while col_max[sx0] == 0:
        sx0 += 1
    while col_max[sx1 - 1] == 0:
        sx1 -= 1
    lo_x, hi_x = (s - sx1, s - sx0) if flipped else (sx0, sx1)
    scale = 1.0 / np.float64(inv_scale)  # bounds only: pixels follow the spec
    tx, ty = np.float64(translate[0]), np.float64(translate[1])
    x0 = np.floor(tx + (lo_x - 0.5) * scale - 0.5) - RECT_MARGIN
    y0 = np.floor(ty + (sy0 - 0.5) * scale - 0.5) - RECT_MARGIN
    x1 = np.ceil(tx + (hi_x + 0.5) * scale - 0.5) + RECT_MARGIN + 1
    y1 = np.ceil(ty + (sy1 + 0.5) * scale - 0.5) + RECT_MARGIN + 1
    row[0], row[1] = int(min(max(x0, 0.0), w)), int(min(max(y0, 0.0), h))
    row[2], row[3] = int(min(max(x1, 0.0), w)), int(min(max(y1, 0.0), h))
    row[4], row[5] = max(sx0 - 1, 0), max(sy0 - 1, 0)
    row[6], row[7] = min(sx1 + 1, s), min(sy1 + 1, s)
    return row[2] > row[0] and row[3] > row[1]


@numba.njit(cache=True, nogil=True)
def _overlap_groups(table, chosen):  # pragma: no cover
    """The chosen pastes in connected components of rectangle overlap, each in increasing order,
    components ordered by their first paste (``reference._overlap_groups``)."""
    k_count = chosen.shape[0]
    parent = np.arange(k_count)
    for i in range(k_count):
        if not chosen[i]:
            continue
        for j in range(i):
            if chosen[j] and table[i, 0] < table[j, 2] and table[j, 0] < table[i, 2] \
                    and table[i, 1] < table[j, 3] and table[j, 1] < table[i, 3]:
                parent[_root(parent, i)] = _root(parent, j)
    roots = np.array([_root(parent, i) for i in range(k_count)])
    groups = []
    seen = np.zeros(k_count, np.bool_)
    for i in range(k_count):  # the root need not be a component's first paste
        if chosen[i] and not seen[roots[i]]:
            seen[roots[i]] = True
            groups.append([k for k in range(i, k_count) if chosen[k] and roots[k] == roots[i]])
    return groups


@numba.njit(cache=True, nogil=True)
def _root(parent, i):  # pragma: no cover
    while parent[i] != i:
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _axis_taps(start, count, t, inv, flipped, s, lo, hi):  # pragma: no cover
    """The two taps of ``count`` target pixels from ``start`` along one axis: indices into the crop
    window ``[lo, hi)`` (clamped into it) and integer weights, float32 (``256 - f``, ``f``) and the
    alpha's (zero for a tap outside the window); the spec's float32 op order."""
    first = np.empty(count, np.int64)
    second = np.empty(count, np.int64)
    weights = np.empty((4, count), np.float32)  # w0, w1, alpha w0, alpha w1
    for j in range(count):
        u = (np.float32(start + j) + np.float32(0.5) - t) * inv
        if flipped:
            u = np.float32(s) - u
        uf = u - np.float32(0.5)
        i0f = np.floor(uf)
        frac = np.floor((uf - i0f) * np.float32(256.0))  # uf - floor(uf) is exact and in [0, 1)
        tap = np.int64(i0f)
        w0 = np.float32(256.0) - frac
        weights[0, j], weights[1, j] = w0, frac
        weights[2, j] = w0 if lo <= tap < hi else np.float32(0.0)
        weights[3, j] = frac if lo <= tap + 1 < hi else np.float32(0.0)
        first[j] = min(max(tap, lo), hi - 1) - lo
        second[j] = min(max(tap + 1, lo), hi - 1) - lo
    return first, second, weights


@numba.njit(cache=True, nogil=True)
def _blend(tile, hwc, gx0, gy0, crop, alpha, plane, keep, b, row, inv, translate, flipped, gain):  # pragma: no cover
    """Blend one paste (``crop`` uint8 ``[4, S, S]`` RGB, prepared ``alpha`` ``[S, S]``) into the
    float32 ``tile`` (origin ``gx0, gy0``; ``[h, w, 3]`` when ``hwc``, else ``[3, h, w]``) over its
    rectangle ``row[:4]``, reading the crop window ``row[4:]``; its raw mask into ``plane`` (over
    the tile's box, zero before)."""
    x0, y0, x1, y1 = row[0], row[1], row[2], row[3]
    cx0, cy0, cx1, cy1 = row[4], row[5], row[6], row[7]
    h, w, ww = y1 - y0, x1 - x0, cx1 - cx0
    s = alpha.shape[0]
    ya, yb, wy = _axis_taps(y0, h, translate[1], inv, False, s, cy0, cy1)
    xa, xb, wx = _axis_taps(x0, w, translate[0], inv, flipped, s, cx0, cx1)
    rows = np.empty((h, ww, 4), np.uint16)  # <= 255 * 256
    for j in range(h):
        ra, rb = cy0 + ya[j], cy0 + yb[j]
        wa, wb = np.uint16(wy[0, j]), np.uint16(wy[1, j])
        qa, qb = np.uint16(wy[2, j]), np.uint16(wy[3, j])
        r0a, r0b = crop[0, ra, cx0:cx1], crop[0, rb, cx0:cx1]
        r1a, r1b = crop[1, ra, cx0:cx1], crop[1, rb, cx0:cx1]
        r2a, r2b = crop[2, ra, cx0:cx1], crop[2, rb, cx0:cx1]
        r3a, r3b = alpha[ra, cx0:cx1], alpha[rb, cx0:cx1]
        out = rows[j]
        # the four channels in one loop: LLVM interleaves the stores (one loop per channel wrote
        # every fourth uint16 and cost 0.45 ms more per batch of 64 pastes)
        for i in range(ww):
            out[i, 0] = np.uint16(r0a[i]) * wa + np.uint16(r0b[i]) * wb
            out[i, 1] = np.uint16(r1a[i]) * wa + np.uint16(r1b[i]) * wb
            out[i, 2] = np.uint16(r2a[i]) * wa + np.uint16(r2b[i]) * wb
            out[i, 3] = np.uint16(r3a[i]) * qa + np.uint16(r3b[i]) * qb
    rgb_a, rgb_b = wx[0] * RGB_WEIGHT, wx[1] * RGB_WEIGHT
    alpha_a, alpha_b = wx[2], wx[3]
    padded = keep.shape[0] > 0
    one = np.float32(1.0)
    for j in range(h):
        line, raw = rows[j], plane[y0 - gy0 + j, x0 - gx0 : x1 - gx0]
        if hwc:  # channels, pixels: one strided view type for both tile layouts
            t = tile[y0 - gy0 + j, x0 - gx0 : x1 - gx0].T
        else:
            t = tile[:, y0 - gy0 + j, x0 - gx0 : x1 - gx0]
        for i in range(w):
            pa, pb = line[xa[i]], line[xb[i]]
            a = np.float32(pa[3]) * alpha_a[i] + np.float32(pb[3]) * alpha_b[i]
            inside = True
            if padded:
                inside = keep[b, y0 + j, x0 + i]
            shown = inside and a >= ALPHA_THRESHOLD
            raw[i] = shown
            if not inside or a == 0:
                continue
            alpha_k = np.float32(np.float64(a) * INV_ALPHA_MAX)
            rest = one - alpha_k
            c0 = np.float32(pa[0]) * rgb_a[i] + np.float32(pb[0]) * rgb_b[i]
            c1 = np.float32(pa[1]) * rgb_a[i] + np.float32(pb[1]) * rgb_b[i]
            c2 = np.float32(pa[2]) * rgb_a[i] + np.float32(pb[2]) * rgb_b[i]
            c0, c1, c2 = c0 * gain, c1 * gain, c2 * gain
            t[0, i] = t[0, i] * rest + c0 * alpha_k
            t[1, i] = t[1, i] * rest + c1 * alpha_k
            t[2, i] = t[2, i] * rest + c2 * alpha_k


@numba.njit(cache=True, nogil=True)
def _load(image, channels_last, x0, y0, x1, y1):  # pragma: no cover
    """float32 copy of a rectangle of ``image``, in its layout: ``[y1 - y0, x1 - x0, 3]`` of a
    ``[H, W, 3]`` image when ``channels_last`` (a row is one contiguous run both sides: 0.55 ms
    less per batch of 64 pastes than splitting it into planes), else ``[3, y1 - y0, x1 - x0]`` of
    ``[3, H, W]``: exact for uint8 and float32."""
    if channels_last:
        tile = np.empty((y1 - y0, x1 - x0, 3), np.float32)
        n = (x1 - x0) * 3
        for j in range(y1 - y0):
            line, out = image[y0 + j, x0:x1].reshape(n), tile[j].reshape(n)
            for i in range(n):
                out[i] = line[i]
        return tile
    tile = np.empty((3, y1 - y0, x1 - x0), np.float32)
    for j in range(y1 - y0):
        for c in range(3):
            line, out = image[c, y0 + j, x0:x1], tile[c, j]
            for i in range(x1 - x0):
                out[i] = line[i]
    return tile


@numba.njit(cache=True, nogil=True)
def _store(image, channels_last, tile, x0, y0, is_u8):  # pragma: no cover
    """``reference._store_rect`` of a whole tile (``_load``'s layout): uint8 ``floor(v + 0.5)``
    clamped to 255 (a no-op for values up to 255, as the reference clamps only when
    ``value_range > 255``), float32 as is."""
    if channels_last:
        h, n = tile.shape[0], tile.shape[1] * 3
        for j in range(h):
            _store_run(tile[j].reshape(n), image[y0 + j, x0 : x0 + tile.shape[1]].reshape(n), is_u8)
        return
    h, w = tile.shape[1], tile.shape[2]
    for j in range(h):
        for c in range(3):
            _store_run(tile[c, j], image[c, y0 + j, x0 : x0 + w], is_u8)


@numba.njit(cache=True, nogil=True)
def _store_run(src, out, is_u8):  # pragma: no cover
    if is_u8:  # through int32, which vectorises (a direct float -> uint8 cast did not)
        for i in range(src.shape[0]):
            out[i] = np.int32(min(src[i] + np.float32(0.5), np.float32(255.0)))
    else:
        for i in range(src.shape[0]):
            out[i] = src[i]


@numba.njit(cache=True, nogil=True)
def _visible(plane, covered, gx0, gy0, row, box, paint, label):  # pragma: no cover
    """Turn a paste's raw mask (in ``plane``, over the group's box from ``gx0, gy0``, set only inside
    ``row[:4]``) into its visible mask: clear what later pastes (``covered``, over the same box)
    hide, then add it to ``covered``; write its tight box (image pixels) into ``box`` and return
    its area. With a semantic map
    (``paint``: bytes ``[H, W * itemsize]``, empty for none), write ``label`` (the bytes of one
    value) wherever the visible mask is set, as ``annotations.paint_semantic`` does."""
    x0, y0, x1, y1 = row[0], row[1], row[2], row[3]
    size = label.shape[0]
    area = 0
    bx0, by0, bx1, by1 = x1, y1, x0, y0
    for y in range(y0, y1):
        line, cover = plane[y - gy0, x0 - gx0 : x1 - gx0], covered[y - gy0, x0 - gx0 : x1 - gx0]
        count = np.int32(0)
        for x in range(x1 - x0):  # 0/1 bytes, branch free: vectorises (0.3 ms less per 64 pastes)
            v = line[x] & (cover[x] ^ np.uint8(1))
            line[x] = v
            cover[x] |= v
            count += np.int32(v)
        if count == 0:
            continue
        first, last = 0, x1 - x0
        while line[first] == 0:
            first += 1
        while line[last - 1] == 0:
            last -= 1
        bx0, bx1 = min(bx0, x0 + first), max(bx1, x0 + last)
        by0, by1 = min(by0, y), y + 1
        area += count
        if size == 1:  # a select, which vectorises
            out, value = paint[y, x0:x1], label[0]
            for x in range(first, last):
                out[x] = value if line[x] else out[x]
        elif size > 1:
            for x in range(first, last):
                if line[x]:
                    paint[y, (x0 + x) * size : (x0 + x + 1) * size] = label
    if area:
        box[0], box[1], box[2], box[3] = bx0, by0, bx1, by1
    return area


@numba.njit(cache=True, nogil=True)
def _put_box(plane, gx0, gy0, box, out):  # pragma: no cover
    """Copy a visible mask's tight ``box`` from ``plane`` (over the group's box from ``gx0, gy0``)
    into its output plane ``out`` ``[H, W]`` (zero before)."""
    x0, y0, x1, y1 = int(box[0]), int(box[1]), int(box[2]), int(box[3])
    for y in range(y0, y1):
        out[y, x0:x1] = plane[y - gy0, x0 - gx0 : x1 - gx0]


@numba.njit(cache=True, nogil=True)
def _cut(masks, covered, gx0, gy0, rows, cols, lost, boxes):  # pragma: no cover
    """Clear ``covered`` (over the group's box from ``gx0, gy0``) from the existing masks whose
    tight ``boxes`` (before any cut) meet it, keeping their row and column counts, and count what
    each lost."""
    gh, gw = covered.shape
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = boxes[i]
        if x1 <= gx0 or x0 >= gx0 + gw or y1 <= gy0 or y0 >= gy0 + gh:  # empty masks have box 0
            continue
        plane, row_count, col_count = masks[i], rows[i], cols[i]
        for y in range(gh):
            line, cover = plane[gy0 + y, gx0 : gx0 + gw], covered[y]
            for x in range(gw):
                if cover[x] and line[x]:
                    line[x] = 0
                    row_count[gy0 + y] -= 1
                    col_count[gx0 + x] -= 1
                    lost[i] += 1
