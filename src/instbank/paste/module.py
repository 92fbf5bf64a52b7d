"""nn.Modules for training loops: ``BankCopyPaste`` (plan + paste + annotations in one call) and
``BankSource`` (staged crops -> a ``PastePlan``, for code that composites itself).

Both take the crops staged for one step with ``set_bank_batch``: a ``BankBatch`` (exact crop
geometry, so both scale modes work) or the packed ``[B, K, 5, S, S]`` tensor of
``BankBatch.packed()`` (RGB, alpha, a plane filled with the class id; any integer or float dtype;
no source geometry, so only ``scale_mode="relative"``). The staged batch size must equal the
images' batch size: a mismatch raises rather than silently reusing or dropping crops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from instbank.paste import IMPLS, impl_module, paste, prepare_alpha, resolve_impl
from instbank.paste.annotations import (
    Instances,
    annotate_rects,
    boxes_from_masks,
    concat_instances,
    object_pixels,
    occlude_instances,
    paint_semantic,
    paste_instances,
)
from instbank.paste.plan import CropGeometry, PastePlan, any_along, check_plan_args, draw_plan
from instbank.paste.reference import check_inputs, composite_rects, default_value_range
from instbank.types import BankBatch


@dataclass(frozen=True)
class CopyPasteConfig:
    """Parameters of bank copy-paste (see ``instbank.paste.plan.draw_plan`` for the meaning).

    - ``prob``: probability that each staged crop is pasted (all ``K`` can be)
    - ``scale_range``, ``scale_mode``: log-uniform size factor, ``"relative"`` to the target's
      shorter side or ``"native"`` to the object's size in its source image
    - ``flip_prob``: horizontal flip probability
    - ``blend``: ``"gaussian"`` (alpha blurred with sigma uniform in ``sigma_range`` crop pixels),
      ``"hard"`` (alpha thresholded to 0/255) or ``"none"`` (stored alpha)
    - ``min_visible``: instances (existing and pasted) with a smaller visible fraction are invalid
    - ``impl``: ``"auto"`` (Triton on CUDA, numba on CPU, each when installed), ``"triton"``,
      ``"numba"`` or ``"torch"`` (the reference); see ``instbank.paste``
    - ``value_range``: ``None`` -> 255 for uint8 images, 1.0 for float images
    """

    prob: float = 1.0
    scale_range: tuple[float, float] = (0.1, 0.5)
    scale_mode: str = "relative"
    flip_prob: float = 0.5
    blend: str = "gaussian"
    sigma_range: tuple[float, float] = (0.5, 2.0)
    min_visible: float = 0.1
    impl: str = "auto"
    value_range: float | None = None

    def __post_init__(self) -> None:
        check_plan_args(self.scale_range, self.scale_mode, self.blend, self.sigma_range, self.prob, self.flip_prob)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")


class StagedPaste(NamedTuple):
    """``BankSource.sample``'s result: the plan and the uint8 crops ``[B, K, 4, S, S]`` it places
    (stored alpha; ``instbank.paste.paste`` prepares it per ``plan.blend``)."""

    plan: PastePlan
    crops: torch.Tensor


def stage(bank_batch: BankBatch | torch.Tensor) -> tuple[torch.Tensor, CropGeometry]:
    """uint8 crops ``[B, K, 4, S, S]`` and their geometry from a ``BankBatch`` or a packed tensor."""
    if isinstance(bank_batch, BankBatch):
        return bank_batch.pixels, CropGeometry.from_bank_batch(bank_batch)
    packed = bank_batch
    if not isinstance(packed, torch.Tensor) or packed.dim() != 5 or packed.shape[2] != 5:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"bank batch must be a BankBatch or a packed [B, K, 5, S, S] tensor, got {shape}")
    crops = packed[:, :, :4].to(torch.uint8)
    ids = packed[:, :, 4, 0, 0]
    class_ids = (ids.round() if ids.is_floating_point() else ids).to(torch.int64)
    return crops, CropGeometry.from_alpha(crops[:, :, 3], class_ids)


class BankSource(nn.Module):
    """Turns the staged crops of one step into a ``PastePlan`` for ``B`` target images."""

    def __init__(self, config: CopyPasteConfig | None = None, **overrides):
        super().__init__()
        self.config = replace(config if config is not None else CopyPasteConfig(), **overrides)
        self._crops: torch.Tensor | None = None
        self._geometry: CropGeometry | None = None

    def set_bank_batch(self, bank_batch: BankBatch | torch.Tensor) -> None:
        """Stage the crops for the next call(s): a ``BankBatch`` or packed ``[B, K, 5, S, S]``."""
        self._crops, self._geometry = stage(bank_batch)

    def sample(
        self,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        padding_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> StagedPaste:
        """Draw a plan for the staged crops; crops and plan on ``device`` (default: the generator's
        device, else where the crops are). ``batch_size``, when given, must match the staged B."""
        if self._crops is None or self._geometry is None:
            raise RuntimeError("no bank batch staged: call set_bank_batch(bank_batch) before sampling")
        staged_b = int(self._crops.shape[0])
        if batch_size is not None and batch_size != staged_b:
            raise ValueError(
                f"bank batch has B={staged_b} staged crop rows but the images have B={batch_size}; "
                "stage one row of crops per image"
            )
        if device is None:
            device = generator.device if generator is not None else self._crops.device
        dev = torch.device(device)
        cfg = self.config
        plan = draw_plan(
            self._geometry,
            image_size,
            generator,
            prob=cfg.prob,
            scale_range=cfg.scale_range,
            scale_mode=cfg.scale_mode,  # type: ignore[arg-type]
            flip_prob=cfg.flip_prob,
            blend=cfg.blend,  # type: ignore[arg-type]
            sigma_range=cfg.sigma_range,
            padding_mask=padding_mask,
            device=dev,
        )
        return StagedPaste(plan, self._crops.to(dev, non_blocking=True))


class BankCopyPaste(nn.Module):
    """Pastes all ``K`` staged crops into each image and updates the annotations.

    ``forward(images, masks=None, boxes=None, labels=None, valid=None, semantic=None,
    padding_mask=None, generator=None)`` returns a dict:

    - ``images``: like the input (dtype, memory format)
    - ``masks`` ``[B, N+K, H, W]`` (existing then pasted; the existing masks' dtype, bool if none),
      ``boxes`` float32 ``[B, N+K, 4]``, ``labels`` int64 ``[B, N+K]``, ``valid`` bool ``[B, N+K]``
    - ``semantic`` ``[B, H, W]`` (only when given)
    - ``paste_masks`` bool ``[B, K, H, W]`` (a view of ``masks[:, N:]`` when the masks are bool or
      uint8), ``paste_boxes``, ``paste_labels``, ``paste_valid``
    - ``plan``: the ``PastePlan`` used (replay it with ``instbank.paste.paste``)

    On CPU (``impl`` resolving to ``"numba"`` or ``"torch"``, bool or uint8 masks) the annotations are computed
    inside each paste's rectangle and written once into the output (``annotate_rects``);
    elsewhere by whole-mask torch ops without host synchronisation. Both give the same results.
    """

    def __init__(self, config: CopyPasteConfig | None = None, **overrides):
        super().__init__()
        self.source = BankSource(config, **overrides)

    @property
    def config(self) -> CopyPasteConfig:
        return self.source.config

    def set_bank_batch(self, bank_batch: BankBatch | torch.Tensor) -> None:
        """Stage the crops for the next forward: a ``BankBatch`` or packed ``[B, K, 5, S, S]``."""
        self.source.set_bank_batch(bank_batch)

    def forward(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        semantic: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        b, _, h, w = images.shape
        staged = self.source.sample((h, w), generator, padding_mask, batch_size=b, device=images.device)
        existing = _existing_instances(masks, boxes, labels, valid, b, h, w, images.device)
        on_cpu = all(t is None or t.device.type == "cpu" for t in (images, existing.masks, semantic, padding_mask))
        impl = resolve_impl(self.config.impl, images)
        rects = on_cpu and existing.masks.dtype in (torch.bool, torch.uint8) and impl in ("numba", "torch")
        if rects:
            blend = impl_module(impl).blend_rect
            out, merged, pasted, painted = self._paste_in_rects(images, staged, existing, padding_mask, semantic, blend)
        else:
            out, merged, pasted, painted = self._paste_whole(images, staged, existing, padding_mask, semantic)
        result = {
            "images": out,
            "masks": merged.masks,
            "boxes": merged.boxes,
            "labels": merged.labels,
            "valid": merged.valid,
            "paste_masks": pasted.masks,
            "paste_boxes": pasted.boxes,
            "paste_labels": pasted.labels,
            "paste_valid": pasted.valid,
            "plan": staged.plan,
        }
        if semantic is not None:
            result["semantic"] = painted
        return result

    def _paste_whole(self, images, staged: StagedPaste, existing: Instances, padding_mask, semantic):
        """Any device: ``paste`` then the annotations by whole-mask ops (no host synchronisation)."""
        cfg = self.config
        out, visible = paste(images, staged.crops, staged.plan, padding_mask, cfg.value_range, cfg.impl)
        pasted = paste_instances(visible, staged.plan, staged.crops, cfg.min_visible)
        kept = occlude_instances(existing, any_along(visible, 1), cfg.min_visible)
        merged = concat_instances(kept, pasted, existing.masks.dtype)
        if merged.masks.dtype in (torch.bool, torch.uint8):  # no second copy of the paste masks
            pasted = pasted._replace(masks=merged.masks[:, kept.masks.shape[1] :].view(torch.bool))
        painted = None if semantic is None else paint_semantic(semantic, visible, staged.plan.labels)
        return out, merged, pasted, painted

    def _paste_in_rects(self, images, staged: StagedPaste, existing: Instances, padding_mask, semantic, blend):
        """CPU: composite (per paste, ``blend``: a ``blend_rect``) and annotate inside each paste's
        rectangle, writing every output once."""
        cfg = self.config
        plan, crops = staged
        b, _, h, w = images.shape
        n, k = existing.labels.shape[1], crops.shape[1]
        prepared = prepare_alpha(crops, plan)
        check_inputs(images, prepared, plan, padding_mask)
        out = torch.empty_like(images)
        vrange = default_value_range(images.dtype, cfg.value_range)
        groups = composite_rects(out, images, prepared, plan, padding_mask, vrange, blend)
        masks = torch.empty((b, n + k, h, w), dtype=existing.masks.dtype)
        painted = None if semantic is None else semantic.clone()
        kept, pasted = annotate_rects(masks, groups, existing, plan, object_pixels(crops), cfg.min_visible, painted)
        merged = Instances(
            masks,
            torch.cat([kept.boxes, pasted.boxes], dim=1),
            torch.cat([kept.labels.to(torch.int64), pasted.labels], dim=1),
            torch.cat([kept.valid, pasted.valid], dim=1),
        )
        return out, merged, pasted, painted


def _existing_instances(masks, boxes, labels, valid, b, h, w, device) -> Instances:
    """The input instances, completed: boxes from masks and valid = mask not empty when absent."""
    if masks is None:
        if boxes is not None or labels is not None or valid is not None:
            raise ValueError("boxes/labels/valid of existing instances need their masks")
        return Instances(
            torch.zeros((b, 0, h, w), dtype=torch.bool, device=device),
            torch.zeros((b, 0, 4), dtype=torch.float32, device=device),
            torch.zeros((b, 0), dtype=torch.int64, device=device),
            torch.zeros((b, 0), dtype=torch.bool, device=device),
        )
    if masks.dim() != 4 or tuple(masks.shape[-2:]) != (h, w) or masks.shape[0] != b:
        raise ValueError(f"masks must be [B={b}, N, {h}, {w}], got {tuple(masks.shape)}")
    if labels is None:
        raise ValueError("labels are required with masks (int [B, N])")
    if boxes is None:
        boxes, nonempty = boxes_from_masks(masks)
    elif valid is None:
        nonempty = _nonempty(masks)
    return Instances(
        masks,
        boxes.to(torch.float32),
        labels.to(torch.int64),
        nonempty if valid is None else valid.to(torch.bool),
    )


def _nonempty(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N]``: masks ``[B, N, H, W]`` with a set pixel; for bool/uint8 on CPU, numpy's
    uint8 ``max`` per mask (4 us for 512^2, against 13 us for ``any`` and 120 us for torch's
    reduction over the flattened masks)."""
    if masks.device.type != "cpu" or masks.dtype not in (torch.bool, torch.uint8):
        return any_along(masks.flatten(2), -1)
    planes = masks.view(torch.uint8).numpy().reshape(-1, *masks.shape[2:])
    return torch.tensor([bool(m.max()) for m in planes], dtype=torch.bool).view(masks.shape[:2])
