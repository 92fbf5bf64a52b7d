"""Copy-paste from the bank: plan (where), alpha preparation (how soft), compositing (torch or
Triton), annotations (what the labels become).

Importing this package is cheap: torch, numba and Triton are imported by the submodules, on first
use of a name below (PEP 562 ``__getattr__``); Triton only when ``paste(..., impl="triton"|"auto")``
runs on a CUDA tensor, numba only when ``impl="numba"|"auto"`` runs on a CPU tensor.

Implementations of the compositing (``impl``), all with the reference's signature and results:

- ``"torch"``: ``instbank.paste.reference``, the specification; numpy inside each paste's
  rectangle on CPU, whole-image torch ops elsewhere.
- ``"numba"``: ``instbank.paste.cpu_kernel``, the reference's CPU path compiled, one call per
  batch (compositing and ``BankCopyPaste``'s annotations); bit-identical to it.
- ``"triton"``: ``instbank.paste.triton_kernel``, one GPU kernel for all pastes.
- ``"auto"``: Triton for CUDA images, numba for CPU images, each when installed; else the reference.

- ``draw_plan`` / ``PastePlan`` / ``CropGeometry``: ``instbank.paste.plan``
- ``paste``: prepare the alpha (``prepare_alpha``), then composite with the chosen implementation
- ``paste_image``: the torch reference (``instbank.paste.reference``), the specification
- ``BankCopyPaste`` / ``CopyPasteConfig`` / ``BankSource``: ``instbank.paste.module``
- targets beyond masks: ``instbank.paste.keypoints`` (keypoints through the paste,
  COCO's person keypoints), ``instbank.paste.panoptic`` (``PanopticSchema``,
  ``Segments``), ``instbank.paste.inbatch`` (objects of the batch's other images as crops); their
  numba and Triton twins in ``instbank.paste.cpu_targets`` and ``instbank.paste.triton_targets``
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from instbank.paste.plan import PastePlan

Impl = Literal["auto", "triton", "numba", "torch"]
IMPLS = ("auto", "triton", "numba", "torch")

_LAZY = {
    "PastePlan": "instbank.paste.plan",
    "CropGeometry": "instbank.paste.plan",
    "draw_plan": "instbank.paste.plan",
    "tight_boxes": "instbank.paste.plan",
    "paste_image": "instbank.paste.reference",
    "BankCopyPaste": "instbank.paste.module",
    "BankSource": "instbank.paste.module",
    "CopyPasteConfig": "instbank.paste.module",
    "StagedPaste": "instbank.paste.module",
    "Instances": "instbank.paste.annotations",
    "boxes_from_masks": "instbank.paste.annotations",
    "occlude_instances": "instbank.paste.annotations",
    "paste_instances": "instbank.paste.annotations",
    "paint_semantic": "instbank.paste.annotations",
    "PanopticSchema": "instbank.paste.panoptic",
    "Segments": "instbank.paste.panoptic",
    "COCO_PERSON_KEYPOINTS": "instbank.paste.keypoints",
    "COCO_PERSON_SKELETON": "instbank.paste.keypoints",
}

__all__ = ["IMPLS", "paste", "prepare_alpha", "prepared_alpha", "resolve_impl", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'instbank.paste' has no attribute {name!r}")


def resolve_impl(impl: str, images: "torch.Tensor") -> str:
    """``"triton"``, ``"numba"`` or ``"torch"``: ``auto`` picks Triton for CUDA images and numba for
    CPU images, each when installed, else the reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if images.is_cuda:
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    on_cpu = images.device.type == "cpu"
    return "numba" if on_cpu and importlib.util.find_spec("numba") is not None else "torch"


IMPL_MODULES = {
    "triton": "instbank.paste.triton_kernel",
    "numba": "instbank.paste.cpu_kernel",
    "torch": "instbank.paste.reference",
}


def impl_module(impl: str):
    """The module of a resolved ``impl`` (imported now): its ``paste_image`` composites."""
    return importlib.import_module(IMPL_MODULES[impl])


def paste(
    images: "torch.Tensor",
    crops: "torch.Tensor",
    plan: "PastePlan",
    padding_mask: "torch.Tensor | None" = None,
    value_range: float | None = None,
    impl: Impl = "auto",
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Paste every planned crop: ``prepare_alpha`` then ``paste_image`` of the chosen impl.

    Args and returns as ``instbank.paste.reference.paste_image`` (images ``[B, 3, H, W]``, crops
    uint8 ``[B, K, 4, S, S]`` with their stored alpha; returns the images and bool visible masks
    ``[B, K, H, W]``).
    """
    composite = impl_module(resolve_impl(impl, images)).paste_image
    crops = prepare_alpha(crops, plan)
    return composite(images, crops, plan, padding_mask=padding_mask, value_range=value_range)


def prepare_alpha(crops: "torch.Tensor", plan: "PastePlan") -> "torch.Tensor":
    """uint8 ``[B, K, 4, S, S]`` with the alpha the compositing uses (RGB copied; a new tensor
    unless ``plan.blend == "none"``, which returns ``crops`` itself); the alpha is
    ``prepared_alpha``'s."""
    import torch

    if plan.blend == "none" or crops.numel() == 0:
        return crops
    out = torch.empty_like(crops, memory_format=torch.contiguous_format)
    out[:, :, :3].copy_(crops[:, :, :3])
    out[:, :, 3].copy_(prepared_alpha(crops, plan))
    return out


def prepared_alpha(crops: "torch.Tensor", plan: "PastePlan") -> "torch.Tensor":
    """uint8 ``[B, K, S, S]``: the alpha of crops ``[B, K, 4, S, S]`` as ``plan.blend`` prepares it
    (a view of the crops' alpha for ``"none"``, else a new tensor):

    - ``"none"``: the stored alpha (area-resampled, so edges are a pixel soft).
    - ``"hard"``: ``255 where alpha >= 128 else 0``: pasted pixels replace the target.
    - ``"gaussian"``: the alpha blurred with a Gaussian of ``plan.sigma[b, k]`` crop pixels per
      paste (Simple Copy-Paste, Ghiasi et al. 2021, smooths the pasted mask's edge this way),
      rounded to uint8; separable, see ``_gaussian_blur``.

    The CPU paste paths take this alone and read RGB from the crops (no copy of the RGB planes).
    """
    import torch

    alpha = crops[:, :, 3]
    if plan.blend == "none" or crops.numel() == 0:
        return alpha
    if plan.blend == "hard":
        # (alpha >> 7) * 255: two uint8 passes; torch 2.13's uint8 ``>=`` + ``where`` took 6 ms for
        # 64 crops of 128^2 on CPU, these 0.12 ms (numpy's: 0.02 ms, and 3 us per call less)
        if alpha.device.type == "cpu":
            hard = np.right_shift(alpha.numpy(), 7)
            hard *= 255
            return torch.from_numpy(hard)
        return torch.bitwise_right_shift(alpha, 7).mul_(255)
    return _gaussian_blur(alpha, plan.sigma.to(crops.device), plan.blur_radius)


def _gaussian_blur(alpha: "torch.Tensor", sigma: "torch.Tensor", radius: int) -> "torch.Tensor":
    """Blur uint8 ``[B, K, S, S]`` with per-crop ``sigma`` ``[B, K]`` (0: unchanged); zeros outside.

    Separable, with normalised taps ``exp(-d^2 / (2 sigma^2))``, ``|d| <= ceil(3 sigma)`` (each
    crop's own reach, at most ``radius``: the taps left out are below ``exp(-4.5)`` of the centre,
    as OpenCV's and torchvision's kernel sizes from sigma leave them; a sigma of 0 has reach 0:
    identity).
    On CPU, taps in numpy and OpenCV's ``sepFilter2D`` per crop (``_gaussian_blur_cv2``).
    Elsewhere, for crops up to ``8 * (2 * radius + 1)`` pixels the two passes are batched matmuls
    with a banded (Toeplitz) matrix ``G``, ``G @ A @ G`` (``G`` is symmetric): measured 4.5 ms per
    pass for 64 crops of 128^2 against 7-23 ms for a grouped ``conv2d`` on CPU (torch 2.13, one
    thread); larger crops use the grouped convolution, whose cost grows with the radius instead of
    the size. ``G`` is a strided view of one zero-padded row of taps (a Hankel matrix, flipped): one
    copy, where gathering it from an index matrix cost half as much as the two matmuls (3.6 ms
    against 7.2 ms for 64 crops).
    """
    import torch
    import torch.nn.functional as F

    from instbank.paste.plan import _namespace

    b, k, s, _ = alpha.shape
    n = b * k
    xp, arr, _ = _namespace(alpha.device)
    offsets = arr(torch.arange(-radius, radius + 1, device=alpha.device, dtype=torch.float32))
    sig = arr(sigma.reshape(n, 1).float())
    reach = xp.ceil(3 * sig)
    taps = xp.exp(-0.5 * (offsets / xp.where(sig > 0, sig, 1e-6)) ** 2) * (abs(offsets) <= reach)
    taps = taps / taps.sum(axis=1, keepdims=True)
    if alpha.device.type == "cpu":
        return _gaussian_blur_cv2(alpha, taps, xp.minimum(reach[:, 0], radius).astype(np.int64))
    x = alpha.reshape(n, s, s).float()
    if s <= 8 * (2 * radius + 1):
        # G[i, j] = taps[radius + j - i] (0 beyond the band) = row[s - 1 + radius + i - j] (taps are
        # symmetric) = hankel[i, s - 1 - j] with hankel[i, m] = row[radius + i + m]
        width = 2 * s - 1 + 2 * radius
        row = torch.zeros((n, width), device=alpha.device, dtype=torch.float32)
        row[:, s - 1 : s + 2 * radius] = taps
        g = row.as_strided((n, s, s), (width, 1, 1), radius).flip(-1)
        x = torch.bmm(torch.bmm(g, x), g)
    else:
        x = x.reshape(1, n, s, s)
        x = F.conv2d(x, taps.view(n, 1, 1, -1), padding=(0, radius), groups=n)
        x = F.conv2d(x, taps.view(n, 1, -1, 1), padding=(radius, 0), groups=n)
    return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8).reshape(b, k, s, s)


def _gaussian_blur_cv2(alpha: "torch.Tensor", taps, reach) -> "torch.Tensor":
    """CPU blur of uint8 ``[B, K, S, S]`` alpha with float32 taps ``[B*K, 2r+1]`` (zeros beyond
    each crop's ``reach`` ``[B*K]``): OpenCV's separable filter per crop, with its ``2 reach + 1``
    taps, summed in float32 and rounded to uint8 by OpenCV itself (to nearest, ties to even; no
    float32 buffer of our own). 0.93 ms for 64 crops of 128^2 with sigma in [0.5, 2] against 17 ms
    for the banded matmuls (one thread); the sums and the rounding run in another order, so a
    value may round to the other neighbour (1 level, 1e-5 of the pixels), which is why both impls
    on one device take the alpha prepared here, never each their own.

    Each crop is filtered only over the box of its non-zero alpha grown by its reach (zeros outside
    it stay zero, and a pixel inside reads zeros beyond it, as the constant border gives): 70% of
    the canvas on the sample bank's letterboxed crops.
    """
    import cv2
    import torch

    b, k, s, _ = alpha.shape
    r = (taps.shape[1] - 1) // 2
    planes = alpha.reshape(b * k, s, s)  # a view of the crops' alpha planes: OpenCV reads strided rows
    # rows and columns with alpha, from torch's uint8 amax (19 us for 8 crops of 128^2; numpy's 52)
    y0, y1 = _grown_spans(planes.amax(dim=2).numpy(), reach)
    x0, x1 = _grown_spans(planes.amax(dim=1).numpy(), reach)
    planes = planes.numpy()
    blurred = np.zeros(planes.shape, np.uint8)
    for i, (box, q) in enumerate(zip(zip(y0, y1, x0, x1), reach.tolist())):
        if box[1] > box[0]:  # an empty alpha stays empty
            rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
            own = taps[i, r - q : r + q + 1]
            cv2.sepFilter2D(planes[i, rows, cols], cv2.CV_8U, own, own, dst=blurred[i, rows, cols],
                            borderType=cv2.BORDER_CONSTANT)
    return torch.from_numpy(blurred.reshape(b, k, s, s))


def _grown_spans(lines, r) -> tuple:
    """Per row of ``lines`` ``[n, s]``: ``[first, last + 1)`` of its non-zero entries grown by
    ``r`` (an int, or ints ``[n]``) and clipped to ``[0, s)``, as two int lists (an empty row gives
    an empty span)."""
    s = lines.shape[1]
    present = lines != 0
    first = np.maximum(present.argmax(axis=1) - r, 0)
    past = np.minimum(s - present[:, ::-1].argmax(axis=1) + r, s)
    past = np.where(present.any(axis=1), past, first)
    return first.tolist(), past.tolist()
