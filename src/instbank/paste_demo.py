"""Before/after picture of bank copy-paste on real images (``instbank paste-demo``).

What a training step does, on ``n`` real images: the images are letterboxed into one
``size x size`` batch (padding at the bottom/right, marked by a padding mask, as large-scale jitter
leaves it), ``k`` crops per image are drawn class-balanced by ``BankSampler`` and staged by
``BankStaging`` into a ``BankBatch``, and one ``BankCopyPaste`` call pastes all of them and updates
the annotations. The picture has one row per image: the original with its annotated instances
(from ``--coco``; none for a plain ``--images`` folder) and the pasted result with every valid
instance. Each instance keeps its colour in both panels; in the result, an existing instance that
lost pixels to a paste shows its cut mask and refit box, with the box it had before dashed; one
that fell under ``min_visible`` is drawn as a dashed grey box marked "dropped"; pasted objects are
labelled "+name".

Targets beyond masks (``render_paste_demo`` options; ``python -m instbank.paste_demo --help``):

- ``keypoints``: persons carry COCO's 17 person keypoints, drawn with the skeleton (the person's
  left side orange, right side blue; filled dots visible, hollow ones labeled but not visible).
  The bank's own when it has them; otherwise (no keypoints are in the sample) **synthetic**: a
  standing person's layout stretched over each person's box, ``v = 2`` where the person's mask
  holds the point, else 1 (``synthetic_keypoints``), so the picture shows the geometry (a flip
  swaps the colours' sides; a paste turns covered points hollow), not a real pose.
- ``panoptic``: a third panel per row, the panoptic map after the paste (each instance a thing
  segment ``class * 1000 + n``, the rest one stuff segment, padding void; a colour per segment,
  new segments outlined in white).
- ``in_batch``: the share of paste slots that take an object of another image of the batch
  instead of a bank crop.

Pixels drawn with Pillow and OpenCV (mask outlines); the paste itself is ``instbank.paste``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from instbank.errors import InputError
from instbank.preview import default_font

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Side of the square batch the images are letterboxed into: a common training resolution
#: scale, and 2 panels of it fit a 1080p screen side by side.
CANVAS = 512
MASK_OPACITY = 0.35  # the pasted pixels must stay visible under the tint
PAD, CAPTION = 8, 13
#: Instance colours (matplotlib's tab10 then tab20's light shades): the same instance has the same
#: colour in both panels of a row.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (199, 199, 199),
)
DROPPED = (90, 90, 90)


@dataclass(frozen=True)
class DemoImage:
    """One source image: ``pixels`` uint8 ``[H, W, 3]`` RGB, its instances' ``masks`` bool
    ``[N, H, W]`` and contiguous ``labels`` int64 ``[N]``, and a ``name`` for the caption."""

    name: str
    pixels: np.ndarray
    masks: np.ndarray
    labels: np.ndarray


# ------------------------------------------------------------------------------------------------
# inputs


def coco_images(ann_path: str | os.PathLike, images_dir: str | os.PathLike | None, n: int) -> tuple[list[DemoImage], list[str]]:
    """The first ``n`` images (ascending id) of a COCO json that have instances, with their masks
    rasterized at source resolution (crowd regions are skipped, as the build does); and the data
    set's class names."""
    from instbank.crops import ImageSkip, decode_image, instance_mask
    from instbank.formats.coco import read_coco

    dataset = read_coco(ann_path, images_dir)
    out = []
    for record in dataset.images:
        if len(out) == n:
            break
        if not record.instances:
            continue
        try:
            bgr, _ = decode_image(record.path)
        except ImageSkip:
            continue  # the build reports unreadable images; the demo just takes the next one
        h, w = bgr.shape[:2]
        masks, labels = [], []
        for inst in record.instances:
            found = instance_mask(inst, h, w)
            if isinstance(found, str):  # a skip reason: empty or outside the image
                continue
            cut, x0, y0 = found
            full = np.zeros((h, w), bool)
            full[y0 : y0 + cut.shape[0], x0 : x0 + cut.shape[1]] = cut > 0
            masks.append(full)
            labels.append(inst.class_id)
        out.append(DemoImage(f"image {record.image_id}", bgr[:, :, ::-1].copy(), _stack(masks, h, w), np.asarray(labels, np.int64)))
    if not out:
        raise InputError(f"{ann_path}: no readable image with instances")
    return out, [c.name for c in dataset.classes]


def folder_images(images_dir: str | os.PathLike, n: int) -> list[DemoImage]:
    """The first ``n`` decodable images of ``images_dir`` (sorted names), without annotations."""
    from instbank.crops import ImageSkip, decode_image

    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory of images")
    out = []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if len(out) == n:
            break
        try:
            bgr, _ = decode_image(str(path))
        except ImageSkip:
            continue
        h, w = bgr.shape[:2]
        out.append(DemoImage(path.name, bgr[:, :, ::-1].copy(), _stack([], h, w), np.zeros(0, np.int64)))
    if not out:
        raise InputError(f"{root}: no decodable image ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _stack(masks: list[np.ndarray], h: int, w: int) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, h, w), bool)


# ------------------------------------------------------------------------------------------------
# the batch and the paste


@dataclass(frozen=True)
class DemoResult:
    """What ``render_paste_demo`` did: the PNG, images used, pastes staged and valid after
    occlusion, existing instances whose box was refit (a paste cut their mask's extent) and
    existing instances dropped (visible fraction under ``min_visible``)."""

    png: Path
    images: int
    staged: int
    pasted: int
    refit: int
    dropped: int

    def summary(self) -> str:
        images = f"{self.images} image" + ("s" if self.images != 1 else "")
        return (f"{self.png} ({images}; {self.pasted} of {self.staged} pastes visible; "
                f"existing instances: {self.refit} boxes refit, {self.dropped} dropped)")


@dataclass(frozen=True)
class Batch:
    """The images letterboxed into one batch (torch tensors):

    - ``images`` uint8 ``[B, 3, C, C]``; ``padding`` bool ``[B, C, C]`` (True = padding)
    - ``masks`` bool ``[B, N, C, C]``, ``labels`` int64 ``[B, N]``, ``valid`` bool ``[B, N]``
      (``N``: the most instances of any image; shorter rows padded with invalid entries)
    - ``sizes``: ``(h, w)`` of each image's content in the canvas (top-left corner)
    """

    images: "torch.Tensor"
    padding: "torch.Tensor"
    masks: "torch.Tensor"
    labels: "torch.Tensor"
    valid: "torch.Tensor"
    sizes: list[tuple[int, int]]


def letterbox_batch(images: list[DemoImage], canvas: int = CANVAS) -> Batch:
    """Scale each image so its longer side is ``canvas`` (area resampling for pixels, nearest for
    masks) and place it at the top-left of a ``canvas x canvas`` frame."""
    import cv2
    import torch

    b, n = len(images), max(len(im.labels) for im in images)
    pixels = np.zeros((b, canvas, canvas, 3), np.uint8)
    padding = np.ones((b, canvas, canvas), bool)
    masks = np.zeros((b, n, canvas, canvas), bool)
    labels = np.zeros((b, n), np.int64)
    valid = np.zeros((b, n), bool)
    sizes = []
    for i, im in enumerate(images):
        h, w = im.pixels.shape[:2]
        s = canvas / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        pixels[i, :nh, :nw] = cv2.resize(im.pixels, (nw, nh), interpolation=cv2.INTER_AREA)
        padding[i, :nh, :nw] = False
        for j, m in enumerate(im.masks):
            masks[i, j, :nh, :nw] = cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
        labels[i, : len(im.labels)] = im.labels
        valid[i, : len(im.labels)] = masks[i, : len(im.labels)].any(axis=(1, 2))
        sizes.append((nh, nw))
    return Batch(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(padding),
                 torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(valid), sizes)


def paste_batch(bank, batch: Batch, k: int, seed: int, *, panoptic_map=None, keypoints=None, keypoint_flip=None,
                bank_batch=None, **config) -> dict:
    """Stage ``k`` class-balanced crops per image (``BankSampler`` + ``BankStaging``; or take
    ``bank_batch``) and run ``BankCopyPaste`` on ``batch``, with the panoptic map ``[B, C, C]``
    and the keypoints ``[B, N, J, 3]`` of its images when given; ``config``: ``CopyPasteConfig``
    fields. Returns its output dict."""
    import torch

    from instbank.paste.module import BankCopyPaste, CopyPasteConfig
    from instbank.sampling import BankSampler, BankStaging

    if bank_batch is None:
        sampler = BankSampler(bank, len(batch.sizes), k, "class_balanced", seed, rank=0, world_size=1)
        bank_batch = next(iter(BankStaging(bank, sampler, pin_memory=False)))
    module = BankCopyPaste(CopyPasteConfig(**config))
    module.set_bank_batch(bank_batch)
    generator = torch.Generator().manual_seed(seed)
    return module(batch.images, masks=batch.masks, labels=batch.labels, valid=batch.valid,
                  padding_mask=batch.padding, generator=generator, keypoints=keypoints, panoptic=panoptic_map,
                  keypoint_flip=keypoint_flip)


# ------------------------------------------------------------------------------------------------
# drawing


def overlay_masks(pixels: np.ndarray, masks: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` with each bool ``[H, W]`` mask tinted in its colour and outlined."""
    import cv2

    out = pixels.astype(np.float32)
    for m, c in zip(masks, colors):
        out[m] = out[m] * (1 - MASK_OPACITY) + np.asarray(c, np.float32) * MASK_OPACITY
    out = out.round().astype(np.uint8)
    for m, c in zip(masks, colors):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, c, 1)
    return out


def _dashed_box(draw, box, color, width: int = 1, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, fixed in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        for start in np.arange(a, b, 2 * dash):
            end = min(start + dash, b)
            line = [(start, fixed), (end, fixed)] if horizontal else [(fixed, start), (fixed, end)]
            draw.line(line, fill=color, width=width)


def _label(draw, xy, text: str, color, font, min_y: int) -> None:
    """``text`` on a filled tag of ``color`` just above ``xy``, or just below it when that would
    go above ``min_y`` (the image's top edge)."""
    x, y = xy
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 3
    y = y - h if y - h >= min_y else y
    draw.rectangle([x, y, x + w, y + h], fill=color)
    light = sum(color) / 3 > 150
    draw.text((x + 2 - left, y + 1 - top), text, fill=(0, 0, 0) if light else (255, 255, 255), font=font)


@dataclass(frozen=True)
class Shown:
    """Instances of one panel: bool masks ``[M, h, w]``, float boxes ``[M, 4]``, tag texts, colours;
    ``before``: boxes to draw dashed (refit: the box before; dropped: the box, with no mask)."""

    masks: np.ndarray
    boxes: np.ndarray
    texts: list[str]
    colors: list[tuple[int, int, int]]
    before: list[tuple[np.ndarray, tuple[int, int, int], str | None]]


def draw_panel(pixels: np.ndarray, shown: Shown, title: str, width: int) -> "Image.Image":
    """RGB panel ``width`` wide: ``title`` above ``pixels`` with the instances of ``shown`` drawn
    over it."""
    from PIL import Image, ImageDraw

    h, w = pixels.shape[:2]
    top = CAPTION + PAD
    panel = Image.new("RGB", (width, h + top), (255, 255, 255))
    panel.paste(Image.fromarray(overlay_masks(pixels, shown.masks, shown.colors)), (0, top))
    draw = ImageDraw.Draw(panel)
    font, small = default_font(CAPTION), default_font(11)
    draw.text((0, 0), title, fill=(20, 20, 20), font=font)
    shift = np.array([0, top, 0, top], np.float32)
    for box, color, text in shown.before:
        _dashed_box(draw, tuple(box + shift), color, width=2)
        if text:
            _label(draw, (box + shift)[:2], text, color, small, top)
    for box, text, color in zip(shown.boxes, shown.texts, shown.colors):
        x0, y0, x1, y1 = box + shift
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=2)
        _label(draw, (x0, y0), text, color, small, top)
    return panel


def row_panels(image: DemoImage, batch: Batch, result: dict, b: int, names: list[str], bank_names: list[str]):
    """The (original, pasted) panels of image ``b`` and its counts ``(pasted valid, refit,
    dropped)``; ``names`` label the annotated instances, ``bank_names`` the pastes."""
    from instbank.paste.annotations import boxes_from_masks

    colors = [PALETTE[i % len(PALETTE)] for i in range(int(result["labels"].shape[1]))]
    boxes0 = boxes_from_masks(batch.masks[b])[0].numpy()  # what BankCopyPaste derives when no boxes are given
    left = _original_panel(image, batch, b, names, colors, boxes0)
    right, counts = _pasted_panel(batch, result, b, (names, bank_names), colors, boxes0)
    if "keypoints" in result:
        top = CAPTION + PAD
        draw_keypoints(left, result["keypoints_before"][b][batch.valid[b]].numpy(), top)
        shown = result["valid"][b].numpy()
        draw_keypoints(right, result["keypoints"][b][shown].numpy(), top)
    return left, right, counts


def _original_panel(image: DemoImage, batch: Batch, b: int, names: list[str], colors, boxes0: np.ndarray):
    h, w = batch.sizes[b]
    kept = np.flatnonzero(batch.valid[b].numpy())
    labels = batch.labels[b].numpy()
    shown = Shown(batch.masks[b, kept, :h, :w].numpy(), boxes0[kept], [names[c] for c in labels[kept]],
                  [colors[i] for i in kept], [])
    caption = f"{image.name}: {len(kept)} annotated instances" if len(kept) else image.name
    return draw_panel(_hwc(batch.images[b], h, w), shown, caption, batch.images.shape[-1])


def _pasted_panel(batch: Batch, result: dict, b: int, names: tuple[list[str], list[str]], colors, boxes0: np.ndarray):
    """The result panel and its counts; ``names``: (data set names, bank names)."""
    h, w = batch.sizes[b]
    n = int(batch.masks.shape[1])
    had = batch.valid[b].numpy()
    valid, boxes, labels = (result[key][b].numpy() for key in ("valid", "boxes", "labels"))
    refit = np.flatnonzero(had & valid[:n] & (np.abs(boxes[:n] - boxes0).max(axis=1) > 0))
    dropped = np.flatnonzero(had & ~valid[:n])
    shown = np.flatnonzero(valid)
    texts = [f"+{names[1][labels[i]]}" if i >= n else names[0][labels[i]] for i in shown]
    dashes = [(boxes0[i], colors[i], None) for i in refit]
    dashes += [(boxes0[i], DROPPED, f"{names[0][labels[i]]} (dropped)") for i in dropped]
    masks = result["masks"][b, shown, :h, :w].numpy().astype(bool)
    pasted = int(result["paste_valid"][b].sum())
    title = f"+{pasted} pasted"
    if had.any():
        title += f" · boxes refit: {len(refit)} (dashed: before) · dropped: {len(dropped)}"
    panel = draw_panel(_hwc(result["images"][b], h, w), Shown(masks, boxes[shown], texts, [colors[i] for i in shown], dashes),
                       title, batch.images.shape[-1])
    return panel, (pasted, len(refit), len(dropped))


# ------------------------------------------------------------------------------------------------
# keypoints and panoptic maps

#: A standing person's keypoints (COCO's 17, in order) in a unit box, facing the camera (the
#: person's left is the image's right): the synthetic layout stretched over each object's box.
PERSON_LAYOUT = (
    (0.50, 0.08), (0.55, 0.06), (0.45, 0.06), (0.60, 0.08), (0.40, 0.08), (0.68, 0.22), (0.32, 0.22), (0.78, 0.38),
    (0.22, 0.38), (0.82, 0.52), (0.18, 0.52), (0.60, 0.55), (0.40, 0.55), (0.60, 0.76), (0.40, 0.76), (0.60, 0.95),
    (0.40, 0.95),
)
LEFT, RIGHT, MIDDLE = (255, 140, 0), (30, 144, 255), (250, 250, 250)


def synthetic_keypoints(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float32 ``[N, 17, 3]``: ``PERSON_LAYOUT`` over each box ``[N, 4]`` (``x0, y0, x1, y1``),
    ``v = 2`` where the bool mask ``[N, H, W]`` holds the point, else 1; zeros for an empty box.
    Synthetic: the sample has no keypoint annotations."""
    layout = np.asarray(PERSON_LAYOUT, np.float32)
    points = np.zeros((len(boxes), len(layout), 3), np.float32)
    for i, (box, mask) in enumerate(zip(boxes, masks)):
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        xy = box[:2] + layout * (box[2:] - box[:2])
        px = np.clip(xy.astype(int), 0, np.asarray(mask.shape[::-1]) - 1)
        points[i, :, :2] = xy
        points[i, :, 2] = np.where(mask[px[:, 1], px[:, 0]], 2.0, 1.0)
    return points


def _targets(bank, batch: Batch, k: int, seed: int, keypoints: bool, panoptic: bool, num_classes: int) -> dict:
    """``paste_batch`` keyword arguments for the demo's targets: the staged ``bank_batch`` (with
    synthetic keypoints when the bank has none), the images' keypoints, the panoptic map and its
    schema."""
    import torch

    from instbank.paste.keypoints import COCO_PERSON_KEYPOINTS
    from instbank.types import flip_from_names
    from instbank.paste.panoptic import PanopticSchema
    from instbank.sampling import BankSampler, BankStaging
    from instbank.types import BankBatch

    extra: dict = {}
    person = list(bank.class_names).index("person") if "person" in bank.class_names else -1
    if keypoints:
        sampler = BankSampler(bank, len(batch.sizes), k, "class_balanced", seed, rank=0, world_size=1)
        staged = next(iter(BankStaging(bank, sampler, pin_memory=False)))
        extra["synthetic"] = staged.keypoints is None
        if staged.keypoints is None:
            alpha = staged.pixels[:, :, 3].numpy() >= 128
            s = alpha.shape[-1]
            box = torch.cat([staged.offset, staged.offset + (staged.src_box[..., 2:] - staged.src_box[..., :2])
                             * staged.scale[..., None]], dim=-1).numpy()
            box[staged.class_ids.numpy() != person] = 0  # persons only, as COCO annotates them
            crop_kp = synthetic_keypoints(alpha.reshape(-1, s, s), box.reshape(-1, 4)).reshape(*alpha.shape[:2], 17, 3)
            fields = {name: getattr(staged, name) for name in BankBatch._TENSORS[:6]}
            staged = BankBatch(**fields, num_classes=staged.num_classes, keypoints=torch.from_numpy(crop_kp),
                               keypoint_flip=torch.tensor(flip_from_names(COCO_PERSON_KEYPOINTS)))
        from instbank.paste.annotations import boxes_from_masks

        boxes = boxes_from_masks(batch.masks)[0].numpy()
        boxes[(batch.labels.numpy() != person) | ~batch.valid.numpy()] = 0
        masks = batch.masks.numpy()
        points = np.stack([synthetic_keypoints(masks[b], boxes[b]) for b in range(len(boxes))])
        extra.update(bank_batch=staged, keypoints=torch.from_numpy(points))
    if panoptic:
        maps = np.full((len(batch.sizes), *batch.padding.shape[1:]), num_classes * 1000, np.int32)
        maps[batch.padding.numpy()] = -1
        for b in range(len(batch.sizes)):
            seen: dict[int, int] = {}
            for i in np.flatnonzero(batch.valid[b].numpy()):
                c = int(batch.labels[b, i])
                seen[c] = seen.get(c, 0) + 1
                maps[b][batch.masks[b, i].numpy()] = c * 1000 + seen[c]
        extra.update(panoptic_map=torch.from_numpy(maps), panoptic=PanopticSchema(tuple(range(num_classes))))
    return extra


def draw_keypoints(panel: "Image.Image", points: np.ndarray, top: int) -> None:
    """COCO person keypoints ``[M, 17, 3]`` (image pixels) onto ``panel`` (content from row ``top``):
    skeleton lines between labeled points, a dot per labeled point, filled when visible (``v = 2``),
    hollow when labeled but not visible; the person's left side orange, right side blue."""
    from PIL import ImageDraw

    from instbank.paste.keypoints import COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON

    draw = ImageDraw.Draw(panel)
    side = [LEFT if name.startswith("left_") else RIGHT if name.startswith("right_") else MIDDLE
            for name in COCO_PERSON_KEYPOINTS]
    for person in points:
        xy = [(float(x), float(y) + top) for x, y, _ in person]
        for a, b in COCO_PERSON_SKELETON:
            if person[a - 1, 2] > 0 and person[b - 1, 2] > 0:
                draw.line([xy[a - 1], xy[b - 1]], fill=side[b - 1] if side[a - 1] == side[b - 1] else MIDDLE, width=1)
        for (x, y), v, color in zip(xy, person[:, 2], side):
            if v > 0:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color if v >= 2 else None, outline=color)


def panoptic_panel(result: dict, batch: Batch, b: int, before: "torch.Tensor") -> "Image.Image":
    """The panoptic map of image ``b`` after the paste: a colour per segment (stuff grey, void
    black), each new segment outlined in white."""
    import cv2
    from PIL import Image, ImageDraw

    h, w = batch.sizes[b]
    painted = result["panoptic"][b, :h, :w].numpy()
    segments = result["segments"]
    ids = np.unique(painted)
    colours = np.zeros((len(ids), 3), np.uint8)
    for i, sid in enumerate(ids):
        if sid >= 0:
            colours[i] = PALETTE[int(sid) % 997 % len(PALETTE)] if sid % 1000 else (150, 150, 150)
    rgb = colours[np.searchsorted(ids, painted)]
    m = segments.num_existing
    for sid, valid in zip(segments.ids[b, m:].tolist(), segments.valid[b, m:].tolist()):
        if valid:
            segment = (painted == sid).astype(np.uint8)
            contours, _ = cv2.findContours(segment, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(rgb, contours, -1, (255, 255, 255), 1)
    top = CAPTION + PAD
    panel = Image.new("RGB", (batch.images.shape[-1], h + top), (255, 255, 255))
    panel.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, top))
    had = len([v for v in np.unique(before[b, :h, :w].numpy()) if v >= 0])
    new = int(segments.valid[b, m:].sum())
    ImageDraw.Draw(panel).text((0, 0), f"panoptic: {had} segments, +{new} new (outlined)", fill=(20, 20, 20),
                               font=default_font(CAPTION))
    return panel


def _hwc(image: "torch.Tensor", h: int, w: int) -> np.ndarray:
    """uint8 ``[3, C, C]`` tensor -> ``[h, w, 3]`` numpy content (the padding cut off)."""
    return np.ascontiguousarray(image[:, :h, :w].permute(1, 2, 0).numpy())


def render_paste_demo(
    bank_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    coco: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    n: int = 4,
    k: int = 6,
    seed: int = 0,
    canvas: int = CANVAS,
    keypoints: bool = False,
    panoptic: bool = False,
    in_batch: float = 0.0,
) -> DemoResult:
    """Write the demo PNG for the bank at ``bank_path``: ``n`` images from ``coco`` (with their
    annotations; ``images`` is then the images folder, guessed when None) or from the folder
    ``images``, ``k`` pastes each, all random draws from ``seed``; ``keypoints``, ``panoptic``,
    ``in_batch``: see the module docstring."""
    from PIL import Image, ImageDraw

    from instbank.storage import open_bank

    if n < 1 or k < 0:
        raise ValueError(f"need n >= 1 and k >= 0, got n={n}, k={k}")
    bank = open_bank(bank_path)
    if coco is not None:
        demo, names = coco_images(coco, images, n)
    elif images is not None:
        demo, names = folder_images(images, n), list(bank.class_names)
    else:
        raise ValueError("give coco (annotations json) or images (a folder of pictures)")
    batch = letterbox_batch(demo, canvas)
    extra = _targets(bank, batch, k, seed, keypoints, panoptic, len(names))
    synthetic = extra.pop("synthetic", False)
    result = paste_batch(bank, batch, k, seed, in_batch=in_batch, **extra)
    if keypoints:
        result = {**result, "keypoints_before": extra["keypoints"]}
    rows = [row_panels(im, batch, result, b, names, list(bank.class_names)) for b, im in enumerate(demo)]
    if panoptic:
        rows = [(left, right, counts, panoptic_panel(result, batch, b, extra["panoptic_map"]))
                for b, (left, right, counts) in enumerate(rows)]
    counts = np.sum([r[2] for r in rows], axis=0)
    columns = 3 if panoptic else 2
    width = columns * canvas + (columns + 1) * PAD
    header = CAPTION + 2 * PAD
    height = header + sum(max(left.height, right.height) + PAD for left, right, *_ in rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    what = {0.0: f"k={k} class-balanced crops", 1.0: f"k={k} objects of another image of the batch"}.get(
        in_batch, f"k={k} pastes, each from the batch with p={in_batch:g}, else from the bank")
    notes = [" · synthetic keypoints" if synthetic else "",
             " | panoptic map" if panoptic else ""]
    draw.text((PAD, PAD), f"{bank.path.name} {bank.version}: original | BankCopyPaste, {what} per image, seed {seed}"
              + "".join(notes), fill=(20, 20, 20), font=default_font(CAPTION))
    y = header
    for left, right, _, *third in rows:
        sheet.paste(left, (PAD, y))
        sheet.paste(right, (2 * PAD + canvas, y))
        if third:
            sheet.paste(third[0], (3 * PAD + 2 * canvas, y))
        y += max(left.height, right.height) + PAD
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return DemoResult(out, len(demo), len(demo) * k, int(counts[0]), int(counts[1]), int(counts[2]))


def main(argv: list[str] | None = None) -> None:
    """``python -m instbank.paste_demo BANK --coco ANN --out PNG [--keypoints] [--panoptic]
    [--in-batch F]``: the demo with the targets beyond masks (``instbank paste-demo`` draws masks)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m instbank.paste_demo", description=main.__doc__.split("\n")[0])
    parser.add_argument("bank")
    parser.add_argument("--coco", required=True)
    parser.add_argument("--images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=CANVAS)
    parser.add_argument("--keypoints", action="store_true",
                        help="COCO person keypoints (synthetic if the bank has none)")
    parser.add_argument("--panoptic", action="store_true", help="a third panel: the panoptic map after the paste")
    parser.add_argument("--in-batch", type=float, default=0.0, help="share of pastes taken from the batch's own images")
    args = parser.parse_args(argv)
    result = render_paste_demo(args.bank, args.out, coco=args.coco, images=args.images, n=args.n, k=args.k,
                               seed=args.seed, canvas=args.size, keypoints=args.keypoints, panoptic=args.panoptic,
                               in_batch=args.in_batch)
    print(f"wrote {result.summary()}")


if __name__ == "__main__":
    main()
