"""What the labels become after a paste: shared by both compositing impls, torch, vectorised over
the batch, no host synchronisation.

Conventions (decided here, documented in docs/paste.md):

- Boxes are ``x0, y0, x1, y1`` float32 in pixel-corner coordinates: the tight box of a mask has
  ``x1 = max column + 1``. An empty mask has box zeros and is invalid.
- Existing instances are cut by the union of the pastes' visible masks. Only instances that lost
  pixels get their box refit to what is left (an untouched instance keeps the box it came with,
  which may be a looser annotation box). Visible fraction = remaining area / original area; below
  ``min_visible`` the instance is marked invalid. Nothing is removed: masks, boxes, labels and
  valid keep the same ``N``, aligned; invalid entries keep their cut mask and refit box.
- A paste is valid when it was applied, its visible mask is not empty, and its visible area is at
  least ``min_visible`` of the area its whole object would cover at that scale (``alpha >= 128``
  pixels of the crop times ``scale**2``): a paste hidden by later pastes, pushed mostly outside the
  image or into padding is dropped like an occluded existing instance.
- The semantic map gets the paste's class id wherever its visible mask is set, whatever the label
  there was (``ignore_index`` included: those pixels now show the pasted object); padding is never
  in a visible mask, so it keeps its label. Invalid (too occluded) pastes still paint their visible
  pixels: the pixels are in the image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from instbank.paste.plan import PastePlan, any_along, tight_boxes


class Instances(NamedTuple):
    """Per-image instance annotations, padded to ``N``:

    - ``masks``: bool or uint8 ``[B, N, H, W]``
    - ``boxes``: float32 ``[B, N, 4]`` ``x0, y0, x1, y1``
    - ``labels``: int64 ``[B, N]``
    - ``valid``: bool ``[B, N]`` (padding entries and dropped instances are False)
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes float32 ``[..., 4]`` of masks ``[..., H, W]`` (bool, or non-zero = set) and
    bool ``[...]`` "not empty"."""
    boxes = tight_boxes(masks)
    return boxes, boxes[..., 2] > boxes[..., 0]  # an empty mask has the box 0, 0, 0, 0


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """int64 ``[...]``: set (non-zero) pixels of masks ``[..., H, W]``.

    On CPU one ``np.count_nonzero`` per mask: torch 2.13's per-row sum of bools converts to int64
    first (150 ms for 8 x 8 x 512 x 512), numpy's ``axis=`` form sums too (5 ms), the whole-array
    form per row counts bytes directly (0.9 ms). Elsewhere a torch sum (no host synchronisation).
    """
    flat = masks.flatten(-2)
    if flat.device.type != "cpu" or flat.numel() == 0:
        return (flat != 0).sum(dim=-1)
    rows = flat.contiguous().numpy().reshape(-1, flat.shape[-1])
    counts = np.fromiter((np.count_nonzero(row) for row in rows), dtype=np.int64, count=len(rows))
    return torch.from_numpy(counts).view(flat.shape[:-1])


def occlude_instances(existing: Instances, covered: torch.Tensor, min_visible: float = 0.1) -> Instances:
    """Cut existing instances by ``covered`` (bool ``[B, H, W]``, the union of the pastes).

    Returns ``Instances`` with the same ``N`` and bool masks (``concat_instances`` restores a mask
    dtype while copying); see the module docstring for refit and validity rules.
    """
    cut = existing.masks.to(torch.bool) & ~covered[:, None]
    before = mask_areas(existing.masks)
    after = mask_areas(cut)
    refit, nonempty = boxes_from_masks(cut)
    touched = after < before
    boxes = torch.where(touched[..., None], refit, existing.boxes.to(torch.float32))
    fraction = after.float() / before.clamp(min=1).float()
    still_visible = ~touched | (nonempty & (fraction >= min_visible))
    return Instances(cut, boxes, existing.labels, existing.valid & still_visible)


def paste_instances(visible: torch.Tensor, plan: PastePlan, crops: torch.Tensor, min_visible: float = 0.1) -> Instances:
    """Annotations of the pastes: ``visible`` bool ``[B, K, H, W]`` from ``paste_image``, the plan,
    and the crops uint8 ``[B, K, 4, S, S]`` (their alpha gives each object's full area)."""
    boxes, nonempty = boxes_from_masks(visible)
    object_px = mask_areas(crops[:, :, 3] >= 128).float()
    full_area = object_px * plan.scale.float() ** 2
    area = mask_areas(visible).float()
    enough = area >= min_visible * full_area
    return Instances(visible, boxes, plan.labels, plan.apply & nonempty & enough)


def concat_instances(first: Instances, second: Instances, mask_dtype: torch.dtype = torch.bool) -> Instances:
    """Existing then pasted along ``N``, masks converted to ``mask_dtype`` (True -> 1) while copied
    into one buffer (measured 2-6x faster on CPU than ``torch.cat`` of mixed dtypes)."""
    b, n1, h, w = first.masks.shape
    masks = torch.empty((b, n1 + second.masks.shape[1], h, w), dtype=mask_dtype, device=first.masks.device)
    masks[:, :n1].copy_(first.masks)
    masks[:, n1:].copy_(second.masks)
    return Instances(
        masks,
        torch.cat([first.boxes.to(torch.float32), second.boxes], dim=1),
        torch.cat([first.labels.to(torch.int64), second.labels], dim=1),
        torch.cat([first.valid, second.valid], dim=1),
    )


def paint_semantic(semantic: torch.Tensor, visible: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Semantic map ``[B, H, W]`` (any int dtype that holds the class ids) with each paste's class
    id where its visible mask ``[B, K, H, W]`` is set (visible masks are disjoint)."""
    if visible.shape[1] == 0:
        return semantic.clone()
    painted = any_along(visible, 1)
    which = visible.to(torch.uint8).argmax(dim=1)  # the one paste visible there
    ids = torch.gather(labels.to(semantic.device), 1, which.flatten(1)).view_as(semantic)
    return torch.where(painted, ids.to(semantic.dtype), semantic)
