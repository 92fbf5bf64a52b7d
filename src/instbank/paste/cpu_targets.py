"""Compiled CPU (numba) twins of the targets beyond masks: keypoint visibility
(``instbank.paste.keypoints``), the panoptic map and its segment table
(``instbank.paste.panoptic``), and the resampling of in-batch objects into crops
(``instbank.paste.inbatch``). Each gives its reference's results bit for bit (all integer
arithmetic, or float32 in the reference's op order with no fused multiply-add: numba leaves
LLVM's ``contract`` flag off without ``fastmath``); tested in ``tests/test_paste_keypoints.py``,
``test_paste_panoptic.py`` and ``test_paste_inbatch.py``.

A module of its own so that editing it leaves the machine code numba cached for
``instbank.paste.cpu_kernel`` valid (numba's cache is keyed on the source file), and so that a
training loop that uses none of these compiles none of them: each function compiles on its first
call with an empty cache (keypoints 0.8 s, the resample 1 s, the panoptic map 6 s per map dtype)
and is cached on disk like the paste kernel.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "instbank.paste.cpu_targets needs numba: pip install 'instbank[numba]', or use the reference (impl='torch')"
    ) from exc


def _planes(masks: torch.Tensor):
    """A uint8/bool tensor ``[B, K, H, W]`` (any strides, e.g. the paste planes of the output
    masks) as its whole storage, a 1-d uint8 array, with its element offset and strides: one
    compiled signature whatever the view (numba compiles contiguous and strided arrays apart)."""
    planes = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    size = planes.untyped_storage().nbytes()
    flat = torch.as_strided(planes, (size,), (1,), 0).numpy()
    return flat, planes.storage_offset(), np.asarray(planes.stride(), np.int64)


# ------------------------------------------------------------------------------------------------
# keypoints


def keypoint_visibility(points: torch.Tensor, n: int, paste_masks: torch.Tensor,
                        padding_mask: torch.Tensor | None = None):
    """As ``instbank.paste.keypoints.keypoint_visibility``, for CPU tensors."""
    out = np.array(points.numpy(), dtype=np.float32)  # a copy, C-contiguous
    pad = _NO_PADDING if padding_mask is None else np.ascontiguousarray(padding_mask.to(torch.bool).numpy())
    flat, offset, strides = _planes(paste_masks)
    dropped = np.zeros(points.shape[0], np.int64)
    _visibility(out, n, flat, offset, strides, paste_masks.shape[2], paste_masks.shape[3], pad, dropped)
    return torch.from_numpy(out), torch.from_numpy(dropped)


_NO_PADDING = np.zeros((0, 0, 0), np.bool_)


def keypoints_after_paste(existing, crop_keypoints, keypoint_flip, plan, paste_masks, padding_mask=None):
    """As ``instbank.paste.keypoints.keypoints_after_paste``, for CPU tensors: rule 1 (the pastes'
    keypoints mapped into the image, float32 in the reference's op order) and rules 2-4 in one call."""
    b, n, j, _ = existing.shape
    k = crop_keypoints.shape[1]
    out = np.zeros((b, n + k, j, 3), np.float32)
    out[:, :n] = existing.numpy()
    _map_keypoints(np.ascontiguousarray(crop_keypoints.numpy(), dtype=np.float32), keypoint_flip.numpy(),
                   plan.apply.numpy(), plan.flip.numpy(), plan.scale.numpy(), plan.translate.numpy(),
                   np.float32(plan.crop_size), out[:, n:])
    pad = _NO_PADDING if padding_mask is None else np.ascontiguousarray(padding_mask.to(torch.bool).numpy())
    flat, offset, strides = _planes(paste_masks)
    dropped = np.zeros(b, np.int64)
    _visibility(out, n, flat, offset, strides, paste_masks.shape[2], paste_masks.shape[3], pad, dropped)
    return torch.from_numpy(out), torch.from_numpy(dropped)


@numba.njit(cache=True, nogil=True)
def _map_keypoints(crop, flip, apply, flipped, scale, translate, size, out):  # pragma: no cover
    """Rule 1 into ``out`` ``[B, K, J, 3]`` (zeros before)."""
    for b in range(crop.shape[0]):
        for k in range(crop.shape[1]):
            if not apply[b, k]:
                continue
            for j in range(crop.shape[2]):
                src = flip[j] if flipped[b, k] else j
                u, v, vis = crop[b, k, src, 0], crop[b, k, src, 1], crop[b, k, src, 2]
                if not vis > 0:
                    continue
                if flipped[b, k]:
                    u = size - u
                out[b, k, j, 0] = u * scale[b, k] + translate[b, k, 0]
                out[b, k, j, 1] = v * scale[b, k] + translate[b, k, 1]
                out[b, k, j, 2] = vis


@numba.njit(cache=True, nogil=True)
def _visibility(points, n, flat, offset, strides, h, w, padding, dropped):  # pragma: no cover
    """Rules 2-4 in place on float32 ``points`` ``[B, N+K, J, 3]``; the paste masks ``[B, K, H, W]``
    as their storage ``flat`` (uint8) with ``offset`` and ``strides``; ``padding``: bool ``[B, H, W]``
    or empty."""
    k_count = points.shape[1] - n
    padded = padding.shape[0] > 0
    for b in range(points.shape[0]):
        for r in range(points.shape[1]):
            for j in range(points.shape[2]):
                x, y, v = points[b, r, j, 0], points[b, r, j, 1], points[b, r, j, 2]
                if not v > 0:
                    continue
                inside = x >= 0 and x < w and y >= 0 and y < h
                if inside:
                    px, py = int(np.floor(x)), int(np.floor(y))
                    if padded and padding[b, py, px]:
                        inside = False
                if not inside:
                    points[b, r, j, 0] = points[b, r, j, 1] = points[b, r, j, 2] = 0.0
                    if r < n:
                        dropped[b] += 1
                    continue
                at = offset + b * strides[0] + py * strides[2] + px * strides[3]
                for k in range(max(r - n + 1, 0), k_count):
                    if flat[at + k * strides[1]]:
                        points[b, r, j, 2] = min(v, np.float32(1.0))
                        break


# ------------------------------------------------------------------------------------------------
# panoptic


def paste_panoptic(panoptic, paste_masks, labels, schema, boxes=None):
    """As ``instbank.paste.panoptic.paste_panoptic``, for CPU tensors: one pass over each map (its
    distinct ids counted while it is copied), then each paste painted inside ``boxes`` (float
    ``[B, K, 4]``, boxes holding the visible masks, e.g. their tight boxes; None: the whole image)."""
    from instbank.paste import panoptic as spec

    b, k, h, w = paste_masks.shape
    maps = panoptic.contiguous()
    out = torch.empty_like(maps)
    flat, offset, strides = _planes(paste_masks if paste_masks.stride(-1) == 1 else paste_masks.contiguous())
    if boxes is None:
        boxes = torch.tensor([0, 0, w, h], dtype=torch.float32).expand(b, k, 4)
    labels = labels.to(torch.int64)
    thing = schema.is_thing(labels)
    errors = np.zeros((4, 5), np.int64)  # per kind, the first: image, value, paste, class
    paste_ids = np.zeros((b, k), np.int64)
    area = np.zeros((b, k), np.int64)
    ids, counts, lost, offsets = _panoptic_batch(
        maps.numpy(), out.numpy(), flat, offset, strides, np.ascontiguousarray(boxes.numpy(), dtype=np.float32),
        labels.numpy(), thing.numpy(), schema.label_divisor, schema.void_id, torch.iinfo(maps.dtype).max, paste_ids,
        area, errors)
    _raise(errors, schema, maps.dtype)
    m = int(np.diff(offsets).max()) if b else 0
    table = np.full((b, m), schema.void_id, np.int64)
    remaining = np.zeros((b, m), np.int64)
    for i in range(b):
        lo, hi = offsets[i], offsets[i + 1]
        table[i, : hi - lo] = ids[lo:hi]
        remaining[i, : hi - lo] = counts[lo:hi] - lost[lo:hi]
    paste_ids_t = torch.from_numpy(paste_ids)
    segments = spec.segment_table(torch.from_numpy(table), torch.from_numpy(remaining), paste_ids_t, labels, thing,
                                  torch.from_numpy(area), schema)
    return out, segments


def _raise(errors: np.ndarray, schema, dtype) -> None:
    """Raise the reference's error (its checks' order: negative ids, instance overflow, void id,
    dtype) from the first of each kind ``_panoptic_batch`` recorded (``found, image, value, paste,
    class`` per row)."""
    from instbank.paste import panoptic as spec

    negative, overflow, void, wide = ([int(v) for v in row] for row in errors)
    if negative[0]:
        raise ValueError(spec.bad_id_message(negative[1], negative[2], schema))
    if overflow[0]:
        raise ValueError(spec.overflow_message(overflow[1], overflow[3], overflow[2], overflow[4], schema))
    if void[0]:
        raise ValueError(spec.void_message(void[1], void[3], schema))
    if wide[0]:
        raise ValueError(spec.dtype_message(wide[2], dtype))


@numba.njit(cache=True, nogil=True)
def _panoptic_batch(maps, out, flat, offset, strides, boxes, labels, thing, divisor, void, id_max, paste_ids, area,
                    errors):  # pragma: no cover
    """Image by image (its map still in cache when it is painted): copy ``maps[b]`` into ``out[b]``
    counting its distinct ids (``_count_image``), record the first id breaking each of the
    reference's checks in ``errors``, give the pastes their ids (``paste_ids`` ``[B, K]``), and,
    while nothing failed, paint them inside ``boxes`` (``_paint_row``), counting each paste's
    ``area`` and what each existing segment loses. Returns ``(ids, counts, lost, offsets)``, image
    ``b``'s segments at ``offsets[b]:offsets[b+1]``, ids ascending."""
    b_count, h, w = maps.shape
    k_count = labels.shape[1]
    run_ids = np.empty(max(4 * w, 4096), maps.dtype)
    run_starts = np.empty(max(4 * w, 4096), np.int64)
    found_ids, found_counts, found_lost = [], [], []
    offsets = np.zeros(b_count + 1, np.int64)
    for b in range(b_count):
        ids, counts = _count_image(maps[b], out[b], void, run_ids, run_starts)
        lost = np.zeros_like(counts)
        offsets[b + 1] = offsets[b] + ids.shape[0]
        found_ids.append(ids)
        found_counts.append(counts)
        found_lost.append(lost)
        for m in range(ids.shape[0]):
            if ids[m] < 0 and errors[0, 0] == 0:
                errors[0, 0], errors[0, 1], errors[0, 2] = 1, b, ids[m]
        for k in range(k_count):
            c = labels[b, k]
            instance = 0
            if thing[b, k]:
                top = 0
                for m in range(ids.shape[0]):
                    if ids[m] // divisor == c:
                        top = max(top, ids[m] % divisor)
                rank = 0
                for j in range(k):
                    rank += labels[b, j] == c
                instance = top + 1 + rank
                if instance >= divisor and errors[1, 0] == 0:
                    errors[1, 0], errors[1, 1], errors[1, 2], errors[1, 3], errors[1, 4] = 1, b, instance, k, c
            paste_ids[b, k] = c * divisor + instance
            if paste_ids[b, k] == void and errors[2, 0] == 0:
                errors[2, 0], errors[2, 1], errors[2, 3] = 1, b, k
            if paste_ids[b, k] > id_max:  # the reference names the largest
                errors[3, 0], errors[3, 2] = 1, max(errors[3, 2], paste_ids[b, k])
        if errors.any():
            continue
        for k in range(k_count):
            x0, y0 = max(int(np.floor(boxes[b, k, 0])), 0), max(int(np.floor(boxes[b, k, 1])), 0)
            x1, y1 = min(int(np.ceil(boxes[b, k, 2])), w), min(int(np.ceil(boxes[b, k, 3])), h)
            for y in range(y0, y1):
                start = offset + b * strides[0] + k * strides[1] + y * strides[2]
                area[b, k] += _paint_row(out[b, y], flat[start : start + w], x0, x1, paste_ids[b, k], void, ids, lost)
    all_ids = np.empty(offsets[b_count], np.int64)
    all_counts = np.empty(offsets[b_count], np.int64)
    all_lost = np.empty(offsets[b_count], np.int64)
    for b in range(b_count):
        all_ids[offsets[b] : offsets[b + 1]] = found_ids[b]
        all_counts[offsets[b] : offsets[b + 1]] = found_counts[b]
        all_lost[offsets[b] : offsets[b + 1]] = found_lost[b]
    return all_ids, all_counts, all_lost, offsets


@numba.njit(cache=True, nogil=True)
def _count_image(image, out, void, run_ids, run_starts):  # pragma: no cover
    """Copy ``image`` ``[H, W]`` into ``out`` and count its distinct ids (void excluded): ``(ids
    ascending, counts)``.

    Rows are copied and cut into runs of one id by ``_runs`` (a compare per pixel and no other
    state: with the hash table in the same loop numba's code was 10x slower); each run is then
    counted in a hash table (open addressing). About 0.1 ms per 512^2 map on the development VM,
    the copy alone 0.03.
    """
    h, w = image.shape
    keys, tally, used = np.zeros(64, np.int64), np.zeros(64, np.int64), np.zeros(64, np.bool_)
    size, y = 0, 0
    current, start = (image[0, 0], 0) if h * w else (image.dtype.type(void), 0)
    last = current
    while y < h:
        y, last, count = _runs(image, out, y, last, run_ids, run_starts)
        for i in range(count + (y == h)):
            following, at = (run_ids[i], run_starts[i]) if i < count else (last, h * w)
            if current != void:
                size += _insert(keys, tally, used, np.int64(current), at - start)
                if 2 * size > keys.shape[0]:
                    keys, tally, used = _grown(keys, tally, used)
            current, start = following, at
    found = keys[used]
    order = np.argsort(found)
    return found[order], tally[used][order]


@numba.njit(cache=True, nogil=True)
def _runs(image, out, y, last, run_ids, run_starts):  # pragma: no cover
    """Copy rows ``y..`` of ``image`` ``[H, W]`` into ``out`` while the run buffers have room for
    one more row, recording where each new run starts (flat index) and its id; ``last``: the id of
    the run in progress. Returns the next row, the id in progress and the runs recorded."""
    h, w = image.shape
    count = 0
    while y < h and count <= run_ids.shape[0] - w:
        src, dst = image[y], out[y]
        base = y * w
        for x in range(w):
            value = src[x]
            dst[x] = value
            if value != last:
                run_ids[count] = value
                run_starts[count] = base + x
                count += 1
                last = value
        y += 1
    return y, last, count


@numba.njit(cache=True, nogil=True)
def _insert(keys, tally, used, key, amount):  # pragma: no cover
    """Add ``amount`` to ``key``'s count (linear probing); 1 when ``key`` is new, else 0."""
    mask = keys.shape[0] - 1
    i = (key ^ (key >> 17)) & mask
    while used[i] and keys[i] != key:
        i = (i + 1) & mask
    new = 0 if used[i] else 1
    used[i], keys[i] = True, key
    tally[i] += amount
    return new


@numba.njit(cache=True, nogil=True)
def _grown(keys, tally, used):  # pragma: no cover
    """The hash table rebuilt twice as large."""
    size = 2 * keys.shape[0]
    bigger = np.zeros(size, np.int64), np.zeros(size, np.int64), np.zeros(size, np.bool_)
    for j in range(keys.shape[0]):
        if used[j]:
            _insert(bigger[0], bigger[1], bigger[2], keys[j], tally[j])
    return bigger


@numba.njit(cache=True, nogil=True)
def _paint_row(row, mask, x0, x1, new, void, ids, lost):  # pragma: no cover
    """Paint ``new`` where ``mask`` (uint8, the row of a visible mask) is set in ``row[x0:x1]``;
    count what each existing segment (``ids``, ascending) loses, run by run. Returns the pixels
    painted."""
    painted, run, last, slot = 0, 0, void, -1
    for x in range(x0, x1):
        if mask[x] == 0:
            continue
        old = row[x]
        row[x] = new
        painted += 1
        if old != last:
            if slot >= 0:
                lost[slot] += run
            last, run = old, 0
            slot = -1 if old == void else np.searchsorted(ids, old)
        run += 1
    if slot >= 0:
        lost[slot] += run
    return painted


# ------------------------------------------------------------------------------------------------
# in-batch objects


def resample_objects(images, masks, draw, geometry, s: int, sampling_ratio: int = 2) -> torch.Tensor:
    """As ``instbank.paste.inbatch.resample_objects``, for CPU tensors: one compiled call, each
    object's crop computed from its separable taps."""
    from instbank.paste.inbatch import check_sampling_ratio

    check_sampling_ratio(sampling_ratio)
    b, k = draw.source_instance.shape
    crops = torch.zeros((b, k, 4, s, s), dtype=torch.uint8)
    if b * k == 0 or images.shape[-1] * images.shape[-2] == 0:
        return crops
    pixels, pixel_offset, pixel_strides = _planes(images)
    planes, plane_offset, plane_strides = _planes(masks)
    _resample(pixels, pixel_offset, pixel_strides, planes, plane_offset, plane_strides, images.shape[-2],
              images.shape[-1], draw.source_image.numpy(), draw.source_instance.numpy(),
              *(np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in geometry), sampling_ratio, crops.numpy())
    return crops


@numba.njit(cache=True, nogil=True)
def _resample(pixels, pixel_offset, ps, planes, plane_offset, ms, h, w, source_image, source_instance, box, scale,
              inv_scale, offset, n, crops):  # pragma: no cover
    """Into ``crops`` ``[B, K, 4, S, S]`` (zeros before). ``pixels``/``planes``: the storage of the
    uint8 images ``[B, 3, H, W]`` and masks ``[B, N, H, W]`` with their offsets and strides."""
    s = crops.shape[-1]
    half, unit = n * n * 32768, n * n * 65536
    for b in range(crops.shape[0]):
        for k in range(crops.shape[1]):
            instance = source_instance[b, k]
            if instance < 0:
                continue
            src = source_image[b]
            xa, xb, wxa, wxb, mxa, mxb = _sample_taps(offset[b, k, 0], inv_scale[b, k], box[b, k, 0], s, n, w)
            ya, yb, wya, wyb, mya, myb = _sample_taps(offset[b, k, 1], inv_scale[b, k], box[b, k, 1], s, n, h)
            image = pixel_offset + src * ps[0]
            plane = plane_offset + src * ms[0] + instance * ms[1]
            for cy in range(s):
                for cx in range(s):
                    r = g = bl = m = 0
                    for j in range(cy * n, cy * n + n):
                        ra, rb = ya[j] * ps[2], yb[j] * ps[2]
                        ma, mb = ya[j] * ms[2], yb[j] * ms[2]
                        for i in range(cx * n, cx * n + n):
                            ca, cb = xa[i] * ps[3], xb[i] * ps[3]
                            for c in range(3):
                                at = image + c * ps[1]
                                top = np.int32(pixels[at + ra + ca]) * wxa[i] + np.int32(pixels[at + ra + cb]) * wxb[i]
                                low = np.int32(pixels[at + rb + ca]) * wxa[i] + np.int32(pixels[at + rb + cb]) * wxb[i]
                                value = top * wya[j] + low * wyb[j]
                                if c == 0:
                                    r += value
                                elif c == 1:
                                    g += value
                                else:
                                    bl += value
                            na, nb = xa[i] * ms[3], xb[i] * ms[3]
                            top = (planes[plane + ma + na] != 0) * mxa[i] + (planes[plane + ma + nb] != 0) * mxb[i]
                            low = (planes[plane + mb + na] != 0) * mxa[i] + (planes[plane + mb + nb] != 0) * mxb[i]
                            m += top * mya[j] + low * myb[j]
                    crops[b, k, 0, cy, cx] = (r + half) // unit
                    crops[b, k, 1, cy, cx] = (g + half) // unit
                    crops[b, k, 2, cy, cx] = (bl + half) // unit
                    crops[b, k, 3, cy, cx] = (255 * m + half) // unit


@numba.njit(cache=True, nogil=True)
def _sample_taps(offset, inv_scale, start, s, n, size):  # pragma: no cover
    """``inbatch._axis_taps`` for one object: for each of the ``S * n`` samples the two tap indices
    (clamped into ``[0, size)``), their weights and their mask weights (0 outside), int32."""
    count = s * n
    first, second = np.empty(count, np.int64), np.empty(count, np.int64)
    w0, w1 = np.empty(count, np.int32), np.empty(count, np.int32)
    m0, m1 = np.empty(count, np.int32), np.empty(count, np.int32)
    for c in range(s):
        for i in range(n):
            u = np.float32(c) + np.float32((2 * i + 1) / (2 * n))
            coord = (u - offset) * inv_scale + start
            xf = coord - np.float32(0.5)
            floor = np.floor(xf)
            frac = min(max(np.int32(np.floor((xf - floor) * np.float32(256.0))), 0), 255)
            tap = np.int64(min(max(floor, np.float32(-2.0)), np.float32(size + 1)))
            at = c * n + i
            w0[at], w1[at] = 256 - frac, frac
            m0[at] = w0[at] if 0 <= tap < size else 0
            m1[at] = w1[at] if 0 <= tap + 1 < size else 0
            first[at] = min(max(tap, 0), size - 1)
            second[at] = min(max(tap + 1, 0), size - 1)
    return first, second, w0, w1, m0, m1
