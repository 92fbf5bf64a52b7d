"""Keypoints through the paste (``instbank.paste.keypoints``): pasted keypoints follow their crop's
geometry as its pixels do (flip included, left/right slots swapped), covered and outside keypoints
change visibility, the numba and Triton twins agree with the reference bit for bit, and
``BankCopyPaste`` returns them aligned with the masks.

All keypoints here are synthetic (``paste_cases.synthetic_keypoints``: uniform positions, random
visibility, on a 5-keypoint toy skeleton or COCO's 17 person keypoints): no real keypoint
annotations are among the shared data.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paste_cases import (
    TOY_FLIP,
    instance_masks,
    keypoint_bank_batch,
    make_plan,
    random_plan,
    synthetic_keypoints,
    triton_device,
    triton_targets,
)

from instbank.paste import BankCopyPaste, CopyPasteConfig
from instbank.paste import keypoints as spec
from instbank.paste.plan import tight_boxes
from instbank.paste.reference import paste_image, visible_masks
from instbank.types import BankBatch

H, W = 37, 53


def full_plan(apply, scale, translate, flip, s):
    """A ``PastePlan``-like plan with what ``paste_keypoints`` reads (``crop_size`` too)."""
    plan = make_plan(apply, scale, translate, flip)

    class Plan:
        pass

    out = Plan()
    for name in ("apply", "scale", "inv_scale", "translate", "flip"):
        setattr(out, name, getattr(plan, name))
    out.crop_size = s
    return out


def test_coco_flip_from_names():
    from instbank.types import flip_from_names

    assert list(flip_from_names(spec.COCO_PERSON_KEYPOINTS)) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert list(flip_from_names(["a", "b"])) == [0, 1]
    assert list(flip_from_names(["left_paw", "nose"])) == [0, 1]  # no twin: keeps its slot


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_pasted_keypoint_lands_on_its_pixel(flip, scale):
    """A crop whose only opaque pixel is ``(i, j)``, with a keypoint at that pixel's centre: once
    pasted (any scale, flipped or not), the keypoint lies in the pasted mask; flipped, it is the
    mirror slot's point that lands in slot 1. Ties the keypoint geometry to the image's."""
    s, i, j = 9, 2, 5
    crops = torch.zeros((1, 1, 4, s, s), dtype=torch.uint8)
    crops[0, 0, :, j, i] = 255
    if scale < 1:  # one crop pixel would fall under the mask threshold: a 3x3 block around it
        crops[0, 0, :, j - 1 : j + 2, i - 1 : i + 2] = 255
    plan = full_plan(torch.ones((1, 1), dtype=torch.bool), torch.full((1, 1), scale), torch.tensor([[[7.0, 4.0]]]),
                     torch.full((1, 1), flip), s)
    _, visible = paste_image(torch.zeros((1, 3, H, W), dtype=torch.uint8), crops, plan)
    at = 0.5
    keypoints = torch.zeros((1, 1, 3, 3))
    keypoints[0, 0, 2 if flip else 1] = torch.tensor([i + at, j + at, 2.0])  # slot 2 is slot 1's mirror
    mapped = spec.paste_keypoints(keypoints, torch.tensor([0, 2, 1]), plan)
    x, y, v = mapped[0, 0, 1].tolist()
    assert v == 2.0 and visible[0, 0, int(y), int(x)]
    assert mapped[0, 0, 2].tolist() == [0.0, 0.0, 0.0]  # the unlabeled slot stays unlabeled
    expected_x = 7.0 + ((s - (i + at)) if flip else (i + at)) * scale
    assert x == pytest.approx(expected_x) and y == pytest.approx(4.0 + (j + at) * scale)


def test_visibility_rules_by_hand():
    """Each rule on one keypoint: covered by a later paste -> 1, by an earlier one -> unchanged,
    outside -> 0 (counted for existing ones), padding -> 0, unlabeled -> unchanged."""
    paste_masks = torch.zeros((1, 2, H, W), dtype=torch.bool)
    paste_masks[0, 0, 10:20, 10:20] = True
    paste_masks[0, 1, 15:25, 30:40] = True
    padding = torch.zeros((1, H, W), dtype=torch.bool)
    padding[0, :, 50:] = True
    points = torch.tensor([[
        [[12.5, 12.5, 2.0], [35.0, 20.0, 2.0], [-0.5, 3.0, 2.0], [5.0, 5.0, 0.0]],  # existing
        [[35.0, 20.0, 2.0], [1.0, 1.0, 1.0], [W + 0.0, 3.0, 2.0], [51.0, 3.0, 2.0]],  # paste 0
        [[12.5, 12.5, 2.0], [35.0, 20.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 2.0]],  # paste 1 (in front)
    ]])
    out, dropped = spec.keypoint_visibility(points, 1, paste_masks, padding)
    assert out[0, 0].tolist() == [[12.5, 12.5, 1.0], [35.0, 20.0, 1.0], [0, 0, 0], [5.0, 5.0, 0.0]]
    assert out[0, 1].tolist() == [[35.0, 20.0, 1.0], [1.0, 1.0, 1.0], [0, 0, 0], [0, 0, 0]]
    assert out[0, 2].tolist() == [[12.5, 12.5, 2.0], [35.0, 20.0, 2.0], [0, 0, 0], [3.0, 3.0, 2.0]]
    assert dropped.tolist() == [1]  # only the existing keypoint outside counts


def random_case(seed: int, b: int, n: int, k: int, j: int, h: int, w: int, padded: bool):
    g = torch.Generator().manual_seed(seed)
    points = synthetic_keypoints(g, (b, n + k, j), w, h, spill=0.2)
    if n + k:
        points[0, 0, 0, 2] = float("nan")  # a NaN visibility is not labeled: left as it is
    masks = torch.zeros((b, n + k, h, w), dtype=torch.bool)
    if k:
        masks[:, n:] = visible_masks(torch.rand((b, k, h, w), generator=g) < 0.3)
    padding = (torch.rand((b, h, w), generator=g) < 0.2) if padded else None
    return points, masks[:, n:], padding  # the paste masks as the module hands them: a view


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.integers(1, 3), st.integers(0, 4), st.integers(0, 5), st.integers(1, 17),
       st.integers(1, 41), st.integers(1, 41), st.booleans())
def test_numba_matches_reference(seed, b, n, k, j, h, w, padded):
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    points, paste_masks, padding = random_case(seed, b, n, k, j, h, w, padded)
    ref = spec.keypoint_visibility(points, n, paste_masks, padding)
    for boxes in (None, tight_boxes(paste_masks)):  # the boxes only say where to read the masks
        ours = cpu_targets.keypoint_visibility(points, n, paste_masks, padding, boxes)
        assert torch.equal(ref[0].nan_to_num(-7), ours[0].nan_to_num(-7)) and torch.equal(ref[1], ours[1])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.integers(1, 3), st.integers(0, 3), st.integers(0, 5), st.booleans())
def test_numba_whole_path_matches_reference(seed, b, n, k, padded):
    """Rule 1 (the mapping, float32) and rules 2-4 in one numba call, against the reference."""
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    g = torch.Generator().manual_seed(seed)
    s = 13
    spec_plan = random_plan(g, b, k, s, H, W)
    plan = full_plan(spec_plan.apply, spec_plan.scale, spec_plan.translate, spec_plan.flip, s)
    existing = synthetic_keypoints(g, (b, n, 5), W, H, spill=0.1)
    crop_kp = synthetic_keypoints(g, (b, k, 5), s, s, spill=0.2)
    masks = torch.zeros((b, 1 + k, H, W), dtype=torch.bool)
    if k:
        masks[:, 1:] = visible_masks(torch.rand((b, k, H, W), generator=g) < 0.3)
    padding = (torch.rand((b, H, W), generator=g) < 0.2) if padded else None
    flip = torch.tensor(TOY_FLIP)
    ref = spec.keypoints_after_paste(existing, crop_kp, flip, plan, masks[:, 1:], padding)
    for boxes in (None, tight_boxes(masks[:, 1:])):
        ours = cpu_targets.keypoints_after_paste(existing, crop_kp, flip, plan, masks[:, 1:], padding, boxes)
        assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])


@pytest.mark.parametrize(("b", "n", "k", "j", "padded"), [(2, 3, 4, 5, False), (3, 0, 5, 17, True), (1, 4, 0, 3, True)])
def test_triton_matches_reference(b, n, k, j, padded):
    kernels = triton_targets()
    dev = triton_device()
    points, paste_masks, padding = random_case(b * 100 + k, b, n, k, j, H, W, padded)
    ref = spec.keypoint_visibility(points, n, paste_masks, padding)
    ours = kernels.keypoint_visibility(points.to(dev), n, paste_masks.to(dev), None if padding is None else padding.to(dev))
    assert torch.equal(ref[0].nan_to_num(-7), ours[0].cpu().nan_to_num(-7)) and torch.equal(ref[1], ours[1].cpu())
    assert (ref[0][..., 2] == 1).any() or k == 0  # some keypoints were covered: not vacuous
    g = torch.Generator().manual_seed(k)
    spec_plan = random_plan(g, b, k, 11, H, W)
    plan = full_plan(spec_plan.apply, spec_plan.scale, spec_plan.translate, spec_plan.flip, 11)
    crop_kp = synthetic_keypoints(g, (b, k, j), 11, 11)
    flip = torch.arange(j).flip(0)
    whole = spec.keypoints_after_paste(points[:, :n], crop_kp, flip, plan, paste_masks, padding)
    moved = full_plan(*(t.to(dev) for t in (plan.apply, plan.scale, plan.translate, plan.flip)), 11)
    ours = kernels.keypoints_after_paste(points[:, :n].to(dev), crop_kp.to(dev), flip.to(dev), moved, paste_masks.to(dev),
                                         None if padding is None else padding.to(dev))
    assert torch.equal(whole[0].nan_to_num(-7), ours[0].cpu().nan_to_num(-7)) and torch.equal(whole[1], ours[1].cpu())


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_bank_copy_paste_carries_keypoints(impl):
    """Outputs ``[B, N+K, J, 3]`` aligned with the masks; pastes not applied give zeros; a
    keypoint marked visible is in no later visible mask; both CPU impls give the same bits."""
    if impl == "numba":
        pytest.importorskip("numba")
    g = torch.Generator().manual_seed(3)
    b, n, k, s = 3, 4, 6, 15
    batch = keypoint_bank_batch(g, b, k, s)
    masks = instance_masks(g, b, n, H, W)
    existing = synthetic_keypoints(g, (b, n, len(TOY_FLIP)), W, H)
    module = BankCopyPaste(CopyPasteConfig(impl=impl, prob=0.8, scale_range=(0.3, 0.7), max_upscale=None))
    module.set_bank_batch(batch)
    out = module(torch.zeros((b, 3, H, W), dtype=torch.uint8), masks=masks, labels=torch.zeros((b, n), dtype=torch.long),
                 keypoints=existing, generator=torch.Generator().manual_seed(5))
    kp = out["keypoints"]
    assert kp.shape == (b, n + k, len(TOY_FLIP), 3) and kp.dtype == torch.float32
    assert (kp[:, n:][~out["plan"].apply] == 0).all()
    shown = kp[..., 2] == 2
    pasted = out["paste_masks"]
    for bi, r, jj in shown.nonzero().tolist():
        x, y = int(kp[bi, r, jj, 0]), int(kp[bi, r, jj, 1])
        in_front = pasted[bi, max(r - n + 1, 0) :, y, x]
        assert not in_front.any()
    covered = (existing[..., 2] == 2) & (kp[:, :n, :, 2] == 1)
    assert covered.any()  # some existing keypoints were covered: the rule was exercised
    if impl == "numba":
        module = BankCopyPaste(module.config, impl="torch")
        module.set_bank_batch(batch)
        ref = module(torch.zeros((b, 3, H, W), dtype=torch.uint8), masks=masks, labels=torch.zeros((b, n), dtype=torch.long),
                     keypoints=existing, generator=torch.Generator().manual_seed(5))
        assert torch.equal(ref["keypoints"], kp) and torch.equal(ref["keypoints_dropped"], out["keypoints_dropped"])


def test_bank_keypoints_without_existing_ones_and_existing_without_bank_ones():
    g = torch.Generator().manual_seed(1)
    batch = keypoint_bank_batch(g, 2, 3, 11)
    module = BankCopyPaste(impl="torch", scale_range=(0.3, 0.6))
    module.set_bank_batch(batch)
    masks = instance_masks(g, 2, 2, H, W)
    out = module(torch.zeros((2, 3, H, W), dtype=torch.uint8), masks=masks, labels=torch.zeros((2, 2), dtype=torch.long))
    assert out["keypoints"].shape == (2, 5, 5, 3) and (out["keypoints"][:, :2] == 0).all()
    plain = BankCopyPaste(impl="torch")
    plain.set_bank_batch(BankBatch(**{f: getattr(batch, f) for f in BankBatch._TENSORS[:6]}, num_classes=5))
    existing = synthetic_keypoints(g, (2, 2, 4), W, H)
    out = plain(torch.zeros((2, 3, H, W), dtype=torch.uint8), masks=masks, labels=torch.zeros((2, 2), dtype=torch.long),
                keypoints=existing, keypoint_flip=[1, 0, 3, 2])
    assert out["keypoints"].shape == (2, 5, 4, 3) and (out["keypoints"][:, 2:] == 0).all()


def test_bank_batch_keeps_keypoints_through_to_and_pin_memory():
    batch = keypoint_bank_batch(torch.Generator().manual_seed(0), 2, 3, 8)
    moved = batch.to("cpu")
    assert torch.equal(moved.keypoints, batch.keypoints) and torch.equal(moved.keypoint_flip, batch.keypoint_flip)
    assert batch.packed().shape == (2, 3, 5, 8, 8)
    plain = BankBatch(**{f: getattr(batch, f) for f in BankBatch._TENSORS[:6]}, num_classes=5)
    assert plain.to("cpu").keypoints is None and plain.to("cpu").keypoint_flip is None
    if torch.cuda.is_available():
        assert batch.pin_memory().keypoints.is_pinned()


def test_bad_keypoints_are_one_line_errors():
    g = torch.Generator().manual_seed(0)
    batch = keypoint_bank_batch(g, 2, 3, 8)
    fields = {f: getattr(batch, f) for f in BankBatch._TENSORS[:6]}
    with pytest.raises(ValueError, match=r"BankBatch.keypoints must be \[B=2, K=3, J, 3\], got \(2, 3, 5\)"):
        BankBatch(**fields, num_classes=5, keypoints=batch.keypoints[..., 0], keypoint_flip=batch.keypoint_flip)
    with pytest.raises(ValueError, match=r"BankBatch.keypoint_flip must be a permutation of 0..4, got \[0, 1, 1, 3, 4\]"):
        BankBatch(**fields, num_classes=5, keypoints=batch.keypoints, keypoint_flip=torch.tensor([0, 1, 1, 3, 4]))
    with pytest.raises(ValueError, match=r"BankBatch.keypoint_flip must be \[J=5\], got \(4,\)"):
        BankBatch(**fields, num_classes=5, keypoints=batch.keypoints, keypoint_flip=torch.arange(4))
    with pytest.raises(ValueError, match="come together"):
        BankBatch(**fields, num_classes=5, keypoints=batch.keypoints)
    module = BankCopyPaste(impl="torch")
    module.set_bank_batch(batch)
    masks = torch.zeros((2, 1, H, W), dtype=torch.bool)
    labels = torch.zeros((2, 1), dtype=torch.long)
    image = torch.zeros((2, 3, H, W), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"keypoints must be float \[B=2, N=1, J, 3\] \(x, y, v\), got torch.float32 \(2, 2, 5, 3\)"):
        module(image, masks=masks, labels=labels, keypoints=torch.zeros((2, 2, 5, 3)))
    with pytest.raises(ValueError, match=r"keypoints \[B, N, J=4, 3\] do not match the bank batch's keypoints \[B, K, J=5, 3\]"):
        module(image, masks=masks, labels=labels, keypoints=torch.zeros((2, 1, 4, 3)))
    with pytest.raises(ValueError, match=r"keypoint_flip must be a permutation of 0..4, got \[0, 0, 1, 2, 3\]"):
        module(image, masks=masks, labels=labels, keypoints=torch.zeros((2, 1, 5, 3)), keypoint_flip=[0, 0, 1, 2, 3])
    inbatch = BankCopyPaste(impl="torch", in_batch=1.0)
    with pytest.raises(ValueError, match=r"keypoint_flip is needed .* J=5"):
        inbatch(image, masks=masks, labels=labels, keypoints=torch.zeros((2, 1, 5, 3)))


def test_paste_keypoints_follows_a_random_plan():
    """``paste_keypoints`` against the plan's own crop -> target map, point by point."""
    g = torch.Generator().manual_seed(9)
    b, k, s = 2, 4, 17
    spec_plan = random_plan(g, b, k, s, H, W)
    plan = full_plan(spec_plan.apply, spec_plan.scale, spec_plan.translate, spec_plan.flip, s)
    crop_kp = synthetic_keypoints(g, (b, k, 5), s, s)
    out = spec.paste_keypoints(crop_kp, torch.tensor(TOY_FLIP), plan)
    for bi in range(b):
        for ki in range(k):
            for jj in range(5):
                flipped = bool(plan.flip[bi, ki])
                u, v, vis = crop_kp[bi, ki, TOY_FLIP[jj] if flipped else jj].tolist()
                if not (plan.apply[bi, ki] and vis > 0):
                    assert out[bi, ki, jj].tolist() == [0, 0, 0]
                    continue
                tx, ty = plan.translate[bi, ki].tolist()
                x = tx + ((s - u) if flipped else u) * float(plan.scale[bi, ki])
                assert out[bi, ki, jj].tolist() == pytest.approx([x, ty + v * float(plan.scale[bi, ki]), vis], rel=1e-5)
