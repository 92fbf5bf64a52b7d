"""Keypoints through the paste: the pasted objects' keypoints follow their crop's geometry, and
every keypoint a paste covers, or that leaves the image, changes visibility.

Conventions (COCO's, which Ultralytics and torchvision's keypoint R-CNN read the same way):
``[..., J, 3]`` float32 rows ``x, y, v`` in continuous pixel coordinates (pixel centres at
``+0.5``, ``instbank.types``); ``v`` is 0 not labeled (``x = y = 0``), 1 labeled but not visible
(occluded: the position is known), 2 visible.

The rules (the specification; ``instbank.paste.cpu_targets`` and ``instbank.paste.triton_targets``
implement ``keypoint_visibility`` with the same results, bit for bit):

1. A pasted keypoint ``(u, v)`` (crop pixels) lands where the paste puts that crop point
   (``instbank.paste.plan``): ``x = u' * scale + tx`` with ``u' = S - u`` when the paste is
   flipped (else ``u``), ``y = v * scale + ty``, float32, one rounding per operation. A flipped
   paste also swaps slots: slot ``j`` takes the keypoint of slot ``keypoint_flip[j]`` (the mirrored
   left eye is the right eye). A paste not applied gives ``(0, 0, 0)`` for all ``J``.
2. The pixel of a keypoint is ``(floor(x), floor(y))``. A labeled keypoint (``v > 0``) outside
   ``[0, W) x [0, H)`` or in padding becomes ``(0, 0, 0)``: no position in the image to learn from,
   so not labeled, as COCO writes unlabeled keypoints (Ultralytics' own augmentations set ``v = 0``
   for keypoints that leave the image too). For a pasted keypoint this is the paste's doing; for an
   existing one it is bad input, counted (``dropped``), not raised.
3. A labeled keypoint whose pixel is in the visible mask of a paste in front of it (for a paste:
   a later paste; for an existing instance: any paste) becomes ``v = 1``: COCO's "labeled but not
   visible", the label occluded keypoints already have; COCO's OKS still scores them and the
   Ultralytics and torchvision losses still train their position (they mask by ``v > 0``), which is
   right, since the position is known. ``v = 1`` stays 1.
4. Unlabeled keypoints (``v <= 0``) are returned as they came.
"""

from __future__ import annotations

import torch

from instbank.paste.plan import PastePlan

#: COCO's person keypoints (``categories[0]["keypoints"]`` of ``person_keypoints_*.json``), in order.
COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
#: COCO's person skeleton (``categories[0]["skeleton"]``): pairs of 1-based keypoint numbers.
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)


def paste_keypoints(crop_keypoints: torch.Tensor, keypoint_flip: torch.Tensor, plan: PastePlan) -> torch.Tensor:
    """float32 ``[B, K, J, 3]``: the staged crops' keypoints (float32 ``[B, K, J, 3]``, crop pixels)
    in the target image, slots swapped where flipped, zeros for unlabeled keypoints and for pastes
    not applied (rule 1). Shared by every impl: a few operations on ``B x K x J`` values."""
    flip = plan.flip[..., None]
    swapped = crop_keypoints.index_select(2, keypoint_flip.to(crop_keypoints.device))
    u, v, vis = torch.where(flip[..., None], swapped, crop_keypoints).float().unbind(-1)
    u = torch.where(flip, float(plan.crop_size) - u, u)
    x = u * plan.scale[..., None] + plan.translate[..., 0, None]
    y = v * plan.scale[..., None] + plan.translate[..., 1, None]
    keep = plan.apply[..., None] & (vis > 0)
    return torch.where(keep[..., None], torch.stack([x, y, vis], dim=-1), 0.0)


def keypoint_visibility(
    points: torch.Tensor, n: int, paste_masks: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules 2-4 for every keypoint of the output, whole-tensor torch ops, no host synchronisation.

    Args:
        points: float32 ``[B, N+K, J, 3]`` in image pixels: the existing instances' keypoints
            (rows ``0..N-1``), then the pastes' (``paste_keypoints``).
        n: ``N``; row ``N + k`` is paste ``k``, covered by pastes ``k + 1 ..``, an existing row by all.
        paste_masks: bool ``[B, K, H, W]`` visible masks of the pastes (a view of the output masks
            is fine: ``[B, K, H*W]`` must be a view).
        padding_mask: optional bool ``[B, H, W]``, True = padding.

    Returns:
        ``(points, dropped)``: float32 ``[B, N+K, J, 3]``, and int64 ``[B]`` labeled existing
        keypoints that were outside the image or in padding (made unlabeled).
    """
    b, p, j, _ = points.shape
    k, h, w = paste_masks.shape[1:]
    x, y, v = points.unbind(-1)
    labeled = v > 0
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)  # False for NaN
    px = torch.where(inside, x, 0.0).floor().long()
    py = torch.where(inside, y, 0.0).floor().long()
    flat = (py * w + px).view(b, p * j)
    if padding_mask is not None:
        inside &= ~padding_mask.reshape(b, h * w).to(torch.bool).gather(1, flat).view(b, p, j)
    hits = paste_masks.reshape(b, k, h * w).gather(2, flat[:, None].expand(b, k, p * j)).view(b, k, p, j)
    layer = torch.arange(p, device=points.device) - n  # -1 for existing rows: behind every paste
    in_front = torch.arange(k, device=points.device)[:, None] > layer[None, :]  # [K, N+K]
    covered = (hits & in_front[None, :, :, None]).any(dim=1)
    shown = torch.stack([x, y, torch.where(covered, v.clamp(max=1.0), v)], dim=-1)
    out = torch.where((labeled & inside)[..., None], shown, 0.0)
    out = torch.where(labeled[..., None], out, points)
    dropped = (labeled & ~inside)[:, :n].flatten(1).sum(dim=1)
    return out, dropped


def keypoints_after_paste(existing, crop_keypoints, keypoint_flip, plan: PastePlan, paste_masks, padding_mask=None):
    """Every keypoint of the output: the existing instances' (float ``[B, N, J, 3]``, image pixels)
    then the pastes' (``crop_keypoints`` float32 ``[B, K, J, 3]``, crop pixels) as rules 1-4 make
    them. Returns float32 ``[B, N+K, J, 3]`` and int64 ``[B]`` ``dropped`` (``keypoint_visibility``).
    The reference: ``paste_keypoints`` then ``keypoint_visibility``; the numba twin does both in one
    call."""
    n = existing.shape[1]
    points = torch.cat([existing.to(torch.float32), paste_keypoints(crop_keypoints, keypoint_flip, plan)], dim=1)
    return keypoint_visibility(points, n, paste_masks, padding_mask)


def check_keypoints(keypoints: torch.Tensor, b: int, n: int, name: str = "keypoints") -> int:
    """``J`` of ``keypoints``, which must be float ``[B, N, J, 3]``; else ``ValueError`` naming
    ``name`` and its shape."""
    shape = tuple(keypoints.shape)
    if len(shape) != 4 or shape[:2] != (b, n) or shape[3] != 3 or not keypoints.is_floating_point():
        raise ValueError(f"{name} must be float [B={b}, N={n}, J, 3] (x, y, v), got {keypoints.dtype} {shape}")
    return shape[2]
