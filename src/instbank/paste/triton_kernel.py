"""Triton paste kernel: composites all K bank crops into each target image in one launch.

Same signature, outputs and math as the torch reference (``instbank.paste.reference``, whose module
docstring is the specification): integer bilinear taps with 8-bit fractional weights (alpha taps
outside the crop canvas read 0, RGB taps read the pixel clamped to its edge), the mask threshold
``A >= 128 * 65536`` on the exact int32 alpha sum, float32 alpha blending, back to front.

Design (one program = one ``BLOCK_H x BLOCK_W`` tile of one image, all K pastes):

- **One pass, front to back.** The spec composites back to front
  (``out = out * (1 - a_k) + c_k * a_k`` for ``k = 0..K-1``). The same sum is computed here in
  reverse order, ``k = K-1..0``, keeping the transmittance ``T = prod_{j>k} (1 - a_j)``:
  ``acc += T * c_k * a_k; T *= 1 - a_k; out = acc + T * image``. That lets one loop also produce the
  visible masks, ``vis_k = raw_k & ~(raw_{k+1} | ... )``, with a running ``covered`` mask in
  registers, so every crop tap is read once, the image is read and written once and each mask plane
  is written once (no second pass re-reading raw masks). The colour differs from the forward order
  only by float32 rounding (far below the 1-level tolerance); the masks are exact (integers).
- **Rectangle culling.** A paste reaches only target pixels whose crop coordinate lies in
  ``[-0.5, S + 0.5]`` (some tap inside the canvas); each program tests its tile against that
  rectangle (widened by 2 pixels against float32 rounding) with scalar math and, when it misses,
  only writes zeros into that paste's mask tile. On a 1024x1024 target with S=128 crops at scale
  ~1, a paste meets at most 27 of the 1024 tiles (3 x 9 tiles of 64 x 16), under 3 %.
- **Bit-identical coordinates.** ``u, v`` and the fractional weights follow the spec's exact float32
  op sequence; the launch passes ``enable_fp_fusion=False`` because ``S - d * inv_scale`` (the flip)
  would otherwise be contracted into an FMA on the GPU and round differently from torch.
- **64-bit offsets.** Image, crop and mask offsets are computed in int64: the mask tensor alone,
  ``B*K*H*W`` bytes, passes 2**31 at 64 images of 1024x1024 with K=32. All tensors are addressed
  through their strides, so channels_last and non-contiguous views (e.g. the RGBA planes of a packed
  ``[B, K, 5, S, S]`` tensor) work.
- **No host synchronisation.** Only shapes steer the Python code; ``apply`` and the geometry are read
  in the kernel.

Tile size 16x64 (1024 pixels, 8 warps: 4 pixels per thread): rows of 64 keep mask stores 64-byte
coalesced and float32 image rows 256 bytes; the tile is small enough that culling is effective.
Traffic per image at 1024x1024, K=8, uint8: 3 MB image read + 3 MB written + 8 MB of masks written
(the masks dominate) + the crop taps (cached). These choices are not measured yet: no GPU was lent
when this was written (tests run under the Triton interpreter).
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the platform
    raise ImportError(
        "instbank.paste.triton_kernel needs triton (Linux x86-64 with a CUDA GPU): "
        "pip install 'instbank[triton]', or use the torch reference (impl='torch')"
    ) from exc

from instbank.paste.plan import PastePlan
from instbank.paste.reference import ONE, check_inputs, default_value_range

BLOCK_H = 16
BLOCK_W = 64
# No FMA contraction: the spec's coordinate ops must round one by one, as torch does (see above).
LAUNCH_OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}


@triton.jit
def _bilinear_sum(ptr, row0, row1, col0, col1, m00, m10, m01, m11, wx0, wx1, wy0, wy1):
    """Integer bilinear sum of one uint8 crop plane: int32 ``[BLOCK_H, BLOCK_W]``, 0..255*65536.

    ``row*``/``col*`` are 1-D offsets (int64) of the two tap rows/columns, ``m**`` the masks of the
    four taps (a masked tap reads 0), ``w**`` the 1-D integer weights (each pair sums to 256).
    """
    r0 = row0[:, None]
    r1 = row1[:, None]
    c0 = col0[None, :]
    c1 = col1[None, :]
    p00 = tl.load(ptr + r0 + c0, mask=m00, other=0).to(tl.int32)
    p10 = tl.load(ptr + r0 + c1, mask=m10, other=0).to(tl.int32)
    p01 = tl.load(ptr + r1 + c0, mask=m01, other=0).to(tl.int32)
    p11 = tl.load(ptr + r1 + c1, mask=m11, other=0).to(tl.int32)
    top = p00 * wx0[None, :] + p10 * wx1[None, :]
    bottom = p01 * wx0[None, :] + p11 * wx1[None, :]
    return top * wy0[:, None] + bottom * wy1[:, None]


@triton.jit
def _taps_1d(u):
    """Spec's per-axis tap math on the continuous crop coordinate ``u`` (float32, flip applied).

    Returns ``(i0, frac)``: the int32 left/top tap index and its 8-bit fraction 0..255. The index is
    clamped to ``[-2, 2**20]`` only to keep the int conversion defined for far-away pixels; a
    clamped index leaves both taps outside any canvas (S < 2**20), as the unclamped one did.
    """
    uf = u - 0.5
    i0f = tl.floor(uf)
    frac = tl.floor((uf - i0f) * 256.0)
    frac = tl.minimum(tl.maximum(frac, 0.0), 255.0).to(tl.int32)
    i0 = tl.minimum(tl.maximum(i0f, -2.0), 1048576.0).to(tl.int32)
    return i0, frac


@triton.jit
def _clamp_tap(i, S):
    """int64 tap index ``i`` (int32) clamped to the canvas ``[0, S - 1]``."""
    return tl.minimum(tl.maximum(i, 0), S - 1).to(tl.int64)


# K, S and tiles_w vary per call; not specialising on them avoids a recompile per value.
@triton.jit(do_not_specialize=["K", "S", "tiles_w"])
def _paste_kernel(
    img_ptr,
    out_ptr,
    crop_ptr,
    mask_ptr,
    pad_ptr,
    apply_ptr,
    inv_scale_ptr,
    translate_ptr,
    flip_ptr,
    K,
    H,
    W,
    S,
    tiles_w,
    rgb_gain,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    s_ob,
    s_oc,
    s_oh,
    s_ow,
    s_cb,
    s_ck,
    s_cc,
    s_cy,
    s_cx,
    s_pb,
    s_ph,
    s_pw,
    HAS_PADDING: tl.constexpr,
    OUT_UINT8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tile_y0 = (tile // tiles_w) * BLOCK_H
    tile_x0 = (tile % tiles_w) * BLOCK_W
    ys = (tile_y0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    xs = (tile_x0 + tl.arange(0, BLOCK_W)).to(tl.int64)
    inside = (ys[:, None] < H) & (xs[None, :] < W)
    # x + 0.5 is exact in float32 for any image width below 2**23.
    xc = xs.to(tl.float32) + 0.5
    yc = ys.to(tl.float32) + 0.5
    size_f = S * 1.0

    if HAS_PADDING:
        padded = tl.load(pad_ptr + b * s_pb + ys[:, None] * s_ph + xs[None, :] * s_pw, mask=inside, other=0)
        open_px = padded == 0
    else:
        open_px = tl.full((BLOCK_H, BLOCK_W), 1, tl.int1)

    acc_r = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    acc_g = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    acc_b = tl.zeros((BLOCK_H, BLOCK_W), tl.float32)
    transmit = tl.full((BLOCK_H, BLOCK_W), 1.0, tl.float32)
    covered = tl.full((BLOCK_H, BLOCK_W), 0, tl.int1)
    mask_px = ys[:, None] * W + xs[None, :]

    for step in range(K):
        k = K - 1 - step
        bk = b * K + k
        mask_tile = mask_ptr + bk * H * W + mask_px
        apply = tl.load(apply_ptr + bk) != 0
        inv = tl.load(inv_scale_ptr + bk)
        # Bounds only (a divide is approximate on the GPU; 2 pixels of margin absorb it): the
        # pixels themselves are mapped with inv_scale, as in the reference.
        scale = 1.0 / inv
        t_x = tl.load(translate_ptr + 2 * bk)
        t_y = tl.load(translate_ptr + 2 * bk + 1)
        # Target pixels whose crop coordinate lies in [-0.5, S + 0.5] (flip maps that onto itself).
        reach_lo_x = t_x - 0.5 * scale - 2.0
        reach_hi_x = t_x + (size_f + 0.5) * scale + 2.0
        reach_lo_y = t_y - 0.5 * scale - 2.0
        reach_hi_y = t_y + (size_f + 0.5) * scale + 2.0
        hits = (
            apply
            & (tile_x0 <= reach_hi_x)
            & (tile_x0 + BLOCK_W - 1 >= reach_lo_x)
            & (tile_y0 <= reach_hi_y)
            & (tile_y0 + BLOCK_H - 1 >= reach_lo_y)
        )
        if hits:
            flip = tl.load(flip_ptr + bk) != 0
            u = (xc - t_x) * inv
            u = tl.where(flip, size_f - u, u)
            x0, fx = _taps_1d(u)
            y0, fy = _taps_1d((yc - t_y) * inv)
            in_x0 = (x0 >= 0) & (x0 < S)
            in_x1 = (x0 + 1 >= 0) & (x0 + 1 < S)
            in_y0 = (y0 >= 0) & (y0 < S)
            in_y1 = (y0 + 1 >= 0) & (y0 + 1 < S)
            m00 = in_y0[:, None] & in_x0[None, :]
            m10 = in_y0[:, None] & in_x1[None, :]
            m01 = in_y1[:, None] & in_x0[None, :]
            m11 = in_y1[:, None] & in_x1[None, :]
            col0 = x0.to(tl.int64) * s_cx
            col1 = col0 + s_cx
            row0 = y0.to(tl.int64) * s_cy
            row1 = row0 + s_cy
            wx0 = 256 - fx
            wy0 = 256 - fy
            crop = crop_ptr + b * s_cb + k * s_ck

            a_sum = _bilinear_sum(crop + 3 * s_cc, row0, row1, col0, col1, m00, m10, m01, m11, wx0, fx, wy0, fy)
            # RGB taps read the pixel at their coordinates clamped to the canvas (no dark rim where
            # the object touches the canvas edge): every load is in bounds.
            col0 = _clamp_tap(x0, S) * s_cx
            col1 = _clamp_tap(x0 + 1, S) * s_cx
            row0 = _clamp_tap(y0, S) * s_cy
            row1 = _clamp_tap(y0 + 1, S) * s_cy
            every = tl.full((BLOCK_H, BLOCK_W), 1, tl.int1)
            raw = (a_sum >= 128 * 65536) & open_px
            alpha = tl.where(open_px, a_sum.to(tl.float32) * (1.0 / (255.0 * 65536.0)), 0.0)
            tl.store(mask_tile, (raw & ~covered).to(tl.uint8), mask=inside)
            covered = covered | raw

            weight = transmit * alpha * rgb_gain
            r_sum = _bilinear_sum(crop, row0, row1, col0, col1, every, every, every, every, wx0, fx, wy0, fy)
            acc_r += r_sum.to(tl.float32) * weight
            g_sum = _bilinear_sum(crop + s_cc, row0, row1, col0, col1, every, every, every, every, wx0, fx, wy0, fy)
            acc_g += g_sum.to(tl.float32) * weight
            b_sum = _bilinear_sum(crop + 2 * s_cc, row0, row1, col0, col1, every, every, every, every, wx0, fx, wy0, fy)
            acc_b += b_sum.to(tl.float32) * weight
            transmit = transmit * (1.0 - alpha)
        else:
            tl.store(mask_tile, tl.zeros((BLOCK_H, BLOCK_W), tl.uint8), mask=inside)

    img_px = img_ptr + b * s_ib + ys[:, None] * s_ih + xs[None, :] * s_iw
    out_px = out_ptr + b * s_ob + ys[:, None] * s_oh + xs[None, :] * s_ow
    _store_channel(out_px, img_px, acc_r, transmit, inside, OUT_UINT8)
    _store_channel(out_px + s_oc, img_px + s_ic, acc_g, transmit, inside, OUT_UINT8)
    _store_channel(out_px + 2 * s_oc, img_px + 2 * s_ic, acc_b, transmit, inside, OUT_UINT8)


@triton.jit
def _store_channel(out_px, img_px, acc, transmit, inside, OUT_UINT8: tl.constexpr):
    """``out = acc + T * image`` for one channel, converted to the output dtype (uint8: round half up,
    clamp to 0..255; floats: cast)."""
    value = acc + transmit * tl.load(img_px, mask=inside, other=0).to(tl.float32)
    if OUT_UINT8:
        value = tl.minimum(tl.maximum(tl.floor(value + 0.5), 0.0), 255.0).to(tl.uint8)
    else:
        value = value.to(out_px.dtype.element_ty)
    tl.store(out_px, value, mask=inside)


def paste_image(
    images: torch.Tensor,
    crops: torch.Tensor,
    plan: PastePlan,
    padding_mask: torch.Tensor | None = None,
    value_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``crops`` into ``images`` as ``plan`` says, all K per image, back to front.

    - ``images``: ``[B, 3, H, W]`` uint8 / float16 / bfloat16 / float32, any strides (channels_last
      kept); not modified.
    - ``crops``: uint8 ``[B, K, 4, S, S]`` (RGB, alpha), alpha already feathered if wanted.
    - ``plan``: a ``PastePlan`` on the images' device; read: ``apply`` bool ``[B, K]``,
      ``inv_scale`` float32 ``[B, K]``, ``translate`` float32 ``[B, K, 2]``, ``flip`` bool ``[B, K]``.
    - ``padding_mask``: optional bool ``[B, H, W]``, True = padding, never pasted into.
    - ``value_range``: the images' white level; None = 255 for uint8, 1.0 for floats.

    Returns ``(out, visible)``: ``out`` like ``images`` (dtype and memory format) and ``visible``
    bool ``[B, K, H, W]``, the part of each paste not covered by later ones.
    """
    check_inputs(images, crops, plan, padding_mask)
    batch, _, height, width = images.shape
    pastes, size = crops.shape[1], crops.shape[-1]
    shape = (batch, pastes, height, width)
    if batch == 0 or pastes == 0 or height == 0 or width == 0:
        return images.clone(), torch.zeros(shape, dtype=torch.bool, device=images.device)
    value_range = default_value_range(images.dtype, value_range)

    out = torch.empty_like(images)  # preserve_format: channels_last stays channels_last
    # The kernel writes every mask pixel (zeros where a paste misses a tile): no memset needed.
    visible = torch.empty(shape, dtype=torch.bool, device=images.device)
    # [B, K] tensors: contiguous uint8/float32 copies are tiny and let the kernel index b * K + k.
    apply = plan.apply.to(torch.uint8).contiguous()
    flip = plan.flip.to(torch.uint8).contiguous()
    inv_scale = plan.inv_scale.to(torch.float32).contiguous()
    translate = plan.translate.to(torch.float32).contiguous()
    if padding_mask is None:
        pad, pad_strides = apply, (0, 0, 0)  # never read: HAS_PADDING=False
    else:
        pad = padding_mask.to(torch.bool).view(torch.uint8)  # bool and uint8 share their bytes
        pad_strides = pad.stride()

    tiles_w = triton.cdiv(width, BLOCK_W)
    grid = (tiles_w * triton.cdiv(height, BLOCK_H), batch)
    # Triton launches on the current CUDA device: make it the images' one (cuda:1 under DDP, say).
    on_images_device = torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext()
    with on_images_device:
        _paste_kernel[grid](
            images,
            out,
            crops,
            visible.view(torch.uint8),
            pad,
            apply,
            inv_scale,
            translate,
            flip,
            pastes,
            height,
            width,
            size,
            tiles_w,
            value_range / (255.0 * ONE),
            *images.stride(),
            *out.stride(),
            *crops.stride(),
            *pad_strides,
            HAS_PADDING=padding_mask is not None,
            OUT_UINT8=images.dtype == torch.uint8,
            BLOCK_H=BLOCK_H,
            BLOCK_W=BLOCK_W,
            **LAUNCH_OPTIONS,
        )
    return out, visible
