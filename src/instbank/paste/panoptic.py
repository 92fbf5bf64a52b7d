"""Panoptic maps through the paste: each visible paste becomes a new segment of the map, and the
segment table of every image says what is in the map afterwards.

Schema (``PanopticSchema``): a segment id encodes its class and instance as
``id = class_id * label_divisor + instance_index``: Cityscapes' ``instanceIds`` and Detectron2's /
Panoptic-DeepLab's panoptic labels use ``label_divisor = 1000``; ``PanopticSchema.rgb`` uses
``256**2``, so that ``id = R + 256 G + 256**2 B`` (class in blue, instance in red and green) is
storable as a COCO-panoptic-style PNG. Class ids are the bank's contiguous ids (build the bank
from the same data set). ``thing_classes`` says which classes are things; stuff segments have
instance index 0. ``void_id`` marks unlabeled pixels (COCO panoptic's 0, Cityscapes' ignore);
pastes paint over them, as over any label, and void is never a segment.

The rules (the specification: ``paste_panoptic``; ``instbank.paste.cpu_targets`` computes the same
map and table, ``instbank.paste.triton_targets`` paints the same map):

- Existing segments are the distinct ids of the input map (void excluded), ascending. A negative
  id other than ``void_id`` does not follow the schema: ``ValueError``. Classes beyond the bank's
  are fine (a bank of instances holds thing classes; a panoptic label space adds stuff after them).
- Paste ``k`` of a thing class ``c`` gets instance index ``1 + (the largest instance index of class
  c in the input map, 0 if none) + (the number of earlier pastes of class c in the image)``:
  numbering continues where the image's own stops, so a new id never collides with an existing
  one. An index reaching ``label_divisor``, a new id equal to ``void_id`` or beyond the map's dtype
  is a ``ValueError``.
  A paste of a stuff class joins its class's stuff segment (instance 0), as panoptic formats keep
  one segment per stuff class.
- The map takes the paste's id wherever its visible mask is set (visible masks are disjoint);
  padding never receives a paste.
- The table (``Segments``): existing segments first (``M``, the most distinct ids of any image,
  shorter rows padded with ``void_id`` and ``valid`` False), then the ``K`` pastes, aligned with
  the instance outputs (segment ``M + k`` is instance ``N + k``). ``area``: pixels of the output map
  the row accounts for: an existing segment's pixels no paste covered, a paste's visible pixels (a
  stuff paste's pixels are in its own row, not in the existing stuff segment's). ``valid``:
  ``area > 0``, the row is in the map.

Cost: the table needs every distinct id of every map. The reference sorts each map and reads the
number of segments back to size the table (one host synchronisation on CUDA, also needed to raise
on ids that break the schema); the numba twin does one pass over each map, copying it as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from instbank.paste.annotations import paint_semantic
from instbank.paste.plan import any_along

MAP_DTYPES = (torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class PanopticSchema:
    """How segment ids encode ``(class, instance)``: ``id = class_id * label_divisor +
    instance_index`` (see the module docstring).

    - ``thing_classes``: the bank's contiguous class ids that are things (the rest are stuff)
    - ``label_divisor``: 1000 for Cityscapes / Detectron2 (the default), ``256**2`` for RGB ids
    - ``void_id``: the id of unlabeled pixels (not a segment)
    """

    thing_classes: tuple[int, ...]
    label_divisor: int = 1000
    void_id: int = -1

    def __post_init__(self) -> None:
        things = tuple(sorted({int(c) for c in self.thing_classes}))
        if any(c < 0 for c in things):
            raise ValueError(f"thing_classes must be class ids >= 0, got {self.thing_classes}")
        if self.label_divisor < 2:
            raise ValueError(f"label_divisor must be >= 2, got {self.label_divisor}")
        object.__setattr__(self, "thing_classes", things)

    @classmethod
    def rgb(cls, thing_classes, void_id: int = -1) -> PanopticSchema:
        """``id = R + 256 G + 256**2 B`` with the class in ``B`` and the instance in ``R + 256 G``."""
        return cls(tuple(thing_classes), 256**2, void_id)

    def segment_id(self, class_id, instance_index):
        """The id of instance ``instance_index`` of class ``class_id`` (ints or tensors)."""
        return class_id * self.label_divisor + instance_index

    def class_of(self, segment_id):
        return segment_id // self.label_divisor

    def instance_of(self, segment_id):
        return segment_id % self.label_divisor

    def is_thing(self, class_ids: torch.Tensor) -> torch.Tensor:
        """bool, the shape of ``class_ids``: which are thing classes."""
        things = torch.tensor(self.thing_classes, dtype=torch.int64, device=class_ids.device)
        return torch.isin(class_ids, things)


class Segments(NamedTuple):
    """Segment table of ``B`` panoptic maps, ``M`` existing segments then ``K`` pastes per image:

    - ``ids`` int64 ``[B, M+K]`` (``void_id`` in padding rows)
    - ``classes`` int64 ``[B, M+K]`` (-1 in padding rows)
    - ``is_thing`` bool ``[B, M+K]``
    - ``area`` int64 ``[B, M+K]``: pixels of the output map in the segment (see the module docstring)
    - ``valid`` bool ``[B, M+K]``: ``area > 0``
    - ``num_existing``: ``M``
    """

    ids: torch.Tensor
    classes: torch.Tensor
    is_thing: torch.Tensor
    area: torch.Tensor
    valid: torch.Tensor
    num_existing: int


def check_map(panoptic: torch.Tensor, b: int, h: int, w: int) -> None:
    """``ValueError`` unless ``panoptic`` is an integer ``[B, H, W]`` map."""
    if tuple(panoptic.shape) != (b, h, w) or panoptic.dtype not in MAP_DTYPES:
        raise ValueError(f"panoptic must be int16/int32/int64 [B={b}, {h}, {w}], "
                         f"got {panoptic.dtype} {tuple(panoptic.shape)}")


def paste_panoptic(
    panoptic: torch.Tensor,
    paste_masks: torch.Tensor,
    labels: torch.Tensor,
    schema: PanopticSchema,
    paint=None,
) -> tuple[torch.Tensor, Segments]:
    """The reference: the painted map and the segment table (module docstring), torch, any device.

    Args:
        panoptic: int16/int32/int64 ``[B, H, W]`` ids (not modified).
        paste_masks: bool ``[B, K, H, W]`` visible masks of the pastes.
        labels: int64 ``[B, K]`` class ids of the pastes.
        schema: the ids' ``PanopticSchema``.
        paint: the function painting the map (``annotations.paint_semantic``'s signature, the
            default: a map of class ids and a map of segment ids are painted alike):
            ``instbank.paste.triton_targets.paint_map`` on CUDA.

    Returns:
        ``(map like panoptic, Segments)``.
    """
    existing, before, paste_ids, thing = existing_segments(panoptic, labels, schema)
    painted = (paint or paint_semantic)(panoptic, paste_masks, paste_ids)
    lost = _lost_pixels(panoptic, paste_masks, existing, schema)
    area = (paste_masks.flatten(2) != 0).sum(dim=-1)
    return painted, segment_table(existing, before - lost, paste_ids, labels, thing, area, schema)


def existing_segments(panoptic, labels, schema: PanopticSchema):
    """Distinct ids int64 ``[B, M]`` of each map (ascending; ``void_id`` after the last), their
    pixel counts int64 ``[B, M]``, the pastes' new ids int64 ``[B, K]`` and whether each paste is a
    thing; raises on ids that break the schema (one host synchronisation on CUDA)."""
    b = panoptic.shape[0]
    flat = panoptic.reshape(b, -1).to(torch.int64)
    ordered = flat.sort(dim=1).values
    labeled = ordered != schema.void_id
    first = torch.ones_like(labeled)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= labeled
    m = int(first.sum(dim=1).max()) if first.numel() else 0
    slot = torch.where(labeled, first.cumsum(dim=1) - 1, m)  # void pixels into the spare column
    ids = torch.full((b, m + 1), schema.void_id, dtype=torch.int64, device=panoptic.device)
    ids.scatter_(1, torch.where(first, slot, m), ordered)
    ids = ids[:, :m].contiguous()
    counts = torch.zeros((b, m + 1), dtype=torch.int64, device=panoptic.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    present = torch.arange(m, device=panoptic.device) < first.sum(dim=1, keepdim=True)
    bad = present & (ids < 0)
    if bool(bad.any()):
        b, m = (int(v) for v in bad.nonzero()[0])
        raise ValueError(bad_id_message(b, int(ids[b, m]), schema))
    paste_ids, thing = _new_ids(ids, present, labels, schema)
    if bool((paste_ids == schema.void_id).any()):
        b, k = (int(v) for v in (paste_ids == schema.void_id).nonzero()[0])
        raise ValueError(void_message(b, k, schema))
    if paste_ids.numel() and int(paste_ids.max()) > torch.iinfo(panoptic.dtype).max:
        raise ValueError(dtype_message(int(paste_ids.max()), panoptic.dtype))
    return ids, counts[:, :m], paste_ids, thing


def bad_id_message(b: int, segment_id: int, schema: PanopticSchema) -> str:
    """The error for a negative id of image ``b`` that is not ``void_id``."""
    return (f"panoptic [B, H, W]: segment id {segment_id} in image {b} is negative and not the schema's void_id "
            f"{schema.void_id}: the map does not follow the PanopticSchema")


def void_message(b: int, k: int, schema: PanopticSchema) -> str:
    return (f"panoptic: paste {k} of image {b} would get segment id {schema.void_id}, the schema's void_id: "
            "choose a void_id no class can produce (e.g. -1)")


def overflow_message(b: int, k: int, instance: int, class_id: int, schema: PanopticSchema) -> str:
    return (f"panoptic: paste {k} of image {b} needs instance index {instance} of class {class_id}, beyond "
            f"label_divisor {schema.label_divisor}")


def dtype_message(segment_id: int, dtype) -> str:
    return f"panoptic: new segment id {segment_id} does not fit the map's {dtype}: use a wider dtype"


def _new_ids(ids, present, labels, schema: PanopticSchema):
    """int64 ``[B, K]`` ids of the pastes and bool ``[B, K]`` thing (module docstring)."""
    labels = labels.to(torch.int64)
    thing = schema.is_thing(labels)
    same_class = present[:, None, :] & (schema.class_of(ids)[:, None, :] == labels[:, :, None])  # [B, K, M]
    top = torch.where(same_class, schema.instance_of(ids)[:, None, :], 0)
    top = top.amax(dim=2) if ids.shape[1] else torch.zeros_like(labels)
    k = labels.shape[1]
    earlier = torch.ones((k, k), dtype=torch.bool, device=labels.device).tril(-1)  # [k, k'] k' < k
    rank = ((labels[:, :, None] == labels[:, None, :]) & earlier).sum(dim=2)
    instance = torch.where(thing, top + 1 + rank, 0)
    over = thing & (instance >= schema.label_divisor)
    if bool(over.any()):
        b, k = (int(v) for v in over.nonzero()[0])
        raise ValueError(overflow_message(b, k, int(instance[b, k]), int(labels[b, k]), schema))
    return schema.segment_id(labels, instance), thing


def _lost_pixels(panoptic, paste_masks, existing, schema: PanopticSchema) -> torch.Tensor:
    """int64 ``[B, M]``: pixels of each existing segment that a paste covers."""
    b, m = existing.shape
    flat = panoptic.reshape(b, -1).to(torch.int64)
    covered = any_along(paste_masks, 1).reshape(b, -1) & (flat != schema.void_id)
    lookup = torch.where(existing == schema.void_id, torch.iinfo(torch.int64).max, existing)  # padding sorts last
    slot = torch.searchsorted(lookup, flat).clamp_(max=m)
    lost = torch.zeros((b, m + 1), dtype=torch.int64, device=panoptic.device)
    lost.scatter_add_(1, torch.where(covered, slot, m), torch.ones_like(slot))
    return lost[:, :m]


def segment_table(existing, remaining, paste_ids, labels, thing, paste_area, schema: PanopticSchema) -> Segments:
    """``Segments`` from the existing ids ``[B, M]`` (``void_id`` = padding) and their remaining
    areas, and the pastes' ids, labels, thing flags and visible areas ``[B, K]``."""
    present = existing != schema.void_id
    classes = torch.where(present, schema.class_of(existing), -1)
    area = torch.cat([torch.where(present, remaining, 0), paste_area.to(torch.int64)], dim=1)
    return Segments(
        ids=torch.cat([existing, paste_ids], dim=1),
        classes=torch.cat([classes, labels.to(torch.int64)], dim=1),
        is_thing=torch.cat([present & schema.is_thing(classes), thing], dim=1),
        area=area,
        valid=area > 0,
        num_existing=int(existing.shape[1]),
    )
