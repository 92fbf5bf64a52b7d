"""Compiled CPU paste kernel (numba): one loop nest per paste where the reference runs 17 numpy
array operations.

Same signature, outputs and arithmetic as the reference ``instbank.paste.reference.paste_image``
(whose module docstring is the specification), and bit-identical results on CPU: images and masks
equal, for every image dtype (tested with hypothesis). Only the inner step differs: the reference's
rectangle path (``paste_rects``: rectangle table, bilinear taps, overlap groups, float32 tiles,
rounding) is reused, with ``blend_rect`` below in place of the reference's numpy ``blend_rect``.

Per paste (``rect`` of ``h x w`` target pixels, crop window ``wh x ww``):

1. Along y, for each target row, the two crop rows of its taps weighted in integers, uint16
   ``[h, ww, 4]`` (channels last, so that a pixel's four channels sit in one 8-byte word for
   step 2); contiguous inner loops, which LLVM vectorises.
2. Along x, per target pixel: the two taps of all four channels, the exact int32 sums of the spec
   as float32 (integers below 2**24, and RGB's weights carry the 2**-16: exact), the threshold,
   ``alpha = A / (255 * 65536)``, and the blend ``out * (1 - alpha) + colour * alpha`` with the
   reference's op order and no fused multiply-add (numba leaves LLVM's ``contract`` flag off
   unless ``fastmath`` is set). Pixels with ``A == 0`` are skipped: the spec leaves them as they
   are (``out * 1 + colour * 0``).

Measured against the reference's numpy ``blend_rect`` on the 54 real crops of the sample bank,
512^2 targets, objects of 64..128 px: 32 us against 115 us per paste (one thread; see
docs/perf/paste.md). The first call in a process compiles (about 2 s for each combination of
argument types: with or without padding, contiguous crops or views); ``cache=True`` stores the
machine code beside this file, or in numba's user cache directory when the package directory is
read-only, so later processes (DataLoader workers) load it in milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "instbank.paste.cpu_kernel needs numba: pip install 'instbank[numba]', "
        "or use the reference (impl='torch')"
    ) from exc

from instbank.paste.plan import PastePlan
from instbank.paste.reference import ALPHA_MAX, ALPHA_THRESHOLD, check_inputs, default_value_range, paste_rects

# ``A / ALPHA_MAX`` for every integer ``A`` in ``0 .. ALPHA_MAX`` is the float32 rounding of
# ``float64(A) * INV_ALPHA_MAX``: the float64 product is within 2**-52 (relative) of ``A / ALPHA_MAX``,
# which lies at least 2**-33 (relative) from every float32 rounding boundary. Checked for all
# 16.7M values of ``A`` in tests/test_paste_cpu_kernel.py; a multiply vectorises, a divide does not.
INV_ALPHA_MAX = 1.0 / ALPHA_MAX
ONE = np.float32(1.0)


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
    return paste_rects(images, crops, plan, padding_mask, default_value_range(images.dtype, value_range), blend_rect)


def blend_rect(tile, crop, taps_x, taps_y, p, keep, gain, rect, window) -> np.ndarray:
    """The reference's ``blend_rect`` (same arguments, same result), compiled.

    A gain of None is passed as 1.0 (``colour * 1`` is exact): one compiled variant fewer.
    """
    gain = ONE if gain is None else gain
    return _blend_rect(tile, crop, p, *taps_x, *taps_y, keep, gain, rect, window)


@numba.njit(cache=True, nogil=True)
def _blend_rect(tile, crop, p, xa, xb, wxa, wxb, ya, yb, wya, wyb, keep, gain, rect, window):  # pragma: no cover
    x0, y0, x1, y1 = rect
    cx0, cy0, cx1, cy1 = window
    h, w, ww = y1 - y0, x1 - x0, cx1 - cx0
    rows = np.empty((h, ww, 4), np.uint16)  # <= 255 * 256
    for j in range(h):
        ra, rb = cy0 + ya[p, j], cy0 + yb[p, j]
        for c in range(4):
            wa, wb = np.uint16(wya[p, c, j, 0]), np.uint16(wyb[p, c, j, 0])
            src_a, src_b, dst = crop[c, ra, cx0:cx1], crop[c, rb, cx0:cx1], rows[j, :, c]
            for i in range(ww):
                dst[i] = np.uint16(src_a[i]) * wa + np.uint16(src_b[i]) * wb
    raw = np.empty((h, w), np.bool_)
    xa_p, xb_p = xa[p], xb[p]
    alpha_a, alpha_b, rgb_a, rgb_b = wxa[p, 3, 0], wxb[p, 3, 0], wxa[p, 0, 0], wxb[p, 0, 0]
    for j in range(h):
        shown, row = raw[j], rows[j]
        t0, t1, t2 = tile[0, y0 + j, x0:x1], tile[1, y0 + j, x0:x1], tile[2, y0 + j, x0:x1]
        for i in range(w):
            pa, pb = row[xa_p[i]], row[xb_p[i]]
            a = np.float32(pa[3]) * alpha_a[i] + np.float32(pb[3]) * alpha_b[i]
            inside = True
            if keep is not None:
                inside = keep[y0 + j, x0 + i]
            shown[i] = inside and a >= ALPHA_THRESHOLD
            if not inside or a == 0:
                continue
            alpha = np.float32(np.float64(a) * INV_ALPHA_MAX)
            rest = ONE - alpha
            c0 = np.float32(pa[0]) * rgb_a[i] + np.float32(pb[0]) * rgb_b[i]
            c1 = np.float32(pa[1]) * rgb_a[i] + np.float32(pb[1]) * rgb_b[i]
            c2 = np.float32(pa[2]) * rgb_a[i] + np.float32(pb[2]) * rgb_b[i]
            c0, c1, c2 = c0 * gain, c1 * gain, c2 * gain
            t0[i] = t0[i] * rest + c0 * alpha
            t1[i] = t1[i] * rest + c1 * alpha
            t2[i] = t2[i] * rest + c2 * alpha
    return raw
