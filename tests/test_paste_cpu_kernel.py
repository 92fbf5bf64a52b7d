"""The numba CPU kernel gives the reference's results bit for bit: images (every dtype) and visible
masks equal, on odd shapes, memory formats, plans and paddings; through ``paste`` and through
``BankCopyPaste``, whose CPU path it drives."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed (pip install 'instbank[numba]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from instbank.paste import BankCopyPaste, cpu_kernel, paste, reference, resolve_impl  # noqa: E402
from instbank.paste.plan import CropGeometry, draw_plan  # noqa: E402
from instbank.paste.reference import ALPHA_MAX  # noqa: E402
from paste_cases import CASES, PasteDataset, make_case, make_plan, random_crops, random_images, random_plan  # noqa: E402


def assert_same(images, crops, plan, padding_mask=None, value_range=None):
    """Both impls on the same inputs: outputs equal to the bit, inputs untouched."""
    before = images.clone()
    out, masks = cpu_kernel.paste_image(images, crops, plan, padding_mask, value_range)
    assert torch.equal(images, before)
    ref_out, ref_masks = reference.paste_image(images, crops, plan, padding_mask, value_range)
    assert out.dtype == ref_out.dtype and out.stride() == ref_out.stride()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    assert torch.equal(out.view(bits), ref_out.view(bits))  # floats: the same bits, not just equal
    assert torch.equal(masks, ref_masks)
    return out, masks


def test_alpha_division_by_multiplication_is_exact():
    """The kernel computes ``A / (255 * 65536)`` as ``float32(float64(A) * (1 / (255 * 65536)))``:
    equal to numpy's float32 division for every alpha sum ``A`` the spec can produce."""
    step = 1 << 22
    for lo in range(0, ALPHA_MAX + 1, step):
        a = np.arange(lo, min(lo + step, ALPHA_MAX + 1), dtype=np.float64)
        divided = a.astype(np.float32) / np.float32(ALPHA_MAX)
        multiplied = (a * cpu_kernel.INV_ALPHA_MAX).astype(np.float32)
        assert np.array_equal(divided.view(np.uint32), multiplied.view(np.uint32)), lo


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    images, crops, plan, padding, value_range = make_case(name)
    out, masks = assert_same(images, crops, plan, padding, value_range)
    if name == "b3-k5":  # the plan really pastes and occludes: the comparison is not vacuous
        assert masks.any(dim=(2, 3)).sum() >= 8
        assert (out != images).float().mean() > 0.05


@pytest.mark.parametrize(("b", "k"), [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_no_pastes(b, k):
    images = torch.randint(0, 256, (b, 3, 9, 11), dtype=torch.uint8)
    plan = random_plan(torch.Generator().manual_seed(0), b, k, 5, 9, 11)
    out, masks = assert_same(images, torch.zeros((b, k, 4, 5, 5), dtype=torch.uint8), plan)
    assert torch.equal(out, images) and masks.shape == (b, k, 9, 11)


def test_identity_paste_copies_the_crop():
    """Scale 1 at an integer corner: the crop comes back exactly, alpha 128 inside the mask."""
    s = 6
    crops = torch.randint(0, 256, (1, 1, 4, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    crops[:, :, 3] = 255
    crops[:, :, 3, 0] = 128
    one = torch.ones((1, 1))
    plan = make_plan(one.bool(), one, torch.tensor([[[5.0, 7.0]]]), torch.zeros((1, 1), dtype=torch.bool))
    out, masks = assert_same(torch.zeros((1, 3, 19, 23), dtype=torch.uint8), crops, plan)
    assert torch.equal(out[0, :, 8:13, 5:11], crops[0, 0, :3, 1:])
    assert masks.sum().item() == s * s


def test_a_group_box_reaching_into_another_group_keeps_its_pastes():
    """Pastes 1-3 overlap in a chain (one overlap group) whose box, the box of their rectangles,
    covers paste 0's rectangle, which overlaps none of theirs (its own group, composited first).
    The later group's tile is stored whole, so it must be read from the output, not the input:
    paste 0's pixels stay (the kernel read the input here until session 6)."""
    s = 8
    crops = torch.randint(0, 256, (1, 4, 4, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    crops[:, :, 3] = 255
    scale = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    translate = torch.tensor([[[2.0, 26.0], [0.0, 0.0], [12.0, 0.0], [24.0, 12.0]]])  # rectangles: 2 px margins
    plan = make_plan(torch.ones((1, 4), dtype=torch.bool), scale, translate, torch.zeros((1, 4), dtype=torch.bool))
    images = torch.zeros((1, 3, 40, 48), dtype=torch.uint8)
    out, masks = assert_same(images, crops, plan)
    assert torch.equal(out[0, :, 26:34, 2:10], crops[0, 0, :3])  # paste 0, whole and uncovered
    assert masks[0, 0].sum() == s * s


@settings(max_examples=40, deadline=None, derandomize=True)
@given(k=st.integers(4, 8), h=st.integers(30, 80), w=st.integers(30, 80), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_with_several_overlap_groups(k, h, w, seed):
    """Several pastes of mid size: several overlap groups, whose boxes may reach into each other."""
    g = torch.Generator().manual_seed(seed)
    plan = random_plan(g, 2, k, 16, h, w, scale_range=(0.5, 1.5))
    assert_same(random_images(g, 2, h, w, torch.uint8), random_crops(g, 2, k, 16), plan)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    k=st.integers(1, 5),
    s=st.integers(1, 20),
    h=st.integers(1, 45),
    w=st.integers(1, 70),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float16, torch.bfloat16]),
    padded=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_random_inputs(b, k, s, h, w, dtype, padded, channels_last, seed):
    """Odd shapes, every image dtype, padding, and both tile layouts (channels-last images are
    composited in ``[h, w, 3]`` tiles, others in ``[3, h, w]`` ones)."""
    g = torch.Generator().manual_seed(seed)
    plan = random_plan(g, b, k, s, h, w, scale_range=(0.3, 4.0))
    padding = torch.rand((b, h, w), generator=g) < 0.2 if padded else None
    images = random_images(g, b, h, w, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    assert_same(images, random_crops(g, b, k, s), plan, padding)


def test_auto_picks_numba_on_cpu_and_paste_matches_the_reference():
    g = torch.Generator().manual_seed(5)
    images, crops = random_images(g, 3, 37, 53, torch.uint8), random_crops(g, 3, 5, 17)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros((3, 5), dtype=torch.int64))
    plan = draw_plan(geometry, (37, 53), g, scale_range=(0.3, 1.0), blend="gaussian", sigma_range=(0.5, 2.0))
    assert resolve_impl("auto", images) == "numba"
    fast = paste(images, crops, plan, impl="auto")
    slow = paste(images, crops, plan, impl="torch")
    assert all(torch.equal(x, y) for x, y in zip(fast, slow))


@pytest.mark.parametrize("blend", ["hard", "gaussian"])
@pytest.mark.parametrize("form", ["u8+box+valid", "u8", "bool+box", "bool+valid", "bool+valid channels-last u8-map"])
def test_bank_copy_paste_cpu_path_matches_the_reference(blend, form):
    """The module's in-rectangle CPU path (composite + annotations) with either impl: the same
    dict, for each way of passing the existing instances (masks uint8 with any non-zero value or
    bool; boxes and valid given or derived), with padding entries (empty masks, valid False) and a
    semantic map (int64, or uint8 with channels-last images: the kernel's one-byte select)."""
    g = torch.Generator().manual_seed(0)
    crops = random_crops(g, 3, 5, 24)
    packed = torch.cat([crops, torch.arange(15).view(3, 5, 1, 1, 1).expand(3, 5, 1, 24, 24).byte()], dim=2)
    images = torch.randint(0, 256, (3, 3, 61, 47), dtype=torch.uint8, generator=g)
    masks = torch.zeros((3, 4, 61, 47), dtype=torch.uint8)
    masks[:, :2] = (torch.rand((3, 2, 61, 47), generator=g) < 0.3).to(torch.uint8) * 7
    masks[0, 2, 5:40, 3:30] = 255
    masks[1, 2, 10:12, 10:12] = 1  # entries 3 (and 2 of image 2): padding, empty
    valid = masks.flatten(2).amax(dim=2) > 0
    boxes = torch.tensor([10.0, 10.0, 20.0, 20.0]).expand(3, 4, 4).clone()  # loose: kept where untouched
    semantic = torch.randint(0, 20, (3, 61, 47), generator=g)
    if "channels-last" in form:
        images = images.contiguous(memory_format=torch.channels_last)
        semantic = semantic.to(torch.uint8)
    labels = torch.arange(12).view(3, 4)
    results = []
    for impl in ("numba", "torch"):
        module = BankCopyPaste(impl=impl, blend=blend, scale_range=(0.3, 0.9), min_visible=0.2)
        module.set_bank_batch(packed)
        results.append(module(
            images, masks.bool() if form.startswith("bool") else masks, boxes if "+box" in form else None, labels,
            valid if "+valid" in form else None, semantic, generator=torch.Generator().manual_seed(1),
        ))
    fast, slow = results
    for key in ("images", "masks", "boxes", "labels", "valid", "semantic", "paste_masks", "paste_boxes", "paste_valid"):
        assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), key
    assert fast["paste_masks"].any() and (fast["boxes"][:, :4] != boxes).any()  # pastes cut and refit
    assert not fast["valid"][:, 3].any()


def test_rejects_images_off_cpu():
    images = torch.zeros((1, 3, 9, 11), dtype=torch.uint8, device="meta")
    crops = torch.zeros((1, 1, 4, 5, 5), dtype=torch.uint8, device="meta")
    plan = random_plan(torch.Generator().manual_seed(0), 1, 1, 5, 9, 11).to("meta")
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_kernel.paste_image(images, crops, plan)


def test_clear_import_error_without_numba():
    """Where numba is missing, importing the kernel says what to install or use instead."""
    code = "import sys; sys.modules['numba'] = None; import instbank.paste.cpu_kernel"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: instbank.paste.cpu_kernel needs numba") and "impl='torch'" in last


def test_runs_in_spawned_dataloader_workers():
    """A worker started with spawn loads (or compiles) the kernel itself and gets the results of
    the reference in the main process."""
    loader = torch.utils.data.DataLoader(
        PasteDataset("numba"), batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    expected = PasteDataset("torch")
    for i, (images, masks) in enumerate(loader):
        want_images, want_masks = expected[i]
        assert torch.equal(images, want_images) and torch.equal(masks, want_masks)
        assert masks.any()
