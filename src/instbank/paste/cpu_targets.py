"""Compiled CPU (numba) twins of the targets beyond masks: keypoint visibility
(``instbank.paste.keypoints``), the panoptic map and its segment table
(``instbank.paste.panoptic``), and the resampling of in-batch objects into crops
(``instbank.paste.inbatch``). Each gives its reference's results bit for bit (all integer
arithmetic, or float32 in the reference's op order with no fused multiply-add: numba leaves
LLVM's ``contract`` flag off without ``fastmath``); tested in ``tests/test_paste_keypoints.py``,
``test_paste_panoptic.py``, ``test_panoptic_given.py`` and ``test_paste_inbatch.py``.

A module of its own so that editing it leaves the machine code numba cached for
``instbank.paste.cpu_kernel`` valid (numba's cache is keyed on the source file), and so that a
training loop that uses none of these compiles none of them: each function compiles on its first
call with an empty cache (keypoints 0.8 s, the resample 1 s, the panoptic map 8 s per map dtype)
and is cached on disk like the paste kernel.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
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


def _prefetcher(write: int):
    """A numba intrinsic ``prefetch(array, index)``: ask the core to bring ``array[index]`` into
    the cache (for writing when ``write``: x86 ``prefetchw``, else ``prefetcht0``) without waiting
    for it; a hint, never a fault, whatever the index."""

    @intrinsic
    def prefetch(typingctx, array, index):
        def codegen(context, builder, signature, args):
            kind = signature.args[0]
            data = context.make_array(kind)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, kind, data, [args[1]], wraparound=False,
                                               boundscheck=False)
            byte, word = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte, word, word, word]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(pointer, byte), word(write), word(3), word(1)])
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return prefetch


_prefetch_read, _prefetch_write = _prefetcher(0), _prefetcher(1)


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


def paste_panoptic(panoptic, paste_masks, labels, schema, boxes=None, segments=None, out=None):
    """As ``instbank.paste.panoptic.paste_panoptic``, for CPU tensors, image by image: the map's
    segments are counted while it is copied into the output, or, with ``segments`` (``(ids, area)``
    int64 ``[B, M]``, ``panoptic.given_segments``), taken from the table while the map is only
    copied, or not even that when ``out`` is ``panoptic`` (in place); then each paste is painted
    inside ``boxes`` (float ``[B, K, 4]``, boxes holding the visible masks, e.g. their tight boxes;
    None: the whole image), counting what each segment loses."""
    from instbank.paste import panoptic as spec

    b, k, h, w = paste_masks.shape
    maps, out = spec.map_output(panoptic, out, "the numba kernel on CPU")
    flat, offset, strides = _planes(paste_masks if paste_masks.stride(-1) == 1 else paste_masks.contiguous())
    if boxes is None:
        boxes = torch.tensor([0, 0, w, h], dtype=torch.float32).expand(b, k, 4)
    if segments is None:
        table_ids = table_area = np.zeros((b, 0), np.int64)
    else:
        table_ids, table_area = (np.ascontiguousarray(t.numpy(), dtype=np.int64) for t in segments)
    errors = np.zeros((len(_ERRORS), 5), np.int64)  # per kind, the first: found, image, value, paste/area, class/lost
    ids, classes, is_thing, area, valid, m = _panoptic_batch(
        maps.numpy(), out.numpy(), out.data_ptr() == maps.data_ptr(), flat, offset, strides,
        np.ascontiguousarray(boxes.numpy(), dtype=np.float32), np.ascontiguousarray(labels.numpy(), dtype=np.int64),
        np.asarray(schema.thing_classes, np.int64), schema.label_divisor, schema.void_id,
        torch.iinfo(maps.dtype).max, segments is not None, table_ids, table_area, errors)
    _raise(errors, schema, maps.dtype)
    table = (torch.from_numpy(t) for t in (ids, classes, is_thing, area, valid))
    return out, spec.Segments(*table, num_existing=int(m))


#: The errors ``_panoptic_batch`` records, in the order the reference checks them.
_ERRORS = ("negative area", "negative id", "overflow", "void", "dtype", "missing", "short")


def _raise(errors: np.ndarray, schema, dtype) -> None:
    """Raise the reference's error (its checks' order, ``_ERRORS``) from the first of each kind
    ``_panoptic_batch`` recorded (``found, image, value, paste or area, class or lost`` per row)."""
    from instbank.paste import panoptic as spec

    if not errors[:, 0].any():
        return
    negative_area, negative, overflow, void, wide, missing, short = ([int(v) for v in row] for row in errors)
    if negative_area[0]:
        raise ValueError(spec.negative_area_message(negative_area[1], negative_area[2], negative_area[3]))
    if negative[0]:
        where = "segments" if negative[3] else "panoptic [B, H, W]"
        raise ValueError(spec.bad_id_message(negative[1], negative[2], schema, where))
    if overflow[0]:
        raise ValueError(spec.overflow_message(overflow[1], overflow[3], overflow[2], overflow[4], schema))
    if void[0]:
        raise ValueError(spec.void_message(void[1], void[3], schema))
    if wide[0]:
        raise ValueError(spec.dtype_message(wide[2], dtype))
    if missing[0]:
        raise ValueError(spec.missing_message(missing[1], missing[2]))
    if short[0]:
        raise ValueError(spec.short_message(short[1], short[2], short[3], short[4]))


@numba.njit(cache=True, nogil=True)
def _panoptic_batch(maps, out, in_place, flat, offset, strides, boxes, labels, things, divisor, void, id_max, given,
                    table_ids, table_area, errors):  # pragma: no cover
    """Image by image (its map still in cache when it is painted): its segments (``_count_image``
    while copying ``maps[b]`` into ``out[b]``, or the ``given`` table merged by id, ``_merged``,
    and the map copied unless ``in_place``); the first value breaking each check recorded in
    ``errors`` (rows as ``_ERRORS``); the pastes' ids (``_paste_ids``); and, while nothing failed,
    each paste painted inside its box (``_paint_box``), counting its area and what each segment
    loses, the first rows of the next paste prefetched meanwhile. Returns the table's ``ids,
    classes, is_thing, area, valid`` ``[B, M+K]`` and ``M``."""
    b_count, h, w = maps.shape
    k_count = labels.shape[1]
    run_ids = np.empty(max(4 * w, 4096), maps.dtype)
    run_starts = np.empty(max(4 * w, 4096), np.int64)
    found_ids, found_remaining = [], []
    paste_ids = np.zeros((b_count, k_count), np.int64)
    thing = np.zeros((b_count, k_count), np.bool_)
    area = np.zeros((b_count, k_count), np.int64)
    missing = np.zeros(1, np.int64)
    seen = np.empty(4, np.int64)  # ids counted in a row: 4 vector passes at most, then pixel by pixel
    m_count = 0
    for b in range(b_count):
        if given:
            ids, counts = _merged(table_ids[b], table_area[b], void)
            if not in_place:
                _copy(maps[b], out[b])
        else:
            ids, counts = _count_image(maps[b], out[b], void, run_ids, run_starts)
        m_count = max(m_count, ids.shape[0])
        for m in range(ids.shape[0]):
            if counts[m] < 0 and errors[0, 0] == 0:
                errors[0, 0], errors[0, 1], errors[0, 2], errors[0, 3] = 1, b, ids[m], counts[m]
            if ids[m] < 0 and errors[1, 0] == 0:
                errors[1, 0], errors[1, 1], errors[1, 2], errors[1, 3] = 1, b, ids[m], given
        _paste_ids(b, ids, labels, things, divisor, void, id_max, paste_ids, thing, errors)
        lost = np.zeros_like(counts)
        found_ids.append(ids)
        found_remaining.append(counts)
        if errors.any():
            continue
        missing[0] = np.iinfo(np.int64).max
        planes = offset + b * strides[0]
        image = out[b].reshape(-1)
        for k in range(k_count):
            for j in range(0 if k == 0 else k + 1, min(k + 2, k_count)):  # the next paste's first rows
                x0, x1, y0, y1 = _pixels(boxes[b, j], w, h)
                _prefetch_rows(image, w, flat, planes + j * strides[1], strides[2], x0, x1, y0, min(y0 + AHEAD, y1))
            area[b, k] = _paint_box(out[b], flat, planes + k * strides[1], strides[2], boxes[b, k], paste_ids[b, k], void,
                                    ids, lost, missing, seen)
        if missing[0] != np.iinfo(np.int64).max and errors[5, 0] == 0:
            errors[5, 0], errors[5, 1], errors[5, 2] = 1, b, missing[0]
        for m in range(ids.shape[0]):
            if lost[m] > counts[m] and errors[6, 0] == 0:
                errors[6, 0], errors[6, 1], errors[6, 2], errors[6, 3], errors[6, 4] = 1, b, ids[m], counts[m], lost[m]
        found_remaining[b] = counts - lost
    return _table(found_ids, found_remaining, m_count, paste_ids, labels, thing, area, things, divisor, void)


@numba.njit(cache=True, nogil=True)
def _merged(ids, area, void):  # pragma: no cover
    """A given table's row (``ids``, ``area`` ``[M]``): its ids other than ``void`` ascending, the
    areas of rows of one id summed."""
    keep = ids != void
    values, sizes = ids[keep], area[keep]
    order = np.argsort(values)
    merged, summed = np.empty(values.shape[0], np.int64), np.zeros(values.shape[0], np.int64)
    n = 0
    for i in order:
        if n == 0 or merged[n - 1] != values[i]:
            merged[n] = values[i]
            n += 1
        summed[n - 1] += sizes[i]
    return merged[:n], summed[:n]


@numba.njit(cache=True, nogil=True)
def _paste_ids(b, ids, labels, things, divisor, void, id_max, paste_ids, thing, errors):  # pragma: no cover
    """The ids of image ``b``'s pastes (``panoptic._new_ids``) into ``paste_ids[b]`` and whether
    each is a thing into ``thing[b]``, recording errors (rows 2-4 of ``_ERRORS``)."""
    for k in range(labels.shape[1]):
        c = labels[b, k]
        thing[b, k] = _slot(things, c) >= 0
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
            if instance >= divisor and errors[2, 0] == 0:
                errors[2, 0], errors[2, 1], errors[2, 2], errors[2, 3], errors[2, 4] = 1, b, instance, k, c
        paste_ids[b, k] = c * divisor + instance
        if paste_ids[b, k] == void and errors[3, 0] == 0:
            errors[3, 0], errors[3, 1], errors[3, 3] = 1, b, k
        if paste_ids[b, k] > id_max:  # the reference names the largest
            errors[4, 0], errors[4, 2] = 1, max(errors[4, 2], paste_ids[b, k])


@numba.njit(cache=True, nogil=True)
def _table(found_ids, found_remaining, m_count, paste_ids, labels, thing, area, things, divisor,
           void):  # pragma: no cover
    """``panoptic.segment_table``'s arrays ``ids, classes, is_thing, area, valid`` ``[B, M+K]`` and
    ``M`` from each image's segments and remaining areas and the pastes' ids, labels, thing flags
    and areas."""
    b_count, k_count = paste_ids.shape
    ids = np.full((b_count, m_count + k_count), void, np.int64)
    classes = np.full((b_count, m_count + k_count), -1, np.int64)
    is_thing = np.zeros((b_count, m_count + k_count), np.bool_)
    table_area = np.zeros((b_count, m_count + k_count), np.int64)
    for b in range(b_count):
        for m in range(found_ids[b].shape[0]):
            c = found_ids[b][m] // divisor
            ids[b, m], classes[b, m], table_area[b, m] = found_ids[b][m], c, found_remaining[b][m]
            is_thing[b, m] = _slot(things, c) >= 0
        for k in range(k_count):
            ids[b, m_count + k], classes[b, m_count + k] = paste_ids[b, k], labels[b, k]
            is_thing[b, m_count + k], table_area[b, m_count + k] = thing[b, k], area[b, k]
    return ids, classes, is_thing, table_area, table_area > 0, m_count


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
def _copy(source, target):  # pragma: no cover
    """``target[...] = source`` for C-contiguous arrays of one shape, as one flat loop (numba's
    2-d slice assignment ran 7x slower than ``memcpy`` here: 0.15 ms per 512^2 int32 map)."""
    a, c = source.reshape(-1), target.reshape(-1)
    for i in range(a.shape[0]):
        c[i] = a[i]


#: Rows of a box prefetched ahead of the one painted (3 to 16 measured alike).
AHEAD = 8


@numba.njit(cache=True, nogil=True, inline="always")
def _pixels(box, w, h):  # pragma: no cover
    """The pixels ``x0, x1, y0, y1`` a float box ``[4]`` covers, clipped to ``w x h``."""
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    return x0, min(int(np.ceil(box[2])), w), y0, min(int(np.ceil(box[3])), h)


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_rows(pixels, w, flat, plane, row_stride, x0, x1, first, last):  # pragma: no cover
    """Prefetch rows ``first:last``, columns ``x0:x1``, of a map (``pixels``: its flat view, rows
    of ``w``; for writing) and of a mask plane (``flat[plane + y * row_stride + x]``): one hint
    per cache line, none waited for."""
    step = max(64 // pixels.itemsize, 1)
    for y in range(first, last):
        for x in range(y * w + x0, y * w + x1, step):
            _prefetch_write(pixels, np.uint64(x))
        for x in range(plane + y * row_stride + x0, plane + y * row_stride + x1, 64):
            _prefetch_read(flat, np.uint64(x))


@numba.njit(cache=True, nogil=True)
def _paint_box(image, flat, plane, row_stride, box, new, void, ids, lost, missing, seen):  # pragma: no cover
    """Paint ``new`` into ``image`` ``[H, W]`` (C-contiguous) where the mask plane
    (``flat[plane + y * row_stride + x]``, uint8) is set inside ``box`` (float ``[4]``), counting
    in ``lost`` what each segment (``ids``, ascending) loses; an id not in ``ids`` lowers
    ``missing[0]`` to it. Returns the pixels painted.

    Row by row with branch-free (vectorised) loops: how many set pixels hold ``ref``, the id under
    the last set pixel of the row before; when not all of them (12% of the rows of the
    benchmark's pastes: a segment's edge), the same count for the id of the first pixel left
    over, up to ``seen.shape[0]`` ids (``_count_other``); then one masked store paints the row.

    Measured per image on the benchmark's pastes (hard, synthetic), hot: 0.022 ms, against 0.050-
    0.058 for the run-by-run loop this replaces (a branch per pixel, a binary search per run of
    one id: ~640 runs and ~1300 mask edges per image). What it took:

    - no array views and no helper calls in the row loop: each view numba makes (a row, a slice)
      and each call taking arrays is an atomic reference count up and down per array, which
      ``perf`` showed as the hottest instructions (0.033 ms with three views per row); indices
      are unsigned so that numba adds no negative-index wraparound, which kept LLVM from
      vectorising flat signed indices (0.09 ms);
    - the row loop here, not in a function per row (0.07-0.09 ms: numba did not inline it);
    - rows ``AHEAD`` below prefetched, and the next paste's first rows (the map comes cold from
      the caller, the mask planes were written a batch earlier): 0.028-0.032 ms per image with
      the caches evicted first, against 0.039-0.046 without."""
    x0, x1, y0, y1 = _pixels(box, image.shape[1], image.shape[0])
    pixels, w = image.reshape(-1), image.shape[1]
    value = pixels.dtype.type(new)
    ref, ref_slot = pixels.dtype.type(void), -1
    one, n = np.uint64(1), np.uint64(max(x1 - x0, 0))
    step = max(64 // pixels.itemsize, 1)
    painted = 0
    for y in range(y0, y1):
        if y + AHEAD < y1:  # written out: a helper's call counts its arrays' references
            for x in range((y + AHEAD) * w + x0, (y + AHEAD) * w + x1, step):
                _prefetch_write(pixels, np.uint64(x))
            for x in range(plane + (y + AHEAD) * row_stride + x0, plane + (y + AHEAD) * row_stride + x1, 64):
                _prefetch_read(flat, np.uint64(x))
        row, mask = np.uint64(y * w + x0), np.uint64(plane + y * row_stride + x0)
        count, same, i = 0, 0, np.uint64(0)
        while i < n:
            hit = flat[mask + i] != 0
            count += hit
            same += hit & (pixels[row + i] == ref)
            i += one
        if count == 0:
            continue
        painted += count
        if ref_slot >= 0:
            lost[ref_slot] += same
        if same < count:
            seen[0] = ref
            _count_other(pixels, row, flat, mask, n, count - same, void, ids, lost, missing, seen)
            last = n - one
            while flat[mask + last] == 0:
                last -= one
            ref = pixels[row + last]
            ref_slot = -1 if ref == void else _slot(ids, ref)
        i = np.uint64(0)
        while i < n:
            pixels[row + i] = value if flat[mask + i] != 0 else pixels[row + i]
            i += one
    return painted


@numba.njit(cache=True, nogil=True)
def _count_other(pixels, row, flat, mask, n, left, void, ids, lost, missing, seen):  # pragma: no cover
    """Count into ``lost`` the ``left`` set pixels of a row (``pixels[row + i]`` where
    ``flat[mask + i]`` is set, ``i < n``, all unsigned) whose id is not ``seen[0]`` (counted
    already): the id of the first such pixel, then its count in one branch-free pass, for up to
    ``seen.shape[0] - 1`` ids; what remains, pixel by pixel. A missing id lowers ``missing[0]``."""
    one, found = np.uint64(1), 1
    while left > 0:
        if found == seen.shape[0]:  # many ids in one row: pixel by pixel
            i = np.uint64(0)
            while i < n:
                if flat[mask + i] != 0 and _first(pixels[row + i], seen, found) == found:
                    _lose(pixels[row + i], 1, void, ids, lost, missing)
                i += one
            return
        i = np.uint64(0)
        while True:  # the first set pixel of an id not seen: one is there (left > 0)
            if flat[mask + i] != 0:
                value, j = pixels[row + i], 0
                while j < found and seen[j] != value:
                    j += 1
                if j == found:
                    break
            i += one
        other, count = pixels[row + i], 0
        i = np.uint64(0)
        while i < n:
            count += (flat[mask + i] != 0) & (pixels[row + i] == other)
            i += one
        _lose(other, count, void, ids, lost, missing)
        seen[found] = other
        found += 1
        left -= count


@numba.njit(cache=True, nogil=True)
def _first(value, seen, found):  # pragma: no cover
    """The index of ``value`` among ``seen[:found]``, ``found`` when absent."""
    for i in range(found):
        if seen[i] == value:
            return i
    return found


@numba.njit(cache=True, nogil=True)
def _lose(segment, n, void, ids, lost, missing):  # pragma: no cover
    """``n`` pixels of ``segment`` painted over: into ``lost``, or ``missing`` when ``ids`` lacks it."""
    if segment == void:
        return
    slot = _slot(ids, segment)
    if slot < 0:
        missing[0] = min(missing[0], segment)
    else:
        lost[slot] += n


@numba.njit(cache=True, nogil=True)
def _slot(ids, value):  # pragma: no cover
    """Index of ``value`` in ``ids`` (ascending), -1 when absent (a binary search)."""
    lo, hi = 0, ids.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if ids[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < ids.shape[0] and ids[lo] == value else -1


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
