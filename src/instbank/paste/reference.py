"""The torch reference of paste compositing: the specification, and the CPU path.

``instbank.paste.triton_kernel.paste_image`` implements the same function; both must agree (uint8
images within 1 level, masks exactly).

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
    taps (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1); a tap outside [0,S)x[0,S) reads 0 (4 channels)
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
Copy-Paste (Ghiasi et al. 2021, arXiv:2012.07177) does.

This implementation: one host synchronisation reads every paste's target rectangle; then, per
paste, only that rectangle is warped. The bilinear sample is separable (``u`` depends on ``x`` only,
``v`` on ``y`` only), so rows are interpolated first and columns second, in int32, exactly the sum
written above.
"""

from __future__ import annotations

import torch

from instbank.paste.plan import PastePlan

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
ONE = 65536  # 256 * 256: the integer weights of one bilinear sample sum to this
ALPHA_MAX = 255 * ONE
ALPHA_THRESHOLD = 128 * ONE
# Pixels beyond the reach computed in ``_target_rects`` that a float32 rounding could still bring
# into it; two pixels is far more than any rounding of coordinates below 2**22.
RECT_MARGIN = 2


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
    b, _, h, w = images.shape
    k, s = crops.shape[1], crops.shape[-1]
    vrange = default_value_range(images.dtype, value_range)
    raw = torch.zeros((b, k, h, w), dtype=torch.bool, device=images.device)
    if b == 0 or k == 0:
        return images.clone(), raw
    # copy=True: float32 images would otherwise be blended in place; preserve_format keeps
    # channels_last
    out = images.to(torch.float32, copy=True)
    keep = None if padding_mask is None else ~padding_mask.to(torch.bool)
    padded = _pad_crops(crops)
    rects = _target_rects(plan, s, h, w)
    for bi, ki, x0, y0, x1, y1 in rects:
        _paste_one(out, raw, padded, plan, keep, vrange, bi, ki, (x0, y0, x1, y1), s)
    return _to_dtype(out, images.dtype), visible_masks(raw)


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
    for name, t in (("crops", crops), ("plan.translate", plan.translate), ("padding_mask", padding_mask)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} is on {t.device} but images are on {images.device}")


def visible_masks(raw: torch.Tensor) -> torch.Tensor:
    """``vis_k = raw_k & ~(raw_{k+1} | ... | raw_{K-1})`` for bool ``[B, K, H, W]``."""
    later = raw.flip(1).to(torch.uint8).cummax(dim=1).values.flip(1)  # later[k] = OR of raw[k:]
    covered = torch.zeros_like(raw)
    covered[:, :-1] = later[:, 1:].to(torch.bool)
    return raw & ~covered


def _pad_crops(crops: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, K, 4, S+2, S+2]``: a ring of zeros, so clamped out-of-canvas taps read 0."""
    return torch.nn.functional.pad(crops.to(torch.int32), (1, 1, 1, 1))


def _target_rects(plan: PastePlan, s: int, h: int, w: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(b, k, x0, y0, x1, y1)`` of every applied paste whose reach meets the image (one sync).

    A paste reaches pixel ``x`` when a tap can be inside the canvas: ``uf`` in ``[-1, S)``, i.e. the
    pixel centre within ``[tx - scale/2, tx + (S + 1/2)*scale)`` (the flip mirrors this interval
    onto itself); ``RECT_MARGIN`` covers float32 rounding.
    """
    scale = 1.0 / plan.inv_scale.double()  # bounds only: the pixels are computed as the spec says
    lo = plan.translate.double() - 0.5 * scale[..., None] - 0.5
    hi = plan.translate.double() + (s + 0.5) * scale[..., None] - 0.5
    x0 = (lo[..., 0].floor() - RECT_MARGIN).clamp(0, w)
    y0 = (lo[..., 1].floor() - RECT_MARGIN).clamp(0, h)
    x1 = (hi[..., 0].ceil() + RECT_MARGIN + 1).clamp(0, w)
    y1 = (hi[..., 1].ceil() + RECT_MARGIN + 1).clamp(0, h)
    bi, ki = torch.meshgrid(
        torch.arange(plan.apply.shape[0], device=scale.device),
        torch.arange(plan.apply.shape[1], device=scale.device),
        indexing="ij",
    )
    table = torch.stack([bi.double(), ki.double(), x0, y0, x1, y1], dim=-1)
    take = plan.apply & (x1 > x0) & (y1 > y0)
    rows = table[take].long().tolist()  # row-major: for each b, k in increasing order
    return [tuple(r) for r in rows]


def _axis_taps(start: int, stop: int, t: torch.Tensor, inv: torch.Tensor, flip, s: int):
    """Indices of both taps into the padded crop and their integer weights,
    ``(i0, i1, w0, w1)``, for pixel coordinates ``start..stop-1`` along one axis (float32 op order
    of the spec). A tap outside ``[0, S)`` is clamped to -1 or S, then shifted by +1 onto the
    zero ring."""
    pos = torch.arange(start, stop, device=t.device, dtype=torch.float32) + 0.5
    u = (pos - t) * inv
    if flip is not None:
        u = torch.where(flip, float(s) - u, u)
    uf = u - 0.5
    i0 = torch.floor(uf)
    frac = torch.floor((uf - i0) * 256.0).clamp(0, 255).to(torch.int32)
    first = i0.clamp(-1, s).to(torch.int64)
    second = (i0 + 1).clamp(-1, s).to(torch.int64)
    return first + 1, second + 1, 256 - frac, frac


def _paste_one(out, raw, padded, plan, keep, vrange, bi, ki, rect, s) -> None:
    """Blend paste ``(bi, ki)`` into ``out[bi]`` over ``rect`` and write its raw mask."""
    x0, y0, x1, y1 = rect
    inv = plan.inv_scale[bi, ki]
    xa, xb, wx0, wx1 = _axis_taps(x0, x1, plan.translate[bi, ki, 0], inv, plan.flip[bi, ki], s)
    ya, yb, wy0, wy1 = _axis_taps(y0, y1, plan.translate[bi, ki, 1], inv, None, s)
    crop = padded[bi, ki]  # [4, S+2, S+2] int32
    top, bottom = crop[:, ya], crop[:, yb]  # rows y0 and y0+1: [4, h, S+2]
    row0 = top[:, :, xa] * wx0 + top[:, :, xb] * wx1  # [4, h, w], <= 255*256
    row1 = bottom[:, :, xa] * wx0 + bottom[:, :, xb] * wx1
    total = row0 * wy0[:, None] + row1 * wy1[:, None]  # int32 [4, h, w], <= 255*65536
    a = total[3]
    inside = a >= ALPHA_THRESHOLD
    alpha = a.to(torch.float32) / float(ALPHA_MAX)
    if keep is not None:
        region = keep[bi, y0:y1, x0:x1]
        inside &= region
        alpha = torch.where(region, alpha, 0.0)
    rgb = total[:3].to(torch.float32) / float(ONE)
    target = out[bi, :, y0:y1, x0:x1]
    target.copy_(target * (1.0 - alpha) + (rgb * (vrange / 255.0)) * alpha)
    raw[bi, ki, y0:y1, x0:x1] = inside


def _to_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)
    return out.to(dtype)
