"""Keras loader throughput with bank copy-paste against the same loader without it (CPU).

    .venv/bin/python benchmarks/keras_loader.py [--size 512] [--batch 8] [--k 8] [--crop 128]
        [--bank out/demo-bank] [--blend gaussian] [--rounds 7] [--batches 4] [--threads 1]
        [--malloc pinned|glibc]

The loader is the one of the AlbumentationsX guide for Keras, on the shipped COCO sample (8
images, about 640x480 JPEGs): a sequence whose batch ``i`` reads ``--batch`` images and their
label PNGs from disk with OpenCV, resizes them to ``--size``^2 (area for images, nearest for
labels) and flips them at random. The label PNGs (written once, before timing, to a temporary
directory) are a semantic map (uint8) and an instance-id map (uint16, 0 = none; the
Cityscapes ``instanceIds`` layout), from which the instance loader makes bool masks
``[B, N, H, W]`` padded to the batch's largest ``N`` (``valid`` False), with their labels.

Three loaders, each measured plain and wrapped in ``BankPasteDataset(..., k=--k)`` (crops drawn
class balanced from ``--bank``, pasted with ``CopyPasteConfig(blend=--blend)``, otherwise its
defaults, ``impl="auto"``: the numba kernel):

- ``semantic``: images + semantic map (``output="semantic"``: what ``model.fit`` gets)
- ``semantic + AlbumentationsX``: the same with the guide's kind of augmentation instead of
  resize + flip: ``SmallestMaxSize(size)``, ``RandomCrop(size, size)``, ``HorizontalFlip``,
  ``Affine(scale=(0.8, 1.2), rotate=(-15, 15), p=0.5)``, ``RandomBrightnessContrast(p=0.5)``
  (skipped when albumentationsx is not installed)
- ``instances``: images + instance masks, labels, valid (the whole dict)

Both sides run in this process, one batch after another (Keras ``workers=1``: the main thread),
``--rounds`` rounds of ``--batches`` batches per side, the sides taking turns (first side
alternating), after a warm-up. Figures: median over rounds of ms per batch, wall clock and process
CPU time; overhead = median of the rounds' pasted / plain - 1. ``--threads`` sets torch's and
OpenCV's thread count on both sides (1: what a loader worker process runs with; torch's DataLoader
and ``BankPasteDataset``'s worker processes set it).
``--malloc pinned`` (the default) fixes glibc's allocator thresholds for the whole process
first (``fix_malloc``): both sides share one process, and with glibc's dynamic threshold the
largest array either side frees decides whether the other's batch arrays come back as fresh,
faulted-in pages (a paste without its 17 MB mask planes made the plain loader 20% slower that
way). ``--malloc glibc`` keeps the dynamic thresholds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

import instbank  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "coco" / "annotations.json"


def write_labels(coco: COCO, out: Path) -> dict[int, np.ndarray]:
    """``<id>-semantic.png`` (uint8: 0 background, 1 + contiguous class) and ``<id>-instances.png``
    (uint16 instance ids from 1) per image; returns each image's instance labels (contiguous
    class ids, int64 ``[N]``)."""
    label_of = {cat: i for i, cat in enumerate(sorted(coco.getCatIds()))}
    labels = {}
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        semantic = np.zeros((info["height"], info["width"]), np.uint8)
        ids = np.zeros(semantic.shape, np.uint16)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        for n, ann in enumerate(anns, start=1):
            mask = coco.annToMask(ann) > 0
            semantic[mask] = 1 + label_of[ann["category_id"]]
            ids[mask] = n
        cv2.imwrite(str(out / f"{image_id}-semantic.png"), semantic)
        cv2.imwrite(str(out / f"{image_id}-instances.png"), ids)
        labels[image_id] = np.array([label_of[a["category_id"]] for a in anns], np.int64)
    return labels


class GuideLoader:
    """Batch ``i``: ``batch`` images read, resized and flipped, with their labels (module docstring)."""

    def __init__(self, coco: COCO, labels_dir: Path, labels: dict, batch: int, size: int, instances: bool, steps: int,
                 augment=None):
        self.images_dir = SAMPLE.parent / "images"
        self.files = {i: coco.loadImgs(i)[0]["file_name"] for i in coco.getImgIds()}
        self.ids = sorted(self.files)
        self.labels_dir, self.labels = labels_dir, labels
        self.batch, self.size, self.instances, self.steps = batch, size, instances, steps
        self.augment = augment  # an AlbumentationsX Compose of image + mask, or None: resize + flip

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(i)
        picks = rng.choice(self.ids, self.batch)
        flips = rng.random(self.batch) < 0.5
        loaded = [self.load(image_id, flip) for image_id, flip in zip(picks, flips)]
        images = np.stack([im for im, _ in loaded])
        if not self.instances:
            return {"images": images, "semantic": np.stack([lab for _, lab in loaded])}
        n = max(int(ids.max()) for _, ids in loaded)
        masks = np.zeros((self.batch, n, self.size, self.size), bool)
        labels = np.zeros((self.batch, n), np.int64)
        valid = np.zeros((self.batch, n), bool)
        for b, ((_, ids), image_id) in enumerate(zip(loaded, picks)):
            count = len(self.labels[image_id])
            np.equal(ids[None], np.arange(1, count + 1, dtype=np.uint16)[:, None, None], out=masks[b, :count])
            labels[b, :count], valid[b, :count] = self.labels[image_id], True
        return {"images": images, "masks": masks, "labels": labels, "valid": valid}

    def load(self, image_id: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        size = (self.size, self.size)
        rgb = cv2.cvtColor(cv2.imread(str(self.images_dir / self.files[image_id])), cv2.COLOR_BGR2RGB)
        kind = "instances" if self.instances else "semantic"
        label = cv2.imread(str(self.labels_dir / f"{image_id}-{kind}.png"), cv2.IMREAD_UNCHANGED)
        if self.augment is not None:
            out = self.augment(image=rgb, mask=label)
            return out["image"], out["mask"]
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        return (np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(label[:, ::-1])) if flip else (rgb, label)


def albumentations_pipeline(size: int):
    """The augmentation of the ``semantic + AlbumentationsX`` loader, or False without it."""
    try:
        import albumentations as A
    except ImportError:
        return False
    return A.Compose([
        A.SmallestMaxSize(max_size=size), A.RandomCrop(size, size), A.HorizontalFlip(),
        A.Affine(scale=(0.8, 1.2), rotate=(-15, 15), p=0.5), A.RandomBrightnessContrast(p=0.5),
    ], seed=0)  # fmt: skip


def sample_bank(out: Path, crop: int):
    from instbank.build import BuildConfig, build_bank
    from instbank.formats.coco import read_coco

    build_bank(read_coco(SAMPLE), out, BuildConfig(size=crop), workers=1)
    return instbank.open_bank(out)


def timed(dataset, indices) -> tuple[float, float]:
    """Wall and process CPU seconds per batch over ``dataset[i]`` for ``indices``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in indices:
        dataset[i]
    n = len(indices)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def measure(plain, pasted, rounds: int, batches: int) -> dict[str, float]:
    for i in range(2):  # warm-up: numba's cached kernel, page cache, allocator
        plain[i], pasted[i]
    runs = {"plain": [], "pasted": []}
    for r in range(rounds):
        indices = range(r * batches, (r + 1) * batches)
        order = ("plain", "pasted") if r % 2 == 0 else ("pasted", "plain")
        for side in order:
            runs[side].append(timed(plain if side == "plain" else pasted, indices))
    med = lambda side, j: statistics.median(t[j] for t in runs[side]) * 1e3  # noqa: E731
    over = lambda j: statistics.median(p[j] / q[j] - 1 for p, q in zip(runs["pasted"], runs["plain"]))  # noqa: E731
    return {"plain_wall": med("plain", 0), "pasted_wall": med("pasted", 0), "plain_cpu": med("plain", 1),
            "pasted_cpu": med("pasted", 1), "over_wall": over(0), "over_cpu": over(1)}


def fix_malloc() -> bool:
    """glibc's mmap threshold pinned at 32 MiB (its maximum) and heap trimming off, for the whole
    process. By default glibc moves the threshold up to the largest block freed so far, and trims
    the heap top past twice that: which of a batch's 2-6 MB arrays come back as fresh pages
    (each page faulted in again; costly on this VM) then depends on the largest array any code in
    the process freed, so one side's allocations change the other side's time. Pinned, neither
    side's figure depends on the other's. False where it cannot be set (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="crop size of the sample bank built when --bank is absent")
    parser.add_argument("--bank", type=Path, default=None)
    parser.add_argument("--blend", default="gaussian", choices=["gaussian", "hard", "none"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=4, help="batches per side per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc", default="pinned", choices=["pinned", "glibc"],
                        help="pinned: fix_malloc() first (default); glibc: its dynamic thresholds")
    args = parser.parse_args(argv)
    malloc = "glibc's dynamic thresholds"
    if args.malloc == "pinned":
        malloc = "mmap threshold pinned at 32 MiB, no trimming" if fix_malloc() else "glibc's (could not pin)"

    from instbank.integrations.keras import BankPasteDataset
    from instbank.paste import CopyPasteConfig

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    steps = 2 + args.rounds * args.batches
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank = instbank.open_bank(args.bank) if args.bank and args.bank.exists() else sample_bank(tmp / "bank", args.crop)
        coco = COCO(str(SAMPLE))
        labels = write_labels(coco, tmp)
        print(f"\nbank {bank.path}: {len(bank)} crops of {bank.crop_size[0]}^2; B={args.batch}, K={args.k}, "
              f"{args.size}^2, {args.blend} blend, threads={args.threads}, malloc: {malloc}, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        print("| loader | plain ms/batch (wall / cpu) | with paste ms/batch (wall / cpu) | paste adds (wall / cpu) |")
        print("|---|---|---|---|")
        for kind in ("semantic", "semantic + AlbumentationsX", "instances"):
            augment = albumentations_pipeline(args.size) if "Albu" in kind else None
            if augment is False:
                continue
            plain = GuideLoader(coco, tmp, labels, args.batch, args.size, kind == "instances", steps, augment)
            output = "dict" if kind == "instances" else "semantic"
            pasted = BankPasteDataset(plain, bank, k=args.k, config=CopyPasteConfig(blend=args.blend), output=output)
            m = measure(plain, pasted, args.rounds, args.batches)
            print(f"| {kind} | {m['plain_wall']:.1f} / {m['plain_cpu']:.1f} | {m['pasted_wall']:.1f} / "
                  f"{m['pasted_cpu']:.1f} | {100 * m['over_wall']:+.0f}% / {100 * m['over_cpu']:+.0f}% |")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
