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

- Existing segments are the distinct ids of the input map (void excluded), ascending, or the ids
  of the table the caller gives (below). A negative id other than ``void_id`` does not follow the
  schema: ``ValueError``. Classes beyond the bank's are fine (a bank of instances holds thing
  classes; a panoptic label space adds stuff after them).
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

The existing segments' table can come from the caller (``segments=``: COCO panoptic's
``segments_info`` ids and areas, a previous step's ``Segments``, or ``(ids, area)`` tensors;
``given_segments``): the map is then not read outside the pastes, and each given area becomes
the given area less what the pastes cover. The table is trusted, not checked pixel by pixel; a
pixel under a paste whose id the table lacks, or a segment losing more pixels than its given
area, is a ``ValueError`` (the areas would be wrong otherwise); an id the table lists but the
map lacks keeps its row and area. The painted map goes to ``out`` when given (the input itself:
in place, only the pastes' pixels are written). Ids that break the schema are found before
anything is painted (``BankCopyPaste`` checks them before the pastes, so that images painted in
place are left as they were too); a table that does not describe the map is found while the
pastes are painted, so its ``ValueError`` can leave a map painted in place partly painted.

Cost: without a table, every distinct id of every map must be counted. The reference sorts each
map (one host synchronisation on CUDA, also needed to raise on ids that break the schema); the
numba twin does one pass over each map, copying it when it is not painted in place (0.07 ms per
512^2 int32 map in place, 0.09 copied, on the development VM). With a table and ``out=`` the
input (``BankCopyPaste(...)(..., segments=..., inplace=True)``), the numba twin touches only the
pastes' boxes (``docs/perf/paste.md`` section (c) has the figures).
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


def map_output(panoptic: torch.Tensor, out: torch.Tensor | None, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, out)`` for a kernel that writes the painted map row by row: ``panoptic`` made
    contiguous and ``out``, a new tensor like it when None; ``ValueError`` naming ``kernel`` when a
    given ``out`` is not contiguous (``panoptic`` itself is fine: painting in place)."""
    source = panoptic.contiguous()
    if out is None:
        return source, torch.empty_like(source)
    if not out.is_contiguous():
        raise ValueError(f"panoptic_out must be C-contiguous for {kernel} (it writes the map row by row)")
    return source, out


def paste_panoptic(
    panoptic: torch.Tensor,
    paste_masks: torch.Tensor,
    labels: torch.Tensor,
    schema: PanopticSchema,
    paint=None,
    segments=None,
    out: torch.Tensor | None = None,
    existing=None,
) -> tuple[torch.Tensor, Segments]:
    """The reference: the painted map and the segment table (module docstring), torch, any device.

    Args:
        panoptic: int16/int32/int64 ``[B, H, W]`` ids (modified only when it is ``out``).
        paste_masks: bool ``[B, K, H, W]`` visible masks of the pastes.
        labels: int64 ``[B, K]`` class ids of the pastes.
        schema: the ids' ``PanopticSchema``.
        paint: the function painting the map (``annotations.paint_semantic``'s signature, the
            default: a map of class ids and a map of segment ids are painted alike):
            ``instbank.paste.triton_targets.paint_map`` on CUDA.
        segments: the existing segments' table ``(ids, area)`` int64 ``[B, M]`` (``given_segments``;
            ``void_id`` in padding rows), None: counted from the map.
        out: ``[B, H, W]`` like ``panoptic`` to write the painted map into (``panoptic`` itself:
            in place), None: a new tensor.
        existing: what ``existing_segments(panoptic, labels, schema, segments)`` returned, when the
            caller checked the map before the pastes were made (None: done here).

    Returns:
        ``(map like panoptic, Segments)``.
    """
    if existing is None:
        existing = existing_segments(panoptic, labels, schema, segments)
    existing, before, paste_ids, thing = existing
    lost = _lost_pixels(panoptic, paste_masks, existing, schema, checked=segments is not None)
    if segments is not None:
        _check_remaining(existing, before, lost)
    painted = (paint or paint_semantic)(panoptic, paste_masks, paste_ids)
    if out is not None and painted is not out:
        painted = out.copy_(painted)
    area = (paste_masks.flatten(2) != 0).sum(dim=-1)
    return painted, segment_table(existing, before - lost, paste_ids, labels, thing, area, schema)


def given_segments(segments, schema: PanopticSchema, b: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The existing segments' table a caller gives, as ``(ids, area)`` int64 ``[B, M]`` (``void_id``
    in padding rows) on ``device``, from any of:

    - a ``Segments`` (e.g. the previous paste's output: its rows of one id are merged),
    - a pair ``(ids, area)`` of int tensors ``[B, M]``,
    - ``B`` lists of COCO-panoptic ``segments_info`` dicts (``id``, ``area``; ``category_id`` when
      present must be ``schema.class_of(id)``, i.e. the ids were converted to the schema;
      ``iscrowd`` is not read: a crowd segment is a segment of the map like any other).

    Raises ``ValueError`` on a table of another batch size or shape, ``TypeError`` on another type.
    """
    if isinstance(segments, Segments):
        ids, area = segments.ids, segments.area
    elif isinstance(segments, (tuple, list)) and len(segments) == 2 and all(
            isinstance(t, torch.Tensor) for t in segments):
        ids, area = segments
    elif isinstance(segments, (tuple, list)) and all(isinstance(info, (tuple, list)) for info in segments):
        ids, area = _from_segments_info(segments, schema)
    else:
        raise TypeError("segments must be a Segments, a pair (ids, area) of int tensors [B, M], or B lists of "
                        f"COCO segments_info dicts, got {type(segments).__name__}")
    if ids.dim() != 2 or ids.shape != area.shape or ids.shape[0] != b or ids.dtype.is_floating_point or \
            area.dtype.is_floating_point:
        raise ValueError(f"segments (ids, area) must be int [B={b}, M] each, got {ids.dtype} {tuple(ids.shape)} and "
                         f"{area.dtype} {tuple(area.shape)}")
    return ids.to(device, torch.int64), area.to(device, torch.int64)


def _from_segments_info(infos, schema: PanopticSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, area)`` int64 ``[B, M]`` from ``B`` lists of ``segments_info`` dicts (``given_segments``)."""
    m = max((len(info) for info in infos), default=0)
    ids = torch.full((len(infos), m), schema.void_id, dtype=torch.int64)
    area = torch.zeros((len(infos), m), dtype=torch.int64)
    for b, info in enumerate(infos):
        for j, segment in enumerate(info):
            try:
                sid, size = int(segment["id"]), int(segment["area"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"segments_info[{b}][{j}] needs an integer 'id' and 'area', got {segment!r}") from exc
            if "category_id" in segment and int(segment["category_id"]) != schema.class_of(sid):
                raise ValueError(f"segments_info[{b}][{j}]: id {sid} encodes class {schema.class_of(sid)} "
                                 f"(label_divisor {schema.label_divisor}) but category_id is "
                                 f"{segment['category_id']}: convert COCO's ids to the PanopticSchema first")
            ids[b, j], area[b, j] = sid, size
    return ids, area


def existing_segments(panoptic, labels, schema: PanopticSchema, segments=None):
    """Distinct ids int64 ``[B, M]`` of each map (ascending; ``void_id`` after the last), their
    pixel counts int64 ``[B, M]``, the pastes' new ids int64 ``[B, K]`` and whether each paste is a
    thing; raises on ids that break the schema (one host synchronisation on CUDA). With
    ``segments`` (``(ids, area)``, ``given_segments``) the ids and counts are the table's, rows of
    one id merged, and the map is not read."""
    if segments is None:
        ids, counts, present = _distinct(panoptic.flatten(1), schema.void_id)  # (flatten: B may be 0)
        where = "panoptic [B, H, W]"
    else:
        ids, counts, present = _distinct(segments[0], schema.void_id, segments[1])
        where = "segments"
        negative = present & (counts < 0)
        if bool(negative.any()):
            b, m = (int(v) for v in negative.nonzero()[0])
            raise ValueError(negative_area_message(b, int(ids[b, m]), int(counts[b, m])))
    bad = present & (ids < 0)
    if bool(bad.any()):
        b, m = (int(v) for v in bad.nonzero()[0])
        raise ValueError(bad_id_message(b, int(ids[b, m]), schema, where))
    paste_ids, thing = _new_ids(ids, present, labels, schema)
    if bool((paste_ids == schema.void_id).any()):
        b, k = (int(v) for v in (paste_ids == schema.void_id).nonzero()[0])
        raise ValueError(void_message(b, k, schema))
    if paste_ids.numel() and int(paste_ids.max()) > torch.iinfo(panoptic.dtype).max:
        raise ValueError(dtype_message(int(paste_ids.max()), panoptic.dtype))
    return ids, counts, paste_ids, thing


def _distinct(values: torch.Tensor, void_id: int, weights: torch.Tensor | None = None):
    """Distinct values int64 ``[B, M]`` of each row of ``values`` ``[B, L]`` other than ``void_id``
    (ascending, ``void_id`` after the last), the sum of their ``weights`` (1 each when None) and
    which are present (bool ``[B, M]``)."""
    b = values.shape[0]
    ordered, order = values.to(torch.int64).sort(dim=1)
    labeled = ordered != void_id
    first = torch.ones_like(labeled)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= labeled
    m = int(first.sum(dim=1).max()) if first.numel() else 0
    slot = torch.where(labeled, first.cumsum(dim=1) - 1, m)  # void entries into the spare column
    ids = torch.full((b, m + 1), void_id, dtype=torch.int64, device=values.device)
    ids.scatter_(1, torch.where(first, slot, m), ordered)
    counts = torch.zeros((b, m + 1), dtype=torch.int64, device=values.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot) if weights is None else weights.gather(1, order))
    present = torch.arange(m, device=values.device) < first.sum(dim=1, keepdim=True)
    return ids[:, :m].contiguous(), counts[:, :m], present


def bad_id_message(b: int, segment_id: int, schema: PanopticSchema, where: str = "panoptic [B, H, W]") -> str:
    """The error for a negative id of image ``b`` that is not ``void_id``, found in ``where`` (the
    map or the given segments table)."""
    return (f"{where}: segment id {segment_id} in image {b} is negative and not the schema's void_id "
            f"{schema.void_id}: the {'map' if where.startswith('panoptic') else 'table'} does not follow the "
            "PanopticSchema")


def negative_area_message(b: int, segment_id: int, area: int) -> str:
    return f"segments: segment {segment_id} of image {b} has a negative area {area}"


def missing_message(b: int, segment_id: int) -> str:
    """The error for a pixel under a paste whose id the given table lacks (the smallest such id of
    the first image that has one)."""
    return (f"segments: segment id {segment_id} of image {b} is under a paste but not in the given segments table "
            "(the table must list every segment of the map, as COCO's segments_info does)")


def short_message(b: int, segment_id: int, area: int, lost: int) -> str:
    """The error for a given area smaller than what the pastes cover of the segment."""
    return (f"segments: segment {segment_id} of image {b} has area {area} in the given table but the pastes cover "
            f"{lost} of its pixels: the table does not describe this map")


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


def _lost_pixels(panoptic, paste_masks, existing, schema: PanopticSchema, checked: bool = False) -> torch.Tensor:
    """int64 ``[B, M]``: pixels of each existing segment that a paste covers; ``checked``: raise
    when a covered pixel's id is not among ``existing`` (a given table that lacks it)."""
    b, m = existing.shape
    flat = panoptic.flatten(1).to(torch.int64)
    covered = any_along(paste_masks, 1).flatten(1) & (flat != schema.void_id)
    lookup = torch.where(existing == schema.void_id, torch.iinfo(torch.int64).max, existing)  # padding sorts last
    slot = torch.searchsorted(lookup, flat).clamp_(max=m)
    if checked:
        found = torch.cat([lookup, lookup.new_full((b, 1), schema.void_id)], dim=1).gather(1, slot) == flat
        missing = covered & ~found
        if bool(missing.any()):
            i = int(missing.any(dim=1).nonzero()[0])
            raise ValueError(missing_message(i, int(flat[i][missing[i]].min())))
    lost = torch.zeros((b, m + 1), dtype=torch.int64, device=panoptic.device)
    lost.scatter_add_(1, torch.where(covered, slot, m), torch.ones_like(slot))
    return lost[:, :m]


def _check_remaining(existing, area, lost) -> None:
    """``ValueError`` when the pastes cover more of a given segment than its given area."""
    short = lost > area
    if bool(short.any()):
        b, m = (int(v) for v in short.nonzero()[0])
        raise ValueError(short_message(b, int(existing[b, m]), int(area[b, m]), int(lost[b, m])))


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
