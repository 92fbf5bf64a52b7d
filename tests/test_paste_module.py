"""BankCopyPaste and BankSource: staging from a BankBatch or a packed tensor, outputs, errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from instbank.paste import BankCopyPaste, BankSource, CopyPasteConfig, paste
from instbank.paste.annotations import boxes_from_masks
from instbank.types import BankBatch

H, W = 48, 64


def bank_batch(b=2, k=3, s=16, num_classes=5, class_ids=None):
    """Crops whose alpha box is exactly the geometry's object box: 12 x 8 at offset (2, 4)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    pixels[:, :, 3] = 0
    pixels[:, :, 3, 4:12, 2:14] = 255
    ids = torch.arange(b * k).view(b, k) % num_classes if class_ids is None else class_ids
    return BankBatch(
        pixels=pixels,
        class_ids=ids,
        indices=torch.arange(b * k).view(b, k),
        src_box=torch.tensor([10.0, 20.0, 34.0, 36.0]).expand(b, k, 4).clone(),  # 24 x 16 at source
        scale=torch.full((b, k), 0.5),
        offset=torch.tensor([2.0, 4.0]).expand(b, k, 2).clone(),
        num_classes=num_classes,
    )


def images(b=2):
    return torch.randint(0, 256, (b, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def seeded(seed=7):
    return torch.Generator().manual_seed(seed)


def test_packed_tensor_and_bank_batch_give_the_same_result():
    """Without the native-resolution bound (which a packed tensor, lacking source geometry, takes
    from the crop size) both stagings give the same plan and outputs."""
    batch = bank_batch()
    module = BankCopyPaste(scale_range=(0.2, 0.5), max_upscale=None)
    module.set_bank_batch(batch)
    a = module(images(), generator=seeded())
    module.set_bank_batch(batch.packed())
    b = module(images(), generator=seeded())
    for key in ("images", "masks", "boxes", "labels", "valid"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [None, torch.int32, torch.float32])
def test_more_than_255_classes_survive_packing(dtype):
    ids = torch.tensor([[0, 255, 1202], [300, 1000, 7]])
    batch = bank_batch(num_classes=1203, class_ids=ids)
    # a float plane is built by casting: BankBatch.packed(float dtype) trips on torch.finfo.nmant
    packed = batch.packed(torch.int32).to(dtype) if dtype is torch.float32 else batch.packed(dtype)
    assert packed.dtype == (dtype or torch.int16)
    source = BankSource(scale_range=(0.2, 0.5))
    source.set_bank_batch(packed)
    staged = source.sample((H, W), seeded())
    assert torch.equal(staged.plan.labels, ids)
    assert torch.equal(staged.crops, batch.pixels)


def test_forward_outputs_existing_then_pasted_and_paints_semantic():
    batch = bank_batch()
    masks = torch.zeros((2, 2, H, W), dtype=torch.bool)
    masks[:, 0, 5:25, 5:30] = True
    masks[:, 1, 30:40, 40:60] = True
    labels = torch.tensor([[9, 8], [7, 6]])
    semantic = torch.full((2, H, W), 255, dtype=torch.int64)
    module = BankCopyPaste(CopyPasteConfig(scale_range=(0.3, 0.6), blend="hard"))
    module.set_bank_batch(batch)
    out = module(images(), masks=masks, labels=labels, semantic=semantic, generator=seeded())
    assert out["masks"].shape == (2, 5, H, W) and out["boxes"].shape == (2, 5, 4)
    assert torch.equal(out["labels"], torch.cat([labels, batch.class_ids], dim=1))
    assert torch.equal(out["masks"][:, 2:], out["paste_masks"])
    assert out["paste_masks"].data_ptr() == out["masks"][:, 2:].data_ptr()  # a view, not a copy
    assert torch.equal(out["masks"][:, :2], masks & ~out["paste_masks"].any(dim=1, keepdim=True))
    assert torch.equal(out["boxes"][:, 2:], boxes_from_masks(out["paste_masks"])[0])
    assert out["paste_valid"].any()
    for bi, ki in out["paste_masks"].any(dim=(2, 3)).nonzero().tolist():
        region = out["paste_masks"][bi, ki]
        assert (out["semantic"][bi][region] == batch.class_ids[bi, ki]).all()
    untouched = ~out["paste_masks"].any(dim=1)
    assert torch.equal(out["semantic"][untouched], semantic[untouched])


def test_plan_in_the_output_replays_the_images():
    module = BankCopyPaste(scale_range=(0.2, 0.5), blend="gaussian")
    batch = bank_batch()
    module.set_bank_batch(batch)
    first = module(images(), generator=seeded(3))
    again, _ = paste(images(), batch.pixels, first["plan"], impl="torch")
    assert torch.equal(first["images"], again)
    second = module(images(), generator=seeded(3))
    assert torch.equal(first["images"], second["images"])


def test_native_scale_keeps_the_source_size():
    source = BankSource(scale_mode="native", scale_range=(1.0, 1.0))
    source.set_bank_batch(bank_batch())
    plan = source.sample((H, W), seeded()).plan
    size = plan.object_boxes[..., 2:] - plan.object_boxes[..., :2]
    assert torch.allclose(size, torch.tensor([24.0, 16.0]).expand_as(size))
    source.set_bank_batch(bank_batch().packed())
    with pytest.raises(ValueError, match="native"):
        source.sample((H, W), seeded())


@pytest.mark.parametrize("scale_mode", ["relative", "native"])
def test_default_placement_never_upscales_past_max_upscale(scale_mode):
    """Objects 24 px long at source, 12 in the crop: with the defaults, no paste is larger than
    1.5 x 24 px however large ``scale_range`` asks; draws below the bound keep their distribution
    and ``plan.native_scale`` records the effective scale."""
    big = (0.8, 1.0) if scale_mode == "relative" else (2.0, 4.0)  # 38..48 px / 2..4 x native
    source = BankSource(scale_mode=scale_mode, scale_range=big)
    source.set_bank_batch(bank_batch(b=4, k=8))
    plan = source.sample((H, W), seeded()).plan
    side = (plan.object_boxes[..., 2:] - plan.object_boxes[..., :2]).amax(dim=-1)
    assert torch.allclose(side, torch.full_like(side, 1.5 * 24), rtol=1e-5)  # every draw above: at the bound
    assert torch.allclose(plan.native_scale, side / 24, rtol=1e-5) and (plan.native_scale <= 1.5).all()
    small = BankSource(scale_mode=scale_mode, scale_range=(0.2, 0.5) if scale_mode == "relative" else (0.3, 1.2))
    small.set_bank_batch(bank_batch(b=4, k=8))
    free = BankSource(small.config, max_upscale=None)
    free.set_bank_batch(bank_batch(b=4, k=8))
    a, b = small.sample((H, W), seeded()).plan, free.sample((H, W), seeded()).plan
    assert torch.allclose(a.scale, b.scale) and torch.allclose(a.translate, b.translate)  # bound above the range


def test_bound_straddling_the_range_draws_inside_it():
    """Log-uniform in ``[lo, min(hi, bound)]``, not clamped after the draw: no mass piles up on the
    bound. Objects 24 px at source in a 48-px-high target: ``f`` in 0.2..1.5 would reach 72 px;
    the bound is 36 px, i.e. f <= 0.75."""
    source = BankSource(scale_range=(0.2, 1.5))
    source.set_bank_batch(bank_batch(b=64, k=8))
    plan = source.sample((H, W), seeded()).plan
    assert (plan.factor >= 0.2 - 1e-6).all() and (plan.factor <= 0.75 + 1e-6).all()
    assert (plan.factor > 0.75 - 1e-4).float().mean() < 0.01  # clamping would put ~(log 2)/(log 7.5) = 34% there
    logs = plan.factor.log()
    median = logs.median().exp().item()
    assert abs(median - (0.2 * 0.75) ** 0.5) < 0.03  # log-uniform: the median is the geometric mean


def test_packed_crops_with_defaults_are_bounded_by_their_crop_size():
    """A packed tensor has no source geometry: the defaults work (no error) and bound each paste
    by 1.5 x its size in the crop (12 px here)."""
    source = BankSource(scale_range=(0.5, 1.0))
    source.set_bank_batch(bank_batch().packed())
    plan = source.sample((H, W), seeded()).plan
    side = (plan.object_boxes[..., 2:] - plan.object_boxes[..., :2]).amax(dim=-1)
    assert torch.allclose(side, torch.full_like(side, 18.0), rtol=1e-5)


def test_uint8_existing_masks_keep_their_dtype_and_padding_is_respected():
    module = BankCopyPaste(scale_range=(0.3, 0.6))
    module.set_bank_batch(bank_batch())
    masks = torch.ones((2, 1, H, W), dtype=torch.uint8)
    padding = torch.zeros((2, H, W), dtype=torch.bool)
    padding[:, :, W // 2 :] = True
    out = module(images(), masks=masks, labels=torch.zeros(2, 1), padding_mask=padding, generator=seeded())
    assert out["masks"].dtype == torch.uint8
    assert not out["paste_masks"][..., W // 2 :].any()
    assert torch.equal(out["images"][..., W // 2 :], images()[..., W // 2 :])


def test_errors_are_clear():
    module = BankCopyPaste()
    with pytest.raises(RuntimeError, match="set_bank_batch"):
        module(images())
    module.set_bank_batch(bank_batch(b=3))
    with pytest.raises(ValueError, match="B=3 staged"):
        module(images(b=2))
    with pytest.raises(ValueError, match="packed"):
        module.set_bank_batch(torch.zeros(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="impl"):
        BankCopyPaste(impl="cuda")
    with pytest.raises(ValueError, match="scale_range"):
        CopyPasteConfig(scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="blend"):
        CopyPasteConfig(blend="poisson")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_upscale"):
            CopyPasteConfig(max_upscale=bad)
    module.set_bank_batch(bank_batch())
    with pytest.raises(ValueError, match="labels are required"):
        module(images(), masks=torch.zeros(2, 1, H, W, dtype=torch.bool))


def test_one_module_serves_changing_shapes():
    module = BankCopyPaste(CopyPasteConfig(scale_range=(0.3, 0.6), blend="hard"))
    for b, k, s in ((2, 3, 16), (1, 2, 16), (2, 3, 24)):
        batch = bank_batch(b=b, k=k, s=s)
        module.set_bank_batch(batch)
        out = module(images(b), generator=seeded())
        fresh = BankCopyPaste(CopyPasteConfig(scale_range=(0.3, 0.6), blend="hard"))
        fresh.set_bank_batch(batch)
        again = fresh(images(b), generator=seeded())
        assert torch.equal(out["images"], again["images"]) and torch.equal(out["masks"], again["masks"])
        assert out["paste_valid"].any()
    copy = pickle.loads(pickle.dumps(module))  # e.g. sent to DataLoader workers, batch staged
    assert torch.equal(copy(images(), generator=seeded())["masks"], module(images(), generator=seeded())["masks"])


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "float16"])
def test_inplace_paints_the_inputs_and_return_masks_false_drops_only_the_masks(impl, layout):
    """``inplace=True`` returns ``images`` and ``semantic`` themselves, painted exactly as the
    copying call paints its copies; ``return_masks=False`` gives the same result without
    ``masks``/``paste_masks``. Large scales: pastes overlap (one group, read before written)."""
    if impl == "numba":
        pytest.importorskip("numba")
    given = images(3)
    if layout == "channels_last":
        given = given.contiguous(memory_format=torch.channels_last)
    elif layout == "float16":
        given = given.to(torch.float16) / 255
    semantic = torch.randint(0, 7, (3, H, W), dtype=torch.int16, generator=seeded(3))
    module = BankCopyPaste(scale_range=(0.5, 0.9), max_upscale=None, impl=impl)
    module.set_bank_batch(bank_batch(b=3, k=4))
    ref = module(given.clone(), semantic=semantic.clone(), generator=seeded())
    pixels, labels = given.clone(), semantic.clone()
    got = module(pixels, semantic=labels, generator=seeded(), inplace=True, return_masks=False)
    assert got["images"] is pixels and got["semantic"] is labels
    assert pixels.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert torch.equal(pixels, ref["images"]) and torch.equal(labels, ref["semantic"])
    assert not torch.equal(pixels, given)
    assert "masks" not in got and "paste_masks" not in got
    for key in ("boxes", "labels", "valid", "paste_boxes", "paste_labels", "paste_valid"):
        assert torch.equal(got[key], ref[key]), key


def test_inplace_on_the_whole_mask_path():
    """Float masks take the whole-mask path (the one other devices run): ``inplace=True`` writes
    its result back into the inputs."""
    given = images(2)
    masks = torch.zeros((2, 1, H, W))
    masks[:, 0, 10:30, 10:40] = 1.0
    semantic = torch.zeros((2, H, W), dtype=torch.int64)
    module = BankCopyPaste(scale_range=(0.5, 0.9), max_upscale=None, impl="torch")
    module.set_bank_batch(bank_batch())
    ref = module(given.clone(), masks, labels=torch.ones((2, 1), dtype=torch.int64), semantic=semantic.clone(),
                 generator=seeded())
    pixels, labels = given.clone(), semantic.clone()
    got = module(pixels, masks, labels=torch.ones((2, 1), dtype=torch.int64), semantic=labels, generator=seeded(),
                 inplace=True, return_masks=False)
    assert got["images"] is pixels and got["semantic"] is labels and "masks" not in got
    assert torch.equal(pixels, ref["images"]) and torch.equal(labels, ref["semantic"]) and not torch.equal(pixels, given)


def test_return_masks_false_still_places_keypoints_with_the_visible_masks():
    batch = bank_batch()
    keypoints = torch.zeros((2, 3, 2, 3))
    keypoints[..., :2], keypoints[..., 2] = torch.tensor([8.0, 8.0]), 2.0  # inside each object
    batch = BankBatch(**{**{f: getattr(batch, f) for f in ("pixels", "class_ids", "indices", "src_box", "scale",
                                                           "offset")},
                         "keypoints": keypoints, "keypoint_flip": torch.tensor([1, 0])}, num_classes=5)
    module = BankCopyPaste(scale_range=(0.5, 0.9), max_upscale=None)
    module.set_bank_batch(batch)
    ref = module(images(), generator=seeded())
    got = module(images(), generator=seeded(), return_masks=False)
    assert "masks" not in got and torch.equal(got["keypoints"], ref["keypoints"])
