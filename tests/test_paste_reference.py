"""The torch reference of paste compositing, the plan, alpha preparation and annotations, on cases
computed by hand, plus a brute-force full-canvas evaluation of the spec."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from instbank.paste import paste, prepare_alpha, resolve_impl
from instbank.paste.annotations import Instances, occlude_instances, paint_semantic, paste_instances
from instbank.paste import reference
from instbank.paste.plan import CropGeometry, PastePlan, draw_plan, tight_boxes
from instbank.paste.reference import paste_image, visible_masks


def make_plan(translate, scale, flip=None, apply=None, s=1, hw=(8, 8), labels=None, blend="none", sigma=None):
    """A PastePlan from nested lists ``[B][K]`` (translate ``[B][K][2]``)."""
    translate = torch.as_tensor(translate, dtype=torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    bk = scale.shape
    flip = torch.zeros(bk, dtype=torch.bool) if flip is None else torch.tensor(flip)
    apply = torch.ones(bk, dtype=torch.bool) if apply is None else torch.tensor(apply)
    canvas = torch.cat([translate, translate + (scale * s)[..., None]], dim=-1)
    return PastePlan(
        apply=apply,
        scale=scale,
        inv_scale=1.0 / scale,
        translate=translate,
        flip=flip,
        labels=torch.zeros(bk, dtype=torch.int64) if labels is None else torch.tensor(labels),
        sigma=torch.zeros(bk) if sigma is None else torch.tensor(sigma, dtype=torch.float32),
        canvas_boxes=canvas,
        object_boxes=canvas,
        blend=blend,
        blur_radius=0 if sigma is None else math.ceil(3 * max(max(r) for r in sigma)),
        image_size=hw,
        crop_size=s,
    )


def solid_crop(s, rgb, alpha=255):
    crop = torch.zeros((1, 1, 4, s, s), dtype=torch.uint8)
    for c in range(3):
        crop[0, 0, c] = rgb[c]
    crop[0, 0, 3] = alpha
    return crop


def spec_full_canvas(images, crops, plan, padding=None, value_range=None):
    """The spec evaluated at every pixel of every image for every paste (no rectangles)."""
    b, _, h, w = images.shape
    k, s = crops.shape[1], crops.shape[-1]
    vr = value_range if value_range is not None else (255.0 if images.dtype == torch.uint8 else 1.0)
    out = images.float()
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    bidx = torch.arange(b)[:, None, None].expand(b, h, w)
    raws = []
    for ki in range(k):
        t, inv = plan.translate[:, ki], plan.inv_scale[:, ki]
        u = (xs[None, None, :] - t[:, 0, None, None]) * inv[:, None, None]
        u = torch.where(plan.flip[:, ki, None, None], float(s) - u, u)
        v = (ys[None, :, None] - t[:, 1, None, None]) * inv[:, None, None]
        uf, vf = u - 0.5, v - 0.5
        x0, y0 = torch.floor(uf), torch.floor(vf)
        fx = torch.floor((uf - x0) * 256).clamp(0, 255).int().expand(b, h, w)[..., None]
        fy = torch.floor((vf - y0) * 256).clamp(0, 255).int().expand(b, h, w)[..., None]
        x0, y0 = x0.long().expand(b, h, w), y0.long().expand(b, h, w)
        crop = crops[:, ki].int()

        def tap(xx, yy):  # RGB at the coordinates clamped to the canvas, alpha 0 outside it
            ok = (xx >= 0) & (xx < s) & (yy >= 0) & (yy < s)
            val = crop[bidx, :, yy.clamp(0, s - 1), xx.clamp(0, s - 1)]
            return torch.cat([val[..., :3], torch.where(ok, val[..., 3], 0)[..., None]], dim=-1)

        total = (tap(x0, y0) * (256 - fx) + tap(x0 + 1, y0) * fx) * (256 - fy) + (
            tap(x0, y0 + 1) * (256 - fx) + tap(x0 + 1, y0 + 1) * fx
        ) * fy
        ok = plan.apply[:, ki, None, None].expand(b, h, w)
        if padding is not None:
            ok = ok & ~padding
        raws.append(ok & (total[..., 3] >= 128 * 65536))
        alpha = torch.where(ok, total[..., 3].float() / (255 * 65536), 0.0)[:, None]
        rgb = (total[..., :3].float() / 65536).permute(0, 3, 1, 2)
        out = out * (1 - alpha) + (rgb * (vr / 255)) * alpha
    raw = torch.stack(raws, 1) if k else torch.zeros((b, 0, h, w), dtype=torch.bool)
    if images.dtype == torch.uint8:
        return torch.floor(out + 0.5).clamp(0, 255).to(torch.uint8), visible_masks(raw)
    return out.to(images.dtype), visible_masks(raw)


# ---------------------------------------------------------------------------------------------
# compositing, by hand


def test_one_pixel_crop_lands_on_one_pixel():
    crop = solid_crop(1, (200, 100, 50))
    images = torch.zeros((1, 3, 6, 6), dtype=torch.uint8)
    out, vis = paste_image(images, crop, make_plan([[[3.0, 2.0]]], [[1.0]]))
    expected = torch.zeros_like(images)
    expected[0, :, 2, 3] = torch.tensor([200, 100, 50], dtype=torch.uint8)
    assert torch.equal(out, expected)
    assert vis[0, 0].nonzero().tolist() == [[2, 3]]


def test_one_pixel_crop_at_quarter_offset_splits_into_weights():
    # pixel x=3: u = 0.25, uf = -0.25 -> x0 = -1, fx = 192: alpha = 192/256 = 0.75 (the outside
    # tap reads alpha 0), rgb = 200 (the outside tap reads the clamped pixel): out = 150, in the mask;
    # pixel x=4: u = 1.25, uf = 0.75 -> x0 = 0, fx = 192: alpha 64/256: 200 * 0.25 = 50
    crop = solid_crop(1, (200, 200, 200))
    images = torch.zeros((1, 3, 4, 8), dtype=torch.uint8)
    out, vis = paste_image(images, crop, make_plan([[[3.25, 1.0]]], [[1.0]]))
    assert out[0, 0, 1].tolist() == [0, 0, 0, 150, 50, 0, 0, 0]
    assert vis[0, 0, 1].tolist() == [False, False, False, True, False, False, False, False]
    assert out[0, :, [0, 2, 3]].sum() == 0


def test_two_pixel_crop_upsampled_by_two():
    # S=2, scale 2: x -> u = (x + 0.5) / 2; weights per column (tap0, tap1): x=0 (192 on tap 0,
    # tap -1 reads 0), x=1 (192, 64), x=2 (64, 192), x=3 (192 on tap 1, tap 2 reads 0)
    crop = torch.zeros((1, 1, 4, 2, 2), dtype=torch.uint8)
    crop[0, 0, 0, :, 1] = 255  # red column on the right
    crop[0, 0, 3] = 255
    images = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    out, vis = paste_image(images, crop, make_plan([[[0.0, 0.0]]], [[2.0]], s=2))
    # red, row 1 (both vertical taps inside): x=1 255*64/256 = 63.75, x=2 191.25, x=3 255 (tap 2
    # reads the clamped tap 1) * alpha 0.75 = 191.25
    assert out[0, 0, 1].tolist() == [0, 64, 191, 191]
    # alpha of the corner pixel = 0.75 * 0.75 = 0.5625 >= 0.5: the whole 4x4 is in the mask
    assert vis.all()
    assert out[0, 1:].sum() == 0


def test_identity_paste_copies_the_crop_where_alpha_is_opaque():
    g = torch.Generator().manual_seed(3)
    crop = torch.randint(0, 256, (1, 1, 4, 8, 8), dtype=torch.uint8, generator=g)
    crop[0, 0, 3] = torch.where(torch.rand(8, 8, generator=g) < 0.5, 255, 0).to(torch.uint8)
    images = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8, generator=g)
    out, vis = paste_image(images, crop, make_plan([[[5.0, 3.0]]], [[1.0]], s=8))
    opaque = crop[0, 0, 3] == 255
    window = out[0, :, 3:11, 5:13]
    assert torch.equal(window[:, opaque], crop[0, 0, :3][:, opaque])
    assert torch.equal(window[:, ~opaque], images[0, :, 3:11, 5:13][:, ~opaque])
    assert torch.equal(vis[0, 0, 3:11, 5:13], opaque)
    assert vis[0, 0].sum() == opaque.sum()
    rest = torch.ones(20, 20, dtype=torch.bool)
    rest[3:11, 5:13] = False
    assert torch.equal(out[0][:, rest], images[0][:, rest])


def test_flip_mirrors_the_crop():
    g = torch.Generator().manual_seed(4)
    crop = torch.randint(0, 256, (1, 1, 4, 6, 6), dtype=torch.uint8, generator=g)
    crop[0, 0, 3] = 255
    images = torch.zeros((1, 3, 10, 10), dtype=torch.uint8)
    out, _ = paste_image(images, crop, make_plan([[[2.0, 1.0]]], [[1.0]], flip=[[True]], s=6))
    assert torch.equal(out[0, :, 1:7, 2:8], crop[0, 0, :3].flip(-1))


def test_later_paste_fully_covers_the_earlier_one():
    crops = solid_crop(4, (10, 20, 30)).repeat(1, 2, 1, 1, 1)
    crops[0, 1, :3] = 99
    images = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    plan = make_plan([[[2.0, 2.0], [2.0, 2.0]]], [[1.0, 1.0]], s=4, hw=(8, 8))
    out, vis = paste_image(images, crops, plan)
    assert not vis[0, 0].any()
    assert vis[0, 1].sum() == 16
    assert (out[0, :, 2:6, 2:6] == 99).all()
    pasted = paste_instances(vis, plan, crops, min_visible=0.1)
    assert pasted.valid.tolist() == [[False, True]]
    assert pasted.boxes[0].tolist() == [[0, 0, 0, 0], [2, 2, 6, 6]]


def test_apply_false_and_padding_paste_nothing():
    crops = solid_crop(4, (50, 60, 70)).repeat(1, 2, 1, 1, 1)
    images = torch.full((1, 3, 8, 8), 5, dtype=torch.uint8)
    padding = torch.zeros((1, 8, 8), dtype=torch.bool)
    padding[0, :, 4:] = True
    plan = make_plan([[[2.0, 2.0], [0.0, 0.0]]], [[1.0, 1.0]], apply=[[True, False]], s=4)
    out, vis = paste_image(images, crops, plan, padding_mask=padding)
    assert torch.equal(out[0][:, padding[0]], images[0][:, padding[0]])
    assert (out[0, :, 2:6, 2:4] == torch.tensor([50, 60, 70], dtype=torch.uint8)[:, None, None]).all()
    assert not vis[0, 1].any() and not (vis[0, 0] & padding[0]).any()
    assert vis[0, 0].sum() == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_images_keep_dtype_value_range_and_memory_format(dtype):
    crop = solid_crop(2, (255, 0, 51))
    images = torch.zeros((1, 3, 4, 4), dtype=dtype).contiguous(memory_format=torch.channels_last)
    out, _ = paste_image(images, crop, make_plan([[[1.0, 1.0]]], [[1.0]], s=2), value_range=2.0)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert out[0, :, 1, 1].float().tolist() == pytest.approx([2.0, 0.0, 0.4], abs=1e-2)
    assert images.abs().sum() == 0  # not modified in place


def test_uint8_output_saturates_when_value_range_exceeds_255():
    crop = solid_crop(1, (200, 100, 0))
    images = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    out, _ = paste_image(images, crop, make_plan([[[0.0, 0.0]]], [[1.0]]), value_range=510.0)
    assert out[0, :, 0, 0].tolist() == [255, 200, 0]


@pytest.mark.parametrize("b,k", [(0, 2), (2, 0), (0, 0)])
def test_empty_batch_or_no_pastes(b, k):
    images = torch.randint(0, 256, (b, 3, 5, 7), dtype=torch.uint8)
    crops = torch.zeros((b, k, 4, 3, 3), dtype=torch.uint8)
    plan = make_plan(torch.zeros(b, k, 2), torch.ones(b, k), s=3)
    out, vis = paste_image(images, crops, plan)
    assert torch.equal(out, images) and out is not images
    assert out.numel() == 0 or out.data_ptr() != images.data_ptr()
    assert vis.shape == (b, k, 5, 7) and vis.dtype == torch.bool


@pytest.mark.parametrize("seed", range(6))
def test_rectangles_equal_the_full_canvas_spec(seed):
    g = torch.Generator().manual_seed(seed)
    b, k, s, h, w = 2, 3, 9, 23, 31
    crops = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    crops[:, :, 3] *= (torch.rand(b, k, s, s, generator=g) < 0.7).to(torch.uint8)
    crops[:, :, 3, :2] = 0  # alpha support smaller than the canvas, RGB around it still read
    crops[:, :, 3, :, -3:] = 0
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros(b, k, dtype=torch.int64))
    plan = draw_plan(geometry, (h, w), g, scale_range=(0.2, 2.5), prob=0.8, blend="none")
    padding = torch.rand(b, h, w, generator=g) < 0.2 if seed % 2 else None
    dtype = (torch.uint8, torch.float32)[seed % 2]
    images = torch.rand(b, 3, h, w, generator=g) * 255
    images = images.to(torch.uint8) if dtype == torch.uint8 else images / 255
    if seed % 3 == 0:
        images = images.contiguous(memory_format=torch.channels_last)
    out, vis = paste_image(images, crops, plan, padding_mask=padding)
    want_out, want_vis = spec_full_canvas(images, crops, plan, padding)
    assert torch.equal(vis, want_vis)
    assert torch.equal(out, want_out)


@pytest.mark.parametrize("seed", range(4))
def test_whole_image_path_equals_the_full_canvas_spec(seed):
    # the torch path of non-CPU devices (no host synchronisation), run here on CPU tensors
    g = torch.Generator().manual_seed(100 + seed)
    b, k, s, h, w = 2, 3, 7, 19, 26
    crops = torch.randint(0, 256, (b, k, 4, s, s), dtype=torch.uint8, generator=g)
    crops[:, :, 3] *= (torch.rand(b, k, s, s, generator=g) < 0.7).to(torch.uint8)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros(b, k, dtype=torch.int64))
    plan = draw_plan(geometry, (h, w), g, scale_range=(0.3, 3.0), prob=0.8, blend="none")
    padding = torch.rand(b, h, w, generator=g) < 0.2 if seed % 2 else None
    images = torch.rand(b, 3, h, w, generator=g)
    images = (images * 255).to(torch.uint8) if seed < 2 else images.to(torch.bfloat16)
    if seed % 3 == 0:
        images = images.contiguous(memory_format=torch.channels_last)
    out, vis = reference._paste_dense(images, crops, plan, padding, 255.0 if seed < 2 else 1.0)
    want_out, want_vis = spec_full_canvas(images, crops, plan, padding)
    assert torch.equal(vis, want_vis) and torch.equal(out, want_out)
    assert out.stride() == images.stride()


@pytest.mark.parametrize("flip", [False, True])
def test_object_touching_the_canvas_edge_keeps_its_colour(flip):
    # RGB 200 everywhere, alpha 255 on the left 10 of 16 columns: the object touches the canvas's
    # left, top and bottom edges. Pasted at a fractional offset and scale, its rim has alpha in
    # (0, 1); every pixel must show 200 * alpha (black background), not 200 * alpha**2.
    s = 16
    crop = solid_crop(s, (200, 200, 200), alpha=0)
    crop[0, 0, 3, :, :10] = 255
    plan = make_plan([[[3.3, 2.6]]], [[1.37]], flip=[[flip]], s=s, hw=(30, 30))
    black = torch.zeros((1, 3, 30, 30), dtype=torch.uint8)
    on_black, _ = paste_image(black, crop, plan)  # 200 * alpha
    on_white, _ = paste_image(black + 255, crop, plan)  # 255 * (1 - alpha) + 200 * alpha
    alpha = 1 - (on_white.float() - on_black.float()) / 255  # within 1/255
    rim = (alpha[0, 0] > 0.05) & (alpha[0, 0] < 0.95)
    assert rim.sum() >= 30  # the canvas edges (top, bottom, one side) and the object's own edge
    assert ((on_black.float() - 200 * alpha).abs() <= 1.5).all()


def test_bad_inputs_are_named():
    crop = solid_crop(2, (1, 2, 3))
    plan = make_plan([[[0.0, 0.0]]], [[1.0]], s=2)
    with pytest.raises(ValueError, match="images must be"):
        paste_image(torch.zeros((1, 4, 4, 4), dtype=torch.uint8), crop, plan)
    with pytest.raises(ValueError, match="crops must be uint8"):
        paste_image(torch.zeros((1, 3, 4, 4)), crop.float(), plan)
    with pytest.raises(ValueError, match="padding_mask must be"):
        paste_image(torch.zeros((1, 3, 4, 4)), crop, plan, padding_mask=torch.zeros(1, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# alpha preparation and dispatch


def test_hard_blend_thresholds_alpha():
    crops = torch.arange(0, 256, dtype=torch.uint8).view(1, 1, 1, 16, 16).repeat(1, 1, 4, 1, 1)
    plan = make_plan([[[0.0, 0.0]]], [[1.0]], s=16, blend="hard")
    alpha = prepare_alpha(crops, plan)[0, 0, 3]
    assert torch.equal(alpha, torch.where(crops[0, 0, 3] >= 128, 255, 0).to(torch.uint8))
    assert torch.equal(prepare_alpha(crops, plan)[:, :, :3], crops[:, :, :3])


def test_gaussian_blend_blurs_per_paste_and_sigma_zero_is_identity():
    crops = torch.zeros((1, 2, 4, 15, 15), dtype=torch.uint8)
    crops[0, :, 3, 5:10, 5:10] = 255
    plan = make_plan([[[0.0, 0.0], [0.0, 0.0]]], [[1.0, 1.0]], s=15, blend="gaussian", sigma=[[0.0, 1.5]])
    alpha = prepare_alpha(crops, plan)[0, :, 3]
    assert torch.equal(alpha[0], crops[0, 0, 3])
    blurred = alpha[1].float()
    assert blurred[7, 7] > 200 and 0 < blurred[4, 7] < 128 and blurred[7, 4] == blurred[7, 10]
    assert blurred.sum().item() == pytest.approx(crops[0, 1, 3].float().sum().item(), rel=0.02)


def test_cpu_gaussian_blur_inside_the_grown_support_equals_the_whole_canvas():
    """On CPU each crop is filtered only over its non-zero alpha's box grown by the radius: the
    same values as filtering the whole canvas (zeros read beyond the box either way)."""
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    g = torch.Generator().manual_seed(4)
    alpha = torch.zeros((2, 4, 37, 37), dtype=torch.uint8)
    alpha[0, 0, 3:9, 30:36] = 255  # near a corner: the grown box is clipped to the canvas
    alpha[0, 1, 15:20, 2:35] = torch.randint(1, 256, (5, 33), dtype=torch.uint8, generator=g)
    alpha[1, 0] = torch.randint(0, 256, (37, 37), dtype=torch.uint8, generator=g)  # everywhere
    alpha[1, 1, 18, 18] = 200  # one pixel; alpha[1, 2:] stays empty
    sigma = torch.tensor([[0.0, 1.5, 2.9, 1.0], [3.0, 0.7, 2.0, 1.0]])
    got = prepare_alpha(torch.cat([alpha[:, :, None].expand(2, 4, 3, 37, 37), alpha[:, :, None]], 2),
                        make_plan([[[0, 0]] * 4] * 2, [[1.0] * 4] * 2, s=37, blend="gaussian", sigma=sigma.tolist()))
    for b, k in [(b, k) for b in range(2) for k in range(4)]:
        s = float(sigma[b, k])
        reach = math.ceil(3 * s)  # each crop's own taps: |d| <= ceil(3 sigma)
        offsets = np.arange(-reach, reach + 1, dtype=np.float32)
        taps = np.exp(-0.5 * (offsets / (s if s > 0 else 1e-6)) ** 2).astype(np.float32)
        taps /= taps.sum()
        whole = cv2.sepFilter2D(alpha[b, k].numpy(), cv2.CV_8U, taps, taps, borderType=cv2.BORDER_CONSTANT)
        assert np.array_equal(got[b, k, 3].numpy(), whole), (b, k)
    assert torch.equal(got[0, 0, 3], alpha[0, 0])  # sigma 0: unchanged


def test_gaussian_taps_reach_ceil_three_sigma_on_every_device_path():
    """A crop blurred with sigma 0.6 (reach 2) is the same whether the plan's radius is 2 or 9
    (another paste of the batch with sigma 3): the taps beyond a crop's own reach are zero on the
    CPU path and on the banded-matmul path that other devices run."""
    from instbank.paste import _gaussian_blur

    alpha = torch.zeros((1, 2, 24, 24), dtype=torch.uint8)
    alpha[0, :, 8:16, 6:18] = 255
    alone = _gaussian_blur(alpha[:, :1], torch.tensor([[0.6]]), 2)[0, 0]
    beside = _gaussian_blur(alpha, torch.tensor([[0.6, 3.0]]), 9)[0, 0]
    assert torch.equal(alone, beside)
    assert alone[7, 10] > 0 and alone[5, 10] == 0  # two rows above the edge: reached; three: not
    x = alpha[0, 0].float()
    sig = torch.tensor(0.6)
    d = torch.arange(-9, 10, dtype=torch.float32)
    taps = torch.exp(-0.5 * (d / sig) ** 2) * (d.abs() <= 2)
    taps = taps / taps.sum()
    g = torch.zeros((24, 24))
    for i in range(24):  # the banded (Toeplitz) matrix the matmul path builds
        for j in range(24):
            if abs(i - j) <= 9:
                g[i, j] = taps[j - i + 9]
    banded = torch.floor(g @ x @ g + 0.5).clamp(0, 255).to(torch.uint8)
    assert (banded.int() - alone.int()).abs().max() <= 1


def test_gaussian_blend_matmul_and_convolution_paths_agree():
    # radius 1: crops up to 8 * 3 = 24 px blur by banded matmul, larger ones by convolution
    small = torch.zeros((1, 1, 4, 20, 20), dtype=torch.uint8)
    small[0, 0, 3, 8:12, 7:13] = 255
    large = torch.zeros((1, 1, 4, 30, 30), dtype=torch.uint8)
    large[0, 0, 3, 13:17, 12:18] = 255
    plan = make_plan([[[0.0, 0.0]]], [[1.0]], s=20, blend="gaussian", sigma=[[0.3]])
    assert plan.blur_radius == 1
    a = prepare_alpha(small, plan)[0, 0, 3]
    b = prepare_alpha(large, plan)[0, 0, 3]
    assert torch.equal(a, b[5:25, 5:25]) and b.sum() == a.sum()
    assert 0 < a[7, 9] < 255 and a[9, 9] == 255


def test_paste_dispatch_prepares_alpha_then_composites():
    g = torch.Generator().manual_seed(5)
    crops = torch.randint(0, 256, (1, 2, 4, 8, 8), dtype=torch.uint8, generator=g)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=g)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros(1, 2, dtype=torch.int64))
    plan = draw_plan(geometry, (16, 16), g, scale_range=(0.5, 1.0), blend="hard")
    got = paste(images, crops, plan, impl="torch")
    want = paste_image(images, prepare_alpha(crops, plan), plan)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with_numba = importlib.util.find_spec("numba") is not None
    assert resolve_impl("auto", images) == ("numba" if with_numba else "torch")  # CPU images
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl("cuda", images)


def test_importing_the_package_does_not_import_torch():
    code = "import sys, instbank, instbank.paste; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# plan


def square_geometry(b, k, s, box, source_side=None, class_ids=None):
    obj = torch.tensor(box, dtype=torch.float32).expand(b, k, 4)
    ids = torch.zeros(b, k, dtype=torch.int64) if class_ids is None else class_ids
    side = None if source_side is None else torch.full((b, k), float(source_side))
    return CropGeometry(ids, s, obj, side)


def test_relative_scale_sets_the_longer_side_against_the_shorter_image_side():
    geometry = square_geometry(3, 4, 32, [8.0, 0.0, 24.0, 32.0])  # 16 x 32 object
    g = torch.Generator().manual_seed(0)
    plan = draw_plan(geometry, (100, 200), g, scale_range=(0.2, 0.4))
    height = plan.object_boxes[..., 3] - plan.object_boxes[..., 1]
    assert ((height >= 0.2 * 100 - 1e-3) & (height <= 0.4 * 100 + 1e-3)).all()
    assert torch.equal(plan.inv_scale, 1.0 / plan.scale)


def test_native_scale_is_relative_to_the_source_size():
    geometry = square_geometry(2, 3, 32, [0.0, 0.0, 32.0, 32.0], source_side=64)
    plan = draw_plan(geometry, (50, 50), torch.Generator().manual_seed(1), scale_range=(1.0, 1.0), scale_mode="native")
    width = plan.object_boxes[..., 2] - plan.object_boxes[..., 0]
    assert torch.allclose(width, torch.full_like(width, 64.0))
    with pytest.raises(ValueError, match="native"):
        draw_plan(square_geometry(1, 1, 8, [0.0, 0.0, 8.0, 8.0]), (8, 8), scale_mode="native")


@pytest.mark.parametrize("scale_mode", ["relative", "native"])
def test_max_upscale_bounds_the_draw_in_both_modes(scale_mode):
    """Objects of 10 px at source (32 px in the crop): never pasted above 1.5 x 10 px; the draw
    happens inside the bound (log-uniform in [lo, min(hi, bound)]), not clamped after it; without
    source geometry the crop's 32 px are the native size."""
    geometry = square_geometry(64, 8, 32, [0.0, 8.0, 32.0, 24.0], source_side=10)
    scale_range = (0.02, 0.2) if scale_mode == "relative" else (0.5, 3.0)  # 2..20 px / 5..30 px
    plan = draw_plan(geometry, (100, 100), torch.Generator().manual_seed(3), scale_range=scale_range,
                     scale_mode=scale_mode)
    side = plan.object_boxes[..., 2] - plan.object_boxes[..., 0]
    assert (side <= 15.0 * (1 + 1e-5)).all() and (side >= (2.0 if scale_mode == "relative" else 5.0) - 1e-4).all()
    assert torch.allclose(plan.native_scale, side / 10, rtol=1e-5)
    assert (plan.native_scale >= 1.5 * (1 - 1e-5)).float().mean() < 0.02  # no pile at the bound
    free = draw_plan(geometry, (100, 100), torch.Generator().manual_seed(3), scale_range=scale_range,
                     scale_mode=scale_mode, max_upscale=None)
    assert ((free.object_boxes[..., 2] - free.object_boxes[..., 0]) > 15.5).any()
    low = draw_plan(geometry, (100, 100), torch.Generator().manual_seed(3), scale_range=(1.0, 2.0) if
                    scale_mode == "native" else (0.2, 0.3), scale_mode=scale_mode, max_upscale=0.8)
    assert torch.allclose(low.native_scale, torch.full_like(low.native_scale, 0.8))  # bound below lo: at it
    unknown = draw_plan(CropGeometry(geometry.class_ids, 32, geometry.object_box), (100, 100),
                        torch.Generator().manual_seed(3), scale_range=(0.2, 0.9))
    assert (unknown.native_scale <= 1.5 * (1 + 1e-6)).all() and (unknown.scale <= 1.5 * (1 + 1e-6)).all()


def test_plan_arithmetic_is_the_same_in_torch_and_numpy(monkeypatch):
    """``draw_plan`` runs its arithmetic in numpy on CPU and in torch elsewhere: on the same drawn
    numbers both give the same plan (to float32 rounding of exp/log)."""
    from instbank.paste import plan as plan_module

    geometry = square_geometry(3, 7, 32, [4.0, 0.0, 28.0, 32.0], source_side=50)
    padding = torch.zeros((3, 40, 60), dtype=torch.bool)
    padding[:, 30:] = True
    plans = []
    for torch_on_cpu in (False, True):
        if torch_on_cpu:
            monkeypatch.setattr(plan_module, "_namespace", lambda device: (torch, (lambda t: t), (lambda t: t)))
        for mode in ("relative", "native"):
            plans.append(draw_plan(geometry, (40, 60), torch.Generator().manual_seed(5), scale_mode=mode, prob=0.7,
                                   scale_range=(0.2, 2.0), padding_mask=padding, blend="gaussian"))
    for numpy_plan, torch_plan in zip(plans[:2], plans[2:]):
        for name in ("apply", "flip", "labels"):
            assert torch.equal(getattr(numpy_plan, name), getattr(torch_plan, name)), name
        for name in ("scale", "inv_scale", "translate", "sigma", "canvas_boxes", "object_boxes", "factor", "native_scale"):
            a, b = getattr(numpy_plan, name), getattr(torch_plan, name)
            assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=1e-5), name


def test_object_centres_fall_inside_the_valid_region_and_flip_mirrors_the_object_box():
    geometry = square_geometry(4, 16, 32, [0.0, 4.0, 10.0, 20.0])
    padding = torch.ones((4, 60, 80), dtype=torch.bool)
    padding[:, 10:40, 20:50] = False
    padding[3] = True  # all padding: nothing pasted
    plan = draw_plan(geometry, (60, 80), torch.Generator().manual_seed(2), padding_mask=padding)
    centre = (plan.object_boxes[..., :2] + plan.object_boxes[..., 2:]) / 2
    assert ((centre[:3, :, 0] >= 20 - 1e-3) & (centre[:3, :, 0] <= 50 + 1e-3)).all()
    assert ((centre[:3, :, 1] >= 10 - 1e-3) & (centre[:3, :, 1] <= 40 + 1e-3)).all()
    assert plan.apply[:3].all() and not plan.apply[3].any()
    assert plan.flip.any() and (~plan.flip).any()
    # the object touches the canvas's left edge (x0 = 0 in the crop): its right edge when flipped
    flip, obj, canvas = plan.flip, plan.object_boxes, plan.canvas_boxes
    assert torch.allclose(obj[..., 2][flip], canvas[..., 2][flip])
    assert torch.allclose(obj[..., 0][~flip], canvas[..., 0][~flip])


def test_same_seed_same_plan():
    geometry = square_geometry(2, 5, 16, [2.0, 2.0, 14.0, 12.0])
    a = draw_plan(geometry, (40, 40), torch.Generator().manual_seed(9), prob=0.5, blend="gaussian")
    b = draw_plan(geometry, (40, 40), torch.Generator().manual_seed(9), prob=0.5, blend="gaussian")
    for name in ("apply", "scale", "inv_scale", "translate", "flip", "sigma"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.blur_radius == 6


def test_tight_boxes_use_pixel_corners():
    masks = torch.zeros((2, 5, 6), dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    assert tight_boxes(masks).tolist() == [[2, 1, 5, 3], [0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# annotations


def test_existing_instances_are_cut_refit_and_dropped_in_line():
    h, w = 10, 10
    masks = torch.zeros((1, 4, h, w), dtype=torch.uint8)
    masks[0, 0, 0:4, 0:4] = 1  # fully covered
    masks[0, 1, 5:10, 0:10] = 1  # right 70% covered: refit to x in [0, 3)
    masks[0, 2, 0:2, 5:10] = 1  # 1 of 10 pixels left < ... see below
    masks[0, 3, 4, 4:10] = 1  # untouched: keeps its (loose) input box
    covered = torch.zeros((1, h, w), dtype=torch.bool)
    covered[0, 0:4, 0:4] = True
    covered[0, 5:10, 3:10] = True
    covered[0, 0:2, 5:10] = True
    covered[0, 0, 5] = False  # instance 2 keeps 1 of 10 pixels = 0.1 (kept at min_visible 0.1)
    boxes = torch.tensor([[[0, 0, 4, 4], [0, 5, 10, 10], [5, 0, 10, 2], [3, 3, 10, 5]]], dtype=torch.float32)
    existing = Instances(masks, boxes, torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool))
    kept = occlude_instances(existing, covered, min_visible=0.1)
    assert kept.masks.dtype == torch.bool and kept.masks.shape == masks.shape
    assert kept.labels.tolist() == [[1, 2, 3, 4]]
    assert kept.valid.tolist() == [[False, True, True, True]]
    assert kept.boxes[0].tolist() == [[0, 0, 0, 0], [0, 5, 3, 10], [5, 0, 6, 1], [3, 3, 10, 5]]
    stricter = occlude_instances(existing, covered, min_visible=0.2)
    assert stricter.valid.tolist() == [[False, True, False, True]]


def test_semantic_map_takes_the_visible_paste_label_everywhere_it_shows():
    semantic = torch.full((1, 4, 4), 255, dtype=torch.int64)
    semantic[0, 0] = 7
    visible = torch.zeros((1, 2, 4, 4), dtype=torch.bool)
    visible[0, 0, 0:2, 0:2] = True
    visible[0, 1, 2:4, 2:4] = True
    out = paint_semantic(semantic, visible, torch.tensor([[300, 5]]))
    assert out[0, 0].tolist() == [300, 300, 7, 7]
    assert out[0, 1].tolist() == [300, 300, 255, 255]
    assert out[0, 3].tolist() == [255, 255, 5, 5]
