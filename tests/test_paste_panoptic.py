"""Panoptic maps through the paste (``instbank.paste.panoptic``): each visible paste becomes a new
segment, numbering continues where the image's own stops, the segment table says what the map
holds; the numba twin (map and table) and the Triton paint kernel agree with the reference.

The maps are built from real COCO instance annotations (the shipped sample and the shared
``coco_tiny_2017``, rasterized by pycocotools through ``instbank.paste_demo.coco_images``): things
are the instances (``class * 1000 + n``, ``n`` counting the class's instances in the image from 1),
everything else is one stuff segment ``background`` (class 80), letterbox padding is void.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_COCO, shared_path
from paste_cases import disk_crops, triton_device, triton_targets

from instbank.paste import BankCopyPaste, CopyPasteConfig
from instbank.paste import panoptic as spec
from instbank.paste.annotations import paint_semantic
from instbank.paste.panoptic import PanopticSchema
from instbank.paste.reference import visible_masks

BACKGROUND = 80  # a stuff class after COCO's 80 thing classes
SCHEMA = PanopticSchema(tuple(range(80)), label_divisor=1000, void_id=-1)


def coco_panoptic(ann, n: int, size: int):
    """``(batch, panoptic int32 [B, size, size])`` of the first ``n`` images of ``ann`` with instances,
    letterboxed (module docstring)."""
    from instbank.paste_demo import coco_images, letterbox_batch

    demo, _ = coco_images(ann, None, n)
    batch = letterbox_batch(demo, size)
    maps = torch.full((len(demo), size, size), BACKGROUND * 1000, dtype=torch.int32)
    maps[batch.padding] = SCHEMA.void_id
    for b in range(len(demo)):
        seen: dict[int, int] = {}
        for i in range(int(batch.valid[b].sum())):
            c = int(batch.labels[b, i])
            seen[c] = seen.get(c, 0) + 1
            maps[b][batch.masks[b, i]] = SCHEMA.segment_id(c, seen[c])
    return batch, maps


def paste_masks_for(g, b: int, k: int, h: int, w: int, padding=None) -> torch.Tensor:
    """Disjoint visible masks of ``k`` random blobs per image, outside ``padding``, as a view of a
    wider buffer (as ``BankCopyPaste`` hands them over)."""
    raw = torch.zeros((b, k, h, w), dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(b):
        for j in range(k):
            cx, cy, r = float(torch.rand((), generator=g)) * w, float(torch.rand((), generator=g)) * h, 4 + j * 3
            raw[i, j] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if padding is not None:
        raw &= ~padding[:, None]
    buffer = torch.zeros((b, 2 + k, h, w), dtype=torch.bool)
    buffer[:, 2:] = visible_masks(raw) if k else raw
    return buffer[:, 2:]


@pytest.fixture(scope="module", params=["sample", "shared"])
def coco_maps(request):
    ann = SAMPLE_COCO if request.param == "sample" else shared_path("coco_tiny_2017", "annotations", "instances_val2017.json")
    return coco_panoptic(ann, 3, 96)


def test_maps_from_coco_follow_the_rules(coco_maps):
    batch, maps = coco_maps
    g = torch.Generator().manual_seed(0)
    b, k = maps.shape[0], 5
    masks = paste_masks_for(g, b, k, 96, 96, batch.padding)
    labels = torch.tensor([[0, 0, 2, BACKGROUND, 0]] * b)
    before = maps.clone()
    painted, segments = spec.paste_panoptic(maps, masks, labels, PanopticSchema(SCHEMA.thing_classes))
    assert torch.equal(maps, before)  # not modified
    m = segments.num_existing
    assert segments.ids.shape == (b, m + k)
    for i in range(b):
        # pixels of visible pastes take the paste's id; the rest are unchanged
        for j in range(k):
            assert (painted[i][masks[i, j]] == segments.ids[i, m + j]).all()
        untouched = ~masks[i].any(0)
        assert torch.equal(painted[i][untouched], maps[i][untouched])
        # numbering continues where the image's own stops, in paste order within a class
        person_top = max([int(v) % 1000 for v in maps[i].unique().tolist() if 0 <= v < 1000] + [0])
        assert (segments.ids[i, m : m + 2] == torch.tensor([person_top + 1, person_top + 2])).all()
        assert segments.ids[i, m + 3] == BACKGROUND * 1000 and not segments.is_thing[i, m + 3]  # a stuff paste
        # the table accounts for every labeled pixel of the output map, row by row
        assert int(segments.area[i].sum()) == int((painted[i] != SCHEMA.void_id).sum())
        for row in range(m + k):
            sid, area = int(segments.ids[i, row]), int(segments.area[i, row])
            if sid == SCHEMA.void_id:
                assert area == 0 and not segments.valid[i, row]
            elif sid != BACKGROUND * 1000:  # the stuff segment shares its id with the stuff paste
                assert area == int((painted[i] == sid).sum())
                assert segments.valid[i, row] == (area > 0)
                assert segments.classes[i, row] == sid // 1000
    assert segments.is_thing[:, :m].any() and (segments.classes[:, :m] == BACKGROUND).any()


def test_numba_twin_matches_reference(coco_maps):
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets
    from instbank.paste.plan import tight_boxes

    batch, maps = coco_maps
    g = torch.Generator().manual_seed(1)
    masks = paste_masks_for(g, maps.shape[0], 6, 96, 96, batch.padding)
    labels = torch.randint(0, 81, (maps.shape[0], 6), generator=g)
    for dtype in (torch.int32, torch.int64):
        ref = spec.paste_panoptic(maps.to(dtype), masks, labels, SCHEMA)
        for boxes in (None, tight_boxes(masks)):
            ours = cpu_targets.paste_panoptic(maps.to(dtype), masks, labels, SCHEMA, boxes)
            assert torch.equal(ref[0], ours[0])
            for name, a, c in zip(spec.Segments._fields, ref[1], ours[1]):
                assert (a == c) if isinstance(a, int) else torch.equal(a, c), name


def test_triton_paint_matches_reference(coco_maps):
    kernels = triton_targets()
    dev = triton_device()
    batch, maps = coco_maps
    g = torch.Generator().manual_seed(2)
    masks = paste_masks_for(g, maps.shape[0], 4, 96, 96, batch.padding)
    labels = torch.randint(0, 80, (maps.shape[0], 4), generator=g)
    ref = spec.paste_panoptic(maps, masks, labels, SCHEMA)
    ours = spec.paste_panoptic(maps.to(dev), masks.to(dev), labels.to(dev), SCHEMA, paint=kernels.paint_map)
    assert torch.equal(ref[0], ours[0].cpu())
    assert all(torch.equal(a, c.cpu()) for a, c in zip(ref[1][:5], ours[1][:5]))
    semantic = torch.randint(0, 80, maps.shape, generator=g, dtype=torch.int16)  # the kernel paints semantic maps too
    assert torch.equal(paint_semantic(semantic, masks, labels), kernels.paint_map(semantic.to(dev), masks.to(dev), labels.to(dev)).cpu())


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_bank_copy_paste_paints_the_map_on_real_images(sample_coco_bank, impl):
    """A real bank, real images and maps: the painted segments are the visible pastes, the table's
    last K rows are aligned with the instance outputs, both CPU impls agree."""
    from instbank.paste_demo import paste_batch

    if impl == "numba":
        pytest.importorskip("numba")
    batch, maps = coco_panoptic(SAMPLE_COCO, 3, 96)
    schema = PanopticSchema(tuple(range(80)))
    out = paste_batch(sample_coco_bank, batch, k=4, seed=3, panoptic=schema, impl=impl, panoptic_map=maps)
    segments = out["segments"]
    m, n = segments.num_existing, batch.masks.shape[1]
    assert torch.equal(segments.classes[:, m:], out["labels"][:, n:])
    assert torch.equal(segments.area[:, m:], out["paste_masks"].flatten(2).sum(-1))
    for i in range(3):
        for j in range(4):
            assert (out["panoptic"][i][out["masks"][i, n + j]] == segments.ids[i, m + j]).all()
    if impl == "numba":
        ref = paste_batch(sample_coco_bank, batch, k=4, seed=3, panoptic=schema, impl="torch", panoptic_map=maps)
        assert torch.equal(ref["panoptic"], out["panoptic"])
        assert all(torch.equal(a, c) for a, c in zip(ref["segments"][:5], segments[:5]))


def test_no_pastes_and_all_void():
    maps = torch.full((2, 9, 11), -1, dtype=torch.int32)
    painted, segments = spec.paste_panoptic(maps, torch.zeros((2, 0, 9, 11), dtype=torch.bool),
                                            torch.zeros((2, 0), dtype=torch.long), SCHEMA)
    assert torch.equal(painted, maps) and segments.ids.shape == (2, 0) and segments.num_existing == 0


def test_rgb_schema_ids_are_colours():
    schema = PanopticSchema.rgb([3])
    sid = schema.segment_id(3, 258)
    r, g, b = sid % 256, sid // 256 % 256, sid // 65536
    assert (r, g, b) == (2, 1, 3) and schema.class_of(sid) == 3 and schema.instance_of(sid) == 258


def one_image(value: int, dtype=torch.int32):
    maps = torch.full((1, 9, 11), value, dtype=dtype)
    masks = torch.zeros((1, 1, 9, 11), dtype=torch.bool)
    masks[0, 0, 2:5, 2:5] = True
    return maps, masks


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_ids_that_break_the_schema_are_one_line_errors(impl):
    if impl == "numba":
        pytest.importorskip("numba")
        from instbank.paste.cpu_targets import paste_panoptic
    else:
        paste_panoptic = spec.paste_panoptic
    label = torch.tensor([[2]])
    maps, masks = one_image(-5)
    with pytest.raises(ValueError, match=r"segment id -5 in image 0 is negative and not the schema's void_id -1"):
        paste_panoptic(maps, masks, label, SCHEMA)
    maps, masks = one_image(29)
    with pytest.raises(ValueError, match=r"paste 0 of image 0 needs instance index 10 of class 2, beyond label_divisor 10"):
        paste_panoptic(maps, masks, label, PanopticSchema((2,), label_divisor=10))
    maps, masks = one_image(7)
    with pytest.raises(ValueError, match=r"paste 0 of image 0 would get segment id 0, the schema's void_id"):
        paste_panoptic(maps, masks, torch.tensor([[0]]), PanopticSchema((2,), void_id=0))
    maps, masks = one_image(32767, torch.int16)
    with pytest.raises(ValueError, match=r"new segment id 32768 does not fit the map's torch.int16"):
        paste_panoptic(maps, masks, torch.tensor([[32]]), SCHEMA)


def test_module_refuses_bad_maps_and_config():
    module = BankCopyPaste(impl="torch", in_batch=1.0)
    images = torch.zeros((2, 3, 9, 11), dtype=torch.uint8)
    masks = torch.zeros((2, 1, 9, 11), dtype=torch.bool)
    labels = torch.zeros((2, 1), dtype=torch.long)
    with pytest.raises(ValueError, match=r"CopyPasteConfig.panoptic \(its PanopticSchema\) is None"):
        module(images, masks=masks, labels=labels, panoptic=torch.zeros((2, 9, 11), dtype=torch.int32))
    module = BankCopyPaste(impl="torch", in_batch=1.0, panoptic=SCHEMA)
    with pytest.raises(ValueError, match=r"panoptic must be int16/int32/int64 \[B=2, 9, 11\], got torch.float32 \(2, 9, 11\)"):
        module(images, masks=masks, labels=labels, panoptic=torch.zeros((2, 9, 11)))
    with pytest.raises(ValueError, match=r"got torch.int32 \(2, 9, 10\)"):
        module(images, masks=masks, labels=labels, panoptic=torch.zeros((2, 9, 10), dtype=torch.int32))
    with pytest.raises(TypeError, match="panoptic must be a PanopticSchema or None, got dict"):
        CopyPasteConfig(panoptic={"thing_classes": [1]})
    with pytest.raises(ValueError, match="label_divisor must be >= 2"):
        PanopticSchema((1,), label_divisor=1)


def test_in_batch_pastes_get_segments_too():
    """With no bank (``in_batch=1``), pasted objects of the other images become new segments of
    their own class."""
    g = torch.Generator().manual_seed(4)
    crops = disk_crops(g, 2, 1, 20)[:, 0]
    masks = (crops[:, 3] > 0)[:, None].repeat(1, 2, 1, 1)
    masks[:, 1] = False
    masks[:, 1, :5, :5] = True
    labels = torch.tensor([[3, 4], [5, 6]])
    maps = torch.where(masks[:, 0], labels[:, :1, None] * 1000 + 1, BACKGROUND * 1000).to(torch.int32)
    maps = torch.where(masks[:, 1], labels[:, 1:, None] * 1000 + 1, maps).to(torch.int32)
    module = BankCopyPaste(impl="torch", in_batch=1.0, in_batch_k=2, in_batch_crop_size=16, panoptic=SCHEMA,
                           scale_range=(0.5, 0.9), max_upscale=None)
    out = module(crops[:, :3].contiguous(), masks=masks, labels=labels, panoptic=maps,
                 generator=torch.Generator().manual_seed(0))
    segments = out["segments"]
    m = segments.num_existing
    assert torch.equal(segments.classes[:, m:][out["paste_valid"]], out["paste_labels"][out["paste_valid"]])
    assert set(segments.classes[0, m:].tolist()) == {5, 6}  # image 0 took image 1's objects
    assert (segments.ids[:, m:][out["paste_valid"]] % 1000 == 1).all()  # their classes are new in the target image
    assert np.isin(segments.ids[segments.valid].numpy(), out["panoptic"].unique().numpy()).all()
