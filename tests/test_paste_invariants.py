"""Invariants of paste + annotations, on random small cases drawn by hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instbank.paste import BankCopyPaste, paste
from instbank.paste.annotations import (
    Instances,
    boxes_from_masks,
    concat_instances,
    occlude_instances,
    paint_semantic,
    paste_instances,
)
from instbank.paste.plan import CropGeometry, draw_plan

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def cases(draw):
    """A random batch: images, crops, existing instances, padding, and a plan drawn from a seed."""
    b = draw(st.integers(0, 2))
    k = draw(st.integers(0, 3))
    n = draw(st.integers(0, 2))
    s = draw(st.integers(1, 9))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    crops = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    crops[:, :, 3] *= (torch.rand(b, k, s, s, generator=g) < 0.6).to(torch.uint8)
    images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    if draw(st.booleans()):
        images = images.float() / 255
    padding = torch.rand(b, h, w, generator=g) < 0.3 if draw(st.booleans()) else None
    masks = torch.rand(b, n, h, w, generator=g) < 0.4
    boxes, nonempty = boxes_from_masks(masks)
    existing = Instances(masks, boxes, torch.randint(0, 5, (b, n), generator=g), nonempty)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.randint(0, 1000, (b, k), generator=g))
    plan = draw_plan(
        geometry,
        (h, w),
        g,
        prob=draw(st.sampled_from([0.5, 1.0])),
        scale_range=(0.1, 3.0),
        flip_prob=0.5,
        blend=draw(st.sampled_from(["hard", "gaussian", "none"])),
        padding_mask=padding,
    )
    return images, crops, plan, padding, existing


def run(images, crops, plan, padding, existing):
    out, visible = paste(images, crops, plan, padding_mask=padding, impl="torch")
    pasted = paste_instances(visible, plan, crops)
    kept = occlude_instances(existing, visible.any(dim=1))
    return out, visible, concat_instances(kept, pasted)


@SETTINGS
@given(cases())
def test_boxes_are_tight_and_annotations_aligned(case):
    images, crops, plan, padding, existing = case
    _, visible, merged = run(*case)
    b, n, k = images.shape[0], existing.masks.shape[1], crops.shape[1]
    assert merged.masks.shape[:2] == merged.boxes.shape[:2] == merged.labels.shape == merged.valid.shape == (b, n + k)
    tight, nonempty = boxes_from_masks(merged.masks)
    assert torch.equal(merged.boxes, tight)  # the inputs' boxes were tight, so every box is
    assert not (merged.valid & ~nonempty).any()
    assert torch.equal(merged.labels[:, n:], plan.labels)


@SETTINGS
@given(cases())
def test_nothing_lands_in_padding_and_visible_masks_are_disjoint(case):
    images, _, _, padding, _ = case
    out, visible, _ = run(*case)
    assert (visible.sum(dim=1) <= 1).all()
    if padding is not None:
        assert not (visible & padding[:, None]).any()
        assert torch.equal(out.permute(0, 2, 3, 1)[padding], images.permute(0, 2, 3, 1)[padding])


@SETTINGS
@given(cases())
def test_image_unchanged_outside_every_paste_reach_and_with_zero_alpha(case):
    images, crops, plan, padding, existing = case
    out, _, _ = run(*case)
    b, _, h, w = images.shape
    reached = torch.zeros((b, h, w), dtype=torch.bool)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    for bi, ki in plan.apply.nonzero().tolist():
        x0, y0, x1, y1 = plan.canvas_boxes[bi, ki].tolist()
        half = 0.5 * plan.scale[bi, ki].item() + 1e-3  # the outer taps reach half a crop pixel out
        reached[bi] |= (xs > x0 - half) & (xs < x1 + half) & (ys > y0 - half) & (ys < y1 + half)
    assert torch.equal(out.permute(0, 2, 3, 1)[~reached], images.permute(0, 2, 3, 1)[~reached])
    transparent = crops.clone()
    transparent[:, :, 3] = 0
    clear, visible, _ = run(images, transparent, plan, padding, existing)
    assert torch.equal(clear, images) and not visible.any()


@SETTINGS
@given(cases())
def test_plan_replays_identically(case):
    first = run(*case)
    second = run(*case)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


@SETTINGS
@given(cases(), st.integers(0, 255))
def test_crops_of_the_image_colour_change_nothing(case, level):
    """RGB taps are clamped to the canvas, so a crop whose RGB is the image's colour leaves the
    image as it was, whatever its alpha, rim included (colour * alpha + colour * (1 - alpha))."""
    images, crops, plan, padding, _ = case
    flat = torch.full((images.shape[0], 3, *images.shape[2:]), level, dtype=torch.uint8)
    plain = crops.clone()
    plain[:, :, :3] = level
    out, _ = paste(flat, plain, plan, padding_mask=padding, impl="torch")
    assert torch.equal(out, flat)


@SETTINGS
@given(cases(), st.sampled_from([torch.bool, torch.uint8]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from(["torch", "numba"]))
def test_module_on_cpu_equals_the_whole_mask_building_blocks(case, mask_dtype, give_boxes, give_valid, with_semantic,
                                                              impl):
    """``BankCopyPaste`` on CPU works inside the pastes' rectangles (numpy reference or numba
    kernel); the same plan through ``paste`` and the whole-mask annotation functions must give the
    same outputs, for every input form (boxes and valid given or not, bool or uint8 masks)."""
    pytest.importorskip(impl if impl == "numba" else "torch")
    images, crops, _, padding, existing = case
    b, k = crops.shape[:2]
    g = torch.Generator().manual_seed(int(crops.sum()) + b * 7 + k)
    masks = existing.masks if mask_dtype == torch.bool else existing.masks.to(torch.uint8) * 255  # non-zero = set
    semantic = torch.randint(0, 300, images.shape[:1] + images.shape[2:], generator=g) if with_semantic else None
    module = BankCopyPaste(impl=impl, scale_range=(0.1, 3.0), max_upscale=None, prob=0.7, min_visible=0.3)
    class_plane = torch.randint(0, 9, (b, k, 1, 1, 1), generator=g).expand_as(crops[:, :, :1])
    module.set_bank_batch(torch.cat([crops, class_plane], dim=2))
    boxes = existing.boxes + 1.0 if give_boxes else None  # given boxes are kept where untouched
    valid = existing.valid & (existing.labels != 3) if give_valid else None  # given valid is kept where untouched
    got = module(images, masks, boxes, existing.labels, valid, semantic, padding, g)
    plan = got["plan"]
    want_images, visible = paste(images, crops, plan, padding_mask=padding, impl="torch")
    given = Instances(masks, existing.boxes + 1.0 if give_boxes else existing.boxes, existing.labels,
                      valid if give_valid else existing.valid)
    kept = occlude_instances(given, visible.any(dim=1), 0.3)
    pasted = paste_instances(visible, plan, crops, 0.3)
    want = concat_instances(kept, pasted, mask_dtype)
    assert torch.equal(got["images"], want_images)
    for key, value in zip(("masks", "boxes", "labels", "valid"), want):
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    for key, value in zip(("paste_masks", "paste_boxes", "paste_labels", "paste_valid"), pasted):
        assert torch.equal(got[key], value), key
    if with_semantic:
        assert torch.equal(got["semantic"], paint_semantic(semantic, visible, plan.labels))
