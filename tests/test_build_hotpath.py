"""The build's hot path: the vectorised COCO rasterizer against pycocotools, crops of large objects
cut from the image pyramid, and OpenCV's thread pool around the local worker pool."""

from __future__ import annotations

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_COCO, shared_path
from instbank.build import BuildConfig, build_bank
from instbank.crops import EMPTY_MASK, OUTSIDE_IMAGE, Pyramid, cut_file, image_masks, letterbox_crop, polygon_masks
from instbank.formats.coco import read_coco
from instbank.types import CropMeta

# Tenths hit the .5 rounding ties of rleFrPoly's 5x grid; the range reaches past every border.
coordinate = st.integers(-150, 550).map(lambda v: v / 10) | st.floats(-15, 55, allow_nan=False)
part = st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=9).map(lambda p: np.array(p, np.float64))


def _coco_decode(parts, height, width) -> np.ndarray:
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in parts], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40),
       instances=st.lists(st.lists(part, min_size=1, max_size=3), min_size=1, max_size=4))
def test_polygon_masks_equal_pycocotools_full_decode(h, w, instances):
    """Bit-identical to pycocotools' full-image mask cut to its tight box, parts united, for
    vertices inside, on and beyond the borders, several instances in one batch."""
    found = polygon_masks([tuple(parts) for parts in instances], h, w)
    for parts, result in zip(instances, found):
        full = _coco_decode(parts, h, w)
        pts = np.concatenate(parts)
        if pts[:, 0].max() <= 0 or pts[:, 1].max() <= 0 or pts[:, 0].min() >= w or pts[:, 1].min() >= h:
            assert result == OUTSIDE_IMAGE
            continue
        if not full.any():
            assert result == EMPTY_MASK
            continue
        mask, x0, y0, area = result
        ys, xs = np.nonzero(full)
        assert (x0, y0) == (xs.min(), ys.min()) and area == full.sum()
        np.testing.assert_array_equal(mask, full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def test_polygon_masks_value_and_overlapping_parts():
    """Two overlapping squares are united (area of the union), painted with ``value``."""
    a = np.array([[2, 2], [12, 2], [12, 12], [2, 12]], np.float64)
    (mask, x0, y0, area), = polygon_masks([(a, a + 5)], 30, 30, value=255)
    assert (x0, y0, mask.shape) == (2, 2, (15, 15)) and set(np.unique(mask)) == {0, 255}
    assert area == 100 + 100 - 25 == np.count_nonzero(mask)


@pytest.mark.parametrize("side, x0, y0", [(101, 5, 7), (301, 5, 7), (302, 6, 3), (640, 1, 1), (1023, 0, 9)])
def test_large_object_geometry_exact_and_area_like(side, x0, y0):
    """Objects over S are cut from pyramid level j (2**j * S <= side) by an exact affine map; the
    scale is exactly S / side, the box is centred to half a source pixel, the alpha is 255 inside
    and 0 outside, and RGB is an area average: against one exact INTER_AREA of the zero-padded
    window, 0.4 levels on average on real crops (docs/perf/build.md); < 3 here on strong texture."""
    size = 100
    noise = np.random.default_rng(side).integers(0, 256, (side + 10, side + 10, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3).astype(int)  # texture of a few source pixels, std ~42
    img = np.clip((blurred - 128) * 6 + 128, 0, 255).astype(np.uint8)
    h = side // 3
    mask = np.ones((h, side), np.uint8)
    rgba, scale, (ox, oy) = letterbox_crop(img, mask, x0, y0, size)
    assert scale == size / side and ox == 0 and oy == (side - h) // 2 * scale
    meta = CropMeta(0, 0, (x0, y0, x0 + side, y0 + h), scale, (ox, oy), side * h, False)
    x_lo, y_lo = meta.src_to_crop(np.array([x0, y0]))
    x_hi, y_hi = meta.src_to_crop(np.array([x0 + side, y0 + h]))
    assert (x_lo, x_hi) == pytest.approx((0, size)) and abs((y_lo + y_hi) / 2 - size / 2) <= scale / 2 + 1e-9
    alpha = rgba[3].astype(int)
    # a level pixel straddling the box edge mixes in up to 2**j - 1 source pixels: < 1 crop pixel
    assert (alpha[int(np.ceil(y_lo)) + 1 : int(y_hi) - 1, 1:-1] == 255).all()
    assert (alpha[: int(y_lo) - 1] == 0).all() and (alpha[int(np.ceil(y_hi)) + 1 :] == 0).all()
    window = np.zeros((side, side, 3), np.uint8)
    py = (side - h) // 2
    window[py : py + h] = img[y0 : y0 + h, x0 : x0 + side, ::-1]
    exact = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    inner = slice(int(np.ceil(y_lo)) + 1, int(y_hi) - 1)  # the rows the box covers whole
    assert np.abs(rgba[:3, inner, 1:-1].astype(int) - exact[:, inner, 1:-1]).mean() < 3.0


@pytest.mark.parametrize("size", [64, 128])
def test_alpha_on_real_coco_is_the_area_resampled_mask(size):
    """On coco_tiny val (real COCO images and polygons, decoded reduced where the build does), each
    crop's alpha against the plain specification, one exact INTER_AREA (INTER_LINEAR when enlarged)
    of the zero-padded source-resolution mask window with the recorded geometry: within 2.5 levels
    on average per crop, 0.5 over all crops (measured: worst crop 2.1 / 1.2, mean 0.23 / 0.06 at
    S = 64 / 128; the old halving path was 2.8 at S = 64)."""
    root = shared_path("coco_tiny_2017")
    dataset = read_coco(root / "annotations" / "instances_val2017.json", root / "val2017")
    errors, reduced = [], 0
    for record in dataset.images:
        cut = cut_file(record.path, record, size)
        reduced += cut.reduction > 1
        masks = dict(zip((i.ann_id for i in record.instances), image_masks(record.instances, cut.height, cut.width, 255)))
        for row, rgba in zip(cut.meta, cut.rgba):
            mask, x0, y0, _ = masks[int(row["ann_id"])]
            h, w = mask.shape
            side = max(h, w)
            assert row["scale"] == size / side and tuple(row["src_box"]) == (x0, y0, x0 + w, y0 + h)
            window = np.zeros((side, side), np.uint8)
            window[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = mask
            interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
            expected = cv2.resize(window, (size, size), interpolation=interp)
            errors.append(np.abs(rgba[3].astype(int) - expected).mean())
    assert reduced > 0 and len(errors) > 700
    assert max(errors) <= 2.5 and np.mean(errors) <= 0.5, (max(errors), np.mean(errors))


@pytest.mark.parametrize("h, w", [(37, 53), (64, 64), (1, 9), (9, 1), (1, 1)])
def test_pyramid_levels_are_exact_means_with_edges_replicated(h, w):
    """Level pixel i covers source pixels [2i, 2i + 2): the mean of the 2x2 block, an odd last
    row/column averaged with itself, rounded half up as OpenCV rounds."""
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    padded = np.pad(img.astype(int), ((0, h & 1), (0, w & 1), (0, 0)), mode="edge")
    expected = (padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2] + 2) >> 2
    np.testing.assert_array_equal(Pyramid(img).level(1), expected)
    assert Pyramid(img).level(2).shape[:2] == (-(-h // 4), -(-w // 4))


def test_pool_build_after_opencv_started_keeps_thread_setting(tmp_path):
    """A w=2 build after OpenCV's thread pool ran in this process (w=1 build) finishes, and this
    process's OpenCV thread count is restored (setting it inside forked workers deadlocks)."""
    ds = read_coco(SAMPLE_COCO)
    threads = cv2.getNumThreads()
    one = build_bank(ds, tmp_path / "one", BuildConfig(size=32), workers=1)
    two = build_bank(ds, tmp_path / "two", BuildConfig(size=32, shard_images=2), workers=2)
    assert one.version == two.version and cv2.getNumThreads() == threads
