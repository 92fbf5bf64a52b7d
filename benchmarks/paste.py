"""Copy-paste speed: instbank against AlbumentationsX on CPU, Triton against the torch reference on GPU.

    .venv/bin/python benchmarks/paste.py [--data synthetic coco] [--coco ANN.json] [--size 512] [--k 8]
        [--crop 128] [--images 32] [--cpu-batches 1 8] [--forms ...] [--impls numba torch]
        [--existing 4] [--threads 1] [--repeats 7] [--bank out/demo-bank]
        [--gpu-batch 32] [--gpu-sizes 512 1024] [--peak-bw GB/s] [--skip-cpu]
        [--targets] [--targets-only] [--tv-references DIR]

(a) CPU, per image, both sides doing the whole augmentation of one training sample from the same
inputs and producing the same outputs: the ``--k`` crops pasted into the ``--size``^2 uint8
image, and the annotations updated: image, masks, boxes and labels of the pasted and of the
existing instances (cut, refit or dropped).

Target images (``--data``, both by default, one table each):

- ``synthetic``: ``--images`` random images holding ``--existing`` ellipse instances each.
- ``coco``: real images with their real instances: the images of ``--coco`` (default: the
  held-out ``../shared/data/coco_tiny_2017`` val split when present, else the shipped sample
  ``data/sample/coco``) that have instances, resized to ``--size``^2 (masks by nearest), every
  instance kept (crowd regions skipped, as the build does); a batch pads its images to the most
  instances of any of them (``valid`` False there, masks empty).

Input forms (``--forms``; one row each): how a user hands the existing instances over, ``masks``
``uint8`` or ``bool``, ``boxes`` given (tight boxes) or computed (not passed: instbank takes the
tight boxes of the masks), ``valid`` given or computed (not passed: "mask not empty"). Named
``u8|bool`` + ``+box`` + ``+valid``: ``u8+box`` is masks, boxes and labels.

- instbank: ``BankCopyPaste(impl=...)`` for each of ``--impls`` (``numba``: the compiled CPU
  kernel, what ``auto`` picks on CPU; ``torch``: the reference, numpy on CPU) on ``BankBatch``es of
  ``--cpu-batches`` images (the crops and their geometry as ``instbank.sampling`` stages them),
  everything inside the call: plan, alpha preparation, compositing, annotations. Object's longer
  side log-uniform in 1/8..1/4 of 512, i.e. 64..128 px (``max_upscale=None``: AlbumentationsX
  below gets the same sizes, whatever the donors' source sizes).
- AlbumentationsX: ``Compose([CopyAndPaste(p=1, scale_range=(0.5, 1))], instance_binding=
  ["masks", "bboxes"])`` called once per image with the K crops as ``copy_paste_metadata`` donors
  (RGB + ``alpha >= 128`` mask) and the image's instances (uint8 mask + tight box each): it
  tight-crops each donor to its mask (an object of up to S=128 px) and shrinks it by 0.5..1, so
  objects get the same 64..128 px. (It does not refit the boxes of existing instances it cuts;
  instbank does.) Its time is the same for every form of a table (it gets its own form).

Rows: ``hard`` (alpha thresholded) and ``gaussian`` (alpha blurred, sigma 1..3) blending on both
sides, for each input form, instbank impl and batch size: median over ``--repeats`` rounds of ms
per image, process CPU time (what the work costs this process; it moves less than wall time when
other jobs share the machine) and wall clock; in each round every function runs once, in a
seeded shuffled order (``interleaved_ms``), and the ratio is the median of the rounds'
AlbumentationsX / instbank (CPU time). ``--threads`` sets both torch's and OpenCV's thread count
(DataLoader workers run torch with 1 thread). No allocator tuning (``MALLOC_*`` variables,
jemalloc) on either side: page faults on fresh output buffers are part of what a user pays.

(b) GPU, only with CUDA: ``paste_image`` of the Triton kernel against the torch reference on the
same device, uint8 images ``[--gpu-batch, 3, H, W]`` for each ``--gpu-sizes``, K crops of S², same
plan and prepared alpha; CUDA events around each call after a warm-up, median of ``--repeats``.
Bytes moved per call = images read + images written + crops read + visible masks written
(``2*B*3*H*W + B*K*4*S*S + B*K*H*W``); GB/s against ``--peak-bw`` when given. Agreement (max
level difference, masks equal) is printed beside the times.

(c) Targets beyond masks, CPU (``--targets``; ``--targets-only`` skips (a)): ``BankCopyPaste``
(numba) on the same batches (``--cpu-batches``, form ``u8+box+valid``) with nothing more, with
keypoints (17 per instance: synthetic, at random pixels of each existing instance's mask, and on
random alpha pixels of each bank crop, COCO's person flip), with a panoptic map (each existing
instance a thing segment, the rest one stuff segment, ``PanopticSchema`` with divisor 1000)
counted (``panoptic``), counted and painted in place (``pan+ip,count``: ``panoptic_out=panoptic``,
as ``inplace=True`` paints it, a fresh copy of the map per call made beforehand), with its
segments table given (``pan+table``: ``segments=(ids, area)``, made once outside the timed runs,
as a data set's ``segments_info``), and with the table given and painted in place
(``pan+inplace``), with keypoints and the map in place (``both``), and with in-batch objects
(``in_batch=1``: the objects of the other images of the batch, ``in_batch=0.5``: mixed with the
bank's). The rows take turns within each round as in (a); the overhead is the median over the
rounds of (row / masks only - 1).

(d) In-batch objects against torchvision's reference ``SimpleCopyPaste`` (``--targets``; on CUDA
when present, else CPU): torchvision's version lives in its repository
(``references/detection/transforms.py``), not in its wheel, so it runs only with torchvision
importable and ``--tv-references`` pointing at that folder; otherwise the section prints why it
is skipped. Both sides get the same batch (uint8 images, bool masks, boxes, labels), paste objects
of another image of the batch with Gaussian blending, and return images, masks, boxes and labels.

Crops: the first ``B*K`` crops of ``--bank`` when it exists (any backend), else of a synthetic
bank written to a temporary directory (``instbank.testing.write_synthetic_bank``: constant colour,
alpha disk); the crop size is the bank's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
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
FORMS = ("u8+box+valid", "u8+box", "u8+valid", "u8", "bool+box+valid", "bool+box", "bool+valid", "bool")
SHARED_COCO = Path("../shared/data/coco_tiny_2017/annotations/instances_val2017.json")
SAMPLE_COCO = Path("data/sample/coco/annotations.json")


@dataclass
class Targets:
    """Target images and their instances, numpy: ``images`` uint8 ``[n, 3, S, S]``; per image,
    ``masks`` uint8 ``[N_i, S, S]`` and ``boxes`` float32 ``[N_i, 4]`` (tight); ``what``: a line."""

    images: np.ndarray
    masks: list[np.ndarray]
    boxes: list[np.ndarray]
    what: str


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


def synthetic_targets(n: int, existing: int, size: int) -> Targets:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    masks = list(existing_instances(n, existing, size, rng))
    boxes = [np.array([tight_box(m) for m in image_masks], np.float32).reshape(-1, 4) for image_masks in masks]
    return Targets(images, masks, boxes, f"{n} random images {size}x{size} uint8, {existing} ellipse instances each")


def coco_targets(ann: Path, n: int, size: int) -> Targets:
    """The first ``n`` images of ``ann`` with instances, resized to ``size``^2, with every instance."""
    import cv2

    from instbank.paste_demo import coco_images

    demo, _ = coco_images(ann, None, n)
    images, masks, boxes = [], [], []
    for im in demo:
        images.append(np.ascontiguousarray(cv2.resize(im.pixels, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)))
        resized = [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in im.masks]
        resized = [m for m in resized if m.any()]  # an instance too thin to survive the resize
        masks.append(np.stack(resized) if resized else np.zeros((0, size, size), np.uint8))
        boxes.append(np.array([tight_box(m) for m in resized], np.float32).reshape(-1, 4))
    counts = [len(m) for m in masks]
    what = (f"{len(images)} real images of {ann} resized to {size}x{size}, their real instances: "
            f"{min(counts)}..{max(counts)} per image, {np.mean(counts):.1f} on average")
    return Targets(np.stack(images), masks, boxes, what)


def interleaved_ms(runs: dict, repeats: int) -> dict:
    """Wall-clock and process CPU milliseconds of each ``runs[name]()``, ``repeats`` rounds after a
    warm-up, the functions taking turns within each round: ``{name: [(wall, cpu), ...]}``.

    Taking turns makes a ratio of two sides within a round insensitive to the load of a machine
    shared with other jobs drifting between rounds; CPU time (``time.process_time``) is what the
    work costs this process, wall time also counts waiting for a core. The order of the turns is
    shuffled in each round (seeded): the first function after a change of batch size pays for
    the memory the others left (e.g. the kernel compacting memory for the transparent huge pages
    of a 100 MB output: up to 2 ms per image of system time), which in a fixed order would always
    land on the same row.
    """
    for fn in runs.values():
        fn()
    times: dict = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = runs[name]
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(((time.perf_counter() - start_wall) * 1e3, (time.process_time() - start_cpu) * 1e3))
    return times


# --------------------------------------------------------------------------------------------
# (a) CPU


def padded_batches(targets: Targets, batch: int) -> list[tuple]:
    """Per batch of ``batch`` images: ``(images, masks, boxes, labels, valid)`` tensors, masks
    uint8, instances padded to the batch's most (empty masks, ``valid`` False)."""
    out = []
    for lo in range(0, len(targets.images), batch):
        masks, boxes = targets.masks[lo : lo + batch], targets.boxes[lo : lo + batch]
        n = max(len(m) for m in masks)
        size = targets.images.shape[-1]
        m = np.zeros((len(masks), n, size, size), np.uint8)
        b = np.zeros((len(masks), n, 4), np.float32)
        v = np.zeros((len(masks), n), bool)
        for i, (mi, bi) in enumerate(zip(masks, boxes)):
            m[i, : len(mi)], b[i, : len(bi)], v[i, : len(mi)] = mi, bi, True
        images = torch.from_numpy(np.ascontiguousarray(targets.images[lo : lo + batch]))
        out.append((images, torch.from_numpy(m), torch.from_numpy(b), torch.ones((len(masks), n), dtype=torch.int64),
                    torch.from_numpy(v)))
    return out


def in_form(batches: list[tuple], form: str) -> list[tuple]:
    """``padded_batches`` as ``form`` passes them: bool masks (a view of the 0/1 uint8 ones) or
    uint8, boxes and valid or None."""
    return [
        (images, masks.view(torch.bool) if form.startswith("bool") else masks, boxes if "+box" in form else None,
         labels, valid if "+valid" in form else None)
        for images, masks, boxes, labels, valid in batches
    ]


def instbank_cpu(batches, staged, blend, impl):
    """A function running ``BankCopyPaste`` once on every batch (``staged``: a ``BankBatch`` each)."""
    module = BankCopyPaste(
        CopyPasteConfig(scale_range=SCALE_RANGE, max_upscale=None, blend=blend, sigma_range=SIGMA_RANGE, impl=impl)
    )
    generator = torch.Generator().manual_seed(0)

    def run():
        for (images, masks, boxes, labels, valid), crops in zip(batches, staged):
            module.set_bank_batch(crops)
            module(images, masks, boxes, labels, valid, generator=generator)

    return run


def albumentations_cpu(targets: Targets, crops, blend, k):
    """A function pasting every image once through AlbumentationsX ``CopyAndPaste``."""
    import albumentations as A

    transform = A.Compose(
        [A.CopyAndPaste(p=1.0, scale_range=(0.5, 1.0), blend_mode=blend, blend_sigma_range=SIGMA_RANGE)],
        bbox_params=A.BboxParams(coord_format="pascal_voc", label_fields=["class_labels"]),
        instance_binding=["masks", "bboxes"],
        seed=0,
    )
    samples = []
    for i, image in enumerate(targets.images):
        donors = [
            {
                "image": np.ascontiguousarray(crops[i, j, :3].transpose(1, 2, 0)),
                "mask": (crops[i, j, 3] >= 128).astype(np.uint8),
                "bbox_labels": {"class_labels": 0},
            }
            for j in range(k)
        ]
        instances = [
            {"mask": m, "bbox": box.tolist(), "bbox_labels": {"class_labels": 1}}
            for m, box in zip(targets.masks[i], targets.boxes[i])
        ]
        samples.append((np.ascontiguousarray(image.transpose(1, 2, 0)), instances, donors))

    def run():
        for image, instances, donors in samples:
            transform(image=image, instances=instances, copy_paste_metadata=donors)

    return run


def cpu_table(args, bank, source: str, targets: Targets) -> None:
    import albumentations as A
    import cv2

    n, k = len(targets.images), args.k
    indices = (np.arange(n * k) % len(bank)).reshape(n, k)
    s = bank.crop_size[0]
    print(f"(a) CPU: {targets.what}; K={k} crops of {s}x{s} per image; {source}")
    print(f"    torch {torch.__version__} ({torch.get_num_threads()} thread), albumentationsx {A.__version__}, "
          f"opencv {cv2.__version__} ({args.threads} thread); ms per image, median of {args.repeats} rounds")
    print(f"    {'blend':9s} {'form':15s} {'impl':6s} {'B':>2s} {'instbank cpu':>12s} {'(wall)':>7s} "
          f"{'AlbX cpu':>9s} {'(wall)':>7s} {'ratio':>6s}")
    donors = np.asarray(bank.get_many(indices.reshape(-1))).reshape(n, k, 4, s, s)
    for blend in ("hard", "gaussian"):
        runs = {"albumentationsx": albumentations_cpu(targets, donors, blend, k)}
        for batch in args.cpu_batches:
            staged = [bank_batch(bank, indices[lo : lo + batch]) for lo in range(0, n, batch)]
            batches = padded_batches(targets, batch)
            for form in args.forms:
                for impl in args.impls:
                    runs[form, impl, batch] = instbank_cpu(in_form(batches, form), staged, blend, impl)
        times = interleaved_ms(runs, args.repeats)
        theirs = times.pop("albumentationsx")
        their_cpu, their_wall = (statistics.median(t[c] for t in theirs) / n for c in (1, 0))
        for (form, impl, batch), ours in times.items():
            cpu, wall = (statistics.median(t[c] for t in ours) / n for c in (1, 0))
            ratio = statistics.median(their[1] / our[1] for their, our in zip(theirs, ours))
            print(f"    {blend:9s} {form:15s} {impl:6s} {batch:2d} {cpu:12.2f} {wall:7.2f} {their_cpu:9.2f} "
                  f"{their_wall:7.2f} {ratio:5.1f}x")


def target_sets(args):
    """The target batches of each ``--data`` kind, with torch and OpenCV at ``--threads``."""
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    for data in args.data:
        if data == "synthetic":
            yield synthetic_targets(args.images, args.existing, args.size)
        else:
            ann = args.coco or (SHARED_COCO if SHARED_COCO.exists() else SAMPLE_COCO)
            yield coco_targets(ann, args.images, args.size)


def cpu_section(args, bank, source: str) -> None:
    for targets in target_sets(args):
        cpu_table(args, bank, source, targets)


# --------------------------------------------------------------------------------------------
# (c) targets beyond masks


def synthetic_points(masks: np.ndarray, j: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``[N, J, 3]``: ``J`` visible keypoints at random pixel centres of each mask ``[N, S, S]``
    (none for an empty mask): synthetic, no keypoint annotations are in the shared data."""
    points = np.zeros((len(masks), j, 3), np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            pick = rng.integers(0, len(xs), j)
            points[i] = np.stack([xs[pick] + 0.5, ys[pick] + 0.5, np.full(j, 2.0)], axis=1)
    return points


def with_keypoints(batch: BankBatch, j: int, rng: np.random.Generator) -> BankBatch:
    """``batch`` with ``j`` synthetic keypoints per crop on its alpha, and COCO person's flip."""
    from instbank.paste.keypoints import COCO_PERSON_KEYPOINTS
    from instbank.types import flip_from_names

    b, k = batch.class_ids.shape
    alpha = batch.pixels[:, :, 3].numpy().reshape(b * k, *batch.pixels.shape[-2:]) >= 128
    points = torch.from_numpy(synthetic_points(alpha, j, rng).reshape(b, k, j, 3))
    flip = flip_from_names(COCO_PERSON_KEYPOINTS) if j == len(COCO_PERSON_KEYPOINTS) else list(range(j))
    fields = {name: getattr(batch, name) for name in ("pixels", "class_ids", "indices", "src_box", "scale", "offset")}
    return BankBatch(**fields, num_classes=batch.num_classes, keypoints=points, keypoint_flip=torch.tensor(flip))


def panoptic_maps(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, S, S]``: instance ``i`` of each image is segment ``1000 + i + 1`` (class 1, as the
    benchmark's labels), the rest the stuff segment ``80000``."""
    maps = torch.full((masks.shape[0], *masks.shape[2:]), 80000, dtype=torch.int32)
    for b in range(masks.shape[0]):
        for i in range(masks.shape[1]):
            if valid[b, i]:
                maps[b][masks[b, i] != 0] = 1000 + i + 1
    return maps


def segments_of(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps' segments table ``(ids, area)`` int64 ``[B, M]`` (-1 padding), as a data set's
    ``segments_info`` gives it (made here once, outside the timed runs)."""
    found = [torch.unique(m, return_counts=True) for m in maps]
    m = max(len(ids) for ids, _ in found)
    ids, area = torch.full((len(found), m), -1, dtype=torch.int64), torch.zeros((len(found), m), dtype=torch.int64)
    for b, (i, a) in enumerate(found):
        ids[b, : len(i)], area[b, : len(a)] = i, a
    return ids, area


#: Rows of (c): (keypoints, panoptic map: None, "counted", "counted in place", "table" or "in place",
#: in_batch).
TARGET_ROWS = {
    "masks": (False, None, 0.0),
    "keypoints": (True, None, 0.0),
    "panoptic": (False, "counted", 0.0),
    "pan+ip,count": (False, "counted in place", 0.0),
    "pan+table": (False, "table", 0.0),
    "pan+inplace": (False, "in place", 0.0),
    "both": (True, "in place", 0.0),
    "in-batch": (False, None, 1.0),
    "mixed": (False, None, 0.5),
}


IN_PLACE = ("counted in place", "in place")


def targets_cpu(batches, staged, blend, extra: str, schema, calls: int):
    """A function running ``BankCopyPaste`` (numba) on every batch with the targets of row
    ``extra`` (``TARGET_ROWS``). A panoptic map is ``counted`` (no table given, a new map
    returned), counted and painted in place (``counted in place``), given with its ``table`` (a
    new map returned), or given with its table and painted ``in place``: in place, each of the
    ``calls`` calls paints a fresh copy of each batch's map, made beforehand (as a training loop
    gets a new batch at each step, not yet in the cache)."""
    points, maps, in_batch = TARGET_ROWS[extra]
    module = BankCopyPaste(CopyPasteConfig(scale_range=SCALE_RANGE, max_upscale=None, blend=blend,
                                           sigma_range=SIGMA_RANGE, impl="numba", panoptic=schema, in_batch=in_batch))
    generator = torch.Generator().manual_seed(0)
    fresh = [[batch[6].clone() for batch in batches] for _ in range(calls)] if maps in IN_PLACE else None
    used = []  # freeing the caller's maps is the caller's cost (its data pipeline's), not the paste's

    def run():
        own = fresh.pop() if fresh else None
        used.append(own)
        for i, ((images, masks, boxes, labels, valid, keypoints, panoptic, table), (plain, with_points)) in enumerate(
                zip(batches, staged)):
            module.set_bank_batch(with_points if points else plain)
            extra_args = {}
            if maps == "counted":
                extra_args = {"panoptic": panoptic}
            elif maps == "table":
                extra_args = {"panoptic": panoptic, "segments": table}
            elif maps == "counted in place":  # the map only: images as in the other rows
                extra_args = {"panoptic": own[i], "panoptic_out": own[i]}
            elif maps == "in place":
                extra_args = {"panoptic": own[i], "segments": table, "panoptic_out": own[i]}
            module(images, masks, boxes, labels, valid, generator=generator, keypoints=keypoints if points else None,
                   **extra_args)

    return run


def targets_table(args, bank, source: str, targets: Targets) -> None:
    from instbank.paste.panoptic import PanopticSchema

    n, k = len(targets.images), args.k
    indices = (np.arange(n * k) % len(bank)).reshape(n, k)
    rng = np.random.default_rng(0)
    schema = PanopticSchema(thing_classes=(1,))
    print(f"(c) targets beyond masks, CPU (numba): {targets.what}; K={k}; {source}")
    print(f"    ms per image, median of {args.repeats} rounds; overhead = median of (row / masks only - 1)")
    print(f"    {'blend':9s} {'B':>2s} {'targets':12s} {'cpu':>7s} {'(wall)':>7s} {'overhead':>9s}")
    extras = tuple(TARGET_ROWS)
    for blend in ("hard", "gaussian"):
        runs = {}
        for batch in args.cpu_batches:
            plain = [bank_batch(bank, indices[lo : lo + batch]) for lo in range(0, n, batch)]
            staged = [(p, with_keypoints(p, 17, rng)) for p in plain]
            batches = []
            for images, masks, boxes, labels, valid in padded_batches(targets, batch):
                points = torch.from_numpy(np.stack([synthetic_points(m, 17, rng) for m in masks.numpy()]))
                maps = panoptic_maps(masks, valid)
                batches.append((images, masks, boxes, labels, valid, points, maps, segments_of(maps)))
            for extra in extras:
                runs[extra, batch] = targets_cpu(batches, staged, blend, extra, schema, args.repeats + 1)
        times = interleaved_ms(runs, args.repeats)
        for (extra, batch), ours in times.items():
            cpu, wall = (statistics.median(t[c] for t in ours) / n for c in (1, 0))
            base = times["masks", batch]
            over = statistics.median(o[1] / m[1] - 1 for o, m in zip(ours, base))
            shown = "" if extra == "masks" else f"{100 * over:+8.1f}%"
            print(f"    {blend:9s} {batch:2d} {extra:12s} {cpu:7.2f} {wall:7.2f} {shown:>9s}")


def targets_section(args, bank, source: str) -> None:
    for targets in target_sets(args):
        targets_table(args, bank, source, targets)


def torchvision_section(args) -> None:
    """(d): instbank's in-batch objects against torchvision's reference ``SimpleCopyPaste``."""
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        print(f"(d) in-batch vs torchvision SimpleCopyPaste: skipped: torchvision is not importable ({exc})")
        return
    if args.tv_references is None or not (args.tv_references / "transforms.py").exists():
        print("(d) in-batch vs torchvision SimpleCopyPaste: skipped: torchvision's SimpleCopyPaste is in its "
              "repository's references/detection/transforms.py, not in the wheel; pass --tv-references DIR")
        return
    import importlib.util
    import sys

    sys.path.insert(0, str(args.tv_references))  # its transforms.py imports its siblings
    spec = importlib.util.spec_from_file_location("tv_reference_transforms", args.tv_references / "transforms.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":  # both sides at --threads, as the CPU sections run
        torch.set_num_threads(args.threads)
    targets = synthetic_targets(args.gpu_batch, args.existing, args.size)
    (images, masks, boxes, labels, _), = padded_batches(targets, args.gpu_batch)
    images, masks, boxes, labels = images.to(dev), masks.to(dev).bool(), boxes.to(dev), labels.to(dev)
    ours = BankCopyPaste(CopyPasteConfig(in_batch=1.0, in_batch_k=masks.shape[1], in_batch_crop_size=args.crop,
                                         scale_range=(0.8, 1.25), scale_mode="native", blend="gaussian",
                                         sigma_range=(2.0, 2.0)))
    theirs = reference.SimpleCopyPaste(blending=True)
    generator = torch.Generator(device=dev).manual_seed(0)
    float_images = [im.float() / 255 for im in images]  # the reference blends float images
    tv_targets = [{"masks": m, "boxes": b, "labels": l} for m, b, l in zip(masks, boxes, labels)]

    def run_ours():
        ours(images, masks, boxes, labels, generator=generator)

    def run_theirs():
        theirs(list(float_images), [dict(t) for t in tv_targets])

    timer = (lambda fn: cuda_ms(fn, args.repeats)) if dev.type == "cuda" else (
        lambda fn: statistics.median(t[0] for t in interleaved_ms({"x": fn}, args.repeats)["x"]))
    ms_ours, ms_theirs = timer(run_ours), timer(run_theirs)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"(d) in-batch vs torchvision SimpleCopyPaste on {name}: B={args.gpu_batch}, {args.size}^2, "
          f"{masks.shape[1]} instances per image")
    per_image = args.gpu_batch
    print(f"    instbank in_batch=1: {ms_ours / per_image:.3f} ms/img; torchvision: {ms_theirs / per_image:.3f} ms/img; "
          f"ratio {ms_theirs / ms_ours:.1f}x")


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
    gpu_targets(args, images, tri_vis, plan, lambda fn: cuda_ms(fn, args.repeats))


def gpu_targets(args, images, visible, plan, timer) -> None:
    """(b, targets): the Triton kernels of the targets beyond masks against their torch references
    on the same device and inputs (the last size of (b)): painting a panoptic map, keypoints, the
    in-batch resample; agreement beside the times."""
    from instbank.paste import inbatch, keypoints, triton_targets
    from instbank.paste.annotations import paint_semantic
    from instbank.types import flip_from_names

    b, k, h, w = visible.shape
    dev = images.device
    g = torch.Generator(device=dev).manual_seed(1)
    maps = torch.randint(0, 80_000, (b, h, w), generator=g, device=dev, dtype=torch.int32)
    ids = torch.randint(0, 80_000, (b, k), generator=g, device=dev)
    existing = torch.rand((b, 4, 17, 3), generator=g, device=dev) * torch.tensor([w, h, 2.99], device=dev)
    existing[..., 2] = existing[..., 2].floor()
    span = torch.tensor([plan.crop_size, plan.crop_size, 2.99], device=dev)
    crop_kp = torch.rand((b, k, 17, 3), generator=g, device=dev) * span
    crop_kp[..., 2] = crop_kp[..., 2].floor()
    flip = torch.tensor(flip_from_names(keypoints.COCO_PERSON_KEYPOINTS), device=dev)
    masks = visible[:, :4]  # four "instances" per image for the in-batch resample
    valid = masks.flatten(2).any(-1)
    draw = inbatch.draw_sources(valid, k, g)
    geometry = inbatch.object_geometry(tight_boxes_of(masks), draw, plan.crop_size)
    cases = {
        "paint panoptic map": (
            lambda: paint_semantic(maps, visible, ids), lambda: triton_targets.paint_map(maps, visible, ids)),
        "keypoints (17 x (4+K))": (
            lambda: keypoints.keypoints_after_paste(existing, crop_kp, flip, plan, visible),
            lambda: triton_targets.keypoints_after_paste(existing, crop_kp, flip, plan, visible)),
        f"in-batch resample S={plan.crop_size} n=2": (
            lambda: inbatch.resample_objects(images, masks, draw, geometry, plan.crop_size, 2),
            lambda: triton_targets.resample_objects(images, masks, draw, geometry, plan.crop_size, 2)),
    }
    print(f"    targets at {h}x{w}, B={b}, K={k}: {'':26s} {'torch ms':>9s} {'triton ms':>10s} {'ratio':>7s}  "
          "agreement")
    for name, (ref, ours) in cases.items():
        ref_ms, our_ms = timer(ref), timer(ours)
        a, c = ref(), ours()
        a, c = (v if isinstance(v, tuple) else (v,) for v in (a, c))
        same = all(torch.equal(x, y) for x, y in zip(a, c))
        print(f"    {name:54s} {ref_ms:9.2f} {our_ms:10.3f} {ref_ms / our_ms:6.1f}x  {'equal' if same else 'DIFFER'}")


def tight_boxes_of(masks):
    from instbank.paste.plan import tight_boxes

    return tight_boxes(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["synthetic", "coco"], choices=["synthetic", "coco"])
    parser.add_argument("--coco", type=Path, default=None, help="COCO json of the real target images")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="synthetic crop size (a bank sets its own)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--impls", nargs="+", default=["numba"], choices=["numba", "torch"])
    parser.add_argument("--existing", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bank", type=Path, default=Path("out/demo-bank"))
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--peak-bw", type=float, default=None, help="device peak memory bandwidth, GB/s")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--targets", action="store_true", help="(c) keypoints/panoptic/in-batch rows and (d)")
    parser.add_argument("--targets-only", action="store_true", help="(c) and (d) only")
    parser.add_argument("--tv-references", type=Path, default=None,
                        help="torchvision's references/detection folder (for its SimpleCopyPaste)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        bank, source = open_crops(args.bank, args.crop, Path(scratch))
        if not (args.skip_cpu or args.targets_only):
            cpu_section(args, bank, source)
        if (args.targets or args.targets_only) and not args.skip_cpu:
            targets_section(args, bank, source)
        if args.targets or args.targets_only:
            torchvision_section(args)
        if not args.targets_only:
            gpu_section(args, bank, source)


if __name__ == "__main__":
    main()
