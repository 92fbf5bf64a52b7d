"""Triton (CUDA) twins of the targets beyond masks: keypoint visibility
(``instbank.paste.keypoints``), painting the panoptic (or semantic) map
(``instbank.paste.panoptic``), and the resampling of in-batch objects into crops
(``instbank.paste.inbatch``). Same arguments and results as their torch references (integers
and comparisons only, or float32 in the reference's op order with ``enable_fp_fusion=False``:
exact); tested against them under ``TRITON_INTERPRET=1`` (``tests/test_paste_*.py``), and on a GPU
when one is there.

Why kernels for such small work: each replaces 10-30 torch launches (each ~5-10 us of launch
overhead on the GPU, more than the work) by one, and the paint kernel reads each visible mask
plane once where torch's ``any`` + ``argmax`` + ``gather`` + ``where`` read them twice and write
two temporaries the size of the map.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the platform
    raise ImportError(
        "instbank.paste.triton_targets needs triton (Linux x86-64 with a CUDA GPU): "
        "pip install 'instbank[triton]', or use the torch reference (impl='torch')"
    ) from exc

from instbank.paste.panoptic import map_output

# No FMA contraction: float32 coordinates must round one operation at a time, as in torch.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
BLOCK_POINTS = 128
BLOCK_PIXELS = 1024


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it ``device`` (cuda:1 under DDP, say)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# keypoints


@triton.jit(do_not_specialize=["N", "K", "J", "P", "H", "W"])
def _keypoint_kernel(pt_ptr, out_ptr, mask_ptr, pad_ptr, drop_ptr, N, K, J, P, H, W,
                     s_mb, s_mk, s_mh, s_mw, s_pb, s_ph, s_pw,
                     HAS_PADDING: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``BLOCK`` of the ``P = (N+K) * J`` keypoints of image ``program_id(1)``."""
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < P
    row = b * P * 3 + idx.to(tl.int64) * 3
    x = tl.load(pt_ptr + row, mask=live, other=0.0)
    y = tl.load(pt_ptr + row + 1, mask=live, other=0.0)
    v = tl.load(pt_ptr + row + 2, mask=live, other=0.0)
    labeled = live & (v > 0)
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    px = tl.where(inside, tl.floor(x), 0.0).to(tl.int64)
    py = tl.where(inside, tl.floor(y), 0.0).to(tl.int64)
    if HAS_PADDING:
        pad = tl.load(pad_ptr + b * s_pb + py * s_ph + px * s_pw, mask=labeled & inside, other=0)
        inside = inside & (pad == 0)
    layer = idx // J - N  # the row's paste, negative for existing instances
    covered = tl.zeros((BLOCK,), tl.int1)
    for k in range(K):
        look = labeled & inside & (k > layer)
        hit = tl.load(mask_ptr + b * s_mb + k * s_mk + py * s_mh + px * s_mw, mask=look, other=0)
        covered = covered | (hit != 0)
    keep = labeled & inside
    v_out = tl.where(covered, tl.minimum(v, 1.0), v)
    tl.store(out_ptr + row, tl.where(keep, x, tl.where(labeled, 0.0, x)), mask=live)
    tl.store(out_ptr + row + 1, tl.where(keep, y, tl.where(labeled, 0.0, y)), mask=live)
    tl.store(out_ptr + row + 2, tl.where(keep, v_out, tl.where(labeled, 0.0, v)), mask=live)
    lost = (labeled & ~inside & (layer < 0)).to(tl.int64)
    tl.atomic_add(drop_ptr + b, tl.sum(lost, axis=0))


def keypoints_after_paste(existing, crop_keypoints, keypoint_flip, plan, paste_masks, padding_mask=None):
    """As ``instbank.paste.keypoints.keypoints_after_paste``: rule 1 in torch (a few operations on
    ``B x K x J`` values, shared with the reference), rules 2-4 in one launch."""
    from instbank.paste.keypoints import paste_keypoints

    points = torch.cat([existing.to(torch.float32), paste_keypoints(crop_keypoints, keypoint_flip, plan)], dim=1)
    return keypoint_visibility(points, existing.shape[1], paste_masks, padding_mask)


def keypoint_visibility(points: torch.Tensor, n: int, paste_masks: torch.Tensor,
                        padding_mask: torch.Tensor | None = None):
    """As ``instbank.paste.keypoints.keypoint_visibility``: one launch."""
    b, p, j, _ = points.shape
    k, h, w = paste_masks.shape[1:]
    source = points.to(torch.float32).contiguous()
    out = torch.empty_like(source)
    dropped = torch.zeros(b, dtype=torch.int64, device=points.device)
    if b == 0 or p * j == 0:
        return out, dropped
    planes = paste_masks.view(torch.uint8) if paste_masks.dtype == torch.bool else paste_masks
    if padding_mask is None:
        pad, pad_strides = dropped, (0, 0, 0)  # never read
    else:
        pad = padding_mask.to(torch.bool).view(torch.uint8)
        pad_strides = pad.stride()
    grid = (triton.cdiv(p * j, BLOCK_POINTS), b)
    with _on(points.device):
        _keypoint_kernel[grid](source, out, planes, pad, dropped, n, k, j, p * j, h, w, *planes.stride(), *pad_strides,
                               HAS_PADDING=padding_mask is not None, BLOCK=BLOCK_POINTS, **LAUNCH_OPTIONS)
    return out, dropped


# ------------------------------------------------------------------------------------------------
# panoptic and semantic maps


@triton.jit(do_not_specialize=["K", "HW"])
def _paint_kernel(map_ptr, out_ptr, mask_ptr, ids_ptr, K, HW, W, s_mb, s_mk, s_mh, s_mw, BLOCK: tl.constexpr):
    """One program: ``BLOCK`` pixels of image ``program_id(1)``; each takes the id of the paste
    whose visible mask holds it (at most one does), else keeps its own."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = p < HW
    y = (p // W).to(tl.int64)
    x = (p % W).to(tl.int64)
    value = tl.load(map_ptr + b * HW + p, mask=live, other=0)
    for k in range(K):
        hit = tl.load(mask_ptr + b * s_mb + k * s_mk + y * s_mh + x * s_mw, mask=live, other=0)
        value = tl.where(hit != 0, tl.load(ids_ptr + b * K + k), value)
    tl.store(out_ptr + b * HW + p, value, mask=live)


def paint_map(panoptic: torch.Tensor, paste_masks: torch.Tensor, paste_ids: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``instbank.paste.annotations.paint_semantic``: one launch, each mask plane read once;
    into ``out`` (contiguous, like ``panoptic``; ``panoptic`` itself paints in place: each pixel is
    read and written by the same program) when given."""
    b, k, h, w = paste_masks.shape
    source, out = map_output(panoptic, out, "the Triton paint kernel")
    if source.numel() == 0:
        return out
    planes = paste_masks.view(torch.uint8) if paste_masks.dtype == torch.bool else paste_masks
    ids = paste_ids.to(device=panoptic.device, dtype=panoptic.dtype).contiguous()
    grid = (triton.cdiv(h * w, BLOCK_PIXELS), b)
    with _on(panoptic.device):
        _paint_kernel[grid](source, out, planes, ids, k, h * w, w, *planes.stride(), BLOCK=BLOCK_PIXELS,
                            **LAUNCH_OPTIONS)
    return out


# ------------------------------------------------------------------------------------------------
# in-batch objects


@triton.jit
def _sample_tap(c, sub, offset, inv_scale, start, size):
    """``inbatch._axis_taps`` for crop pixels ``c`` (int32) and the sample offset ``sub`` (float32):
    the two taps clamped into ``[0, size)`` (int64), weights and mask weights (0 outside), int32."""
    u = c.to(tl.float32) + sub
    coord = (u - offset) * inv_scale + start
    xf = coord - 0.5
    first = tl.floor(xf)
    frac = tl.minimum(tl.maximum(tl.floor((xf - first) * 256.0), 0.0), 255.0).to(tl.int32)
    tap = tl.minimum(tl.maximum(first, -2.0), size + 1.0).to(tl.int64)
    w0 = 256 - frac
    m0 = tl.where((tap >= 0) & (tap < size), w0, 0)
    m1 = tl.where((tap + 1 >= 0) & (tap + 1 < size), frac, 0)
    a = tl.minimum(tl.maximum(tap, 0), size - 1)
    b = tl.minimum(tl.maximum(tap + 1, 0), size - 1)
    return a, b, w0, frac, m0, m1


@triton.jit(do_not_specialize=["K", "S", "H", "W"])
def _resample_kernel(img_ptr, mask_ptr, crop_ptr, src_ptr, inst_ptr, box_ptr, inv_ptr, off_ptr, K, S, H, W,
                     s_ib, s_ic, s_ih, s_iw, s_mb, s_mk, s_mh, s_mw, N: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``BLOCK`` pixels of the crop of object ``program_id(1)`` (``b * K + k``)."""
    bk = tl.program_id(1).to(tl.int64)
    b = bk // K
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = p < S * S
    cy = p // S
    cx = p % S
    instance = tl.load(inst_ptr + bk)
    src = tl.load(src_ptr + b)
    present = (tl.zeros((BLOCK,), tl.int64) + instance) >= 0  # a block: the interpreter masks with blocks only
    ox = tl.load(off_ptr + 2 * bk)
    oy = tl.load(off_ptr + 2 * bk + 1)
    inv = tl.load(inv_ptr + bk)
    bx = tl.load(box_ptr + 4 * bk)
    by = tl.load(box_ptr + 4 * bk + 1)
    image = img_ptr + src * s_ib
    plane = mask_ptr + src * s_mb + tl.maximum(instance, 0) * s_mk
    load = live & present
    r = tl.zeros((BLOCK,), tl.int32)
    g = tl.zeros((BLOCK,), tl.int32)
    bl = tl.zeros((BLOCK,), tl.int32)
    m = tl.zeros((BLOCK,), tl.int32)
    for j in tl.static_range(N):
        ya, yb, wya, wyb, mya, myb = _sample_tap(cy, (2 * j + 1) / (2 * N), oy, inv, by, H)
        for i in tl.static_range(N):
            xa, xb, wxa, wxb, mxa, mxb = _sample_tap(cx, (2 * i + 1) / (2 * N), ox, inv, bx, W)
            for c in tl.static_range(3):
                at = image + c * s_ic
                p00 = tl.load(at + ya * s_ih + xa * s_iw, mask=load, other=0).to(tl.int32)
                p10 = tl.load(at + ya * s_ih + xb * s_iw, mask=load, other=0).to(tl.int32)
                p01 = tl.load(at + yb * s_ih + xa * s_iw, mask=load, other=0).to(tl.int32)
                p11 = tl.load(at + yb * s_ih + xb * s_iw, mask=load, other=0).to(tl.int32)
                value = (p00 * wxa + p10 * wxb) * wya + (p01 * wxa + p11 * wxb) * wyb
                if c == 0:
                    r += value
                elif c == 1:
                    g += value
                else:
                    bl += value
            q00 = (tl.load(plane + ya * s_mh + xa * s_mw, mask=load, other=0) != 0).to(tl.int32)
            q10 = (tl.load(plane + ya * s_mh + xb * s_mw, mask=load, other=0) != 0).to(tl.int32)
            q01 = (tl.load(plane + yb * s_mh + xa * s_mw, mask=load, other=0) != 0).to(tl.int32)
            q11 = (tl.load(plane + yb * s_mh + xb * s_mw, mask=load, other=0) != 0).to(tl.int32)
            m += (q00 * mxa + q10 * mxb) * mya + (q01 * mxa + q11 * mxb) * myb
    half = N * N * 32768
    unit = N * N * 65536
    out = crop_ptr + bk * 4 * S * S + p
    zero = tl.zeros((BLOCK,), tl.int32)
    tl.store(out, tl.where(present, (r + half) // unit, zero).to(tl.uint8), mask=live)
    tl.store(out + S * S, tl.where(present, (g + half) // unit, zero).to(tl.uint8), mask=live)
    tl.store(out + 2 * S * S, tl.where(present, (bl + half) // unit, zero).to(tl.uint8), mask=live)
    tl.store(out + 3 * S * S, tl.where(present, (255 * m + half) // unit, zero).to(tl.uint8), mask=live)


def resample_objects(images, masks, draw, geometry, s: int, sampling_ratio: int = 2) -> torch.Tensor:
    """As ``instbank.paste.inbatch.resample_objects``: one launch for every object."""
    from instbank.paste.inbatch import check_sampling_ratio

    check_sampling_ratio(sampling_ratio)
    b, k = draw.source_instance.shape
    h, w = images.shape[-2:]
    crops = torch.empty((b, k, 4, s, s), dtype=torch.uint8, device=images.device)
    if b * k == 0 or h * w == 0:
        return crops.zero_()
    planes = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    box, _, inv_scale, offset = (t.to(torch.float32).contiguous() for t in geometry)
    grid = (triton.cdiv(s * s, BLOCK_PIXELS), b * k)
    with _on(images.device):
        _resample_kernel[grid](images, planes, crops, draw.source_image.contiguous(), draw.source_instance.contiguous(),
                               box, inv_scale, offset, k, s, h, w, *images.stride(), *planes.stride(),
                               N=sampling_ratio, BLOCK=BLOCK_PIXELS, **LAUNCH_OPTIONS)
    return crops
