"""In-batch source: the objects of the other images of the batch as crops, with no bank (Simple
Copy-Paste, Ghiasi et al. 2021; torchvision's reference ``SimpleCopyPaste``; segpaste's
``IntraBatchSource``), cut on the images' device and resampled into the same uint8
``[B, K, 4, S, S]`` crops and ``CropGeometry`` that bank crops have, so that they go through the
same plan, compositing kernels and annotations, alone or mixed with bank crops.

Draw (``draw_sources``, all on the device, no host synchronisation): image ``b`` takes its objects
from image ``source_image[b] = (b + r) mod B`` with ``r`` uniform in ``1..B-1`` (never itself), and
``K`` distinct valid instances of it, uniformly (fewer when it has fewer: the other slots are
empty, ``source_instance = -1``, and are not pasted).

Crop geometry (``object_geometry``), as the bank's build makes it (``instbank.crops``): the object's
tight box in its image (the boxes given, else those of the masks), scaled by ``S / max(box w, box h)``
and centred in the ``S x S`` canvas; ``source_side`` is the box's longer side, so ``max_upscale``
and ``scale_mode="native"`` work as for bank crops.

Resampling (``resample_objects``: the specification; ``instbank.paste.cpu_targets`` and
``instbank.paste.triton_targets`` compute the same bytes). Each crop pixel ``(cx, cy)`` averages
``n x n`` bilinear samples (``n = sampling_ratio``, 1, 2 or 4: RoIAlign's averaging, which Mask
R-CNN runs with 2, so a large object is not aliased when it shrinks into the crop) at::

    u  = cx + (2i + 1) / (2n)                      # float32, exact; i = 0..n-1 (and v, j for y)
    sx = (u - offset_x) * inv_scale + box_x0        # float32, one rounding per operation
    xf = sx - 0.5 ; x0 = floor(xf) ; fx = floor((xf - x0) * 256)     # 8-bit fraction, 0..255

with integer weights ``256 - fx, fx`` (as the paste's spec, ``instbank.paste.reference``): RGB taps
read the pixel clamped into the image; mask taps outside the image read 0, inside ``mask != 0``.
Per channel the ``n^2`` samples' integer sums (each at most ``255 * 65536``) are added and rounded
half up: ``(total + n^2 * 32768) // (n^2 * 65536)``; alpha is the mask's average times 255,
``(255 * total + n^2 * 32768) // (n^2 * 65536)``. Integers throughout: every implementation gives
the same bytes. RGB is sampled over the whole canvas (the image around the object, not zeros),
so a pasted edge blends the object's own surroundings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from instbank.paste.plan import CropGeometry

SAMPLING_RATIOS = (1, 2, 4)  # powers of two: the sample offsets (2i + 1) / (2n) are exact in float32
ONE = 65536


class InBatchDraw(NamedTuple):
    """Where each of the ``B x K`` in-batch objects comes from: ``source_image`` int64 ``[B]``
    (never ``b`` itself) and ``source_instance`` int64 ``[B, K]`` (an instance of that image, or
    -1 for an empty slot)."""

    source_image: torch.Tensor
    source_instance: torch.Tensor


class ObjectGeometry(NamedTuple):
    """Float32 placement of each object in its crop (zeros, scale 1 for empty slots):

    - ``box`` ``[B, K, 4]``: the object's box in its source image (``x0, y0, x1, y1``)
    - ``scale`` ``[B, K]``: crop pixels per source pixel, ``S / side``; ``inv_scale``: ``side / S``
      (computed once: no implementation divides)
    - ``offset`` ``[B, K, 2]``: crop-pixel position of the box's corner ``(x0, y0)``
    """

    box: torch.Tensor
    scale: torch.Tensor
    inv_scale: torch.Tensor
    offset: torch.Tensor


def check_sampling_ratio(n: int) -> None:
    if n not in SAMPLING_RATIOS:
        raise ValueError(f"sampling_ratio must be one of {SAMPLING_RATIOS}, got {n}")


def draw_sources(valid: torch.Tensor, k: int, generator: torch.Generator | None = None) -> InBatchDraw:
    """Draw the source image and ``k`` distinct valid instances (``valid`` bool ``[B, N]``) for every
    image (module docstring); on ``valid``'s device, from ``generator`` (two ``torch`` draws)."""
    b, n = valid.shape
    if b < 2:
        raise ValueError(f"an in-batch source needs B >= 2 images (objects come from the other images), "
                         f"got valid [{b}, {n}]")
    dev = valid.device
    shift = torch.randint(1, b, (b,), generator=generator, device=dev)
    source = (torch.arange(b, device=dev) + shift) % b
    scores = torch.rand((b, n), generator=generator, device=dev)
    scores = torch.where(valid[source].to(torch.bool), scores, -1.0)
    if n < k:
        scores = torch.cat([scores, torch.full((b, k - n), -1.0, device=dev)], dim=1)
    top, index = scores.topk(k, dim=1) if k else (scores[:, :0], scores[:, :0].long())
    return InBatchDraw(source, torch.where(top >= 0, index, -1))


def object_geometry(boxes: torch.Tensor, draw: InBatchDraw, s: int) -> ObjectGeometry:
    """``ObjectGeometry`` of the drawn objects from the boxes float ``[B, N, 4]`` of every image."""
    taken = _take(boxes.to(torch.float32), draw)  # [B, K, 4]
    size = taken[..., 2:] - taken[..., :2]
    side = torch.maximum(size[..., 0], size[..., 1])
    has = (draw.source_instance >= 0) & (side > 0)
    box = torch.where(has[..., None], taken, 0.0)
    scale = torch.where(has, float(s) / torch.where(has, side, 1.0), 1.0)
    inv_scale = torch.where(has, side / float(s), 1.0)
    offset = torch.where(has[..., None], (float(s) - size * scale[..., None]) * 0.5, 0.0)
    return ObjectGeometry(box, scale, inv_scale, offset)


def crop_geometry(geometry: ObjectGeometry, labels: torch.Tensor, draw: InBatchDraw, s: int) -> CropGeometry:
    """The plan's view of the drawn objects: class ids (``labels`` ``[B, N]`` of their images; 0
    for empty slots), object boxes in crop pixels, and their longer side in the source image."""
    size = geometry.box[..., 2:] - geometry.box[..., :2]
    lo = geometry.offset
    object_box = torch.cat([lo, lo + size * geometry.scale[..., None]], dim=-1)
    class_ids = torch.where(draw.source_instance >= 0, _take(labels.to(torch.int64), draw), 0)
    return CropGeometry(class_ids, int(s), object_box, torch.maximum(size[..., 0], size[..., 1]))


def crop_keypoints(keypoints: torch.Tensor, geometry: ObjectGeometry, draw: InBatchDraw) -> torch.Tensor:
    """float32 ``[B, K, J, 3]``: the drawn objects' keypoints (``keypoints`` ``[B, N, J, 3]`` in image
    pixels) in crop pixels, ``crop_xy = (xy - box[:2]) * scale + offset``; unlabeled ones and empty
    slots zero."""
    taken = _take(keypoints.to(torch.float32), draw)  # [B, K, J, 3]
    xy = (taken[..., :2] - geometry.box[:, :, None, :2]) * geometry.scale[..., None, None] + geometry.offset[:, :, None]
    v = taken[..., 2]
    keep = (v > 0) & (draw.source_instance >= 0)[..., None]
    return torch.where(keep[..., None], torch.cat([xy, v[..., None]], dim=-1), 0.0)


def _take(values: torch.Tensor, draw: InBatchDraw) -> torch.Tensor:
    """``values[source_image[b], source_instance[b, k]]`` for ``values`` ``[B, N, ...]`` (index 0
    for empty slots: the caller masks them)."""
    b, k = draw.source_instance.shape
    rows = values[draw.source_image]  # [B, N, ...]
    index = draw.source_instance.clamp(min=0)
    if rows.shape[1] == 0:
        return torch.zeros((b, k, *values.shape[2:]), dtype=values.dtype, device=values.device)
    return rows.gather(1, index.view(b, k, *[1] * (values.dim() - 2)).expand(b, k, *values.shape[2:]))


def as_uint8(images: torch.Tensor, value_range: float) -> torch.Tensor:
    """The images as uint8 ``[0, 255]`` (themselves when uint8): crops are uint8 like the bank's."""
    if images.dtype == torch.uint8:
        return images
    return torch.floor(images.float() * (255.0 / value_range) + 0.5).clamp_(0, 255).to(torch.uint8)


def resample_objects(images: torch.Tensor, masks: torch.Tensor, draw: InBatchDraw, geometry: ObjectGeometry, s: int,
                     sampling_ratio: int = 2) -> torch.Tensor:
    """The reference (module docstring): uint8 crops ``[B, K, 4, S, S]`` of the drawn objects from
    uint8 ``images`` ``[B, 3, H, W]`` and ``masks`` ``[B, N, H, W]`` (non-zero = set), vectorised
    over every object (``torch.take`` of the four taps of every sample); zeros for empty slots."""
    check_sampling_ratio(sampling_ratio)
    b, k = draw.source_instance.shape
    n_inst, h, w = masks.shape[1:]
    dev = images.device
    crops = torch.zeros((b, k, 4, s, s), dtype=torch.uint8, device=dev)
    if b * k == 0 or h * w == 0:
        return crops
    n = sampling_ratio
    x_taps = _axis_taps(geometry.offset[..., 0], geometry.inv_scale, geometry.box[..., 0], s, n, w)
    y_taps = _axis_taps(geometry.offset[..., 1], geometry.inv_scale, geometry.box[..., 1], s, n, h)
    src = draw.source_image[:, None, None, None]  # [B, 1, 1, 1] against [B, K, Sn, Sn]
    instance = draw.source_instance.clamp(min=0)[:, :, None, None]
    rgb = torch.zeros((b, k, 3, s * n, s * n), dtype=torch.int32, device=dev)
    alpha = torch.zeros((b, k, s * n, s * n), dtype=torch.int32, device=dev)
    for (row, row_w, row_mw), (col, col_w, col_mw) in ((ya, xa) for ya in y_taps for xa in x_taps):
        pixel = row[..., :, None] * w + col[..., None, :]  # [B, K, Sn, Sn]
        weight = (row_w[..., :, None] * col_w[..., None, :]).to(torch.int32)
        for c in range(3):
            rgb[:, :, c] += torch.take(images, (src * 3 + c) * (h * w) + pixel).to(torch.int32) * weight
        mask_weight = (row_mw[..., :, None] * col_mw[..., None, :]).to(torch.int32)
        alpha += (torch.take(masks, (src * n_inst + instance) * (h * w) + pixel) != 0).to(torch.int32) * mask_weight
    half, unit = n * n * (ONE // 2), n * n * ONE
    rgb = rgb.view(b, k, 3, s, n, s, n).sum(dim=(4, 6), dtype=torch.int32)
    alpha = alpha.view(b, k, s, n, s, n).sum(dim=(3, 5), dtype=torch.int32)
    crops[:, :, :3] = torch.div(rgb + half, unit, rounding_mode="floor").to(torch.uint8)
    crops[:, :, 3] = torch.div(255 * alpha + half, unit, rounding_mode="floor").to(torch.uint8)
    present = (draw.source_instance >= 0)[:, :, None, None, None]
    return torch.where(present, crops, 0)


def _axis_taps(offset, inv_scale, start, s: int, n: int, size: int):
    """Along one axis, for every object ``[B, K]``: the two taps of each of the ``S * n`` samples,
    ``(index clamped into the image, weight, mask weight)`` int64 ``[B, K, S*n]`` (the mask weight
    is 0 for a tap outside the image)."""
    dev = offset.device
    sub = (2 * torch.arange(n, device=dev, dtype=torch.float32) + 1) / (2 * n)  # exact
    u = (torch.arange(s, device=dev, dtype=torch.float32)[:, None] + sub).reshape(-1)
    coord = (u - offset[..., None]) * inv_scale[..., None] + start[..., None]
    xf = coord - 0.5
    first = torch.floor(xf)
    frac = torch.floor((xf - first) * 256.0).clamp(0, 255).long()
    tap = first.clamp(-2, size + 1).long()  # far-away samples stay outside the image
    taps = []
    for index, weight in ((tap, 256 - frac), (tap + 1, frac)):
        inside = (index >= 0) & (index < size)
        taps.append((index.clamp(0, size - 1), weight, torch.where(inside, weight, 0)))
    return taps
