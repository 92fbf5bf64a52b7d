"""The build's hot path: the vectorised COCO rasterizer against pycocotools, the halving path of
large crops, and OpenCV's thread pool around the local worker pool."""

from __future__ import annotations

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_COCO
from instbank.build import BuildConfig, build_bank
from instbank.crops import MIN_FILL, EMPTY_MASK, OUTSIDE_IMAGE, letterbox_crop, polygon_masks
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


@pytest.mark.parametrize("side", [301, 302, 640, 1023])
def test_large_object_geometry_exact_and_fills_canvas(side):
    """Objects of >= 2S are halved before the final resize; the window may grow to a multiple of
    2**j, the recorded scale/offset stay exact for what was done, and the object fills >= 99.5%."""
    size = 100
    noise = np.random.default_rng(side).integers(0, 256, (side + 10, side + 10, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3).astype(int)  # texture of a few source pixels, std ~42
    img = np.clip((blurred - 128) * 6 + 128, 0, 255).astype(np.uint8)
    h = side // 3
    mask = np.ones((h, side), np.uint8)
    rgba, scale, (ox, oy) = letterbox_crop(img, mask, 5, 7, size)
    meta = CropMeta(0, 0, (5, 7, 5 + side, 7 + h), scale, (ox, oy), side * h, False)
    x_lo, y_lo = meta.src_to_crop(np.array([5, 7]))
    x_hi, y_hi = meta.src_to_crop(np.array([5 + side, 7 + h]))
    assert side * scale >= MIN_FILL * size and x_hi <= size + 1e-9 and x_lo >= 0
    assert abs((x_lo + x_hi) / 2 - size / 2) <= scale and abs((y_lo + y_hi) / 2 - size / 2) <= scale
    alpha = rgba[3].astype(int)
    assert (alpha[int(np.ceil(y_lo)) + 1 : int(y_hi) - 1, int(np.ceil(x_lo)) + 1 : int(x_hi) - 1] == 255).all()
    # a 2x2 block straddling the box edge spreads it by up to 2**j - 1 source pixels: < 1 crop pixel
    assert (alpha[: int(y_lo) - 1] == 0).all() and (alpha[int(np.ceil(y_hi)) + 1 :] == 0).all()
    # RGB is an area average of the box: 2x2 means then area differ from one exact INTER_AREA of
    # the same window only in the weights at the footprint's edges (measured: 0.5 levels on
    # average for 1 halving, 2.6 for 3)
    window_side = round(size / scale)
    window = np.zeros((window_side, window_side, 3), np.uint8)
    px, py = round(ox / scale), round(oy / scale)
    window[py : py + h, px : px + side] = img[7 : 7 + h, 5 : 5 + side, ::-1]
    exact = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    assert np.abs(rgba[:3].astype(int) - exact).mean() < 3.0


def test_pool_build_after_opencv_started_keeps_thread_setting(tmp_path):
    """A w=2 build after OpenCV's thread pool ran in this process (w=1 build) finishes, and this
    process's OpenCV thread count is restored (setting it inside forked workers deadlocks)."""
    ds = read_coco(SAMPLE_COCO)
    threads = cv2.getNumThreads()
    one = build_bank(ds, tmp_path / "one", BuildConfig(size=32), workers=1)
    two = build_bank(ds, tmp_path / "two", BuildConfig(size=32, shard_images=2), workers=2)
    assert one.version == two.version and cv2.getNumThreads() == threads
