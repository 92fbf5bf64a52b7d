"""Train an instance-segmentation model with bank copy-paste on real COCO data.

    python examples/train.py [--coco data/sample/coco/annotations.json] [--images DIR]
        [--bank out/example-bank] [--crop-size 64] [--size 256] [--batch-size 4] [--k 4]
        [--steps 20] [--workers 2] [--bank-workers 1] [--start-method fork|spawn|forkserver]
        [--device cpu|cuda] [--model tiny|maskrcnn] [--timing] [--dump DIR]

Per step:

1. data: a ``torch.utils.data.DataLoader`` (``--workers`` processes) yields ``--batch-size`` COCO
   images, each resized by large-scale jitter (Ghiasi et al. 2021: the longer side becomes
   ``r * --size``, ``r`` log-uniform in ``--jitter``) and randomly cropped / padded (bottom, right)
   to ``--size``\\ ² with a padding mask, with its instance masks, tight boxes, labels and a semantic
   map (class id per pixel, ``C`` = background, ``IGNORE`` = padding). Beside it
   ``instbank.sampling.bank_loader`` (``--bank-workers`` processes) stages ``--k`` class-balanced
   bank crops per image.
2. staging: both batches go to ``--device`` (asynchronously from pinned memory on CUDA).
3. paste: ``BankCopyPaste`` on the device pastes all K crops into each image, outside the padding,
   and returns the images, masks (existing instances cut by the pastes, then the pastes), tight
   boxes, labels, validity and the semantic map painted by the pastes.
4. forward+backward: ``--model tiny``, a pure-torch network (three strided convolutions, a
   semantic head, and per-instance class and mask heads on features sampled inside each box), or
   ``--model maskrcnn``: torchvision's ``maskrcnn_resnet50_fpn`` (random init; needs torchvision).

Printed per step (every ``--log-every`` steps): the loss, and the time spent waiting for data,
staging, pasting and in forward+backward, with the paste's share of the step (staging + paste +
forward+backward; the wait for data is not part of it); at the end, the medians. On CPU every
operation has finished when it returns, so the times are exact. On CUDA the work is queued, so
the per-stage times are only printed with ``--timing``, which calls ``torch.cuda.synchronize()``
before each clock reading (this idles the GPU between stages, so a run with ``--timing`` is
slightly slower than one without); without it the only waits are the loss readings.

The bank is opened from ``--bank`` or, when that directory holds no bank yet, built there from
``--coco`` with ``--crop-size`` crops. Its classes must be the data set's. ``--dump DIR`` saves
what the model saw at each step (``DIR/step0000.pt`` ...: the paste's outputs, the padding mask
and the staged crops' class ids) so that it can be checked afterwards.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COCO = REPO / "data" / "sample" / "coco" / "annotations.json"
#: Semantic-map value of padding pixels: ``F.cross_entropy``'s default ``ignore_index``.
IGNORE = -100
#: Side of the per-instance RoI grid of the tiny model (Mask R-CNN's mask head uses 14 then 28).
ROI = 14


class UsageError(Exception):
    """Bad arguments or environment: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# data: COCO images with large-scale jitter


def jitter_transform(height: int, width: int, size: int, r: float, u: tuple[float, float]):
    """Large-scale jitter of a ``height x width`` image to ``size x size``: the image is scaled by
    ``s = r * size / max(height, width)``, then cut at ``(cx, cy)`` (``u`` in [0, 1)^2 picks it
    among the possible cuts) and padded at the bottom and right.

    Returns the 2x3 affine matrix for ``cv2.warpAffine`` (index coordinates: pixel centres at
    integers, so ``x_dst = s * x_src + s / 2 - 1/2 - cx``; in the project's continuous coordinates,
    centres at +0.5, that is exactly ``X_dst = s * X_src - cx``) and the valid region's
    ``(width, height)`` in the output.
    """
    s = r * size / max(height, width)
    scaled_w, scaled_h = max(1, round(width * s)), max(1, round(height * s))
    cx = int(u[0] * (max(0, scaled_w - size) + 1))
    cy = int(u[1] * (max(0, scaled_h - size) + 1))
    matrix = np.array([[s, 0.0, s / 2 - 0.5 - cx], [0.0, s, s / 2 - 0.5 - cy]], np.float64)
    return matrix, (min(size, scaled_w - cx), min(size, scaled_h - cy))


def warp_instance(mask: np.ndarray, x0: int, y0: int, matrix: np.ndarray, valid_wh) -> tuple[np.ndarray, int, int] | None:
    """Warp one instance's 0/255 mask, cut to its box at ``(x0, y0)`` in the source, into the output
    frame, only over the rectangle it lands on: ``(bool mask, rx, ry)`` or ``None`` when nothing of it
    is left inside the valid region."""
    s = matrix[0, 0]
    h, w = mask.shape
    # The box covers [x0, x0 + w) in continuous source coordinates, so [s * x0 - cx, ...) in the
    # output, with cx = s / 2 - 1/2 - matrix[0, 2]; then the pixels it touches, clipped.
    lo_x = x0 * s + matrix[0, 2] - s / 2 + 0.5
    lo_y = y0 * s + matrix[1, 2] - s / 2 + 0.5
    hi_x, hi_y = lo_x + w * s, lo_y + h * s
    rx0, ry0 = max(0, math.floor(lo_x)), max(0, math.floor(lo_y))
    rx1, ry1 = min(valid_wh[0], math.ceil(hi_x)), min(valid_wh[1], math.ceil(hi_y))
    if rx1 <= rx0 or ry1 <= ry0:
        return None
    local = matrix.copy()
    local[0, 2] += s * x0 - rx0
    local[1, 2] += s * y0 - ry0
    warped = cv2.warpAffine(mask, local, (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR, borderValue=0)
    out = warped >= 128
    return (out, rx0, ry0) if out.any() else None


class CocoTrainSet(torch.utils.data.Dataset):
    """COCO images with large-scale jitter: ``dataset[i]`` is a dict of numpy arrays, ``image``
    uint8 ``[3, size, size]`` (RGB, zero in the padding), ``masks`` bool ``[n, size, size]``,
    ``labels`` int64 ``[n]`` (contiguous ids), ``padding`` bool ``[size, size]``.

    Random numbers come from torch's generator, which the DataLoader seeds per worker from its own
    generator, so a run is reproducible for a given seed and worker count. An image that cannot be
    decoded is reported on stderr and comes back as all padding, without instances.
    """

    def __init__(self, dataset, size: int, jitter: tuple[float, float]):
        self.records = dataset.images
        self.size = size
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from instbank.crops import ImageSkip, decode_image, image_masks

        record, size = self.records[index], self.size
        try:
            bgr, _ = decode_image(record.path)
        except ImageSkip as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            return empty_sample(size)
        height, width = bgr.shape[:2]
        lo, hi = math.log(self.jitter[0]), math.log(self.jitter[1])
        rand = torch.rand(3).tolist()
        matrix, valid_wh = jitter_transform(height, width, size, math.exp(lo + rand[0] * (hi - lo)), rand[1:])
        rgb = cv2.warpAffine(bgr[..., ::-1], matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        padding = np.ones((size, size), bool)
        padding[: valid_wh[1], : valid_wh[0]] = False
        rgb[padding] = 0
        masks, labels = [], []
        for inst, found in zip(record.instances, image_masks(record.instances, height, width, 255)):
            if isinstance(found, str):
                continue  # empty or malformed mask: the bank build skips (and counts) it too
            warped = warp_instance(found[0], found[1], found[2], matrix, valid_wh)
            if warped is None:
                continue
            full = np.zeros((size, size), bool)
            part, rx, ry = warped
            full[ry : ry + part.shape[0], rx : rx + part.shape[1]] = part
            masks.append(full)
            labels.append(inst.class_id)
        return {
            "image": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
            "masks": np.stack(masks) if masks else np.zeros((0, size, size), bool),
            "labels": np.asarray(labels, np.int64),
            "padding": padding,
        }


def empty_sample(size: int) -> dict:
    return {
        "image": np.zeros((3, size, size), np.uint8),
        "masks": np.zeros((0, size, size), bool),
        "labels": np.zeros(0, np.int64),
        "padding": np.ones((size, size), bool),
    }


def tight_boxes_np(masks: np.ndarray) -> np.ndarray:
    """float32 ``[n, 4]`` tight ``x0, y0, x1, y1`` of bool ``[n, H, W]`` masks (zeros when empty)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
        if cols.size:
            boxes[i] = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    return boxes


class Collate:
    """Batch samples, padding the instances to the batch's largest count ``N`` (padded slots:
    empty mask, label 0, ``valid`` False). Returns ``images`` uint8 ``[B, 3, H, W]``, ``masks`` bool
    ``[B, N, H, W]``, ``boxes`` float32 ``[B, N, 4]`` (tight), ``labels`` int64 ``[B, N]``,
    ``valid`` bool ``[B, N]``, ``semantic`` int64 ``[B, H, W]`` (the class id of the last instance
    covering a pixel, ``num_classes`` for background, ``IGNORE`` in padding), ``padding_mask`` bool
    ``[B, H, W]``."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, samples: list[dict]) -> dict:
        b = len(samples)
        h, w = samples[0]["padding"].shape
        n = max(len(s["labels"]) for s in samples)
        masks = np.zeros((b, n, h, w), bool)
        boxes = np.zeros((b, n, 4), np.float32)
        labels = np.zeros((b, n), np.int64)
        valid = np.zeros((b, n), bool)
        semantic = np.full((b, h, w), self.num_classes, np.int64)
        for i, s in enumerate(samples):
            m = len(s["labels"])
            masks[i, :m], labels[i, :m], valid[i, :m] = s["masks"], s["labels"], True
            boxes[i, :m] = tight_boxes_np(s["masks"])
            for mask, label in zip(s["masks"], s["labels"]):
                semantic[i][mask] = label
            semantic[i][s["padding"]] = IGNORE
        return {
            "images": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "masks": torch.from_numpy(masks),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "valid": torch.from_numpy(valid),
            "semantic": torch.from_numpy(semantic),
            "padding_mask": torch.from_numpy(np.stack([s["padding"] for s in samples])),
        }


def worker_init(_worker_id: int, fresh_interpreter: bool) -> None:
    # One OpenCV thread per worker: the workers are the parallelism. A forked worker inherits the
    # main process's setting (``loaders`` sets it before forking): calling ``cv2.setNumThreads``
    # in a forked child whose parent had started OpenCV's pool deadlocks (see
    # instbank.engines.shard.opencv_single_threaded), so only spawn/forkserver workers set it.
    if fresh_interpreter:
        cv2.setNumThreads(1)


def endless(loader):
    """Batches of ``loader``, epoch after epoch (``persistent_workers`` keeps the workers)."""
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------
# models


def roi_grid(boxes: torch.Tensor, image_size: tuple[int, int], r: int) -> torch.Tensor:
    """``grid_sample`` grid ``[B, N, r, r, 2]`` of the ``r x r`` bin centres of each box ``[B, N, 4]``
    (image pixels, x0 y0 x1 y1) in normalised coordinates (``align_corners=False``: -1 and 1 are
    the image's outer edges, so any feature map covering the image takes the same grid)."""
    h, w = image_size
    t = (torch.arange(r, device=boxes.device, dtype=torch.float32) + 0.5) / r
    x = boxes[..., 0, None] + t * (boxes[..., 2, None] - boxes[..., 0, None])  # [B, N, r]
    y = boxes[..., 1, None] + t * (boxes[..., 3, None] - boxes[..., 1, None])
    gx = (2 * x / w - 1)[..., None, :].expand(*x.shape[:-1], r, r)
    gy = (2 * y / h - 1)[..., :, None].expand(*y.shape[:-1], r, r)
    return torch.stack([gx, gy], dim=-1)


def roi_features(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear RoI features ``[B, N, F, r, r]`` from ``features`` ``[B, F, h, w]`` at ``grid``
    ``[B, N, r, r, 2]`` (one ``grid_sample`` per batch: the N grids are stacked along rows)."""
    b, n, r = grid.shape[:3]
    out = F.grid_sample(features, grid.reshape(b, n * r, r, 2), align_corners=False)
    return out.view(b, -1, n, r, r).transpose(1, 2)


class TinyInstanceNet(nn.Module):
    """Three stride-2 convolutions (1/8 resolution), a semantic head (``C + 1`` classes, ``C`` =
    background) and, per instance, class logits and a class-specific ``ROI x ROI`` mask from the
    features sampled inside its box (Mask R-CNN's box-conditioned heads in miniature, without
    proposals: the instances' boxes are given)."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.semantic = nn.Conv2d(width, num_classes + 1, 1)
        self.mask_head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))
        self.class_head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor):
        """``images`` float ``[B, 3, H, W]``, ``boxes`` ``[B, N, 4]`` -> semantic logits ``[B, C+1,
        H, W]``, class logits ``[B, N, C]``, mask logits ``[B, N, C, ROI, ROI]``."""
        b, _, h, w = images.shape
        features = self.backbone(images)
        semantic = F.interpolate(self.semantic(features), size=(h, w), mode="bilinear", align_corners=False)
        rois = roi_features(features, roi_grid(boxes, (h, w), ROI))  # [B, N, F, r, r]
        n = rois.shape[1]
        flat = rois.flatten(0, 1)
        classes = self.class_head(flat.mean(dim=(-1, -2))).view(b, n, -1)
        masks = self.mask_head(flat).view(b, n, -1, ROI, ROI)
        return semantic, classes, masks


def tiny_loss(model: TinyInstanceNet, batch: dict) -> torch.Tensor:
    """Semantic cross-entropy (padding ignored) + per-instance class cross-entropy + mask BCE on
    the instance's ``ROI x ROI`` box grid, the per-instance terms averaged over valid instances
    (weights, not indexing: no host synchronisation)."""
    images, boxes, labels, masks = batch["images"], batch["boxes"], batch["labels"], batch["masks"]
    x = images.float() / 255 - 0.5 if images.dtype == torch.uint8 else images.float() - 0.5
    semantic, classes, mask_logits = model(x, boxes)
    loss = F.cross_entropy(semantic, batch["semantic"], ignore_index=IGNORE)
    b, n = labels.shape
    if n == 0:
        return loss
    weight = batch["valid"].float()
    count = weight.sum().clamp(min=1)
    class_loss = F.cross_entropy(classes.flatten(0, 1), labels.flatten(), reduction="none").view(b, n)
    picked = mask_logits.gather(2, labels[:, :, None, None, None].expand(b, n, 1, ROI, ROI)).squeeze(2)
    grid = roi_grid(boxes, masks.shape[-2:], ROI).flatten(0, 1)  # [B*N, r, r, 2]
    target = F.grid_sample(masks.flatten(0, 1)[:, None].float(), grid, align_corners=False)[:, 0].view(b, n, ROI, ROI)
    mask_loss = F.binary_cross_entropy_with_logits(picked, target, reduction="none").mean(dim=(-1, -2))
    return loss + ((class_loss + mask_loss) * weight).sum() / count


def maskrcnn_loss(model, batch: dict) -> torch.Tensor:
    """torchvision Mask R-CNN training losses, summed, on the valid instances (labels + 1: 0 is
    torchvision's background)."""
    images = batch["images"]
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    targets = []
    for b in range(x.shape[0]):
        keep = batch["valid"][b]
        targets.append({
            "boxes": batch["boxes"][b][keep],
            "labels": batch["labels"][b][keep] + 1,
            "masks": batch["masks"][b][keep].to(torch.uint8),
        })  # fmt: skip
    losses = model(list(x), targets)
    return sum(losses.values())


def import_torchvision():
    """torchvision, or ``UsageError`` saying why it does not import."""
    try:
        import torchvision  # noqa: F401
        from torchvision.models.detection import maskrcnn_resnet50_fpn
    except Exception as e:  # noqa: BLE001 - ImportError, or a compiled-ops mismatch (RuntimeError)
        raise UsageError(f"--model maskrcnn needs torchvision, which does not import here ({type(e).__name__}: {e})") from None
    return maskrcnn_resnet50_fpn


def build_model(name: str, num_classes: int, size: int):
    """``(model, loss_fn)`` for ``--model``: ``loss_fn(model, batch) -> scalar``."""
    if name == "tiny":
        return TinyInstanceNet(num_classes), tiny_loss
    maskrcnn_resnet50_fpn = import_torchvision()
    # Random init (no download); the images are already --size square: no internal resize.
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=size, max_size=size)
    return model, maskrcnn_loss


MODELS = ("tiny", "maskrcnn")


# --------------------------------------------------------------------------------------------
# setup


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def read_dataset(args):
    from instbank.formats.coco import read_coco

    if not args.coco.is_file():
        raise UsageError(f"--coco {args.coco}: no such file")
    dataset = read_coco(args.coco, args.images)
    if len(dataset.images) < args.batch_size:
        raise UsageError(f"{args.coco}: {len(dataset.images)} images, fewer than --batch-size {args.batch_size}")
    return dataset


def open_or_build_bank(args, dataset):
    """The bank at ``--bank``, built there from ``--coco`` first when it holds none; checked
    against the data set's classes and the image size."""
    from instbank import open_bank

    if not (args.bank / "manifest.json").exists():
        from instbank.build import BuildConfig, build_bank

        print(f"building a bank of {args.crop_size}x{args.crop_size} crops from {args.coco} in {args.bank}", flush=True)
        build_bank(dataset, args.bank, BuildConfig(size=args.crop_size), workers=1)
    bank = open_bank(args.bank)
    s = bank.crop_size[0]
    if s > args.size:
        raise UsageError(
            f"bank {args.bank} has {s}x{s} crops, larger than the {args.size}x{args.size} training images "
            f"(--size): build it with a crop size <= {args.size} or train at --size >= {s}"
        )
    names = [c.name for c in dataset.classes]
    if list(bank.class_names) != names:
        raise UsageError(
            f"bank {args.bank} has {len(bank.class_names)} classes ({', '.join(list(bank.class_names)[:5])}, ...) "
            f"that are not those of {args.coco} ({len(names)}: {', '.join(names[:5])}, ...): build the bank from the same data set"
        )
    return bank


def loaders(args, dataset, bank, device: torch.device):
    """The image DataLoader (endless) and the bank's crop loader, both with workers."""
    from instbank.sampling import bank_loader

    pin = device.type == "cuda"
    context = args.start_method if args.workers > 0 else None
    method = args.start_method or multiprocessing.get_start_method()
    cv2.setNumThreads(1)  # before the workers fork: see worker_init
    train = torch.utils.data.DataLoader(
        CocoTrainSet(dataset, args.size, tuple(args.jitter)),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # BankCopyPaste needs one row of K crops per image: fixed B
        num_workers=args.workers,
        collate_fn=Collate(len(dataset.classes)),
        pin_memory=pin,
        worker_init_fn=functools.partial(worker_init, fresh_interpreter=method != "fork"),
        multiprocessing_context=context,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    crops = bank_loader(
        bank,
        batch_size=args.batch_size,
        k=args.k,
        num_workers=args.bank_workers,
        multiprocessing_context=args.start_method,
        pin_memory=pin,
        weighting=args.weighting,
        seed=args.seed,
    )
    return endless(train), iter(crops)


# --------------------------------------------------------------------------------------------
# the loop


class Clock:
    """Wall-clock readings; on CUDA with ``sync`` each reading first waits for the queued work."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"

    def __call__(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()


def train(args) -> list[dict]:
    """Run ``--steps`` steps; returns per step its times (ms; when timed) and loss (when logged)."""
    from instbank.paste import BankCopyPaste, CopyPasteConfig

    device = resolve_device(args.device)
    if args.model == "maskrcnn":
        import_torchvision()  # fail before reading anything
    dataset = read_dataset(args)
    bank = open_or_build_bank(args, dataset)
    torch.manual_seed(args.seed)
    model, loss_fn = build_model(args.model, len(dataset.classes), args.size)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    copy_paste = BankCopyPaste(CopyPasteConfig(scale_range=tuple(args.scale_range), min_visible=0.1)).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    timed = device.type == "cpu" or args.timing
    clock = Clock(device, args.timing)
    print(
        f"{len(dataset.images)} images of {args.coco} ({args.size}x{args.size}, jitter {args.jitter[0]:g}..{args.jitter[1]:g}), "
        f"bank {args.bank} ({len(bank)} crops of {bank.crop_size[0]}x{bank.crop_size[0]}, {args.weighting}), "
        f"B={args.batch_size} K={args.k}, model {args.model} on {device}, "
        f"workers {args.workers}+{args.bank_workers} ({args.start_method or 'default'} start)",
        flush=True,
    )
    if device.type == "cuda":
        print("timing: " + ("torch.cuda.synchronize() before each clock reading (--timing)" if args.timing
                            else "off on CUDA without --timing (queued work would be timed as free)"), flush=True)
    batches, crops_iter = loaders(args, dataset, bank, device)
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(args.steps):
        t0 = clock()
        batch, crops = next(batches), next(crops_iter)
        t1 = clock()
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        copy_paste.set_bank_batch(crops.to(device))
        t2 = clock()
        out = copy_paste(
            batch["images"], masks=batch["masks"], boxes=batch["boxes"], labels=batch["labels"],
            valid=batch["valid"], semantic=batch["semantic"], padding_mask=batch["padding_mask"], generator=generator,
        )  # fmt: skip
        t3 = clock()
        loss = loss_fn(model, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t4 = clock()
        if args.dump is not None:
            dump(args.dump / f"step{step:04d}.pt", out, batch, crops)
        record = {"wait": t1 - t0, "staging": t2 - t1, "paste": t3 - t2, "fwd_bwd": t4 - t3} if timed else {}
        record = {name: seconds * 1e3 for name, seconds in record.items()}
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            record["loss"] = float(loss.detach())  # on CUDA, reading the loss waits for the step
            print(step_line(step, args.steps, record), flush=True)
        records.append(record)
    if timed and len(records) > 1:
        print(summary_line(records[1:]), flush=True)
    return records


def share(record: dict) -> float:
    """The paste's share of the step: paste / (staging + paste + forward+backward)."""
    return record["paste"] / (record["staging"] + record["paste"] + record["fwd_bwd"])


def step_line(step: int, steps: int, record: dict) -> str:
    line = f"step {step + 1:4d}/{steps}  loss {record['loss']:.4f}"
    if "paste" in record:
        line += (
            f"  wait {record['wait']:7.1f} ms  staging {record['staging']:6.1f} ms  paste {record['paste']:6.1f} ms"
            f"  fwd+bwd {record['fwd_bwd']:7.1f} ms  paste share {100 * share(record):5.1f}%"
        )
    return line


def summary_line(records: list[dict]) -> str:
    med = {k: statistics.median(r[k] for r in records) for k in ("wait", "staging", "paste", "fwd_bwd")}
    shares = statistics.median(share(r) for r in records)
    return (
        f"median of steps 2..{len(records) + 1}: wait {med['wait']:.1f} ms, staging {med['staging']:.1f} ms, "
        f"paste {med['paste']:.1f} ms, fwd+bwd {med['fwd_bwd']:.1f} ms; paste share of the step {100 * shares:.1f}% "
        "(staging + paste + fwd+bwd; data wait excluded)"
    )


def dump(path: Path, out: dict, batch: dict, crops) -> None:
    """What the model saw this step, on the CPU: the paste's outputs, the padding mask, and the
    staged crops' class ids."""
    saved = {name: value.detach().cpu() for name, value in out.items() if isinstance(value, torch.Tensor)}
    saved["padding_mask"] = batch["padding_mask"].cpu()
    saved["staged_class_ids"] = crops.class_ids.cpu()
    saved["existing"] = int(batch["labels"].shape[1])
    torch.save(saved, path)


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coco", type=Path, default=DEFAULT_COCO, help="COCO instances json")
    p.add_argument("--images", type=Path, default=None, help="images directory (default: guessed from --coco)")
    p.add_argument("--bank", type=Path, default=REPO / "out" / "example-bank", help="bank directory (built from --coco when empty)")
    p.add_argument("--crop-size", type=int, default=64, help="crop size S when the bank is built here")
    p.add_argument("--size", type=int, default=256, help="training image side after jitter and padding")
    p.add_argument("--jitter", type=float, nargs=2, default=(0.1, 2.0), metavar=("LO", "HI"), help="large-scale jitter range")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="bank crops pasted into each image")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.1, 0.5), metavar=("LO", "HI"))
    p.add_argument("--weighting", default="class_balanced")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="image DataLoader workers")
    p.add_argument("--bank-workers", type=int, default=1, help="bank_loader workers")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing", action="store_true", help="on CUDA, synchronize around each timed stage")
    p.add_argument("--log-every", type=int, default=1, help="print (and, on CUDA, wait for) the loss every N steps")
    p.add_argument("--dump", type=Path, default=None, help="save what the model saw at each step here")
    args = p.parse_args(argv)
    args.coco, args.bank = relative_to_cwd(args.coco), relative_to_cwd(args.bank)
    for name in ("size", "batch_size", "k", "steps", "crop_size", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.jitter[0] <= args.jitter[1]:
        p.error(f"--jitter must satisfy 0 < LO <= HI, got {args.jitter}")
    return args


def relative_to_cwd(path: Path) -> Path:
    """``path`` relative to the working directory when inside it (the defaults are absolute)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def main(argv=None) -> int:
    from instbank.errors import InstbankError

    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, InstbankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
