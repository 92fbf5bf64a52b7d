"""Everything a GPU must show, in one command that ends within 6 minutes on one GPU, in one log.

    python benchmarks/gpu_suite.py [--log out/gpu-suite.log] [--parts tests module kernel e2e maskrcnn]
        [--bank DIR] [--budget 340] [--smoke]

Parts (each line of the log says PASS / FAIL for a check, "target met" / "target MISSED" for a
speed target, or why a part did not run):

- ``tests``: the CUDA tests in a pytest subprocess: the Triton kernel against the torch reference
  (tests/test_paste_triton.py, on the GPU when there is one) and pinned staging
  (tests/test_staging.py::test_pinned_staging_and_transfer).
- ``module``: ``BankCopyPaste`` on CUDA: the Triton impl against the torch reference impl on the
  same device with the same generator (same plan; images within 1 level, masks, boxes, labels,
  validity and semantic map equal), the annotations' invariants, and a forward under
  ``torch.cuda.set_sync_debug_mode("error")`` (after a warm-up), which raises at the first
  operation that synchronises with the host; the log names the instbank line that did.
- ``kernel``: ``paste_image`` of Triton against the torch reference (``benchmarks/paste.py``'s
  comparison) at B=32, 512^2 and 1024^2, K=8, S=128, uint8; bytes moved per call
  (``2*B*3*H*W + B*K*4*S*S + B*K*H*W``: images read and written, crops read, masks written)
  per second against a device-to-device copy's (read + write) measured in the same run.
  Targets: Triton >= 10x the reference, >= 50% of the copy bandwidth.
- ``e2e``: ``BankCopyPaste`` end to end per batch (B=8 at 1024^2, B=32 at 512^2; 4 existing
  instances, semantic map, padding masks), with its stages timed alone: plan
  (``BankSource.sample``), alpha (``prepare_alpha``), composite (``paste_image``), annotations
  (the rest of the forward).
- ``maskrcnn``: the paste's share of a training step of torchvision's Mask R-CNN R50-FPN (random
  init, bf16 autocast, SGD, B=8, 1024^2; ``examples/train.py``'s model and loss), each step's
  paste feeding its training step. Target: paste <= 3% of paste + step.

Timing on CUDA: CUDA events around the timed calls after a warm-up; the host synchronises only
after the end event (``benchmarks/paste.py``'s ``cuda_ms``), never inside a timed region.

Crops: a synthetic memmap bank written to a temporary directory (``instbank.testing``; crop ``i``
is a disk of constant colour) whose objects are declared 4x the crop size in their source image,
so that the default ``max_upscale`` bound leaves ``scale_range`` (0.1..0.5 of the image side) as
it is; or ``--bank``. The suite needs torch, numpy, OpenCV, numba or Triton, and torchvision for
``maskrcnn`` only; not lmdb, zstandard, pycocotools or webdataset.

``--smoke`` runs every part on the CPU with tiny shapes (``make test`` does, in
tests/test_gpu_suite.py): numba stands in for Triton, the CPU clock for CUDA events, the example's
small model for Mask R-CNN when torchvision does not import; no targets are judged.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("instbank") is None:  # a checkout that is not installed (GPU machines)
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch

from instbank.types import BankBatch

PARTS = ("tests", "module", "kernel", "e2e", "maskrcnn")
TARGET_SPEEDUP = 10.0
TARGET_BANDWIDTH = 0.5
TARGET_SHARE = 0.03
SCALE_RANGE = (0.1, 0.5)
#: Declared source size of the synthetic crops' objects, in crop sizes (see the docstring).
NATIVE_FACTOR = 4


@dataclass(frozen=True)
class Shapes:
    kernel_batch: int
    kernel_sizes: tuple[int, ...]
    k: int
    crop: int
    e2e: tuple[tuple[int, int], ...]  # (B, H=W)
    existing: int
    maskrcnn_batch: int
    maskrcnn_size: int
    repeats: int
    warmup: int
    copy_bytes: int
    tests: tuple[str, ...]
    tests_timeout: int


FULL = Shapes(
    kernel_batch=32, kernel_sizes=(512, 1024), k=8, crop=128, e2e=((8, 1024), (32, 512)), existing=4,
    maskrcnn_batch=8, maskrcnn_size=1024, repeats=10, warmup=3, copy_bytes=1 << 30,
    tests=("tests/test_paste_triton.py", "tests/test_staging.py::test_pinned_staging_and_transfer"),
    tests_timeout=170,
)  # fmt: skip
SMOKE = Shapes(
    kernel_batch=2, kernel_sizes=(48, 64), k=2, crop=16, e2e=((2, 64),), existing=2,
    maskrcnn_batch=2, maskrcnn_size=64, repeats=2, warmup=1, copy_bytes=8 << 20,
    tests=("tests/test_paste_triton.py::test_rejects_mismatched_crops",
           "tests/test_staging.py::test_pinned_staging_and_transfer"),
    tests_timeout=120,
)  # fmt: skip


class UsageError(Exception):
    """Missing requirement or bad argument: one line, exit status 2."""


def load_file(name: str, path: Path):
    """Import ``path`` as module ``name`` (benchmarks/ and examples/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_paste = load_file("instbank_bench_paste", REPO / "benchmarks" / "paste.py")


# --------------------------------------------------------------------------------------------
# the log


class Log:
    """Lines to stdout and to the log file; a tally of checks and targets for the summary."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in main
        self.failed: list[str] = []
        self.missed: list[str] = []
        self.not_run: list[str] = []
        self.passed = 0

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self(f"    {'PASS' if ok else 'FAIL'}: {name}{': ' + detail if detail else ''}")
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)

    def target(self, name: str, value: str, ok: bool | None) -> None:
        """``ok`` None: not judged (CPU stand-in)."""
        verdict = "not judged (CPU stand-in)" if ok is None else ("target met" if ok else "target MISSED")
        self(f"    {name}: {value}: {verdict}")
        if ok is False:
            self.missed.append(name)


# --------------------------------------------------------------------------------------------
# timing


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after a warm-up call: CUDA events on CUDA (synchronising
    after the end event only), ``perf_counter`` on the CPU (every op has finished on return)."""
    if device.type == "cuda":
        return bench_paste.cuda_ms(fn, repeats)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Marks:
    """Paired time marks inside a loop: CUDA events recorded in stream order (read after one
    synchronisation at the end), or ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        self.marks.append(event)
        return event

    def ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes``, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats, device)
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------
# inputs


def open_crops(args, shapes: Shapes, scratch: Path):
    """``(bank, native)``: ``--bank``, or a synthetic memmap bank of ``shapes.crop``^2 crops;
    ``native`` is the declared source side of the synthetic crops' objects (None: the bank's own
    geometry)."""
    if args.bank is not None:
        from instbank.storage import open_bank

        return open_bank(args.bank), None
    from instbank.testing import write_synthetic_bank

    n = max(shapes.kernel_batch, *(b for b, _ in shapes.e2e), shapes.maskrcnn_batch) * shapes.k
    return write_synthetic_bank(scratch / "bank", n, size=shapes.crop, num_classes=80), NATIVE_FACTOR * shapes.crop


def staged(bank, native: int | None, b: int, k: int, device: torch.device) -> BankBatch:
    """The ``BankBatch`` of crops ``0..b*k-1`` (modulo the bank) on ``device``."""
    indices = (np.arange(b * k) % len(bank)).reshape(b, k)
    batch = bench_paste.bank_batch(bank, indices)
    if native is not None:
        s = bank.crop_size[0]
        side = torch.full((b, k), float(native))
        batch = BankBatch(
            pixels=batch.pixels, class_ids=batch.class_ids, indices=batch.indices,
            src_box=torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], dim=-1),
            scale=torch.full((b, k), s / native), offset=torch.zeros((b, k, 2)), num_classes=batch.num_classes,
        )  # fmt: skip
    return batch.to(device)


def targets(b: int, n: int, size: int, num_classes: int, device: torch.device, seed: int = 0) -> dict:
    """A batch as a training loop has it: uint8 images ``[b, 3, size, size]``, ``n`` ellipse
    instances (bool masks, labels), a semantic map (``num_classes`` = background, -100 in padding)
    and a padding mask (large-scale jitter: each image's valid region a top-left rectangle)."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device, generator=g)
    valid_wh = (torch.rand((b, 1, 2), device=device, generator=g) * 0.5 + 0.5) * size  # 50..100%
    yy = torch.arange(size, device=device, dtype=torch.float32)[:, None]
    xx = torch.arange(size, device=device, dtype=torch.float32)[None, :]
    padding = (xx[None] >= valid_wh[:, :, 0, None]) | (yy[None] >= valid_wh[:, :, 1, None])  # [b, size, size]
    centre = torch.rand((b, n, 2), device=device, generator=g) * 0.4 + 0.2
    radius = torch.rand((b, n, 2), device=device, generator=g) * 0.15 + 0.05
    cx, cy = (centre[..., i, None, None] * size for i in range(2))
    rx, ry = (radius[..., i, None, None] * size for i in range(2))
    masks = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1  # [b, n, size, size]
    masks &= ~padding[:, None]
    labels = torch.randint(0, num_classes, (b, n), device=device, generator=g)
    semantic = torch.full((b, size, size), num_classes, dtype=torch.int64, device=device)
    for i in range(n):
        semantic = torch.where(masks[:, i], labels[:, i, None, None], semantic)
    semantic[padding] = -100
    images[padding[:, None].expand_as(images)] = 0
    return {"images": images, "masks": masks, "labels": labels, "semantic": semantic, "padding_mask": padding}


def instbank_line(exc: BaseException) -> str:
    """The innermost instbank source line of ``exc``'s traceback (where a sync happened)."""
    import instbank

    package = Path(instbank.__file__).resolve().parent
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(package)]
    if not frames:
        return "outside instbank"
    f = frames[-1]
    name = Path(f.filename).resolve().relative_to(package.parent)
    return f"{name}:{f.lineno} in {f.name}: {f.line}"


def paste_impl(device: torch.device) -> str:
    """The kernel under test: Triton on CUDA, its CPU stand-in numba elsewhere."""
    return "triton" if device.type == "cuda" else "numba"


# --------------------------------------------------------------------------------------------
# parts


def part_tests(log: Log, shapes: Shapes, device: torch.device, deadline: float, reserve: float) -> None:
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"    not run: {' and '.join(missing)} not installed (the CUDA test files need pytest and hypothesis)")
        log.not_run.append("tests")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *shapes.tests]
    log(f"    $ python {' '.join(cmd[1:])}   (on {'the GPU' if device.type == 'cuda' else 'the CPU: CUDA tests skip'})")
    timeout = max(10, min(shapes.tests_timeout, deadline - time.monotonic() - reserve))
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.check("CUDA tests", False, f"timed out after {timeout:.0f} s")
        return
    lines = (done.stdout + done.stderr).strip().splitlines()
    for line in lines[-12:] if done.returncode else lines[-4:]:
        log(f"      {line}")
    log.check("CUDA tests (pytest exit status 0)", done.returncode == 0, f"exit status {done.returncode}")


def part_module(log: Log, shapes: Shapes, device: torch.device, bank, native) -> None:
    from instbank.paste import BankCopyPaste, CopyPasteConfig
    from instbank.paste.plan import tight_boxes

    b, size, k = shapes.e2e[-1][0], shapes.e2e[-1][1], shapes.k
    num_classes = len(bank.class_names)
    batch = targets(b, shapes.existing, size, num_classes, device)
    crops = staged(bank, native, b, k, device)
    impl = paste_impl(device)
    outs = {}
    for name in (impl, "torch"):
        module = BankCopyPaste(CopyPasteConfig(scale_range=SCALE_RANGE, impl=name)).to(device)
        module.set_bank_batch(crops)
        outs[name] = module(**batch, generator=torch.Generator(device=device).manual_seed(1))
    log(f"    {impl} against the torch reference impl, both on {device}: B={b}, {size}x{size}, K={k}, "
        f"{shapes.existing} existing instances, semantic map, padding masks, same generator seed")
    ours, ref = outs[impl], outs["torch"]
    diff = int((ours["images"].int() - ref["images"].int()).abs().max())
    log.check("images within 1 level", diff <= 1, f"max |diff| {diff}")
    for key in ("masks", "boxes", "labels", "valid", "semantic"):
        log.check(f"{key} equal", torch.equal(ours[key], ref[key]))
    valid, masks, n = ours["valid"], ours["masks"], shapes.existing
    tight = torch.equal(ours["boxes"][valid], tight_boxes(masks)[valid])
    log.check("boxes of valid instances are the tight boxes of their masks", tight)
    log.check("pasted labels are the staged crops' classes", torch.equal(ours["labels"][:, n:], crops.class_ids))
    log.check("nothing pasted into padding", not bool((masks[:, n:] & batch["padding_mask"][:, None]).any()))
    log.check("objects were pasted", bool(valid[:, n:].sum() >= b), f"{int(valid[:, n:].sum())} valid pastes")

    module = BankCopyPaste(CopyPasteConfig(scale_range=SCALE_RANGE, impl="auto")).to(device)
    module.set_bank_batch(crops)
    cases = {"images only": {"images": batch["images"]}, "training inputs (masks, labels, semantic, padding)": batch}
    for name, inputs in cases.items():
        generator = torch.Generator(device=device).manual_seed(2)
        module(**inputs, generator=generator)  # warm-up: kernel compilation, allocator
        if device.type != "cuda":
            module(**inputs, generator=generator)
            log(f"    host synchronisation, {name}: skipped: no CUDA (the same forward ran on the CPU)")
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            module(**inputs, generator=generator)
            error = None
        except Exception as e:  # noqa: BLE001 - the sync check raises RuntimeError; report any
            error = e
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        detail = "none" if error is None else f"at {instbank_line(error)} ({str(error).splitlines()[0]})"
        log.check(f"no host synchronisation in the CUDA forward, {name}", error is None, detail)


def part_kernel(log: Log, shapes: Shapes, device: torch.device, bank, native) -> None:
    from instbank.paste import impl_module, prepare_alpha
    from instbank.paste.plan import draw_plan

    impl = paste_impl(device)
    ours, reference = impl_module(impl).paste_image, impl_module("torch").paste_image
    b, k, s = shapes.kernel_batch, shapes.k, bank.crop_size[0]
    copy_bps = copy_bandwidth(device, shapes.copy_bytes, shapes.repeats)
    log(f"    {device.type} copy of {shapes.copy_bytes >> 20} MiB: {copy_bps / 1e9:.1f} GB/s (read + write)")
    crops = staged(bank, native, b, k, device)
    for size in shapes.kernel_sizes:
        generator = torch.Generator(device=device).manual_seed(0)
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device, generator=generator)
        plan = draw_plan(crops, (size, size), generator, scale_range=SCALE_RANGE, blend="gaussian")
        prepared = prepare_alpha(crops.pixels, plan)
        ref_ms = median_ms(lambda: reference(images, prepared, plan), shapes.repeats, device)
        our_ms = median_ms(lambda: ours(images, prepared, plan), shapes.repeats, device)
        moved = 2 * b * 3 * size * size + b * k * 4 * s * s + b * k * size * size
        bps = moved / (our_ms * 1e-3)
        out, vis = ours(images, prepared, plan)
        ref_out, ref_vis = reference(images, prepared, plan)
        sides = (plan.object_boxes[..., 2:] - plan.object_boxes[..., :2]).amax(dim=-1)[plan.apply]
        objects = f"{len(sides)} objects of {sides.min():.0f}..{sides.max():.0f} px" if len(sides) else "no objects"
        log(f"    B={b} {size}x{size} K={k} S={s}: torch {ref_ms:.2f} ms, {impl} {our_ms:.3f} ms "
            f"({moved / 1e6:.1f} MB moved, {bps / 1e9:.1f} GB/s); {objects} pasted")
        diff = int((out.int() - ref_out.int()).abs().max())
        log.check(f"{impl} agrees with the reference at {size}x{size}", diff <= 1 and torch.equal(vis, ref_vis),
                  f"max |diff| {diff} level, masks {'equal' if torch.equal(vis, ref_vis) else 'DIFFER'}")
        judged = device.type == "cuda"
        log.target(f"{impl} / torch at {size}x{size} >= {TARGET_SPEEDUP:g}x", f"{ref_ms / our_ms:.1f}x",
                   ref_ms / our_ms >= TARGET_SPEEDUP if judged else None)
        log.target(f"{impl} bandwidth at {size}x{size} >= {TARGET_BANDWIDTH:.0%} of the copy's", f"{bps / copy_bps:.0%}",
                   bps / copy_bps >= TARGET_BANDWIDTH if judged else None)


def part_e2e(log: Log, shapes: Shapes, device: torch.device, bank, native) -> None:
    from instbank.paste import BankCopyPaste, CopyPasteConfig, impl_module, prepare_alpha

    impl = paste_impl(device)
    log(f"    BankCopyPaste(impl='auto' -> {impl}), K={shapes.k}, {shapes.existing} existing instances, semantic, padding;"
        " stages timed alone (annotations: the rest of the forward)")
    for b, size in shapes.e2e:
        batch = targets(b, shapes.existing, size, len(bank.class_names), device)
        crops = staged(bank, native, b, shapes.k, device)
        module = BankCopyPaste(CopyPasteConfig(scale_range=SCALE_RANGE)).to(device)
        module.set_bank_batch(crops)
        generator = torch.Generator(device=device).manual_seed(0)
        total = median_ms(lambda: module(**batch, generator=generator), shapes.repeats, device)

        def plan_only():
            return module.source.sample((size, size), generator, batch["padding_mask"], batch_size=b, device=device)

        plan, crops_px = plan_only()
        prepared = prepare_alpha(crops_px, plan)
        composite = impl_module(impl).paste_image
        t_plan = median_ms(plan_only, shapes.repeats, device)
        t_alpha = median_ms(lambda: prepare_alpha(crops_px, plan), shapes.repeats, device)
        t_comp = median_ms(lambda: composite(batch["images"], prepared, plan, batch["padding_mask"]), shapes.repeats, device)
        rest = total - t_plan - t_alpha - t_comp
        log(f"    B={b:2d} {size}x{size}: {total:8.2f} ms per batch ({total / b:.3f} ms per image) = plan {t_plan:.2f} "
            f"+ alpha {t_alpha:.2f} + composite {t_comp:.2f} + annotations {rest:.2f} ms")


def maskrcnn_available() -> str | None:
    """None when torchvision's Mask R-CNN imports, else why not."""
    try:
        from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or its compiled ops failing to load
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def part_maskrcnn(log: Log, shapes: Shapes, device: torch.device, bank, native) -> None:
    from instbank.paste import BankCopyPaste, CopyPasteConfig

    example = load_file("instbank_example_train", REPO / "examples" / "train.py")
    b, size, num_classes = shapes.maskrcnn_batch, shapes.maskrcnn_size, len(bank.class_names)
    why_not = maskrcnn_available()
    if why_not is None:
        name, (model, loss_fn) = "Mask R-CNN R50-FPN", example.build_model("maskrcnn", num_classes, size)
    else:
        log(f"    Mask R-CNN: skipped: no torchvision ({why_not})")
        name, (model, loss_fn) = "stand-in: examples/train.py TinyInstanceNet", example.build_model("tiny", num_classes, size)
    torch.manual_seed(0)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    module = BankCopyPaste(CopyPasteConfig(scale_range=SCALE_RANGE)).to(device)
    module.set_bank_batch(staged(bank, native, b, shapes.k, device))
    batch = targets(b, shapes.existing, size, num_classes, device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(out):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    marks = Marks(device)
    pairs = []
    for _ in range(shapes.warmup + shapes.repeats):
        t0 = marks.mark()
        out = module(**batch, generator=generator)
        t1 = marks.mark()
        loss = step(out)
        t2 = marks.mark()
        pairs.append((t0, t1, t2))
    marks.finish()
    timed = pairs[shapes.warmup :]
    paste_ms = statistics.median(marks.ms(a, b_) for a, b_, _ in timed)
    step_ms = statistics.median(marks.ms(b_, c) for _, b_, c in timed)
    share = statistics.median(marks.ms(a, b_) / marks.ms(a, c) for a, b_, c in timed)
    log(f"    {name}, random init, bf16 autocast, SGD, B={b}, {size}x{size}, K={shapes.k} pastes per image on {device}: "
        f"paste {paste_ms:.2f} ms, training step {step_ms:.1f} ms (median of {shapes.repeats} after {shapes.warmup} "
        f"warm-up); last loss {float(loss.detach()):.3f}")
    log.check("training loss is finite", math.isfinite(float(loss.detach())))
    judged = device.type == "cuda" and why_not is None
    log.target(f"paste share of a {name} step <= {TARGET_SHARE:.0%}", f"{share:.2%}", share <= TARGET_SHARE if judged else None)


RUNNERS = {"module": part_module, "kernel": part_kernel, "e2e": part_e2e, "maskrcnn": part_maskrcnn}
#: Seconds to keep for each part after the tests (an H200 needs well under these); the tests'
#: pytest gets what the budget leaves, at most ``Shapes.tests_timeout``.
RESERVE_S = {"tests": 0, "module": 40, "kernel": 40, "e2e": 25, "maskrcnn": 70}
TITLES = {
    "tests": "CUDA tests (pytest)",
    "module": "BankCopyPaste on the device: agreement, invariants, host synchronisation",
    "kernel": "compositing kernel against the torch reference; bandwidth",
    "e2e": "BankCopyPaste end to end per batch",
    "maskrcnn": "paste share of a training step",
}


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", type=Path, default=None, help="default: out/gpu-suite.log (out/gpu-suite-smoke.log)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--bank", type=Path, default=None, help="a bank to take the crops from (default: synthetic)")
    p.add_argument("--budget", type=float, default=340.0,
                   help="seconds for all parts: a part that would not end in time is not started")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny shapes")
    return p.parse_args(argv)


def check_requirements(args) -> torch.device:
    """The device to run on; ``UsageError`` naming everything a full run lacks, in one line."""
    if args.smoke:
        return torch.device("cpu")
    missing = []
    if not torch.cuda.is_available():
        missing.append(f"CUDA (torch {torch.__version__}: torch.cuda.is_available() is False; --smoke runs the CPU stand-ins)")
    if importlib.util.find_spec("triton") is None:
        missing.append("Triton (pip install triton)")
    if "maskrcnn" in args.parts and (why := maskrcnn_available()) is not None:
        missing.append(f"torchvision for the maskrcnn part ({why}; --parts without maskrcnn leaves it out)")
    if missing:
        raise UsageError("the GPU suite needs " + ", and ".join(missing))
    return torch.device("cuda")


def check_bank(bank, shapes: Shapes, path: Path) -> None:
    s, smallest = bank.crop_size[0], min(*shapes.kernel_sizes, *(size for _, size in shapes.e2e), shapes.maskrcnn_size)
    if s > smallest:
        raise UsageError(f"bank {path} has {s}x{s} crops, larger than the {smallest}x{smallest} images of this suite")


def run(args) -> int:
    from instbank.errors import InstbankError

    shapes = SMOKE if args.smoke else FULL
    device = check_requirements(args)
    deadline = time.monotonic() + args.budget
    log_path = args.log or REPO / "out" / ("gpu-suite-smoke.log" if args.smoke else "gpu-suite.log")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            bank, native = open_crops(args, shapes, Path(scratch))
        except InstbankError as e:
            raise UsageError(str(e)) from None
        check_bank(bank, shapes, args.bank)
        log = Log(log_path)
        try:
            return run_parts(args, log, shapes, device, bank, native, deadline)
        finally:
            log.file.close()


def run_parts(args, log: Log, shapes: Shapes, device: torch.device, bank, native, deadline: float) -> int:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: stand-ins, tiny shapes)"
    versions = [f"torch {torch.__version__}"]
    for module in ("triton", "numba", "torchvision"):
        versions.append(f"{module} {_version(module)}")
    log(f"instbank GPU suite on {name}; {', '.join(versions)}")
    source = f"bank {args.bank}" if native is None else f"synthetic bank (objects declared {native} px at the source)"
    log(f"crops: {source}, {bank.crop_size[0]}x{bank.crop_size[0]}; budget {args.budget:.0f} s")
    start = time.monotonic()
    for part in args.parts:
        log()
        log(f"[{part}] {TITLES[part]}")
        later = sum(RESERVE_S[p] for p in args.parts[args.parts.index(part) + 1 :])
        if part != "tests" and time.monotonic() + RESERVE_S[part] > deadline:
            log(f"    not run: it would not end within the {args.budget:.0f} s budget")
            log.not_run.append(part)
            continue
        began = time.monotonic()
        try:
            if part == "tests":
                part_tests(log, shapes, device, deadline, later)
            else:
                RUNNERS[part](log, shapes, device, bank, native)
        except Exception as e:  # noqa: BLE001 - one part's crash must not hide the others' results
            log.check(f"{part} ran", False, f"{type(e).__name__}: {e}".splitlines()[0])
            for line in traceback.format_exc().rstrip().splitlines():
                log.file.write(f"      {line}\n")
        log(f"    ({time.monotonic() - began:.1f} s)")
    log()
    log(f"summary: {log.passed} checks passed, {len(log.failed)} failed{': ' + '; '.join(log.failed) if log.failed else ''}; "
        f"targets missed: {'; '.join(log.missed) if log.missed else 'none'}; "
        f"not run: {', '.join(log.not_run) if log.not_run else 'none'}; {time.monotonic() - start:.0f} s")
    return 1 if log.failed or log.missed or log.not_run else 0


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "absent"
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - a module that is present but does not import
        return f"broken ({type(e).__name__})"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
