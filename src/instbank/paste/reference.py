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
``v`` on ``y`` only): the horizontal sums ``a00*wx0 + a10*wx1`` are two row gathers of the
transposed crop, the vertical ones two row gathers of their transpose, all in float32 on integer
values below 2**24, hence exact (the int32 sums of the spec, bit for bit). Visible masks are then
written front to back inside the same rectangles.
"""

from __future__ import annotations

import itertools

import torch

from instbank.paste.plan import PastePlan, tight_boxes

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
ONE = 65536  # 256 * 256: the integer weights of one bilinear sample sum to this
ALPHA_MAX = 255 * ONE
ALPHA_THRESHOLD = 128 * ONE
# Pixels beyond the reach computed in ``_paste_windows`` that a float32 rounding could still bring
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
    visible = torch.zeros((b, k, h, w), dtype=torch.bool, device=images.device)
    result = images.clone()  # images without pastes are final: floor(x + 0.5) = x, cast(x) = x
    if b == 0 or k == 0:
        return result, visible
    keep = None if padding_mask is None else ~padding_mask.to(torch.bool)
    table, rows = _paste_windows(plan, crops, h, w)
    if not rows:
        return result, visible
    # one image's float32 accumulator, reused: a fresh [B, 3, H, W] float32 buffer per call cost
    # more in page faults than the blending (glibc returns large blocks to the OS on free)
    canvas = torch.empty_like(images[0], dtype=torch.float32)
    taps_x, taps_y = _all_taps(plan, table, rows, s)
    raws = []
    for bi, group in itertools.groupby(enumerate(rows), key=lambda item: item[1][0]):  # rows by image
        canvas.copy_(images[bi])
        region = None if keep is None else keep[bi]
        for j, (_, ki, *rect_and_window) in group:
            rect, window = rect_and_window[:4], rect_and_window[4:]
            tx, ty = [v[j] for v in taps_x], [v[j] for v in taps_y]
            raws.append((bi, ki, rect, _paste_one(canvas, crops[bi, ki], tx, ty, region, vrange, rect, window)))
        _store(result[bi], canvas, vrange)
    _write_visible(visible, raws)
    return result, visible


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
    """The spec's ``vis_k = raw_k & ~(raw_{k+1} | ... | raw_{K-1})`` over whole bool masks
    ``[B, K, H, W]`` (``paste_image`` applies it inside each paste's rectangle instead); front to
    back, one pass per paste (``cummax`` over K was 50x slower on CPU)."""
    visible = torch.empty_like(raw)
    covered = torch.zeros_like(raw[:, 0])
    for k in reversed(range(raw.shape[1])):
        torch.logical_and(raw[:, k], ~covered, out=visible[:, k])
        covered |= raw[:, k]
    return visible


def _write_visible(visible: torch.Tensor, raws: list) -> None:
    """``visible_masks`` restricted to each paste's rectangle: front to back over ``raws``
    (``(b, k, rect, raw mask of the rect)`` in back-to-front order)."""
    b, _, h, w = visible.shape
    covered = torch.zeros((b, h, w), dtype=torch.bool, device=visible.device)
    for bi, ki, (x0, y0, x1, y1), raw in reversed(raws):
        region = covered[bi, y0:y1, x0:x1]
        visible[bi, ki, y0:y1, x0:x1] = raw & ~region
        region |= raw


def _paste_windows(plan: PastePlan, crops: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, list]:
    """Every applied paste that can change a pixel, as rows ``(b, k, x0, y0, x1, y1, cx0, cy0,
    cx1, cy1)``: int64 ``[P, 10]`` on the device and the same as a list (one host sync).

    Outside the box of the crop's non-zero alpha (its support) every tap reads alpha 0, so a
    target pixel whose taps all fall outside it keeps its value and is not in the mask. The target
    rect ``(x0, y0, x1, y1)`` holds every pixel with a tap in the support ``[cx0, cx1)``: ``uf`` in
    ``[cx0 - 1, cx1)``, i.e. the pixel centre within ``tx + [cx0 - 1/2, cx1 + 1/2) * scale``
    (mirrored to ``S - cx1 .. S - cx0`` when flipped); ``RECT_MARGIN`` covers float32 rounding.
    The crop window read is the support grown by one pixel (clamped to the canvas): a pixel with
    one tap in the support takes the RGB of its other tap, next to it; a pixel with a tap further
    out has alpha 0 and keeps its value whatever RGB it reads.
    """
    s = crops.shape[-1]
    support = tight_boxes(crops[:, :, 3] > 0).double()  # [B, K, 4] crop pixels
    flip = plan.flip
    lo_x = torch.where(flip, s - support[..., 2], support[..., 0])
    hi_x = torch.where(flip, s - support[..., 0], support[..., 2])
    scale = 1.0 / plan.inv_scale.double()  # bounds only: the pixels are computed as the spec says
    t = plan.translate.double()
    x0 = (t[..., 0] + (lo_x - 0.5) * scale - 0.5).floor() - RECT_MARGIN
    y0 = (t[..., 1] + (support[..., 1] - 0.5) * scale - 0.5).floor() - RECT_MARGIN
    x1 = (t[..., 0] + (hi_x + 0.5) * scale - 0.5).ceil() + RECT_MARGIN + 1
    y1 = (t[..., 1] + (support[..., 3] + 0.5) * scale - 0.5).ceil() + RECT_MARGIN + 1
    rect = torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], dim=-1)
    b_idx, k_idx = torch.meshgrid(
        torch.arange(flip.shape[0], device=flip.device), torch.arange(flip.shape[1], device=flip.device), indexing="ij"
    )
    grown = torch.cat([(support[..., :2] - 1).clamp(min=0), (support[..., 2:] + 1).clamp(max=s)], dim=-1)
    table = torch.cat([b_idx[..., None].double(), k_idx[..., None].double(), rect, grown], dim=-1)
    nonempty = (rect[..., 2] > rect[..., 0]) & (rect[..., 3] > rect[..., 1]) & (support[..., 2] > support[..., 0])
    table = table[plan.apply & nonempty].long()  # row-major: b, then k increasing
    return table, table.tolist()


def _all_taps(plan: PastePlan, table: torch.Tensor, rows: list, s: int) -> tuple:
    """Bilinear taps of every paste (``table``/``rows`` from ``_paste_windows``), x then y, each
    ``(i0, i1, w0, w1)`` of shape ``[P, n]`` padded to the widest (tallest) rect, at most the
    image's width (height)."""
    b, k = table[:, 0], table[:, 1]
    inv = plan.inv_scale[b, k]
    width = max(r[4] - r[2] for r in rows)
    height = max(r[5] - r[3] for r in rows)
    taps_x = _axis_taps(table[:, 2], width, plan.translate[b, k, 0], inv, plan.flip[b, k], s, table[:, 6], table[:, 8])
    taps_y = _axis_taps(table[:, 3], height, plan.translate[b, k, 1], inv, None, s, table[:, 7], table[:, 9])
    return taps_x, taps_y


def _axis_taps(start, count, t, inv, flip, s, c0, c1) -> tuple:
    """For paste ``p`` and target pixel ``start[p] + j`` along one axis: the taps ``i0``, ``i0 + 1``
    as int64 indices into the crop window ``[c0, c1)`` and their float32 weights ``256 - f``, ``f``
    (float32 op order of the spec). A tap outside the window reads 0: its weight is set to 0 and
    its index clamped into the window (see ``_paste_windows`` for why the window suffices)."""
    pos = start[:, None].to(torch.float32) + torch.arange(count, device=start.device, dtype=torch.float32)
    u = ((pos + 0.5) - t[:, None]) * inv[:, None]
    if flip is not None:
        u = torch.where(flip[:, None], float(s) - u, u)
    uf = u - 0.5
    i0 = torch.floor(uf)
    frac = torch.floor((uf - i0) * 256.0).clamp(0, 255)
    lo = c0[:, None].to(torch.float32)
    hi = c1[:, None].to(torch.float32)
    w0 = torch.where((i0 >= lo) & (i0 < hi), 256.0 - frac, 0.0)
    w1 = torch.where((i0 + 1 >= lo) & (i0 + 1 < hi), frac, 0.0)
    top = hi - lo - 1
    first = torch.minimum((i0 - lo).clamp(min=0), top)
    second = torch.minimum((i0 + 1 - lo).clamp(min=0), top)
    return first.long(), second.long(), w0, w1


def _paste_one(canvas, crop, taps_x, taps_y, keep, vrange, rect, window) -> torch.Tensor:
    """Blend one crop ``[4, S, S]`` into ``canvas`` (float32 ``[3, H, W]``) over ``rect``; returns
    its raw mask there (``keep``: bool ``[H, W]``, False = padding, or None).

    ``a00*wx0 + a10*wx1`` for every crop row: two row gathers of the transposed window; then the
    same along y on its transpose. Values stay integers below 2**24 in float32: exact.
    """
    x0, y0, x1, y1 = rect
    cx0, cy0, cx1, cy1 = window
    xa, xb, wx0, wx1 = (v[: x1 - x0] for v in taps_x)
    ya, yb, wy0, wy1 = (v[: y1 - y0] for v in taps_y)
    columns = crop[:, cy0:cy1, cx0:cx1].transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    across = columns.index_select(1, xa).mul_(wx0[:, None]).add_(columns.index_select(1, xb).mul_(wx1[:, None]))
    rows = across.transpose(1, 2).contiguous()  # [4, window height, w], integers <= 255 * 256
    total = rows.index_select(1, ya).mul_(wy0[:, None]).add_(rows.index_select(1, yb).mul_(wy1[:, None]))
    a = total[3]  # [h, w], integers <= 255 * 65536
    inside = a >= ALPHA_THRESHOLD
    alpha = a / float(ALPHA_MAX)
    if keep is not None:
        region = keep[y0:y1, x0:x1]
        inside &= region
        alpha = torch.where(region, alpha, 0.0)
    # rgb / 65536 * (value_range / 255): dividing by 2**16 is exact, so one multiply does both
    colour = total[:3].mul_(vrange / 255.0 / ONE).mul_(alpha)
    canvas[:, y0:y1, x0:x1].mul_(1.0 - alpha).add_(colour)  # not addcmul: its FMA rounds differently
    return inside


def _store(target: torch.Tensor, canvas: torch.Tensor, vrange: float) -> None:
    """The spec's final conversion of ``canvas`` into ``target`` (the image's dtype), in place.

    For uint8, ``floor(out + 0.5)`` clamped to ``[0, 255]`` is the truncating float -> uint8 copy
    of ``clamp(out + 0.5, 0, 255)``: the two agree on every value, with one pass less. With
    ``value_range <= 255`` every blend is a convex combination of values in ``[0, 255]`` (up to a
    rounding far below 0.5), so the clamp is needed only for larger value ranges.
    """
    if target.dtype == torch.uint8:
        canvas.add_(0.5)
        if vrange > 255:
            canvas.clamp_(0, 255)
    target.copy_(canvas)
