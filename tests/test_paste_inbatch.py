"""In-batch source (``instbank.paste.inbatch``): objects of the other images of the batch, drawn on
the device, resampled into the bank's crop layout with exact geometry (the numba and Triton twins
give the reference's bytes), and pasted by ``BankCopyPaste`` alone or mixed with bank crops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paste_cases import (
    TOY_FLIP,
    instance_masks,
    keypoint_bank_batch,
    synthetic_keypoints,
    triton_device,
    triton_targets,
)

from instbank.paste import BankCopyPaste, CopyPasteConfig, inbatch
from instbank.paste.plan import tight_boxes

H, W = 37, 53


def objects(seed: int, b: int = 3, n: int = 4, k: int = 5, s: int = 17, h: int = H, w: int = W):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)
    masks = instance_masks(g, b, n, h, w)
    valid = masks.flatten(2).any(-1)
    draw = inbatch.draw_sources(valid, k, g)
    geometry = inbatch.object_geometry(tight_boxes(masks), draw, s)
    return images, masks, valid, draw, geometry


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(0, 6), st.integers(0, 7))
def test_draw_takes_distinct_valid_objects_of_another_image(seed, b, n, k):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand((b, n), generator=g) < 0.7
    draw = inbatch.draw_sources(valid, k, g)
    assert draw.source_instance.shape == (b, k)
    assert (draw.source_image != torch.arange(b)).all() and (draw.source_image < b).all()
    for i in range(b):
        taken = [j for j in draw.source_instance[i].tolist() if j >= 0]
        assert len(taken) == len(set(taken)) == min(k, int(valid[draw.source_image[i]].sum()))
        assert all(valid[draw.source_image[i], j] for j in taken)
        assert draw.source_instance[i, len(taken):].eq(-1).all()  # empty slots last


def test_one_image_has_no_other_image():
    with pytest.raises(ValueError, match=r"in-batch source needs B >= 2 images .* got valid \[1, 3\]"):
        inbatch.draw_sources(torch.ones((1, 3), dtype=torch.bool), 4)
    module = BankCopyPaste(impl="torch", in_batch=1.0)
    with pytest.raises(ValueError, match=r"got valid \[1, 2\]"):
        module(torch.zeros((1, 3, 9, 9), dtype=torch.uint8), masks=torch.ones((1, 2, 9, 9), dtype=torch.bool),
               labels=torch.zeros((1, 2), dtype=torch.long))


def test_geometry_centres_the_box_as_the_build_does():
    boxes = torch.tensor([[[2.0, 3.0, 12.0, 8.0]], [[0.0, 0.0, 4.0, 20.0]]])
    draw = inbatch.InBatchDraw(torch.tensor([1, 0]), torch.tensor([[0, -1], [0, 0]]))
    geometry = inbatch.object_geometry(boxes, draw, 20)
    crop = inbatch.crop_geometry(geometry, torch.tensor([[7], [9]]), draw, 20)
    # image 0 takes image 1's 4 x 20 object: scale 1, centred horizontally
    assert geometry.scale[0, 0] == 1.0 and geometry.offset[0, 0].tolist() == [8.0, 0.0]
    assert crop.object_box[0, 0].tolist() == [8.0, 0.0, 12.0, 20.0] and crop.source_side[0, 0] == 20.0
    assert crop.class_ids.tolist() == [[9, 0], [7, 7]]
    assert geometry.scale[0, 1] == 1.0 and crop.source_side[0, 1] == 0.0  # the empty slot: no object
    # image 1 takes image 0's 10 x 5 object: scale 2, centred vertically
    assert geometry.scale[1, 0] == 2.0 and geometry.inv_scale[1, 0] == 0.5 and geometry.offset[1, 0].tolist() == [0.0, 5.0]


def test_scale_one_copies_the_object_pixels_exactly():
    """An object whose box side equals ``S`` lands on crop pixel centres: with ``n = 1`` the crop
    is the image's pixels and the mask times 255, exactly."""
    s = 12
    images = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros((2, 1, H, W), dtype=torch.bool)
    masks[1, 0, 5:17, 20:32] = torch.rand((12, 12), generator=torch.Generator().manual_seed(1)) < 0.7
    masks[1, 0, 5, 20] = masks[1, 0, 16, 31] = True  # the box is exactly 12 x 12
    draw = inbatch.InBatchDraw(torch.tensor([1, 0]), torch.tensor([[0], [-1]]))
    geometry = inbatch.object_geometry(tight_boxes(masks), draw, s)
    crops = inbatch.resample_objects(images, masks, draw, geometry, s, sampling_ratio=1)
    assert torch.equal(crops[0, 0, :3], images[1, :, 5:17, 20:32])
    assert torch.equal(crops[0, 0, 3], masks[1, 0, 5:17, 20:32].to(torch.uint8) * 255)
    assert not crops[1].any()  # the empty slot


@pytest.mark.parametrize("n", inbatch.SAMPLING_RATIOS)
def test_numba_matches_reference(n):
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    images, masks, _, draw, geometry = objects(n)
    ref = inbatch.resample_objects(images, masks, draw, geometry, 17, n)
    assert torch.equal(ref, cpu_targets.resample_objects(images, masks, draw, geometry, 17, n))
    # other layouts and mask dtypes: channels_last images, uint8 masks with any non-zero value
    views = images.contiguous(memory_format=torch.channels_last), masks.to(torch.uint8) * 7
    assert torch.equal(ref, cpu_targets.resample_objects(*views, draw, geometry, 17, n))
    assert ref[..., 3, :, :].float().mean() > 20  # objects were cut: not vacuous


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.integers(2, 40), st.sampled_from(inbatch.SAMPLING_RATIOS), st.integers(6, 61),
       st.integers(6, 61))
def test_numba_separable_resample_matches_reference(seed, s, n, h, w):
    """The numba twin sums each source row's taps once per crop (separable) in the reference's
    integers: the same bytes for crops larger and smaller than their objects, objects at the
    image's edges (taps clamped, mask weights zero outside), odd sizes."""
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    images, masks, _, draw, geometry = objects(seed, b=2, n=3, k=3, s=s, h=h, w=w)
    ref = inbatch.resample_objects(images, masks, draw, geometry, s, n)
    assert torch.equal(ref, cpu_targets.resample_objects(images, masks, draw, geometry, s, n))


@pytest.mark.parametrize("n", inbatch.SAMPLING_RATIOS)
def test_triton_matches_reference(n):
    kernels = triton_targets()
    dev = triton_device()
    images, masks, _, draw, geometry = objects(10 + n, b=2, n=3, k=3, s=9, h=21, w=29)
    ref = inbatch.resample_objects(images, masks, draw, geometry, 9, n)
    moved = inbatch.InBatchDraw(*(t.to(dev) for t in draw)), inbatch.ObjectGeometry(*(t.to(dev) for t in geometry))
    ours = kernels.resample_objects(images.to(dev).contiguous(memory_format=torch.channels_last), masks.to(dev), *moved, 9, n)
    assert torch.equal(ref, ours.cpu())


def test_keypoints_follow_the_objects_into_their_crops():
    *_, draw, geometry = objects(5, k=4)
    g = torch.Generator().manual_seed(6)
    keypoints = synthetic_keypoints(g, (3, 4, 5), W, H)
    crop_kp = inbatch.crop_keypoints(keypoints, geometry, draw)
    for b in range(3):
        for k in range(4):
            j = int(draw.source_instance[b, k])
            if j < 0:
                assert (crop_kp[b, k] == 0).all()
                continue
            src = keypoints[draw.source_image[b], j]
            expected = (src[:, :2] - geometry.box[b, k, :2]) * geometry.scale[b, k] + geometry.offset[b, k]
            labeled = src[:, 2] > 0
            assert torch.allclose(crop_kp[b, k, labeled, :2], expected[labeled])
            assert torch.equal(crop_kp[b, k, :, 2], src[:, 2])


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_bank_copy_paste_in_batch_only(impl):
    """No bank: every pasted object is an object of another image, with its class, pasted at no
    more than ``max_upscale`` times its own size; its keypoints come along."""
    if impl == "numba":
        pytest.importorskip("numba")
    images, masks, *_ = objects(7, b=4, n=5)
    labels = torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(8))
    keypoints = synthetic_keypoints(torch.Generator().manual_seed(9), (4, 5, 5), W, H)
    module = BankCopyPaste(CopyPasteConfig(impl=impl, in_batch=1.0, in_batch_k=3, in_batch_crop_size=24,
                                           scale_range=(0.2, 0.9), max_upscale=1.0))
    out = module(images, masks=masks, labels=labels, keypoints=keypoints, keypoint_flip=TOY_FLIP,
                 generator=torch.Generator().manual_seed(1))
    source, taken = out["source_image"], out["source_instance"]
    assert (source != torch.arange(4)).all()
    plan = out["plan"]
    for b in range(4):
        for k in range(3):
            if taken[b, k] >= 0:
                assert out["paste_labels"][b, k] == labels[source[b], taken[b, k]]
            else:
                assert not plan.apply[b, k]
    assert (plan.native_scale <= 1.0 + 1e-6).all()
    assert out["paste_valid"].any() and out["keypoints"].shape == (4, 8, 5, 3)
    if impl == "numba":
        ref = BankCopyPaste(module.config, impl="torch")(images, masks=masks, labels=labels, keypoints=keypoints,
                                                          keypoint_flip=TOY_FLIP, generator=torch.Generator().manual_seed(1))
        for key in ("images", "masks", "boxes", "labels", "valid", "keypoints", "source_instance"):
            assert torch.equal(ref[key], out[key]), key


def test_bank_copy_paste_mixes_bank_crops_and_in_batch_objects():
    g = torch.Generator().manual_seed(2)
    batch = keypoint_bank_batch(g, 4, 6, 16, num_classes=5)
    images, masks, _, _, _ = objects(3, b=4, n=5)
    labels = torch.full((4, 5), 40)  # no bank crop has class 40 (class_ids < 5)
    module = BankCopyPaste(impl="torch", in_batch=0.5, scale_range=(0.2, 0.5))
    module.set_bank_batch(batch)
    out = module(images, masks=masks, labels=labels, generator=torch.Generator().manual_seed(0))
    from_batch = out["source_instance"] >= 0
    assert from_batch.any() and (~from_batch).any()
    assert (out["paste_labels"][from_batch] == 40).all() and (out["paste_labels"][~from_batch] < 5).all()
    # the bank crops' keypoints come along, in-batch objects (no keypoints given) have none
    assert (out["keypoints"][:, 5:][from_batch] == 0).all()
    assert (out["keypoints"][:, 5:][~from_batch & out["plan"].apply][..., 2] > 0).any()


def test_config_checks():
    with pytest.raises(ValueError, match=r"in_batch must be in \[0, 1\], got 1.5"):
        CopyPasteConfig(in_batch=1.5)
    with pytest.raises(ValueError, match=r"sampling_ratio must be one of \(1, 2, 4\), got 3"):
        CopyPasteConfig(sampling_ratio=3)
    module = BankCopyPaste(impl="torch", in_batch=0.5)
    with pytest.raises(RuntimeError, match="no bank batch staged: in_batch=0.5 mixes"):
        module(torch.zeros((2, 3, 9, 9), dtype=torch.uint8), masks=torch.ones((2, 1, 9, 9), dtype=torch.bool),
               labels=torch.zeros((2, 1), dtype=torch.long))
