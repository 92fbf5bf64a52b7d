"""Crop geometry (DESIGN "Crop geometry"): exact mapping, tight box, letterbox, RLE decode in box."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instbank.crops import (
    CropFilters,
    cut_image,
    instance_mask,
    letterbox_crop,
    rle_mask_in_box,
    rle_string_to_counts,
)
from instbank.types import CropMeta, ImageRecord, InstanceRecord


def _rect_polygon(x0, y0, x1, y1):
    return (np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64),)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rectangle_crop_is_exact_copy_when_no_resize():
    """A 20x10 rectangle cut at S=20: scale 1, letterbox pad 5 rows, pixels copied (BGR->RGB)."""
    img = _image(40, 50)
    rec = ImageRecord(1, "", 50, 40, (InstanceRecord(7, 3, _rect_polygon(10, 12, 30, 22)),))
    px, meta, skipped = cut_image(img, rec, 20)
    assert not skipped and px.shape == (1, 4, 20, 20)
    m = CropMeta.from_row(meta[0])
    assert m.src_box == (10, 12, 30, 22) and m.scale == 1.0 and m.offset == (0.0, 5.0)
    assert m.area == 200 and not m.truncated and meta[0]["class_id"] == 3
    np.testing.assert_array_equal(px[0, :3, 5:15, :], img[12:22, 10:30, ::-1].transpose(2, 0, 1))
    assert (px[0, 3, 5:15] == 255).all() and (px[0, 3, :5] == 0).all() and (px[0, :, 15:] == 0).all()


def test_downscale_maps_box_corners_exactly():
    img = _image(300, 400)
    rec = ImageRecord(1, "", 400, 300, (InstanceRecord(1, 0, _rect_polygon(40, 60, 240, 160)),))
    px, meta, _ = cut_image(img, rec, 50)
    m = CropMeta.from_row(meta[0])
    assert m.scale == pytest.approx(50 / 200)
    corners = m.src_to_crop(np.array([[40, 60], [240, 160]]))
    np.testing.assert_allclose(corners, [[0, 12.5], [50, 37.5]])
    np.testing.assert_allclose(m.crop_to_src(corners), [[40, 60], [240, 160]])
    alpha = px[0, 3]
    assert (alpha[13:37] == 255).all() and (alpha[:12] == 0).all() and (alpha[38:] == 0).all()


def test_truncated_and_filters():
    img = _image(40, 40)
    insts = (
        InstanceRecord(1, 0, _rect_polygon(0, 5, 10, 15)),  # touches the left border
        InstanceRecord(2, 0, _rect_polygon(20, 20, 22, 22)),  # area 4
        InstanceRecord(3, 0, _rect_polygon(5, 30, 35, 32)),  # 30x2: aspect 15, side 2
        InstanceRecord(4, 0, _rect_polygon(60, 60, 70, 70)),  # outside
    )
    rec = ImageRecord(1, "", 40, 40, insts)
    _, meta, skipped = cut_image(img, rec, 16)
    assert list(meta["ann_id"]) == [1, 2, 3] and bool(meta["truncated"][0]) and not skipped.get("truncated")
    assert skipped == {"outside_image": 1}
    f = CropFilters(min_area=5, skip_truncated=True)
    _, meta, skipped = cut_image(img, rec, 16, f)
    assert list(meta["ann_id"]) == [3] and skipped == {"truncated": 1, "small_area": 1, "outside_image": 1}
    _, meta, skipped = cut_image(img, rec, 16, CropFilters(min_side=3))
    assert list(meta["ann_id"]) == [1] and skipped["small_side"] == 2
    _, meta, skipped = cut_image(img, rec, 16, CropFilters(max_aspect=10))
    assert list(meta["ann_id"]) == [1, 2] and skipped["aspect"] == 1


def test_normalized_polygon_scales_with_decoded_image():
    img = _image(100, 200)
    poly = (np.array([[0.1, 0.2], [0.3, 0.2], [0.3, 0.4], [0.1, 0.4]]),)
    rec = ImageRecord(0, "", 0, 0, (InstanceRecord(0, 0, poly, normalized=True),))
    _, meta, _ = cut_image(img, rec, 32)
    assert tuple(meta["src_box"][0]) == (20, 20, 60, 40)


def test_multi_part_polygon_merges_parts():
    parts = _rect_polygon(5, 5, 10, 10) + _rect_polygon(20, 5, 25, 10)
    found = instance_mask(InstanceRecord(0, 0, parts), 30, 30)
    mask, x0, y0 = found
    assert (x0, y0, mask.shape) == (5, 5, (5, 20)) and mask.sum() == 50


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), data=st.data())
def test_rle_in_box_equals_pycocotools_decode(h, w, data):
    """Uncompressed and compressed RLE decode inside the box equal pycocotools' full decode."""
    full = np.asfortranarray(data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), dtype=np.uint8)
    full = full.reshape(h, w, order="F")
    encoded = mask_utils.encode(np.asfortranarray(full))
    counts = rle_string_to_counts(encoded["counts"])
    decoded = mask_utils.decode({"size": [h, w], "counts": encoded["counts"]})
    np.testing.assert_array_equal(decoded, full)
    for rle in ({"size": [h, w], "counts": counts.tolist()}, {"size": [h, w], "counts": encoded["counts"].decode()}):
        found = rle_mask_in_box(rle, h, w)
        if not full.any():
            assert found is None
            continue
        mask, x0, y0 = found
        ys, xs = np.nonzero(full)
        assert (x0, y0) == (xs.min(), ys.min())
        np.testing.assert_array_equal(mask, full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


@settings(max_examples=60, deadline=None)
@given(bh=st.integers(1, 90), bw=st.integers(1, 90), size=st.sampled_from([8, 17, 64]))
def test_letterbox_geometry_invariants(bh, bw, size):
    """Scale fixes the longer side to S; the object's box maps inside the canvas, centred to half a
    source pixel."""
    img = _image(100, 100)
    mask = np.ones((bh, bw), np.uint8)
    rgba, scale, (ox, oy) = letterbox_crop(img, mask, 3, 4, size)
    assert rgba.shape == (4, size, size) and rgba.dtype == np.uint8
    assert scale == pytest.approx(size / max(bh, bw))
    assert 0 <= ox and ox + bw * scale <= size + 1e-9 and 0 <= oy and oy + bh * scale <= size + 1e-9
    assert abs(ox - (size - bw * scale) / 2) <= scale / 2 + 1e-9
    assert abs(oy - (size - bh * scale) / 2) <= scale / 2 + 1e-9
