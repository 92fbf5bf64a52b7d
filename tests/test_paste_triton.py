"""The Triton paste kernel agrees with the torch reference: uint8 images within 1 level, float images
within 1/255, visible masks exactly.

With CUDA the compiled kernel runs on the GPU; without it the kernel runs on CPU tensors under the
Triton interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so the
variable is set here, before ``instbank.paste.triton_kernel`` is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not installed (it ships for Linux x86-64 only)")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from instbank.paste import reference, triton_kernel  # noqa: E402
from instbank.paste.plan import CropGeometry, draw_plan  # noqa: E402
from paste_cases import CASES, make_case, make_plan, random_crops, random_images, random_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(triton_kernel._paste_kernel, InterpretedFunction):
    pytest.skip(
        "instbank.paste.triton_kernel was imported before TRITON_INTERPRET=1 was set (by another test "
        "module in this process), and there is no GPU: run this file on its own",
        allow_module_level=True,
    )

FLOAT_TOL = 1 / 255 + 1e-5  # the spec's agreement for float images
FLOAT32_TOL = 1e-5  # float32 out: only the summation order differs (a few float32 ulps of 1.0)


def assert_agree(images, crops, plan, padding_mask=None, value_range=None):
    """Run both impls on ``DEVICE``; check the tolerance, the masks, and that nothing was modified."""
    images, crops, plan = images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE)
    if padding_mask is not None:
        padding_mask = padding_mask.to(DEVICE)
    before = images.clone()
    out, masks = triton_kernel.paste_image(images, crops, plan, padding_mask, value_range)
    assert torch.equal(images, before)
    # A clone (same memory format): the reference must not be able to change what we compare with.
    ref_out, ref_masks = reference.paste_image(images.clone(), crops, plan, padding_mask, value_range)
    assert out.dtype == images.dtype and out.shape == images.shape
    assert out.stride() == ref_out.stride()  # same memory format as the input, as the reference
    assert masks.dtype == torch.bool and masks.shape == ref_masks.shape
    assert torch.equal(masks, ref_masks)
    if images.dtype == torch.uint8:
        assert (out.int() - ref_out.int()).abs().max().item() <= 1
        # Both sum the same float32 terms (in another order): a level differs only where a value
        # falls within float32 rounding of .5, so a systematic rounding error shows up here.
        assert (out != ref_out).float().mean().item() <= 0.002
    else:
        top = 1.0 if value_range is None else value_range
        diff = (out.float() - ref_out.float()).abs().max().item()
        assert diff <= (FLOAT32_TOL if images.dtype == torch.float32 else FLOAT_TOL) * top
    return out, masks


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_reference(name):
    images, crops, plan, padding, value_range = make_case(name)
    out, masks = assert_agree(images, crops, plan, padding, value_range)
    if padding is not None:
        assert not masks[padding.to(DEVICE)[:, None].expand_as(masks)].any()
    if not plan.apply.any():
        assert torch.equal(out, images.to(DEVICE)) and not masks.any()
    if name == "b3-k5":  # the random plan really pastes and occludes (the comparison is not vacuous)
        assert masks.any(dim=(2, 3)).sum() >= 8
        assert (out != images.to(DEVICE)).float().mean() > 0.05


def test_draw_plan_batch_agrees():
    """A plan from ``draw_plan`` (the training path) on crops with disk-shaped objects."""
    g = torch.Generator().manual_seed(7)
    b, k, s, h, w = 2, 4, 17, 37, 53
    crops = random_crops(g, b, k, s)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = ((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2) <= (s / 2.5) ** 2
    crops[:, :, 3] = torch.where(disk, 255, 0).to(torch.uint8)
    geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros((b, k), dtype=torch.int64))
    plan = draw_plan(geometry, (h, w), g, scale_range=(0.2, 0.8), blend="hard")
    assert_agree(random_images(g, b, h, w, torch.uint8), crops, plan)


@pytest.mark.parametrize("flip", [False, True])
def test_identity_paste_copies_the_crop(flip):
    """Scale 1 and an integer corner put every crop pixel centre on a target pixel centre, so the
    bilinear weights are (256, 0): the kernel alone must reproduce the crop (mirrored when flipped)
    exactly, with alpha 128 exactly on the mask threshold (in) and 127 just under it (out)."""
    s, h, w, x0, y0 = 6, 19, 23, 5, 7
    g = torch.Generator().manual_seed(3)
    crops = torch.randint(0, 256, (1, 1, 4, s, s), dtype=torch.uint8, generator=g)
    crops[:, :, 3] = 255
    crops[:, :, 3, 0, :] = 128  # A = 128 * 65536 exactly: the threshold is inclusive
    crops[:, :, 3, 1, :] = 127
    crops[:, :, :3, 0:2, :] = 11  # 10 * 127/255 + 11 * 128/255 = 10.502 -> 11 (round half up)
    images = torch.full((1, 3, h, w), 10, dtype=torch.uint8)
    plan = make_plan(
        torch.ones((1, 1), dtype=torch.bool), torch.ones((1, 1)), torch.tensor([[[x0, y0]]], dtype=torch.float32),
        torch.full((1, 1), flip),
    )
    out, masks = triton_kernel.paste_image(images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE))
    expected = images.clone()
    rgb = crops[0, 0, :3].flip(-1) if flip else crops[0, 0, :3]
    expected[0, :, y0 : y0 + s, x0 : x0 + s] = rgb
    expected[0, :, y0 + 1, x0 : x0 + s] = 10  # 10 * 128/255 + 11 * 127/255 = 10.498 -> 10
    box = torch.zeros((1, 1, h, w), dtype=torch.bool)
    box[..., y0 : y0 + s, x0 : x0 + s] = True
    box[..., y0 + 1, :] = False
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(masks.cpu(), box)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_pastes_straddling_tile_edges(scale):
    """Canvases starting or ending within 2.5 pixels of the tile edges x = BLOCK_W, y = BLOCK_H:
    the kernel skips a paste for a tile only when no pixel of that tile can reach it."""
    block_w, block_h = triton_kernel.BLOCK_W, triton_kernel.BLOCK_H
    s, h, w = 5, block_h + 6, block_w + 30  # 2 x 2 tiles
    side = s * scale
    corners = []
    for d in (-2.5, -0.7, 1.9):
        corners.append((block_w + d, block_h + d))  # starts just around the edges
        corners.append((block_w + d - side, block_h + d - side))  # ends just around them
    b = len(corners)  # one paste per image: none hides another
    crops = torch.full((b, 1, 4, s, s), 255, dtype=torch.uint8)
    plan = make_plan(
        torch.ones((b, 1), dtype=torch.bool), torch.full((b, 1), scale),
        torch.tensor(corners, dtype=torch.float32)[:, None], torch.zeros((b, 1), dtype=torch.bool),
    )
    images = torch.zeros((b, 3, h, w), dtype=torch.uint8)
    _, masks = assert_agree(images, crops, plan)
    assert masks.any(dim=(2, 3)).all()


@pytest.mark.parametrize("flip", [False, True])
def test_object_touching_the_canvas_edge_keeps_its_colour(flip):
    """RGB taps outside the canvas read the pixel clamped to its edge (alpha taps read 0), so a crop
    of RGB 200 whose object touches the canvas's left, top and bottom edges pastes as 200 * alpha,
    with no dark rim (200 * alpha**2 when RGB taps outside read 0)."""
    s = 16
    crops = torch.zeros((1, 1, 4, s, s), dtype=torch.uint8)
    crops[:, :, :3] = 200
    crops[0, 0, 3, :, :10] = 255
    plan = make_plan(
        torch.ones((1, 1), dtype=torch.bool), torch.full((1, 1), 1.37), torch.tensor([[[3.3, 2.6]]]),
        torch.full((1, 1), flip),
    ).to(DEVICE)
    black = torch.zeros((1, 3, 30, 30), dtype=torch.uint8, device=DEVICE)
    on_black, _ = triton_kernel.paste_image(black, crops.to(DEVICE), plan)  # 200 * alpha
    on_white, _ = triton_kernel.paste_image(black + 255, crops.to(DEVICE), plan)  # 255 (1 - alpha) + 200 alpha
    alpha = 1 - (on_white.float() - on_black.float()) / 255
    assert ((alpha[0, 0] > 0.05) & (alpha[0, 0] < 0.95)).sum() >= 30  # the rim
    assert ((on_black.float() - 200 * alpha).abs() <= 1.5).all()


def test_later_paste_hides_earlier_one():
    """Two identical opaque pastes: the first is invisible, the second fully visible."""
    s, h, w = 8, 20, 20
    crops = torch.full((1, 2, 4, s, s), 200, dtype=torch.uint8)
    crops[:, :, 3] = 255
    plan = make_plan(
        torch.ones((1, 2), dtype=torch.bool), torch.ones((1, 2)), torch.full((1, 2, 2), 4.0),
        torch.zeros((1, 2), dtype=torch.bool),
    )
    images = torch.zeros((1, 3, h, w), dtype=torch.uint8)
    _, masks = triton_kernel.paste_image(images.to(DEVICE), crops.to(DEVICE), plan.to(DEVICE))
    assert not masks[0, 0].any()
    assert masks[0, 1].sum().item() == s * s


@pytest.mark.parametrize(("b", "k"), [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_no_pastes_returns_a_copy(b, k):
    images = torch.randint(0, 256, (b, 3, 9, 11), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    crops = torch.zeros((b, k, 4, 5, 5), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    plan = random_plan(g, b, k, 5, 9, 11)
    out, masks = triton_kernel.paste_image(images, crops, plan)
    assert torch.equal(out, images)
    assert out.numel() == 0 or out.data_ptr() != images.data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert masks.shape == (b, k, 9, 11) and masks.dtype == torch.bool


def test_rejects_mismatched_crops():
    images = torch.zeros((2, 3, 9, 11), dtype=torch.uint8)
    crops = torch.zeros((3, 1, 4, 5, 5), dtype=torch.uint8)
    plan = random_plan(torch.Generator().manual_seed(0), 3, 1, 5, 9, 11)
    with pytest.raises(ValueError, match="crops must be uint8"):
        triton_kernel.paste_image(images, crops, plan)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    k=st.integers(1, 4),
    s=st.integers(1, 12),
    h=st.integers(1, 40),
    w=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_agrees_on_random_shapes(b, k, s, h, w, seed):
    """Any shape, including 1-pixel crops and 1-pixel images; visible masks are disjoint."""
    g = torch.Generator().manual_seed(seed)
    plan = random_plan(g, b, k, s, h, w, scale_range=(0.3, 4.0))
    _, masks = assert_agree(random_images(g, b, h, w, torch.uint8), random_crops(g, b, k, s), plan)
    assert masks.sum(dim=1).max().item() <= 1


def test_clear_import_error_without_triton():
    """Where triton is not installed, importing the kernel says what to install or use instead."""
    code = "import sys; sys.modules['triton'] = None; import instbank.paste.triton_kernel"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: instbank.paste.triton_kernel needs triton") and "impl='torch'" in last


# Lowers the kernel for sm_90 to PTX with Triton's own stages; needs no GPU (nor ptxas, which only
# the cubin stage after PTX uses). Exit code 3: this Triton's internal compiler API differs.
PTX_SCRIPT = """
import sys
try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
except ImportError:
    sys.exit(3)
from instbank.paste import triton_kernel as tk

fn = tk._paste_kernel
consts = {"HAS_PADDING": True, "OUT_UINT8": True, "BLOCK_H": tk.BLOCK_H, "BLOCK_W": tk.BLOCK_W}
floats = {"inv_scale_ptr": "*fp32", "translate_ptr": "*fp32", "rgb_gain": "fp32"}
sig = {n: "constexpr" if n in consts else floats.get(n, "*u8" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options(dict(tk.LAUNCH_OPTIONS))
context = ir.context()
ir.load_dialects(context)
backend.load_dialects(context)
src = ASTSource(fn, sig, constexprs=consts)
module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
stages = {}
backend.add_stages(stages, options, src.language)
metadata = {"hash": "0", "target": target, **options.__dict__}
for ext in ("ttir", "ttgir", "llir", "ptx"):
    module = stages[ext](module, metadata)
print("fma.rn.f32" in module, "ld.global" in module)
"""


def test_compiles_for_the_gpu_without_fused_multiply_add(tmp_path):
    """The interpreter runs Python, not the compiled kernel: lower it to sm_90 PTX here so that
    compiled-mode errors show up on a machine without a GPU, and check that no float32 FMA is left
    (a fused ``S - d * inv_scale`` would round the flipped coordinate differently from torch)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode == 3:
        pytest.skip("this triton's internal compiler API (ASTSource, make_backend) differs from 3.x")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "True"]
