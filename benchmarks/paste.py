"""Copy-paste speed: instbank against AlbumentationsX on CPU, Triton against the torch reference on GPU.

    .venv/bin/python benchmarks/paste.py [--size 512] [--k 8] [--crop 128] [--images 32]
        [--cpu-batches 1 8] [--impls numba torch] [--existing 4] [--threads 1] [--repeats 7]
        [--bank out/demo-bank] [--gpu-batch 32] [--gpu-sizes 512 1024] [--peak-bw GB/s]

(a) CPU, per image, both sides doing the whole augmentation of one training sample from the same
inputs and producing the same outputs: the ``--k`` crops pasted into the ``--size``^2 uint8
image holding ``--existing`` instances (masks, tight boxes, labels given), and the annotations
updated: image, masks, boxes and labels of the pasted and of the existing instances (cut,
refit or dropped).

- instbank: ``BankCopyPaste(impl=...)`` for each of ``--impls`` (``numba``: the compiled CPU
  kernel, what ``auto`` picks on CPU; ``torch``: the reference, numpy on CPU) on ``BankBatch``es of
  ``--cpu-batches`` images (the crops and their geometry as ``instbank.sampling`` stages them),
  everything inside the call: plan, alpha preparation, compositing, annotations. Object's longer
  side log-uniform in 1/8..1/4 of 512.
- AlbumentationsX: ``Compose([CopyAndPaste(p=1, scale_range=(0.5, 1))], instance_binding=
  ["masks", "bboxes"])`` called once per image with the K crops as ``copy_paste_metadata`` donors
  (RGB + ``alpha >= 128`` mask): it tight-crops each donor to its mask (an object of up to S=128
  px) and shrinks it by 0.5..1, so objects get the same 64..128 px. (It does not refit the boxes
  of existing instances it cuts; instbank does.)

Rows: ``hard`` (alpha thresholded) and ``gaussian`` (alpha blurred, sigma 1..3) blending on both
sides, for each instbank impl and batch size; median over ``--repeats`` rounds of ms per image,
wall clock and process CPU time (the latter moves less when other jobs share the machine); in each
round the sides take turns, and the ratio is the median of the rounds' AlbumentationsX / instbank.
``--threads`` sets both torch's and OpenCV's thread count (DataLoader workers run torch with 1
thread). No allocator tuning (``MALLOC_*`` variables, jemalloc) on either side: page faults on
fresh output buffers are part of what a user pays.

(b) GPU, only with CUDA: ``paste_image`` of the Triton kernel against the torch reference on the
same device, uint8 images ``[--gpu-batch, 3, H, W]`` for each ``--gpu-sizes``, K crops of S², same
plan and prepared alpha; CUDA events around each call after a warm-up, median of ``--repeats``.
Bytes moved per call = images read + images written + crops read + visible masks written
(``2*B*3*H*W + B*K*4*S*S + B*K*H*W``); GB/s against ``--peak-bw`` when given. Agreement (max
level difference, masks equal) is printed beside the times.

Crops: the first ``B*K`` crops of ``--bank`` when it exists (any backend), else of a synthetic
bank written to a temporary directory (``instbank.testing.write_synthetic_bank``: constant colour,
alpha disk); the crop size is the bank's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instbank.paste import BankCopyPaste, CopyPasteConfig, prepare_alpha
from instbank.paste.plan import CropGeometry, draw_plan
from instbank.paste.reference import paste_image as torch_paste_image
from instbank.sampling import gather_geometry
from instbank.types import BankBatch

SCALE_RANGE = (1 / 8, 1 / 4)  # object's longer side / 512: 64..128 px, AlbumentationsX's 0.5..1 x 128
SIGMA_RANGE = (1.0, 3.0)  # AlbumentationsX's default blend_sigma_range


def open_crops(bank_path: Path, size: int, scratch: Path):
    """The bank at ``bank_path``, or a synthetic one of ``size``^2 crops in ``scratch``; and a line
    saying which."""
    from instbank.storage import open_bank
    from instbank.testing import write_synthetic_bank

    if (bank_path / "manifest.json").exists():
        bank = open_bank(bank_path)
        return bank, f"real crops of {bank_path} ({bank.version})"
    return write_synthetic_bank(scratch / "bank", 512, size=size), f"synthetic crops (no bank at {bank_path})"


def bank_batch(bank, indices: np.ndarray) -> BankBatch:
    """The ``BankBatch`` of crops int64 ``[B, K]`` (what ``instbank.sampling`` stages)."""
    pixels = np.asarray(bank.get_many(indices.reshape(-1))).reshape(*indices.shape, 4, *bank.crop_size)
    geometry = {name: torch.from_numpy(v) for name, v in gather_geometry(bank, indices).items()}
    return BankBatch(pixels=torch.from_numpy(pixels), num_classes=len(bank.class_names), **geometry)


def existing_instances(b: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[b, n, size, size]`` ellipse masks, one per instance."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((b, n, size, size), np.uint8)
    for i in range(b):
        for j in range(n):
            cx, cy = rng.uniform(0.2, 0.8, 2) * size
            rx, ry = rng.uniform(0.05, 0.2, 2) * size
            masks[i, j] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return masks


def tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def interleaved_ms(runs: dict, repeats: int) -> dict:
    """Wall-clock and process CPU milliseconds of each ``runs[name]()``, ``repeats`` rounds after a
    warm-up, the functions taking turns within each round: ``{name: [(wall, cpu), ...]}``.

    Taking turns makes a ratio of two sides within a round insensitive to the load of a machine
    shared with other jobs drifting between rounds; CPU time (``time.process_time``) is what the
    work costs this process, wall time also counts waiting for a core.
    """
    for fn in runs.values():
        fn()
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(((time.perf_counter() - start_wall) * 1e3, (time.process_time() - start_cpu) * 1e3))
    return times


# --------------------------------------------------------------------------------------------
# (a) CPU


def instbank_cpu(images, batches, masks, boxes, labels, blend, batch, impl):
    """A function pasting every image once through ``BankCopyPaste``, by batches of ``batch``
    (``batches``: one ``BankBatch`` per batch)."""
    module = BankCopyPaste(
        CopyPasteConfig(scale_range=SCALE_RANGE, blend=blend, sigma_range=SIGMA_RANGE, impl=impl)
    )
    generator = torch.Generator().manual_seed(0)

    def run():
        for i, staged in enumerate(batches):
            lo, hi = i * batch, (i + 1) * batch
            module.set_bank_batch(staged)
            module(images[lo:hi], masks[lo:hi], boxes[lo:hi], labels[lo:hi], generator=generator)

    return run


def albumentations_cpu(images, crops, masks, boxes, blend, k):
    """A function pasting every image once through AlbumentationsX ``CopyAndPaste``."""
    import albumentations as A

    transform = A.Compose(
        [A.CopyAndPaste(p=1.0, scale_range=(0.5, 1.0), blend_mode=blend, blend_sigma_range=SIGMA_RANGE)],
        bbox_params=A.BboxParams(coord_format="pascal_voc", label_fields=["class_labels"]),
        instance_binding=["masks", "bboxes"],
        seed=0,
    )
    samples = []
    for i in range(len(images)):
        donors = [
            {
                "image": np.ascontiguousarray(crops[i, j, :3].transpose(1, 2, 0)),
                "mask": (crops[i, j, 3] >= 128).astype(np.uint8),
                "bbox_labels": {"class_labels": 0},
            }
            for j in range(k)
        ]
        instances = [
            {"mask": m, "bbox": box, "bbox_labels": {"class_labels": 1}} for m, box in zip(masks[i], boxes[i])
        ]
        samples.append((np.ascontiguousarray(images[i].transpose(1, 2, 0)), instances, donors))

    def run():
        for image, instances, donors in samples:
            transform(image=image, instances=instances, copy_paste_metadata=donors)

    return run


def cpu_section(args, bank, source: str) -> None:
    import albumentations as A
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    n, k = args.images, args.k
    rng = np.random.default_rng(0)
    indices = (np.arange(n * k) % len(bank)).reshape(n, k)
    images_np = rng.integers(0, 256, (n, 3, args.size, args.size), dtype=np.uint8)
    masks_np = existing_instances(n, args.existing, args.size, rng)
    boxes_np = np.array([[tight_box(m) for m in image_masks] for image_masks in masks_np], np.float32)
    images, masks, boxes = (torch.from_numpy(v) for v in (images_np, masks_np, boxes_np))
    labels = torch.ones((n, args.existing), dtype=torch.int64)
    s = bank.crop_size[0]
    print(f"(a) CPU: {n} images {args.size}x{args.size} uint8, K={k} crops of {s}x{s} each, "
          f"{args.existing} existing instances (masks, boxes, labels); {source}")
    print(f"    torch {torch.__version__} ({torch.get_num_threads()} thread), albumentationsx {A.__version__}, "
          f"opencv {cv2.__version__} ({args.threads} thread)")
    header = f"{'blend':9s} {'impl':6s} {'B':>2s} {'clock':5s} {'instbank ms/img':>16s} {'AlbumentationsX ms/img':>23s}"
    print(f"    {header} {'ratio':>7s}")
    donors = np.asarray(bank.get_many(indices.reshape(-1))).reshape(n, k, 4, s, s)
    for blend in ("hard", "gaussian"):
        runs = {"albumentationsx": albumentations_cpu(images_np, donors, masks_np, boxes_np, blend, k)}
        for batch in args.cpu_batches:
            batches = [bank_batch(bank, indices[lo : lo + batch]) for lo in range(0, n, batch)]
            for impl in args.impls:
                runs[impl, batch] = instbank_cpu(images, batches, masks, boxes, labels, blend, batch, impl)
        times = interleaved_ms(runs, args.repeats)
        theirs = times.pop("albumentationsx")
        for (impl, batch), ours in times.items():
            for c, clock in enumerate(("wall", "cpu")):
                a = statistics.median(t[c] for t in ours) / n
                b = statistics.median(t[c] for t in theirs) / n
                ratio = statistics.median(their[c] / our[c] for their, our in zip(theirs, ours))
                print(f"    {blend:9s} {impl:6s} {batch:2d} {clock:5s} {a:16.2f} {b:23.2f} {ratio:6.1f}x")


# --------------------------------------------------------------------------------------------
# (b) GPU


def cuda_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_section(args, bank, source: str) -> None:
    if not torch.cuda.is_available():
        print("(b) GPU: no CUDA device: skipped")
        return
    try:
        from instbank.paste.triton_kernel import paste_image as triton_paste_image
    except ImportError as exc:
        print(f"(b) GPU: Triton kernel unavailable ({exc}): skipped")
        return
    dev = torch.device("cuda")
    b, k, s = args.gpu_batch, args.k, bank.crop_size[0]
    indices = np.arange(b * k) % len(bank)
    crops = torch.from_numpy(np.asarray(bank.get_many(indices))).view(b, k, 4, s, s).to(dev)
    print(f"(b) GPU {torch.cuda.get_device_name(dev)}: B={b}, K={k}, S={s}, uint8; {source}")
    peak = f" (peak {args.peak_bw:g} GB/s)" if args.peak_bw else ""
    print(f"    {'H=W':>5s} {'torch ms':>9s} {'triton ms':>10s} {'ratio':>7s} {'triton GB/s':>12s}{peak}  agreement")
    for size in args.gpu_sizes:
        generator = torch.Generator(device=dev).manual_seed(0)
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=dev, generator=generator)
        geometry = CropGeometry.from_alpha(crops[:, :, 3], torch.zeros((b, k), dtype=torch.int64, device=dev))
        plan = draw_plan(geometry, (size, size), generator, scale_range=SCALE_RANGE, blend="gaussian",
                         sigma_range=SIGMA_RANGE)
        prepared = prepare_alpha(crops, plan)
        ref_ms = cuda_ms(lambda: torch_paste_image(images, prepared, plan), args.repeats)
        tri_ms = cuda_ms(lambda: triton_paste_image(images, prepared, plan), args.repeats)
        moved = 2 * b * 3 * size * size + b * k * 4 * s * s + b * k * size * size
        gbps = moved / (tri_ms * 1e-3) / 1e9
        share = f" = {100 * gbps / args.peak_bw:.0f}% of peak" if args.peak_bw else ""
        ref_out, ref_vis = torch_paste_image(images, prepared, plan)
        tri_out, tri_vis = triton_paste_image(images, prepared, plan)
        diff = (ref_out.int() - tri_out.int()).abs().max().item()
        same = bool(torch.equal(ref_vis, tri_vis))
        print(f"    {size:5d} {ref_ms:9.2f} {tri_ms:10.3f} {ref_ms / tri_ms:6.1f}x {gbps:12.1f}{share}  "
              f"max |diff| {diff} level, masks {'equal' if same else 'DIFFER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="synthetic crop size (a bank sets its own)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--impls", nargs="+", default=["numba", "torch"], choices=["numba", "torch"])
    parser.add_argument("--existing", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bank", type=Path, default=Path("out/demo-bank"))
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--peak-bw", type=float, default=None, help="device peak memory bandwidth, GB/s")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        bank, source = open_crops(args.bank, args.crop, Path(scratch))
        if not args.skip_cpu:
            cpu_section(args, bank, source)
        gpu_section(args, bank, source)


if __name__ == "__main__":
    main()
