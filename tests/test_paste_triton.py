"""The Triton paste kernel agrees with the torch reference: uint8 images within 1 level, float images
within 1/255, visible masks exactly.

With CUDA the compiled kernel runs on the GPU; without it the kernel runs on CPU tensors under the
Triton interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so the
variable is set here, before ``instbank.paste.triton_kernel`` is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not installed (it ships for Linux x86-64 only)")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from instbank.paste import reference, triton_kernel  # noqa: E402
from instbank.paste.plan import CropGeometry, draw_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(triton_kernel._paste_kernel, InterpretedFunction):
    pytest.skip(
        "instbank.paste.triton_kernel was imported before TRITON_INTERPRET=1 was set (by another test "
        "module in this process), and there is no GPU: run this file on its own",
        allow_module_level=True,
    )

FLOAT_TOL = 1 / 255 + 1e-5


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
    """Log-uniform scales; canvas corners drawn so that up to ``spill`` of the canvas leaves the image."""
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


def assert_agree(images, crops, plan, padding_mask=None, value_range=None):
    """Run both impls on ``DEVICE``; check the tolerance, the masks, and that nothing was modified."""
    images, crops, plan = images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE)
    if padding_mask is not None:
        padding_mask = padding_mask.to(DEVICE)
    before = images.clone()
    out, masks = triton_kernel.paste_image(images, crops, plan, padding_mask, value_range)
    assert torch.equal(images, before)
    # A clone (same memory format): the reference must not be able to change what we compare with.
    ref_out, ref_masks = reference.paste_image(images.clone(), crops, plan, padding_mask, value_range)
    assert out.dtype == images.dtype and out.shape == images.shape
    assert out.stride() == ref_out.stride()  # same memory format as the input, as the reference
    assert masks.dtype == torch.bool and masks.shape == ref_masks.shape
    assert torch.equal(masks, ref_masks)
    if images.dtype == torch.uint8:
        assert (out.int() - ref_out.int()).abs().max().item() <= 1
    else:
        top = 1.0 if value_range is None else value_range
        diff = (out.float() - ref_out.float()).abs().max().item()
        assert diff <= FLOAT_TOL * top
    return out, masks


CASES = {
    # name: (B, K, S, H, W, dtype, extra options)
    "one-paste": (1, 1, 17, 37, 53, torch.uint8, {}),
    "b3-k5": (3, 5, 17, 37, 53, torch.uint8, {}),
    "channels-last": (2, 3, 17, 37, 53, torch.uint8, {"channels_last": True}),
    "float32": (2, 4, 17, 37, 53, torch.float32, {}),
    "float32-channels-last-range2": (2, 3, 17, 37, 53, torch.float32, {"channels_last": True, "value_range": 2.0}),
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


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_reference(name):
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
    out, masks = assert_agree(images, crops, plan, padding, opts.get("value_range"))
    if padding is not None:
        assert not masks[padding.to(DEVICE)[:, None].expand_as(masks)].any()
    if not plan.apply.any():
        assert torch.equal(out, images.to(DEVICE)) and not masks.any()
    if name == "b3-k5":  # the random plan really pastes and occludes (the comparison is not vacuous)
        assert masks.any(dim=(2, 3)).sum() >= 8
        assert (out != images.to(DEVICE)).float().mean() > 0.05


def test_draw_plan_batch_agrees():
    """A plan from ``draw_plan`` (the training path) on crops with disk-shaped objects."""
    g = torch.Generator().manual_seed(7)
    b, k, s, h, w = 2, 4, 17, 37, 53
    crops = random_crops(g, b, k, s)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = ((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2) <= (s / 2.5) ** 2
    crops[:, :, 3] = torch.where(disk, 255, 0).to(torch.uint8)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros((b, k), dtype=torch.int64))
    plan = draw_plan(geometry, (h, w), g, scale_range=(0.2, 0.8), blend="hard")
    assert_agree(random_images(g, b, h, w, torch.uint8), crops, plan)


@pytest.mark.parametrize("flip", [False, True])
def test_identity_paste_copies_the_crop(flip):
    """Scale 1 and an integer corner put every crop pixel centre on a target pixel centre: the
    kernel alone must reproduce the crop (mirrored when flipped) exactly, mask = its rectangle."""
    s, h, w, x0, y0 = 6, 19, 23, 5, 7
    g = torch.Generator().manual_seed(3)
    crops = torch.randint(0, 256, (1, 1, 4, s, s), dtype=torch.uint8, generator=g)
    crops[:, :, 3] = 255
    images = torch.zeros((1, 3, h, w), dtype=torch.uint8)
    one = torch.ones((1, 1))
    plan = make_plan(
        torch.ones((1, 1), dtype=torch.bool), one, torch.tensor([[[x0, y0]]], dtype=torch.float32),
        torch.full((1, 1), flip),
    )
    out, masks = triton_kernel.paste_image(images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE))
    expected = images.clone()
    rgb = crops[0, 0, :3].flip(-1) if flip else crops[0, 0, :3]
    expected[0, :, y0 : y0 + s, x0 : x0 + s] = rgb
    box = torch.zeros((1, 1, h, w), dtype=torch.bool)
    box[..., y0 : y0 + s, x0 : x0 + s] = True
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(masks.cpu(), box)


def test_later_paste_hides_earlier_one():
    """Two identical opaque pastes: the first is invisible, the second fully visible."""
    s, h, w = 8, 20, 20
    crops = torch.full((1, 2, 4, s, s), 200, dtype=torch.uint8)
    crops[:, :, 3] = 255
    plan = make_plan(
        torch.ones((1, 2), dtype=torch.bool), torch.ones((1, 2)), torch.full((1, 2, 2), 4.0),
        torch.zeros((1, 2), dtype=torch.bool),
    )
    images = torch.zeros((1, 3, h, w), dtype=torch.uint8)
    _, masks = triton_kernel.paste_image(images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE))
    assert not masks[0, 0].any()
    assert masks[0, 1].sum().item() == s * s


@pytest.mark.parametrize(("b", "k"), [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_no_pastes_returns_a_copy(b, k):
    images = torch.randint(0, 256, (b, 3, 9, 11), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    crops = torch.zeros((b, k, 4, 5, 5), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    plan = random_plan(g, b, k, 5, 9, 11)
    out, masks = triton_kernel.paste_image(images, crops, plan)
    assert torch.equal(out, images)
    assert out.numel() == 0 or out.data_ptr() != images.data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert masks.shape == (b, k, 9, 11) and masks.dtype == torch.bool


def test_rejects_mismatched_crops():
    images = torch.zeros((2, 3, 9, 11), dtype=torch.uint8)
    crops = torch.zeros((3, 1, 4, 5, 5), dtype=torch.uint8)
    plan = random_plan(torch.Generator().manual_seed(0), 3, 1, 5, 9, 11)
    with pytest.raises(ValueError, match="crops must be uint8"):
        triton_kernel.paste_image(images, crops, plan)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    k=st.integers(1, 4),
    s=st.integers(1, 12),
    h=st.integers(1, 40),
    w=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_agrees_on_random_shapes(b, k, s, h, w, seed):
    """Any shape, including 1-pixel crops and 1-pixel images; visible masks are disjoint."""
    g = torch.Generator().manual_seed(seed)
    plan = random_plan(g, b, k, s, h, w, scale_range=(0.3, 4.0))
    _, masks = assert_agree(random_images(g, b, h, w, torch.uint8), random_crops(g, b, k, s), plan)
    assert masks.sum(dim=1).max().item() <= 1
