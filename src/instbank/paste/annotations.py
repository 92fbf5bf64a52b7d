"""What the labels become after a paste: shared by both compositing impls.

Three implementations of the same rules: whole-mask torch ops, vectorised over the batch with no
host synchronisation (``paste_instances``, ``occlude_instances``; any device); ``annotate_rects``,
the reference's CPU path of ``BankCopyPaste`` (``paste_annotate_rects``), which works only inside
the pastes' rectangles from ``reference.composite_rects`` and writes the output masks once (numpy);
and its compiled twin in ``instbank.paste.cpu_kernel``. The formulas for validity and refit are the
same functions in all three, ``paste_validity`` and ``occlusion_outcome``.

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

import itertools
from typing import NamedTuple

import numpy as np
import torch

from instbank.paste.plan import PastePlan, any_along, tight_boxes
from instbank.paste.reference import Paste, group_visible


LARGE_MASK = 1 << 16  # pixels from which ``_tight_box`` uses torch


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


def object_pixels(crops: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, K]``: pixels of each crop ``[B, K, 4, S, S]`` whose alpha is at least 128 (the
    object's area at scale 1). On CPU the comparison is numpy's: torch 2.13's uint8 ``>=`` took
    0.8 ms for 64 crops of 128^2, numpy's 0.04 ms."""
    alpha = crops[:, :, 3]
    if alpha.device.type == "cpu":
        return mask_areas(torch.from_numpy(alpha.numpy() >= 128))
    return mask_areas(alpha >= 128)


def occlude_instances(existing: Instances, covered: torch.Tensor, min_visible: float = 0.1) -> Instances:
    """Cut existing instances by ``covered`` (bool ``[B, H, W]``, the union of the pastes).

    Returns ``Instances`` with the same ``N`` and bool masks (``concat_instances`` restores a mask
    dtype while copying); see the module docstring for refit and validity rules.
    """
    cut = existing.masks.to(torch.bool) & ~covered[:, None]
    before = mask_areas(existing.masks)
    after = mask_areas(cut)
    refit, nonempty = boxes_from_masks(cut)
    boxes, valid = occlusion_outcome(before, after, refit, nonempty, existing, min_visible)
    return Instances(cut, boxes, existing.labels, valid)


def occlusion_outcome(before, after, refit, nonempty, existing: Instances, min_visible: float):
    """Boxes float32 ``[B, N, 4]`` and valid bool ``[B, N]`` of existing instances whose masks had
    ``before`` set pixels and keep ``after`` (int64 ``[B, N]``); ``refit``/``nonempty``: the tight
    box of what is left and whether anything is (used where pixels were lost).

    Tensors in, tensors out; or numpy arrays (``existing.boxes``/``valid`` too), numpy out: the
    CPU kernel's path, where these ~10 operations on ``[B, N]`` values cost a fifth of torch's.
    """
    xp = np if isinstance(before, np.ndarray) else torch
    touched = after < before
    boxes = xp.where(touched[..., None], refit, _float32(existing.boxes))
    fraction = _float32(after) / _float32(xp.where(before > 1, before, 1))
    still_visible = ~touched | (nonempty & (fraction >= min_visible))
    return boxes, existing.valid & still_visible


def _float32(values):
    """float32 copy (or the values themselves) of a tensor or numpy array."""
    return values.astype(np.float32, copy=False) if isinstance(values, np.ndarray) else values.float()


def paste_instances(visible: torch.Tensor, plan: PastePlan, crops: torch.Tensor, min_visible: float = 0.1) -> Instances:
    """Annotations of the pastes: ``visible`` bool ``[B, K, H, W]`` from ``paste_image``, the plan,
    and the crops uint8 ``[B, K, 4, S, S]`` (their alpha gives each object's full area)."""
    boxes, nonempty = boxes_from_masks(visible)
    valid = paste_validity(mask_areas(visible), nonempty, object_pixels(crops), plan, min_visible)
    return Instances(visible, boxes, plan.labels, valid)


def paste_validity(area, nonempty, object_px, plan: PastePlan, min_visible: float):
    """bool ``[B, K]``: applied, visible (``nonempty``), and a visible ``area`` (int64 ``[B, K]``)
    of at least ``min_visible`` of the whole object's (``object_px * scale**2``). Tensors, or numpy
    arrays (then ``plan``'s tensors are read as numpy, and numpy comes out)."""
    scale, apply = plan.scale, plan.apply
    if isinstance(area, np.ndarray):
        scale, apply = scale.numpy(), apply.numpy()
    full_area = _float32(object_px) * _float32(scale) ** 2
    return apply & nonempty & (_float32(area) >= min_visible * full_area)


def annotate_rects(
    masks: torch.Tensor,
    groups: list[list[Paste]],
    existing: Instances,
    plan: PastePlan,
    object_px: torch.Tensor,
    min_visible: float,
    semantic: torch.Tensor | None = None,
) -> tuple[Instances, Instances]:
    """CPU, in place: the annotations of the pastes of ``reference.composite_rects``, computed
    inside their rectangles. Same results as ``paste_instances`` + ``occlude_instances``.

    Args:
        masks: bool or uint8 ``[B, N+K, H, W]`` output buffer, filled image by image (while its
            planes are in cache): the existing masks as 0/1 cut by the pastes, then the visible
            masks of the pastes, zero outside their rectangles.
        groups: the overlap groups of ``composite_rects``, with their raw masks.
        existing: the existing instances (``N``; masks bool or uint8, non-zero = set).
        object_px: int64 ``[B, K]``, see ``object_pixels``.
        semantic: optional ``[B, H, W]`` map painted in place with the paste labels.

    Returns:
        ``(kept, pasted)``: ``Instances`` whose masks are views of ``masks`` (bool views when it is
        uint8).
    """
    n = existing.labels.shape[1]
    planes = masks.view(torch.bool).numpy()  # the buffer holds 0/1
    given = existing.masks.numpy()
    as_is = given.dtype == np.bool_  # copied as they are: numpy's bool != 0 took 0.14 ms per 512^2 plane
    area = np.zeros(plan.apply.shape, np.int64)
    box = np.zeros((*plan.apply.shape, 4), np.float32)
    cuts = _Cuts(planes[:, :n])
    if semantic is not None:
        painted, labels = semantic.numpy(), plan.labels.to(semantic.dtype).numpy()
    of_image = {bi: list(image_groups) for bi, image_groups in itertools.groupby(groups, key=lambda g: g[0].b)}
    for bi in range(masks.shape[0]):
        if as_is:
            planes[bi, :n] = given[bi]
        else:
            np.not_equal(given[bi], 0, out=planes[bi, :n])  # uint8: any non-zero value is set
        planes[bi, n:] = False
        for group in of_image.get(bi, []):
            shown, cover, rect = group_visible(group)
            for p, vis in zip(group, shown):
                planes[bi, n + p.k, p.y0 : p.y1, p.x0 : p.x1] = vis
                area[bi, p.k] = np.count_nonzero(vis)
                if area[bi, p.k]:
                    box[bi, p.k] = _tight_box(vis, p.x0, p.y0)
                    if semantic is not None:
                        painted[bi, p.y0 : p.y1, p.x0 : p.x1][vis] = labels[bi, p.k]
            cuts.cut(bi, cover, rect)
    kept_boxes, kept_valid = occlusion_outcome(*cuts.outcome(), existing, min_visible)
    area_t = torch.from_numpy(area)
    pasted_valid = paste_validity(area_t, area_t > 0, object_px, plan, min_visible)
    view = masks if masks.dtype == torch.bool else masks.view(torch.bool)
    return (
        Instances(view[:, :n], kept_boxes, existing.labels, kept_valid),
        Instances(view[:, n:], torch.from_numpy(box), plan.labels, pasted_valid),
    )


def paste_annotate_rects(images, crops, alpha, plan: PastePlan, padding_mask, vrange: float, existing: Instances,
                         min_visible: float, semantic=None, with_masks: bool = True, inplace: bool = False):
    """``BankCopyPaste``'s CPU path (the reference's; ``instbank.paste.cpu_kernel`` has the same
    function compiled): composite and annotate inside each paste's rectangle, each output written
    once.

    Args:
        images: CPU ``[B, 3, H, W]``; crops: uint8 ``[B, K, 4, S, S]`` (RGB and stored alpha);
            alpha: their prepared alpha, uint8 ``[B, K, S, S]`` (``instbank.paste.prepared_alpha``);
            plan, padding_mask, vrange: as ``reference.composite_rects`` takes them (checked).
        existing: ``Instances`` with bool or uint8 masks ``[B, N, H, W]``; ``boxes`` and ``valid``
            may be None (then the tight boxes of the masks and "mask not empty").
        semantic: optional ``[B, H, W]`` map (not modified: the painted copy is returned).
        with_masks: False: ``merged`` and ``pasted`` come without masks (``masks=None``; the
            compiled twin then allocates no planes for the pastes).
        inplace: the images and the map returned are ``images`` and ``semantic``, painted (here
            written back from the copies; the compiled twin makes none).

    Returns:
        ``(images, merged, pasted, painted)``: the images; ``Instances`` of existing then pasted
        (``[B, N+K, ...]``, masks in the existing masks' dtype); the pastes' ``Instances`` (masks a
        bool view of ``merged.masks[:, N:]``); the painted map or None.
    """
    from instbank.paste.reference import composite_rects

    b, _, h, w = images.shape
    n, k = existing.labels.shape[1], crops.shape[1]
    existing = complete_instances(existing)
    prepared = torch.empty(crops.shape, dtype=torch.uint8)
    prepared[:, :, :3] = crops[:, :, :3]
    prepared[:, :, 3] = alpha
    out = torch.empty_like(images)
    groups = composite_rects(out, images, prepared, plan, padding_mask, vrange)
    masks = torch.empty((b, n + k, h, w), dtype=existing.masks.dtype)
    painted = None if semantic is None else semantic.clone()
    kept, pasted = annotate_rects(masks, groups, existing, plan, object_pixels(crops), min_visible, painted)
    merged = Instances(
        masks if with_masks else None,
        torch.cat([kept.boxes, pasted.boxes], dim=1),
        torch.cat([kept.labels.to(torch.int64), pasted.labels], dim=1),
        torch.cat([kept.valid, pasted.valid], dim=1),
    )
    if inplace:
        out = images.copy_(out)
        painted = None if semantic is None else semantic.copy_(painted)
    return out, merged, pasted if with_masks else pasted._replace(masks=None), painted


def complete_instances(existing: Instances) -> Instances:
    """``existing`` with ``boxes`` (float32) and ``valid`` (bool) filled in where None: the tight
    boxes of the masks, and "mask not empty"."""
    boxes, valid = existing.boxes, existing.valid
    if boxes is None:
        boxes, nonempty = boxes_from_masks(existing.masks)
    elif valid is None:
        nonempty = mask_nonempty(existing.masks)
    return Instances(
        existing.masks,
        boxes.to(torch.float32),
        existing.labels.to(torch.int64),
        nonempty if valid is None else valid.to(torch.bool),
    )


def mask_nonempty(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N]``: masks ``[B, N, H, W]`` with a set pixel; for bool/uint8 on CPU, numpy's
    uint8 ``max`` per mask (4 us for 512^2, against 13 us for ``any`` and 120 us for torch's
    reduction over the flattened masks)."""
    if masks.device.type != "cpu" or masks.dtype not in (torch.bool, torch.uint8):
        return any_along(masks.flatten(2), -1)
    planes = masks.view(torch.uint8).numpy().reshape(-1, *masks.shape[2:])
    return torch.tensor([bool(m.max()) for m in planes], dtype=torch.bool).view(masks.shape[:2])


class _Cuts:
    """Existing masks (numpy bool ``[B, N, H, W]``) cut by the pastes, group by group, and what
    they lost: areas before and after and refit boxes (``before == after`` where untouched)."""

    def __init__(self, planes: np.ndarray):
        self.planes = planes
        self.lost = np.zeros(planes.shape[:2], np.int64)

    def cut(self, bi: int, cover: np.ndarray, rect) -> None:
        """Clear ``cover`` (bool, the size of ``rect`` ``x0, y0, x1, y1``) from image ``bi``'s masks."""
        x0, y0, x1, y1 = rect
        region = self.planes[bi, :, y0:y1, x0:x1]
        hidden = region & cover  # contiguous: fast counts
        for i in range(len(region)):
            lost = np.count_nonzero(hidden[i])
            if lost:
                region[i] &= ~cover
                self.lost[bi, i] += lost

    def outcome(self) -> tuple[torch.Tensor, ...]:
        """int64 ``before``, ``after`` ``[B, N]``, float32 ``refit`` ``[B, N, 4]``, bool
        ``nonempty`` ``[B, N]`` (of what is left), as ``occlusion_outcome`` takes them."""
        after = np.zeros_like(self.lost)
        refit = np.zeros((*self.lost.shape, 4), np.float32)
        for bi, i in zip(*np.nonzero(self.lost)):
            plane = self.planes[bi, i]
            after[bi, i] = np.count_nonzero(plane)
            if after[bi, i]:
                refit[bi, i] = _tight_box(plane, 0, 0)
        before = after + self.lost
        return tuple(torch.from_numpy(v) for v in (before, after, refit, after > 0))


def _tight_box(mask: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int]:
    """``x0, y0, x1, y1`` of a non-empty bool ``[h, w]`` mask, offset by ``(x0, y0)``. Large masks
    go through torch's uint8 ``amax`` (15 us for a 512^2 plane against 32 us for numpy's ``any``),
    small ones through numpy (less overhead per call)."""
    if mask.size >= LARGE_MASK:
        as_bytes = torch.from_numpy(mask.view(np.uint8))
        rows, cols = as_bytes.amax(1).numpy(), as_bytes.amax(0).numpy()
    else:
        rows, cols = mask.any(axis=1), mask.any(axis=0)
    rows, cols = np.flatnonzero(rows), np.flatnonzero(cols)
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


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
