"""Panoptic maps with the existing segments' table given by the caller (``segments=``, as COCO
panoptic's ``segments_info`` gives it) and painted into ``out`` / in place: the reference (torch),
the numba twin and the Triton painter agree with each other and with the counted table, on odd
shapes, every map dtype, many segments per row (the numba twin's vector passes fall back to pixel
by pixel past 4 ids in a row), and a given table's bad rows are one-line errors.

Maps here are synthetic: random blocks of segment ids (and void) of a 37 x 53 canvas, drawn by
hypothesis; the real-COCO maps are in ``test_paste_panoptic.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paste_cases import disk_crops, triton_device, triton_targets

from instbank.paste import BankCopyPaste
from instbank.paste import panoptic as spec
from instbank.paste.panoptic import PanopticSchema, Segments
from instbank.paste.plan import tight_boxes
from instbank.paste.reference import visible_masks

SCHEMA = PanopticSchema((1, 2, 3), label_divisor=100, void_id=-1)
H, W = 37, 53


def random_case(seed: int, b: int, k: int, dtype, stripes: bool):
    """``(maps [B, H, W], masks [B, K, H, W] disjoint, labels [B, K])``: maps of random rectangles
    of ids (things of classes 1-3, stuff classes 0, 4 and 5, void), or of 1-3 px vertical stripes
    of 13 ids (``stripes``: many ids per row); masks of random rectangles made visible back to
    front. Id 0 is ``void_id + 1``, which the numba painter takes as its second reference id
    before it has seen a row: a real segment all the same."""
    g = np.random.default_rng(seed)
    ids = [c * 100 + i for c in (1, 2, 3) for i in (1, 2, 7)] + [0, 400, 500, -1]
    maps = np.full((b, H, W), 500, np.int64)
    for i in range(b):
        if stripes:
            edges = np.cumsum(g.integers(1, 4, W))
            maps[i] = np.asarray(ids)[np.searchsorted(edges, np.arange(W), side="right") % len(ids)][None, :]
        for _ in range(g.integers(0, 8)):
            y0, x0 = g.integers(0, H), g.integers(0, W)
            maps[i, y0 : y0 + g.integers(1, H), x0 : x0 + g.integers(1, W)] = g.choice(ids)
    raw = np.zeros((b, k, H, W), bool)
    for i in range(b):
        for j in range(k):
            y0, x0 = g.integers(0, H), g.integers(0, W)
            raw[i, j, y0 : y0 + g.integers(1, 30), x0 : x0 + g.integers(1, 40)] = g.random() < 0.9
            raw[i, j] &= g.random((H, W)) < 0.8  # holes: runs inside rows
    labels = torch.from_numpy(g.integers(1, 6, (b, k)))
    masks = visible_masks(torch.from_numpy(raw)) if k else torch.from_numpy(raw)
    return torch.from_numpy(maps).to(dtype), masks, labels


def table_of(maps: torch.Tensor, g: np.random.Generator, split: bool = True):
    """The maps' segments as a caller could give them: ``(ids, area)`` ``[B, M]`` in shuffled row
    order with ``void_id`` padding, one segment's area split over two rows (merged by id)."""
    rows = []
    for m in maps:
        found, counts = (t.tolist() for t in torch.unique(m.to(torch.int64), return_counts=True))
        pairs = [(i, c) for i, c in zip(found, counts) if i != SCHEMA.void_id]
        if split and pairs:
            i, c = pairs.pop()
            pairs += [(i, c // 2), (i, c - c // 2)]
        g.shuffle(pairs)
        rows.append(pairs)
    width = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), width), SCHEMA.void_id, dtype=torch.int64)
    area = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        for j, (sid, size) in enumerate(r):
            ids[i, j], area[i, j] = sid, size
    return ids, area


def assert_same(a, c):
    assert torch.equal(a[0], c[0])
    for name, x, y in zip(Segments._fields, a[1], c[1]):
        assert (x == y) if isinstance(x, int) else torch.equal(x, y.to(x.device)), name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), k=st.integers(0, 5),
       dtype=st.sampled_from([torch.int16, torch.int32, torch.int64]), stripes=st.booleans())
def test_given_table_and_in_place_agree_with_the_counted_reference(seed, b, k, dtype, stripes):
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    maps, masks, labels = random_case(seed, b, k, dtype, stripes)
    table = table_of(maps, np.random.default_rng(seed))
    counted = spec.paste_panoptic(maps, masks, labels, SCHEMA)
    assert_same(counted, spec.paste_panoptic(maps, masks, labels, SCHEMA, segments=table))
    for boxes in (None, tight_boxes(masks)):
        assert_same(counted, cpu_targets.paste_panoptic(maps, masks, labels, SCHEMA, boxes))
        assert_same(counted, cpu_targets.paste_panoptic(maps, masks, labels, SCHEMA, boxes, table))
        for impl, known in ((spec.paste_panoptic, table), (cpu_targets.paste_panoptic, table),
                            (cpu_targets.paste_panoptic, None)):
            own = maps.clone()
            if impl is spec.paste_panoptic:
                result = impl(own, masks, labels, SCHEMA, segments=known, out=own)
            else:
                result = impl(own, masks, labels, SCHEMA, boxes, known, own)
            assert result[0] is own  # in place: the caller's tensor, painted
            assert_same(counted, result)
        out = torch.full_like(maps, 9)
        assert cpu_targets.paste_panoptic(maps, masks, labels, SCHEMA, boxes, table, out)[0] is out
        assert torch.equal(out, counted[0])


def packed_bank(g: torch.Generator, b: int, k: int, s: int = 16, labels=(1, 2, 3, 4, 5)) -> torch.Tensor:
    """uint8 ``[B, K, 5, S, S]``: disk crops with hard or soft alpha and a class-id plane drawn
    from ``labels`` (things 1-3 and stuff 4-5 of ``SCHEMA``)."""
    crops = disk_crops(g, b, k, s)
    if bool(torch.rand((), generator=g) < 0.5):
        crops[..., 3, :, :] = torch.where(crops[:, :, 3] > 0, 255, 0)
    choice = torch.tensor(labels)[torch.randint(0, len(labels), (b, k), generator=g)]
    return torch.cat([crops, choice.to(torch.uint8)[:, :, None, None, None].expand(b, k, 1, s, s)], dim=2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), k=st.integers(1, 6),
       dtype=st.sampled_from([torch.int16, torch.int32, torch.int64]), stripes=st.booleans(),
       table=st.booleans(), in_place=st.booleans(), return_masks=st.booleans(), channels_last=st.booleans())
def test_module_numba_paints_the_map_in_its_kernel_as_the_reference(seed, b, k, dtype, stripes, table, in_place,
                                                                     return_masks, channels_last):
    """``BankCopyPaste(impl="numba")`` paints the map inside its paste kernel, each paste as its
    visible mask is made (over the overlap group's scratch, not the output planes): the same map,
    table and images as the reference path, on odd shapes, every map dtype, many ids per row,
    with or without the table, the output masks, a map painted in place (``inplace=True``)."""
    pytest.importorskip("numba")
    g = torch.Generator().manual_seed(seed)
    maps, masks, labels = random_case(seed, b, 2, dtype, stripes)
    images = torch.randint(0, 256, (b, 3, H, W), dtype=torch.uint8, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    packed = packed_bank(g, b, k)
    known = table_of(maps, np.random.default_rng(seed)) if table else None
    results = {}
    for impl in ("torch", "numba"):
        module = BankCopyPaste(impl=impl, panoptic=SCHEMA, scale_range=(0.3, 0.8), max_upscale=None)
        module.set_bank_batch(packed)
        own = maps.clone()
        results[impl] = module(images.clone(), masks=masks, labels=labels, panoptic=own, segments=known,
                               generator=torch.Generator().manual_seed(seed), return_masks=return_masks,
                               inplace=in_place)
        assert (results[impl]["panoptic"] is own) == in_place
    ref, ours = results["torch"], results["numba"]
    assert_same((ref["panoptic"], ref["segments"]), (ours["panoptic"], ours["segments"]))
    assert torch.equal(ref["images"], ours["images"]) and torch.equal(ref["paste_valid"], ours["paste_valid"])
    segments, m = ours["segments"], ours["segments"].num_existing
    in_map = (ours["panoptic"][:, None] == segments.ids[:, m:, None, None]).flatten(2).sum(-1)
    things = segments.is_thing[:, m:]
    assert torch.equal(segments.area[:, m:][things], in_map[things])  # a thing paste's row: its pixels in the map


def module_case(impl: str, seed: int, stripes: bool, labels=(1, 2, 3, 4, 5)):
    """``(maps, masks, labels, images, module)``: two 37 x 53 images with two instances each and a
    ``BankCopyPaste`` of ``impl`` with three disk crops staged (classes drawn from ``labels``)."""
    if impl == "numba":
        pytest.importorskip("numba")
    g = torch.Generator().manual_seed(seed)
    maps, masks, instance_labels = random_case(seed, 2, 2, torch.int32, stripes)
    images = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g)
    module = BankCopyPaste(impl=impl, panoptic=SCHEMA, scale_range=(0.4, 0.8), max_upscale=None)
    module.set_bank_batch(packed_bank(g, 2, 3, labels=labels))
    return maps, masks, instance_labels, images, module


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_an_empty_batch_goes_through(impl):
    """B = 0 (a loader's last, empty batch) with a map, its table and keypoints: empty outputs of
    the right shapes, on both CPU impls."""
    if impl == "numba":
        pytest.importorskip("numba")
    module = BankCopyPaste(impl=impl, panoptic=SCHEMA, scale_range=(0.3, 0.6))
    module.set_bank_batch(torch.zeros((0, 3, 5, 16, 16), dtype=torch.uint8))
    for segments in (None, (torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long))):
        out = module(torch.zeros((0, 3, H, W), dtype=torch.uint8), masks=torch.zeros((0, 2, H, W), dtype=torch.bool),
                     labels=torch.zeros((0, 2), dtype=torch.long), keypoints=torch.zeros((0, 2, 5, 3)),
                     keypoint_flip=list(range(5)), panoptic=torch.zeros((0, H, W), dtype=torch.int32),
                     segments=segments, inplace=True)
        assert out["panoptic"].shape == (0, H, W) and out["segments"].ids.shape == (0, 3)
        assert out["keypoints"].shape == (0, 5, 5, 3) and out["images"].shape == (0, 3, H, W)


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_inplace_paints_a_map_of_any_strides(impl):
    """``inplace=True`` paints the caller's map: a map of other strides (a transposed view) is
    painted as a contiguous copy and copied back."""
    maps, masks, labels, images, module = module_case(impl, 8, True)
    expected = module(images, masks=masks, labels=labels, panoptic=maps, generator=torch.Generator().manual_seed(2))
    strided = maps.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    out = module(images.clone(), masks=masks, labels=labels, panoptic=strided, inplace=True,
                 generator=torch.Generator().manual_seed(2))
    assert out["panoptic"] is strided and torch.equal(strided, expected["panoptic"])
    assert not torch.equal(strided, maps)  # something was pasted


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_module_refuses_a_bad_map_before_painting_anything(impl):
    """Ids that break the schema are found before the pastes: with ``inplace=True`` the images and
    the map are left as they were. A table that does not describe the map is found while painting."""
    maps, masks, labels, images, module = module_case(impl, 7, False, labels=(1,))
    bad = maps.clone()
    bad[1, 0, 0] = -7
    kept_images, kept_map = images.clone(), bad.clone()
    with pytest.raises(ValueError, match=r"segment id -7 in image 1 is negative and not the schema's void_id -1"):
        module(images, masks=masks, labels=labels, panoptic=bad, inplace=True)
    assert torch.equal(images, kept_images) and torch.equal(bad, kept_map)
    ids, area = table_of(maps, np.random.default_rng(0), split=False)
    short = (ids, torch.ones_like(area))
    with pytest.raises(ValueError, match=r"has area 1 in the given table but the pastes cover"):
        module(images, masks=masks, labels=labels, panoptic=maps, segments=short,
               generator=torch.Generator().manual_seed(0))
    lacking = (torch.tensor([[101], [101]]), torch.tensor([[5], [5]]))
    with pytest.raises(ValueError, match=r"is under a paste but not in the given segments table"):
        module(images, masks=masks, labels=labels, panoptic=maps, segments=lacking,
               generator=torch.Generator().manual_seed(0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 7), w=st.integers(1, 70), kinds=st.integers(1, 6),
       in_place=st.booleans(), dtype=st.sampled_from([torch.int16, torch.int32, torch.int64]))
def test_numba_counts_a_map_as_unique_does(seed, h, w, kinds, in_place, dtype):
    """The numba twin's count of a map's segments (runs cut by blocks of 16 pixels checked at
    once, then walked): rows shorter than a block or not a multiple of it, runs ending at a
    block's edge, void, a map counted in place (left as it was) or copied."""
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    g = np.random.default_rng(seed)
    ids = np.array([101, 102, 201, 400, -1, 500])[:kinds]
    lengths = g.integers(1, 20, h * w)  # runs of random lengths, cut to the map
    flat = np.repeat(g.choice(ids, len(lengths)), lengths)[: h * w]
    maps = torch.from_numpy(np.resize(flat, (1, h, w))).to(dtype)
    kept = maps.clone()
    out = maps if in_place else torch.full_like(maps, 7)
    state = cpu_targets.prepare_panoptic(maps, torch.zeros((1, 0), dtype=torch.int64), SCHEMA, None, out)
    found, counts = torch.unique(kept.to(torch.int64), return_counts=True)
    labeled = found != SCHEMA.void_id
    m = int(state.count[0])
    assert state.ids[0, :m].tolist() == found[labeled].tolist()
    assert state.area[0, :m].tolist() == counts[labeled].tolist()
    assert torch.equal(out, kept) and torch.equal(maps, kept)


def test_given_segments_forms_are_one_table():
    """A ``Segments`` (the previous step's output, stuff rows of one id merged), a pair, COCO
    ``segments_info`` lists: the same existing segments."""
    maps, masks, labels = random_case(3, 2, 4, torch.int32, False)
    counted = spec.paste_panoptic(maps, masks, labels, SCHEMA)
    ids, area = table_of(maps, np.random.default_rng(0), split=False)
    infos = [[{"id": int(i), "area": int(a), "category_id": int(i) // 100, "iscrowd": 0}
              for i, a in zip(ri, ra) if i != SCHEMA.void_id] for ri, ra in zip(ids, area)]
    for form in ((ids, area), infos):
        table = spec.given_segments(form, SCHEMA, 2)
        assert_same(counted, spec.paste_panoptic(maps, masks, labels, SCHEMA, segments=table))
    # chaining: the output table describes the painted map
    painted, segments = counted
    again = spec.paste_panoptic(painted, masks, labels, SCHEMA)
    chained = spec.paste_panoptic(painted, masks, labels, SCHEMA, segments=spec.given_segments(segments, SCHEMA, 2))
    assert_same(again, chained)


def test_numba_in_place_matches_reference():
    pytest.importorskip("numba")
    from instbank.paste import cpu_targets

    for seed, stripes in ((0, False), (1, True), (2, True)):
        maps, masks, labels = random_case(seed, 3, 5, torch.int32, stripes)
        table = table_of(maps, np.random.default_rng(seed))
        ref_map, ref_table = spec.paste_panoptic(maps, masks, labels, SCHEMA)
        own = maps.clone()
        painted, segments = cpu_targets.paste_panoptic(own, masks, labels, SCHEMA, tight_boxes(masks), table, own)
        assert painted is own and torch.equal(own, ref_map)
        assert_same((ref_map, ref_table), (painted, segments))


def test_triton_paints_in_place():
    kernels = triton_targets()
    dev = triton_device()
    maps, masks, labels = random_case(4, 2, 4, torch.int32, True)
    table = table_of(maps, np.random.default_rng(4))
    ref = spec.paste_panoptic(maps, masks, labels, SCHEMA)
    own = maps.to(dev)

    def paint(source, planes, ids):
        return kernels.paint_map(source, planes, ids, out=own)

    ours = spec.paste_panoptic(own, masks.to(dev), labels.to(dev), SCHEMA, paint=paint,
                               segments=tuple(t.to(dev) for t in table), out=own)
    assert ours[0] is own
    assert_same(ref, (ours[0].cpu(), Segments(*(t.cpu() for t in ours[1][:5]), ours[1].num_existing)))


def one_image(value: int):
    maps = torch.full((1, 9, 11), value, dtype=torch.int32)
    masks = torch.zeros((1, 1, 9, 11), dtype=torch.bool)
    masks[0, 0, 2:5, 2:5] = True
    return maps, masks, torch.tensor([[2]])


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_bad_tables_are_one_line_errors(impl):
    if impl == "numba":
        pytest.importorskip("numba")
        from instbank.paste import cpu_targets

        def run(maps, masks, labels, table):
            return cpu_targets.paste_panoptic(maps, masks, labels, SCHEMA, None, table)
    else:
        def run(maps, masks, labels, table):
            return spec.paste_panoptic(maps, masks, labels, SCHEMA, segments=table)
    maps, masks, labels = one_image(101)
    maps[0, 3, 3] = 102
    with pytest.raises(ValueError, match=r"segment id 102 of image 0 is under a paste but not in the given segments "
                                         r"table"):
        run(maps, masks, labels, (torch.tensor([[101]]), torch.tensor([[98]])))
    with pytest.raises(ValueError, match=r"segment 101 of image 0 has area 5 in the given table but the pastes cover 8"):
        run(maps, masks, labels, (torch.tensor([[101, 102]]), torch.tensor([[5, 1]])))
    with pytest.raises(ValueError, match=r"segment 102 of image 0 has a negative area -1"):
        run(maps, masks, labels, (torch.tensor([[101, 102]]), torch.tensor([[98, -1]])))
    with pytest.raises(ValueError, match=r"segments: segment id -5 in image 0 is negative and not the schema's void_id "
                                         r"-1: the table does not follow"):
        run(maps, masks, labels, (torch.tensor([[101, 102, -5]]), torch.tensor([[98, 1, 0]])))
    # void pixels under a paste need no row; ids the table lists but the map lacks are kept
    maps, masks, labels = one_image(-1)
    _, segments = run(maps, masks, labels, (torch.tensor([[305]]), torch.tensor([[0]])))
    assert segments.ids.tolist() == [[305, 201]] and segments.area.tolist() == [[0, 9]]


def test_given_segments_refuses_bad_forms():
    with pytest.raises(ValueError, match=r"category_id is 7: convert COCO's ids to the PanopticSchema first"):
        spec.given_segments([[{"id": 101, "area": 3, "category_id": 7}]], SCHEMA, 1)
    with pytest.raises(ValueError, match=r"segments_info\[0\]\[0\] needs an integer 'id' and 'area'"):
        spec.given_segments([[{"id": 101}]], SCHEMA, 1)
    with pytest.raises(ValueError, match=r"segments \(ids, area\) must be int \[B=2, M\] each"):
        spec.given_segments((torch.zeros((1, 3), dtype=torch.long), torch.zeros((1, 3), dtype=torch.long)), SCHEMA, 2)
    with pytest.raises(TypeError, match="segments must be a Segments, a pair"):
        spec.given_segments({"ids": 1}, SCHEMA, 1)


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_module_takes_the_table_and_paints_in_place(impl):
    if impl == "numba":
        pytest.importorskip("numba")
    g = torch.Generator().manual_seed(5)
    crops = disk_crops(g, 2, 3, 16)
    crops[..., 3, :, :] = torch.where(crops[:, :, 3] > 0, 255, 0)
    packed = torch.cat([crops, torch.full((2, 3, 1, 16, 16), 2, dtype=torch.uint8)], dim=2)
    maps, masks, labels = random_case(6, 2, 2, torch.int32, True)
    images = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g)
    module = BankCopyPaste(impl=impl, panoptic=SCHEMA, scale_range=(0.3, 0.6))
    module.set_bank_batch(packed)

    def step(**extra):
        return module(images, masks=masks, labels=labels, generator=torch.Generator().manual_seed(1), **extra)

    counted = step(panoptic=maps)
    own = maps.clone()
    out = step(panoptic=own, segments=table_of(maps, np.random.default_rng(0)), panoptic_out=own)
    assert out["panoptic"] is own
    assert_same((counted["panoptic"], counted["segments"]), (out["panoptic"], out["segments"]))
    with pytest.raises(ValueError, match="segments and panoptic_out describe a panoptic map: pass it as panoptic="):
        step(segments=table_of(maps, np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"panoptic_out must be like panoptic \(torch.int32 \(2, 37, 53\)"):
        step(panoptic=maps, panoptic_out=maps.to(torch.int64))
