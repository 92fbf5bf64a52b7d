"""nn.Modules for training loops: ``BankCopyPaste`` (plan + paste + annotations in one call) and
``BankSource`` (staged crops -> a ``PastePlan``, for code that composites itself).

Both take the crops staged for one step with ``set_bank_batch``: a ``BankBatch`` (exact crop
geometry, so both scale modes work) or the packed ``[B, K, 5, S, S]`` tensor of
``BankBatch.packed()`` (RGB, alpha, a plane filled with the class id; any integer or float dtype;
no source geometry, so only ``scale_mode="relative"``). The staged batch size must equal the
images' batch size: a mismatch raises rather than silently reusing or dropping crops.

``BankCopyPaste`` can also take its objects from the batch itself (``CopyPasteConfig.in_batch``:
the objects of the other images, ``instbank.paste.inbatch``), alone or mixed with bank crops, and
carries keypoints (``instbank.paste.keypoints``) and panoptic maps (``instbank.paste.panoptic``)
through the paste.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from instbank.paste import IMPLS, paste, prepared_alpha, resolve_impl
from instbank.paste.annotations import (
    Instances,
    boxes_from_masks,
    complete_instances,
    concat_instances,
    mask_nonempty,
    occlude_instances,
    paint_semantic,
    paste_annotate_rects,
    paste_instances,
)
from instbank.paste.plan import MAX_UPSCALE, CropGeometry, PastePlan, any_along, check_plan_args, draw_plan
from instbank.paste.reference import check_inputs, default_value_range
from instbank.types import BankBatch

if TYPE_CHECKING:  # pragma: no cover
    from instbank.paste.panoptic import PanopticSchema


@dataclass(frozen=True)
class CopyPasteConfig:
    """Parameters of bank copy-paste (see ``instbank.paste.plan.draw_plan`` for the meaning).

    - ``prob``: probability that each staged crop is pasted (all ``K`` can be)
    - ``scale_range``, ``scale_mode``: log-uniform size factor, ``"relative"`` to the target's
      shorter side or ``"native"`` to the object's size in its source image
    - ``max_upscale``: no object is pasted larger than this times its size in its source image
      (default 1.5; crops of tiny objects must not become blurred blobs); the factor is drawn
      inside that bound. Packed crops (no source geometry) are bounded by their size in the crop.
      ``None``: no bound
    - ``flip_prob``: horizontal flip probability
    - ``blend``: ``"gaussian"`` (alpha blurred with sigma uniform in ``sigma_range`` crop pixels),
      ``"hard"`` (alpha thresholded to 0/255) or ``"none"`` (stored alpha)
    - ``min_visible``: instances (existing and pasted) with a smaller visible fraction are invalid
    - ``impl``: ``"auto"`` (Triton on CUDA, numba on CPU, each when installed), ``"triton"``,
      ``"numba"`` or ``"torch"`` (the reference); see ``instbank.paste``
    - ``value_range``: ``None`` -> 255 for uint8 images, 1.0 for float images
    - ``in_batch``: probability that a paste slot takes an object of another image of the batch
      instead of its bank crop (``instbank.paste.inbatch``; a slot whose source image has no object
      left for it keeps its bank crop). 0: bank crops only (the default); 1: in-batch objects only,
      no bank batch needed
    - ``in_batch_k``, ``in_batch_crop_size``: pastes per image and crop side ``S`` of in-batch
      objects when no bank batch is staged (with one: its ``K`` and ``S``)
    - ``sampling_ratio``: samples per crop pixel and axis when in-batch objects are resampled (1, 2
      or 4; RoIAlign's averaging, 2 as Mask R-CNN runs it)
    - ``panoptic``: the ``PanopticSchema`` of the panoptic maps given to ``forward`` (None: no maps)
    """

    prob: float = 1.0
    scale_range: tuple[float, float] = (0.1, 0.5)
    scale_mode: str = "relative"
    max_upscale: float | None = MAX_UPSCALE
    flip_prob: float = 0.5
    blend: str = "gaussian"
    sigma_range: tuple[float, float] = (0.5, 2.0)
    min_visible: float = 0.1
    impl: str = "auto"
    value_range: float | None = None
    in_batch: float = 0.0
    in_batch_k: int = 8
    in_batch_crop_size: int = 128
    sampling_ratio: int = 2
    panoptic: "PanopticSchema | None" = None

    def __post_init__(self) -> None:
        check_plan_args(self.scale_range, self.scale_mode, self.blend, self.sigma_range, self.prob, self.flip_prob,
                        self.max_upscale)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")
        if not 0 <= self.in_batch <= 1:
            raise ValueError(f"in_batch must be in [0, 1], got {self.in_batch}")
        if self.in_batch_k < 0 or self.in_batch_crop_size < 1:
            raise ValueError(f"in_batch_k must be >= 0 and in_batch_crop_size >= 1, got {self.in_batch_k} and "
                             f"{self.in_batch_crop_size}")
        from instbank.paste.inbatch import check_sampling_ratio
        from instbank.paste.panoptic import PanopticSchema

        check_sampling_ratio(self.sampling_ratio)
        if self.panoptic is not None and not isinstance(self.panoptic, PanopticSchema):
            raise TypeError(f"panoptic must be a PanopticSchema or None, got {type(self.panoptic).__name__}")


class StagedPaste(NamedTuple):
    """``BankSource.sample``'s result: the plan and the uint8 crops ``[B, K, 4, S, S]`` it places
    (stored alpha; ``instbank.paste.paste`` prepares it per ``plan.blend``)."""

    plan: PastePlan
    crops: torch.Tensor


class Staged(NamedTuple):
    """What a source hands the plan and the compositing: uint8 crops ``[B, K, 4, S, S]`` (stored
    alpha), their ``CropGeometry``, their keypoints float32 ``[B, K, J, 3]`` (crop pixels) and the
    flip permutation int64 ``[J]`` (both None without keypoints)."""

    crops: torch.Tensor
    geometry: CropGeometry
    keypoints: torch.Tensor | None = None
    keypoint_flip: torch.Tensor | None = None


def stage(bank_batch: BankBatch | torch.Tensor) -> Staged:
    """The ``Staged`` crops of a ``BankBatch`` or of a packed tensor (no geometry, no keypoints)."""
    if isinstance(bank_batch, BankBatch):
        return Staged(bank_batch.pixels, CropGeometry.from_bank_batch(bank_batch), bank_batch.keypoints,
                      bank_batch.keypoint_flip)
    packed = bank_batch
    if not isinstance(packed, torch.Tensor) or packed.dim() != 5 or packed.shape[2] != 5:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"bank batch must be a BankBatch or a packed [B, K, 5, S, S] tensor, got {shape}")
    crops = packed[:, :, :4].to(torch.uint8, memory_format=torch.contiguous_format)  # once per staging
    ids = packed[:, :, 4, 0, 0]
    class_ids = (ids.round() if ids.is_floating_point() else ids).to(torch.int64)
    return Staged(crops, CropGeometry.from_alpha(crops[:, :, 3], class_ids))


class BankSource(nn.Module):
    """Turns the staged crops of one step into a ``PastePlan`` for ``B`` target images."""

    def __init__(self, config: CopyPasteConfig | None = None, **overrides):
        super().__init__()
        self.config = replace(config if config is not None else CopyPasteConfig(), **overrides)
        self._staged: Staged | None = None

    def set_bank_batch(self, bank_batch: BankBatch | torch.Tensor) -> None:
        """Stage the crops for the next call(s): a ``BankBatch`` or packed ``[B, K, 5, S, S]``."""
        self._staged = stage(bank_batch)

    @property
    def staged(self) -> Staged | None:
        """The crops staged by ``set_bank_batch`` (None before the first call)."""
        return self._staged

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
        staged = self.checked(batch_size)
        if device is None:
            device = generator.device if generator is not None else staged.crops.device
        dev = torch.device(device)
        plan = self.draw(staged.geometry, image_size, generator, padding_mask, dev)
        return StagedPaste(plan, staged.crops.to(dev, non_blocking=True))

    def checked(self, batch_size: int | None = None) -> Staged:
        """The staged crops; ``RuntimeError`` when none are, ``ValueError`` when their B is not
        ``batch_size``."""
        if self._staged is None:
            raise RuntimeError("no bank batch staged: call set_bank_batch(bank_batch) before sampling")
        staged_b = int(self._staged.crops.shape[0])
        if batch_size is not None and batch_size != staged_b:
            raise ValueError(
                f"bank batch has B={staged_b} staged crop rows but the images have B={batch_size}; "
                "stage one row of crops per image"
            )
        return self._staged

    def draw(self, geometry: CropGeometry, image_size, generator, padding_mask, device: torch.device) -> PastePlan:
        """``draw_plan`` of ``geometry`` with this source's configuration."""
        cfg = self.config
        return draw_plan(
            geometry,
            image_size,
            generator,
            prob=cfg.prob,
            scale_range=cfg.scale_range,
            scale_mode=cfg.scale_mode,  # type: ignore[arg-type]
            max_upscale=cfg.max_upscale,
            flip_prob=cfg.flip_prob,
            blend=cfg.blend,  # type: ignore[arg-type]
            sigma_range=cfg.sigma_range,
            padding_mask=padding_mask,
            device=device,
        )


class BankCopyPaste(nn.Module):
    """Pastes all ``K`` staged crops into each image and updates the annotations.

    ``forward(images, masks=None, boxes=None, labels=None, valid=None, semantic=None,
    padding_mask=None, generator=None, keypoints=None, panoptic=None, keypoint_flip=None, segments=None,
    panoptic_out=None, return_masks=True, inplace=False)`` returns a dict:

    - ``images``: like the input (dtype, memory format)
    - ``masks`` ``[B, N+K, H, W]`` (existing then pasted; the existing masks' dtype, bool if none),
      ``boxes`` float32 ``[B, N+K, 4]``, ``labels`` int64 ``[B, N+K]``, ``valid`` bool ``[B, N+K]``
    - ``semantic`` ``[B, H, W]`` (only when given)
    - ``paste_masks`` bool ``[B, K, H, W]`` (a view of ``masks[:, N:]`` when the masks are bool or
      uint8), ``paste_boxes``, ``paste_labels``, ``paste_valid``
    - ``plan``: the ``PastePlan`` used (replay it with ``instbank.paste.paste``)

    ``return_masks=False`` leaves ``masks`` and ``paste_masks`` out (semantic segmentation needs
    only the images and the map; on CPU no ``[B, K, H, W]`` planes are then made, 17 MB for a
    batch of 8 at 512^2 with K = 8); the rest is unchanged. ``inplace=True`` paints the pastes
    into ``images``, ``semantic`` and ``panoptic`` themselves (returned as ``images``, ``semantic``
    and ``panoptic``): on CPU
    the pixels no paste reaches are then not copied (for a caller that drops its inputs anyway,
    such as a loader's freshly made batch).

    With keypoints (``keypoints`` float ``[B, N, J, 3]`` of the existing instances in image pixels,
    COCO's ``x, y, v``, and/or a bank batch carrying them): ``keypoints`` float32 ``[B, N+K, J, 3]``
    aligned with ``masks``, and ``keypoints_dropped`` int64 ``[B]`` (labeled existing keypoints
    found outside the image or in padding, made unlabeled); see ``instbank.paste.keypoints``.
    ``keypoint_flip`` (``[J]`` ints) is the left/right permutation when no bank batch carries one.

    With a panoptic map (``panoptic`` int ``[B, H, W]``, ids as ``config.panoptic`` says):
    ``panoptic`` (painted) and ``segments`` (``instbank.paste.panoptic.Segments``, ``M`` existing
    segments then the ``K`` pastes, aligned with ``masks[:, N:]``). ``segments`` given to
    ``forward`` is the existing segments' table (a ``Segments``, ``(ids, area)`` ``[B, M]``, or
    COCO ``segments_info`` lists: ``panoptic.given_segments``): the map is then not counted.
    ``panoptic_out`` (like ``panoptic``) receives the painted map; ``panoptic_out=panoptic``, or
    ``inplace=True``, paints in place (on CPU only the pastes' pixels are then written).

    With in-batch objects (``config.in_batch > 0``): ``source_image`` int64 ``[B]`` and
    ``source_instance`` int64 ``[B, K]`` (the instance of ``source_image`` each paste slot took, -1
    for a bank crop).

    On CPU (``impl`` resolving to ``"numba"`` or ``"torch"``, bool or uint8 masks) the annotations
    are computed inside each paste's rectangle and written once into the output
    (``paste_annotate_rects``: compiled in ``instbank.paste.cpu_kernel``, numpy in
    ``instbank.paste.annotations``); elsewhere by whole-mask torch ops without host
    synchronisation. All give the same results.
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
        keypoints: torch.Tensor | None = None,
        panoptic: torch.Tensor | None = None,
        keypoint_flip=None,
        segments=None,
        panoptic_out: torch.Tensor | None = None,
        return_masks: bool = True,
        inplace: bool = False,
    ) -> dict:
        b, _, h, w = images.shape
        existing = _existing_instances(masks, boxes, labels, valid, b, h, w, images.device)
        if keypoints is not None:
            from instbank.paste.keypoints import check_keypoints

            check_keypoints(keypoints, b, existing.labels.shape[1])
        if panoptic is not None or segments is not None or panoptic_out is not None:
            _check_panoptic(panoptic, self.config, b, h, w, segments, panoptic_out)
        map_back = False  # inplace paints the map as well; one of other strides as a copy, copied back
        if inplace and panoptic is not None and panoptic_out is None:
            map_back = not panoptic.is_contiguous()
            panoptic_out = None if map_back else panoptic
        impl = resolve_impl(self.config.impl, images)
        staged, origin = self._stage(images, existing, keypoints, generator, impl)
        plan = self.source.draw(staged.geometry, (h, w), generator, padding_mask, images.device)
        paste_plan = StagedPaste(plan, staged.crops.to(images.device, non_blocking=True))
        on_cpu = all(t is None or t.device.type == "cpu" for t in (images, existing.masks, semantic, padding_mask))
        rects = on_cpu and existing.masks.dtype in (torch.bool, torch.uint8) and impl in ("numba", "torch")
        # a panoptic map's ids are checked before the pastes: a bad map leaves images painted in
        # place as they were
        known = None if panoptic is None else _existing_segments(panoptic, plan.labels, self.config.panoptic,
                                                                 segments, panoptic_out, impl)
        if rects:
            # keypoints and panoptic maps are placed with the pastes' visible masks
            with_masks = return_masks or keypoints is not None or staged.keypoints is not None or panoptic is not None
            out, merged, pasted, painted = self._paste_in_rects(images, paste_plan, existing, padding_mask, semantic,
                                                                impl, with_masks, inplace)
        else:
            existing = complete_instances(existing)
            out, merged, pasted, painted = self._paste_whole(images, paste_plan, existing, padding_mask, semantic)
            if inplace:
                out = images.copy_(out)
                painted = None if semantic is None else semantic.copy_(painted)
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
            "plan": plan,
        }
        if not return_masks:
            del result["masks"], result["paste_masks"]
        if semantic is not None:
            result["semantic"] = painted
        if keypoints is not None or staged.keypoints is not None:
            _check_keypoint_count(keypoints, staged.keypoints)
            flip = _keypoint_flip(keypoint_flip, staged, keypoints)
            result["keypoints"], result["keypoints_dropped"] = _paste_keypoints(
                keypoints, staged.keypoints, flip, plan, pasted, padding_mask, impl, existing.labels.shape[1])
        if panoptic is not None:
            result["panoptic"], result["segments"] = _paste_panoptic(panoptic, pasted, self.config.panoptic, impl,
                                                                     known, panoptic_out)
        if map_back:
            result["panoptic"] = panoptic.copy_(result["panoptic"])
        if origin is not None:
            result["source_image"], result["source_instance"] = origin
        return result

    def _stage(self, images, existing: Instances, keypoints, generator, impl: str):
        """The crops of this step, ``Staged``: the bank batch's, in-batch objects, or a mix of both
        (``config.in_batch``); and where in-batch ones come from (``None`` without them)."""
        cfg = self.config
        b = images.shape[0]
        if cfg.in_batch == 0:
            return self.source.checked(b), None
        from instbank.paste import inbatch

        bank = self.source.staged
        if bank is None and cfg.in_batch < 1:
            raise RuntimeError(f"no bank batch staged: in_batch={cfg.in_batch} mixes bank crops with in-batch objects; "
                               "call set_bank_batch(bank_batch), or set in_batch=1")
        if bank is not None:
            bank = self.source.checked(b)
            k, s = bank.crops.shape[1], bank.crops.shape[-1]
        else:
            k, s = cfg.in_batch_k, cfg.in_batch_crop_size
        valid = existing.valid if existing.valid is not None else mask_nonempty(existing.masks)
        draw = inbatch.draw_sources(valid, k, generator)
        boxes = existing.boxes if existing.boxes is not None else boxes_from_masks(existing.masks)[0]
        geometry = inbatch.object_geometry(boxes, draw, s)
        taken = draw.source_instance >= 0
        if bank is not None:
            taken &= torch.rand((b, k), generator=generator, device=taken.device) < cfg.in_batch
        pixels = inbatch.as_uint8(images, default_value_range(images.dtype, cfg.value_range))
        resample = _target_impl(impl, inbatch).resample_objects
        planes = existing.masks if existing.masks.dtype in (torch.bool, torch.uint8) else existing.masks != 0
        # only the slots that take an object are resampled (a bank crop fills the others)
        cut = draw if bank is None else draw._replace(source_instance=torch.where(taken, draw.source_instance, -1))
        crops = resample(pixels, planes, cut, geometry, s, cfg.sampling_ratio)
        objects = Staged(crops, inbatch.crop_geometry(geometry, existing.labels, draw, s),
                         None if keypoints is None else inbatch.crop_keypoints(keypoints, geometry, draw))
        if bank is not None:
            objects = _mix(taken, objects, bank, images.device)
        origin = (draw.source_image, torch.where(taken, draw.source_instance, -1))
        return objects, origin

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

    def _paste_in_rects(self, images, staged: StagedPaste, existing: Instances, padding_mask, semantic, impl: str,
                        with_masks: bool = True, inplace: bool = False):
        """CPU: composite and annotate inside each paste's rectangle, writing every output once
        (``paste_annotate_rects`` of ``impl``: the numba kernel or the numpy reference)."""
        if impl == "numba":  # imports numba, so only when asked for
            from instbank.paste.cpu_kernel import paste_annotate_rects as run
        else:
            run = paste_annotate_rects
        cfg = self.config
        plan, crops = staged
        check_inputs(images, crops, plan, padding_mask)
        vrange = default_value_range(images.dtype, cfg.value_range)
        alpha = prepared_alpha(crops, plan)
        return run(images, crops, alpha, plan, padding_mask, vrange, existing, cfg.min_visible, semantic, with_masks,
                   inplace)


def _target_impl(impl: str, reference):
    """The module implementing a target for a resolved ``impl``: ``instbank.paste.cpu_targets``
    (numba), ``instbank.paste.triton_targets``, or the target's own reference module."""
    if impl == "numba":
        from instbank.paste import cpu_targets

        return cpu_targets
    if impl == "triton":
        from instbank.paste import triton_targets

        return triton_targets
    return reference


def _mix(taken: torch.Tensor, objects: Staged, bank: Staged, device) -> Staged:
    """Per slot (bool ``[B, K]``), the in-batch object where ``taken``, else the bank crop."""
    crops = torch.where(taken[:, :, None, None, None], objects.crops, bank.crops.to(device, non_blocking=True))
    g, o = bank.geometry, objects.geometry
    if g.source_side is None and o.source_side is not None:  # packed crops: their native size is their crop size
        box = g.object_box.to(device)
        bank_side = torch.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1])
    else:
        bank_side = g.source_side.to(device)
    geometry = CropGeometry(
        torch.where(taken, o.class_ids, g.class_ids.to(device)),
        o.crop_size,
        torch.where(taken[..., None], o.object_box, g.object_box.to(device)),
        torch.where(taken, o.source_side, bank_side),
    )
    keypoints = None
    if objects.keypoints is not None or bank.keypoints is not None:
        _check_keypoint_count(objects.keypoints, bank.keypoints)
        ours = objects.keypoints if objects.keypoints is not None else torch.zeros_like(bank.keypoints).to(device)
        theirs = bank.keypoints.to(device) if bank.keypoints is not None else torch.zeros_like(ours)
        keypoints = torch.where(taken[..., None, None], ours, theirs.to(ours.dtype))
    return Staged(crops, geometry, keypoints, bank.keypoint_flip)


def _check_keypoint_count(keypoints, crop_keypoints) -> None:
    if keypoints is not None and crop_keypoints is not None and keypoints.shape[2] != crop_keypoints.shape[2]:
        raise ValueError(f"keypoints [B, N, J={keypoints.shape[2]}, 3] do not match the bank batch's keypoints "
                         f"[B, K, J={crop_keypoints.shape[2]}, 3]")


def _keypoint_flip(given, staged: Staged, keypoints) -> torch.Tensor:
    """The left/right permutation int64 ``[J]``: ``given`` (checked), else the bank batch's; a
    ``ValueError`` when neither is there (an identity would silently swap nothing)."""
    j = (keypoints if keypoints is not None else staged.keypoints).shape[2]
    if given is not None:
        BankBatch.check_keypoint_flip(given, j, "keypoint_flip")
        return torch.as_tensor(given, dtype=torch.int64)
    if staged.keypoint_flip is None:
        raise ValueError("keypoint_flip is needed to flip pasted keypoints (no bank batch carries one): pass "
                         f"keypoint_flip=[...] of length J={j} (list(range(J)) when the skeleton has no pairs)")
    if tuple(staged.keypoint_flip.shape) != (j,):  # a permutation: BankBatch checked it
        raise ValueError(f"BankBatch.keypoint_flip must be [J={j}], got {tuple(staged.keypoint_flip.shape)}")
    return staged.keypoint_flip


def _paste_keypoints(keypoints, crop_keypoints, flip, plan: PastePlan, pasted: Instances, padding_mask, impl: str,
                     n: int):
    """``keypoints`` ``[B, N+K, J, 3]`` and ``keypoints_dropped`` ``[B]`` (``instbank.paste.keypoints``),
    placed with the pastes' visible masks (``pasted``)."""
    from instbank.paste import keypoints as spec

    b, k = plan.apply.shape
    dev = plan.apply.device
    j = (keypoints if keypoints is not None else crop_keypoints).shape[2]
    if crop_keypoints is None:
        crop_keypoints = torch.zeros((b, k, j, 3), dtype=torch.float32, device=dev)
    theirs = torch.zeros((b, n, j, 3), device=dev) if keypoints is None else keypoints.to(dev, torch.float32)
    if impl == "numba":  # its masks' tight boxes tell where to read them
        from instbank.paste import cpu_targets

        return cpu_targets.keypoints_after_paste(theirs, crop_keypoints, flip, plan, pasted.masks, padding_mask,
                                                 pasted.boxes)
    run = _target_impl(impl, spec).keypoints_after_paste
    return run(theirs, crop_keypoints.to(dev), flip.to(dev), plan, pasted.masks, padding_mask)


def _check_panoptic(panoptic, config: CopyPasteConfig, b: int, h: int, w: int, segments, out) -> None:
    from instbank.paste.panoptic import check_map

    if panoptic is None:
        raise ValueError("segments and panoptic_out describe a panoptic map: pass it as panoptic=")
    if config.panoptic is None:
        raise ValueError("a panoptic map was given but CopyPasteConfig.panoptic (its PanopticSchema) is None")
    check_map(panoptic, b, h, w)
    if out is not None and (out.shape != panoptic.shape or out.dtype != panoptic.dtype or
                            out.device != panoptic.device):
        raise ValueError(f"panoptic_out must be like panoptic ({panoptic.dtype} {tuple(panoptic.shape)} on "
                         f"{panoptic.device}), got {out.dtype} {tuple(out.shape)} on {out.device}")


def _existing_segments(panoptic, labels, schema, segments, out, impl: str):
    """A panoptic map's existing segments, checked, before the pastes: ``cpu_targets.PanopticPaint``
    for ``impl`` numba (the map copied into ``out`` meanwhile), else ``(table,
    panoptic.existing_segments(...))``; ``segments``: the existing segments' table as the caller
    gives it."""
    from instbank.paste import panoptic as spec

    table = None if segments is None else spec.given_segments(segments, schema, panoptic.shape[0], panoptic.device)
    if impl == "numba":
        from instbank.paste import cpu_targets

        return cpu_targets.prepare_panoptic(panoptic, labels, schema, table, out)
    return table, spec.existing_segments(panoptic, labels.to(panoptic.device), schema, table)


def _paste_panoptic(panoptic, pasted: Instances, schema, impl: str, known, out=None):
    """The painted map and its ``Segments`` (``instbank.paste.panoptic``); ``known``: what
    ``_existing_segments`` returned; ``out``: where the map goes."""
    from instbank.paste import panoptic as spec

    if impl == "numba":
        from instbank.paste import cpu_targets

        return cpu_targets.finish_panoptic(known, schema, pasted.masks, pasted.boxes)
    paint = paint_semantic
    if impl == "triton":
        from instbank.paste import triton_targets

        def paint(source, masks, ids):
            return triton_targets.paint_map(source, masks, ids, out=out)

    table, existing = known
    return spec.paste_panoptic(panoptic, pasted.masks, pasted.labels, schema, paint=paint, segments=table, out=out,
                               existing=existing)


def _existing_instances(masks, boxes, labels, valid, b, h, w, device) -> Instances:
    """The input instances, checked; ``boxes``/``valid`` stay None when not given
    (``complete_instances`` derives them from the masks; the CPU kernel while copying them)."""
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
    return Instances(masks, boxes, labels, valid)
