"""Inputs shared by the tests of the paste kernels against the reference (Triton, numba): random
crops, plans and images, and named cases of odd shapes, dtypes, memory formats and plans."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class SpecPlan:
    """The five ``PastePlan`` fields both impls read (the spec's plan); the rest of ``PastePlan``
    is about what happens around the compositing."""

    apply: torch.Tensor
    scale: torch.Tensor
    inv_scale: torch.Tensor
    translate: torch.Tensor
    flip: torch.Tensor

    def to(self, device) -> SpecPlan:
        return SpecPlan(*(getattr(self, f.name).to(device) for f in fields(self)))


def make_plan(apply, scale, translate, flip) -> SpecPlan:
    """``inv_scale = 1 / scale`` computed once in torch, as ``draw_plan`` does."""
    return SpecPlan(apply, scale, 1.0 / scale, translate, flip)


def random_crops(g: torch.Generator, b: int, k: int, s: int) -> torch.Tensor:
    """uint8 ``[B, K, 4, S, S]``: random RGB; alpha a third 0, a third 255, a third any value (so
    bilinear sums land on both sides of the 128 threshold often)."""
    crops = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    pick = torch.rand((b, k, s, s), generator=g)
    alpha = crops[:, :, 3]
    crops[:, :, 3] = torch.where(pick < 1 / 3, 0, torch.where(pick < 2 / 3, 255, alpha))
    return crops


def random_plan(g, b, k, s, h, w, *, scale_range=(0.4, 2.5), apply_prob=0.8, flip_prob=0.5, spill=0.5):
    """Log-uniform scales; canvas centres uniform over the image grown by ``spill`` canvas sides on
    each border (so with ``spill > 0.5`` some canvases miss the image entirely)."""
    lo, hi = torch.log(torch.tensor(scale_range))
    scale = torch.exp(lo + torch.rand((b, k), generator=g) * (hi - lo))
    side = (scale * s)[..., None]
    span = torch.tensor([w, h], dtype=torch.float32) + 2 * spill * side
    translate = torch.rand((b, k, 2), generator=g) * span - side * (1 + spill) + side * 0.5
    apply = torch.rand((b, k), generator=g) < apply_prob
    flip = torch.rand((b, k), generator=g) < flip_prob
    return make_plan(apply, scale, translate, flip)


def random_images(g, b, h, w, dtype, value_range=None) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    top = 1.0 if value_range is None else value_range
    return (torch.rand((b, 3, h, w), generator=g) * top).to(dtype)


CASES = {
    # name: (B, K, S, H, W, dtype, extra options)
    "one-paste": (1, 1, 17, 37, 53, torch.uint8, {}),
    "b3-k5": (3, 5, 17, 37, 53, torch.uint8, {}),
    "channels-last": (2, 3, 17, 37, 53, torch.uint8, {"channels_last": True}),
    "float32": (2, 4, 17, 37, 53, torch.float32, {}),
    "float32-channels-last-range2": (2, 3, 17, 37, 53, torch.float32, {"channels_last": True, "value_range": 2.0}),
    "uint8-range510": (2, 3, 17, 37, 53, torch.uint8, {"value_range": 510.0}),
    "float16": (1, 4, 17, 37, 53, torch.float16, {}),
    "bfloat16": (1, 4, 17, 37, 53, torch.bfloat16, {}),
    "padding": (2, 4, 17, 37, 53, torch.uint8, {"padding": True}),
    "all-flipped": (2, 3, 17, 37, 53, torch.uint8, {"plan": {"flip_prob": 1.0}}),
    "none-applied": (2, 3, 17, 37, 53, torch.uint8, {"plan": {"apply_prob": 0.0}}),
    "shrink": (2, 4, 17, 37, 53, torch.uint8, {"plan": {"scale_range": (0.25, 0.9)}}),
    "enlarge": (2, 3, 17, 37, 53, torch.uint8, {"plan": {"scale_range": (1.5, 3.5)}}),
    "mostly-outside": (2, 5, 17, 37, 53, torch.uint8, {"plan": {"spill": 1.2}}),
    "wide-many-tiles": (2, 5, 9, 40, 150, torch.uint8, {"plan": {"scale_range": (0.8, 1.5)}}),
    "strided-views": (2, 3, 17, 37, 53, torch.uint8, {"views": True}),
}



def make_case(name: str):
    """``(images, crops, plan, padding_mask or None, value_range or None)`` of ``CASES[name]``, on CPU."""
    b, k, s, h, w, dtype, opts = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    images = random_images(g, b, h, w, dtype, opts.get("value_range"))
    crops = random_crops(g, b, k, s)
    plan = random_plan(g, b, k, s, h, w, **opts.get("plan", {}))
    padding = None
    if opts.get("padding"):
        # Large-scale-jitter style padding (right and bottom bands) plus scattered pixels.
        padding = torch.rand((b, h, w), generator=g) < 0.1
        padding[:, :, w - 11 :] = True
        padding[:, h - 7 :, :] = True
    if opts.get("channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    if opts.get("views"):
        # Crops as the first 4 planes of a packed [B, K, 5, S, S] tensor; images cut from wider ones.
        packed = torch.zeros((b, k, 5, s, s), dtype=torch.uint8)
        packed[:, :, :4] = crops
        crops = packed[:, :, :4]
        images = torch.cat([images, images], dim=3)[:, :, :, 3 : 3 + w]
        assert not crops.is_contiguous() and not images.is_contiguous()
    return images, crops, plan, padding, opts.get("value_range")


class PasteDataset(torch.utils.data.Dataset):
    """Item ``i``: one ``BankCopyPaste(impl=...)`` call on inputs seeded by ``i`` -> ``(images,
    paste_masks)``; module-level so that DataLoader workers started with spawn can import it."""

    def __init__(self, impl: str, n: int = 2):
        self.impl, self.n = impl, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from instbank.paste import BankCopyPaste

        g = torch.Generator().manual_seed(i)
        images, crops = random_images(g, 2, 37, 53, torch.uint8), random_crops(g, 2, 4, 17)
        packed = torch.cat([crops, torch.zeros((2, 4, 1, 17, 17), dtype=torch.uint8)], dim=2)
        module = BankCopyPaste(impl=self.impl, blend="gaussian", scale_range=(0.3, 1.0))
        module.set_bank_batch(packed)
        out = module(images, generator=torch.Generator().manual_seed(i))
        return out["images"], out["paste_masks"]


# ------------------------------------------------------------------------------------------------
# targets beyond masks: keypoints, panoptic maps, in-batch objects

#: A 5-keypoint toy skeleton for synthetic tests (nose, then two left/right pairs).
TOY_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_hand", "right_hand")
TOY_FLIP = (0, 2, 1, 4, 3)


def disk_crops(g: torch.Generator, b: int, k: int, s: int) -> torch.Tensor:
    """uint8 ``[B, K, 4, S, S]``: random RGB, alpha 255 on a centred disk (radius 0.4 S), 0 outside."""
    crops = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= (0.4 * s) ** 2
    crops[:, :, 3] = torch.where(disk, 255, 0).to(torch.uint8)
    return crops


def synthetic_keypoints(g: torch.Generator, shape: tuple, width: float, height: float, spill: float = 0.0):
    """float32 ``[*shape, 3]`` synthetic keypoints: ``x, y`` uniform over ``[-spill, 1 + spill]`` of
    ``width x height``, ``v`` uniform in {0, 1, 2} (``x = y = 0`` where 0, as COCO writes them)."""
    xy = (torch.rand((*shape, 2), generator=g) * (1 + 2 * spill) - spill) * torch.tensor([width, height])
    v = torch.randint(0, 3, shape, generator=g).float()
    return torch.where((v > 0)[..., None], torch.cat([xy, v[..., None]], dim=-1), 0.0)


def keypoint_bank_batch(g: torch.Generator, b: int, k: int, s: int, num_classes: int = 5, flip=TOY_FLIP):
    """A ``BankBatch`` of disk crops with synthetic keypoints (crop pixels, some outside the canvas),
    geometry of an object of ``S x S`` source pixels filling the canvas."""
    from instbank.types import BankBatch

    return BankBatch(
        pixels=disk_crops(g, b, k, s),
        class_ids=torch.randint(0, num_classes, (b, k), generator=g),
        indices=torch.arange(b * k).view(b, k),
        src_box=torch.tensor([0.0, 0.0, s, s]).expand(b, k, 4).clone(),
        scale=torch.ones((b, k)),
        offset=torch.zeros((b, k, 2)),
        num_classes=num_classes,
        keypoints=synthetic_keypoints(g, (b, k, len(flip)), s, s, spill=0.1),
        keypoint_flip=torch.tensor(flip),
    )


def instance_masks(g: torch.Generator, b: int, n: int, h: int, w: int) -> torch.Tensor:
    """bool ``[B, N, H, W]``: each instance a random rectangle, 80% of its pixels set (holes keep
    the tight box and the mask apart), one in seven empty."""
    masks = torch.zeros((b, n, h, w), dtype=torch.bool)
    for i in range(b):
        for j in range(n):
            if torch.rand((), generator=g) < 1 / 7:
                continue
            x0, y0 = (int(torch.randint(0, m - 3, (), generator=g)) for m in (w, h))
            x1 = min(w, x0 + int(torch.randint(2, w // 2, (), generator=g)))
            y1 = min(h, y0 + int(torch.randint(2, h // 2, (), generator=g)))
            masks[i, j, y0:y1, x0:x1] = torch.rand((y1 - y0, x1 - x0), generator=g) < 0.8
    return masks


def triton_targets():
    """``instbank.paste.triton_targets``, under the Triton interpreter when there is no GPU; skips
    the test without Triton."""
    import os

    import pytest

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when the module's kernels are decorated (imported)
    pytest.importorskip("triton", reason="triton is not installed (it ships for Linux x86-64 only)")
    from instbank.paste import triton_targets as module

    return module


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
