"""Bank crops as donors for AlbumentationsX ``CopyAndPaste``.

``CopyAndPaste`` (albumentationsx >= 2.0) pastes every object of the list it finds under
``copy_paste_metadata`` in the ``Compose`` call; each object is a dict with

- ``image``: ``(h, w, 3)`` uint8, the donor picture (any size; here the crop cut to the object's
  tight box, RGB as the bank stores it),
- ``mask``: ``(h, w)`` uint8 0/1, the paste footprint (here alpha >= 128, the rule
  ``instbank.paste`` uses for an object's pixels),
- ``bbox_labels``: ``{label field: value}``, one value for every name in the pipeline's
  ``BboxParams.label_fields`` (a missing one is an error in ``CopyAndPaste``),
- for a bank with keypoints, ``keypoints``: float32 ``(m, 2)``, the crop's *labeled* keypoints
  (``v > 0``; an unlabeled one has no position to paste) as ``x, y`` pixels of the donor image
  (``KeypointParams(coord_format="xy")``), and ``keypoint_labels``: ``{label field: [m values]}``
  for the pipeline's ``KeypointParams.label_fields``: by default ``keypoint_ids`` (the slot
  ``0..J-1``), ``keypoint_names`` and ``keypoint_visibility`` (1 or 2), so that declaring any of
  them works (``CopyAndPaste`` ignores the others). A donor with no labeled keypoint has neither
  key. ``CopyAndPaste`` moves the points with the object (also those outside its mask).

It leaves the choice of donors to the user; ``BankDonors`` makes that choice from the bank, class
balanced by default, through ``instbank.sampling.BankSampler``. Nothing here imports albumentations:
the donors are plain numpy dicts. Usage::

    donors = BankDonors(open_bank("banks/coco"), k=3, label_field="class_labels")
    out = transform(image=image, instances=instances, copy_paste_metadata=donors())
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

#: Alpha at or above this is the object (the same rule as ``instbank.paste.annotations``).
MASK_THRESHOLD = 128
LABELS = ("id", "source_id", "name")
#: What a keypoint label field can hold per keypoint: its slot, its name, its visibility (1 or 2).
KEYPOINT_LABELS = ("id", "name", "visibility")
DEFAULT_KEYPOINT_LABELS = {"keypoint_ids": "id", "keypoint_names": "name", "keypoint_visibility": "visibility"}


def crop_to_donor(
    rgba: np.ndarray,
    bbox_labels: Mapping[str, Any],
    keypoints: np.ndarray | None = None,
    keypoint_labels: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """One donor dict from a uint8 ``[4, S, S]`` crop: ``image`` uint8 ``(h, w, 3)`` and ``mask``
    uint8 ``(h, w)`` cut to the tight box of the mask, and ``bbox_labels``. With the crop's
    keypoints float32 ``[J, 3]`` (crop pixels): ``keypoints`` float32 ``(m, 2)`` of the labeled ones
    in the donor image's pixels and ``keypoint_labels`` (``{field: J values}``, kept for those).

    The mask is ``alpha >= MASK_THRESHOLD``; a sliver thinner than that everywhere (possible for a
    hairline object shrunk into the crop) falls back to ``alpha > 0`` so that no donor is empty.
    """
    alpha = rgba[3]
    mask = alpha >= MASK_THRESHOLD
    if not mask.any():
        mask = alpha > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        raise ValueError("crop has an empty alpha channel: not a bank crop")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    donor = {
        "image": np.ascontiguousarray(rgba[:3, y0:y1, x0:x1].transpose(1, 2, 0)),
        "mask": mask[y0:y1, x0:x1].astype(np.uint8),
        "bbox_labels": dict(bbox_labels),
    }
    if keypoints is not None:
        labeled = np.flatnonzero(np.asarray(keypoints)[:, 2] > 0)
        if labeled.size:
            donor["keypoints"] = (keypoints[labeled, :2] - np.array([x0, y0], np.float32)).astype(np.float32)
            donor["keypoint_labels"] = {field: [values[i] for i in labeled] for field, values in (keypoint_labels or {}).items()}
    return donor


def class_label(bank, class_id: int, label: str) -> Any:
    """Class ``class_id`` of ``bank`` as ``label``: ``"id"`` (contiguous int), ``"source_id"``
    (the data set's category id) or ``"name"``."""
    if label == "id":
        return int(class_id)
    info = bank.classes[class_id]
    return int(info.source_id) if label == "source_id" else info.name


def keypoint_label_values(spec, points: np.ndarray, fields: Mapping[str, str]) -> dict[str, list[Any]]:
    """``{field: J values}`` of one crop's keypoints float32 ``[J, 3]`` under the bank's layout
    ``spec``: per field, ``"id"`` (slot), ``"name"`` or ``"visibility"`` (``fields``' values)."""
    columns = {"id": list(range(spec.num_keypoints)), "name": list(spec.names),
               "visibility": [int(v) for v in points[:, 2]]}
    return {field: columns[what] for field, what in fields.items()}


def check_keypoint_labels(fields: Mapping[str, str] | None) -> dict[str, str]:
    """``fields`` (default ``DEFAULT_KEYPOINT_LABELS``); ``ValueError`` for a value not in ``KEYPOINT_LABELS``."""
    fields = dict(DEFAULT_KEYPOINT_LABELS if fields is None else fields)
    bad = {f: w for f, w in fields.items() if w not in KEYPOINT_LABELS}
    if bad:
        raise ValueError(f"keypoint_labels values must be one of {', '.join(KEYPOINT_LABELS)}, got {bad}")
    return fields


def donors_from_indices(
    bank,
    indices: Sequence[int] | np.ndarray,
    label_field: str = "class_labels",
    label: str = "id",
    extra_labels: Mapping[str, Any] | None = None,
    keypoint_labels: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Donor dicts of crops ``indices`` (one ``get_many``), labelled ``{label_field: class as
    label, **extra_labels}`` (``extra_labels``: constant values for the pipeline's other label
    fields, e.g. ``{"is_crowd": 0}``). For a bank with keypoints each donor carries its labeled
    keypoints, labelled ``{field: what}`` per ``keypoint_labels`` (``KEYPOINT_LABELS``; default
    ``DEFAULT_KEYPOINT_LABELS``)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    fields = check_keypoint_labels(keypoint_labels)
    idx = np.asarray(indices, np.int64).reshape(-1)
    class_ids = np.asarray(bank.crop_class_ids, np.int64)[idx]
    extra = dict(extra_labels or {})
    spec = getattr(bank, "keypoint_spec", None)
    points = [None] * len(idx) if spec is None else bank.get_keypoints(idx)
    return [
        crop_to_donor(rgba, {label_field: class_label(bank, int(c), label), **extra}, kp,
                      None if kp is None else keypoint_label_values(spec, kp, fields))
        for rgba, c, kp in zip(bank.get_many(idx), class_ids, points)
    ]


class BankDonors:
    """Callable returning ``k`` donors for one target image, drawn by a ``BankSampler``.

    ``weighting`` (default ``"class_balanced"``: every class with crops equally likely) and any
    other ``BankSampler`` keyword (``classes``, ``min_area``, ``allow_truncated``,
    ``class_weights``, ``t``) choose the crops; the ``k`` crops of one call are distinct when the
    bank has ``k`` eligible crops. ``label_field``, ``label``, ``extra_labels`` and
    ``keypoint_labels`` (banks with keypoints) as in ``donors_from_indices``.

    Streams: one per process, from ``seed``; inside a torch ``DataLoader`` worker the worker's own
    stream (``BankSampler.for_worker``), so workers do not paste the same donors. Picklable (the
    bank travels as its path).
    """

    def __init__(
        self,
        bank,
        k: int = 3,
        weighting: str = "class_balanced",
        seed: int = 0,
        label_field: str = "class_labels",
        label: str = "id",
        extra_labels: Mapping[str, Any] | None = None,
        keypoint_labels: Mapping[str, str] | None = None,
        **sampler_kwargs,
    ):
        from instbank.sampling import BankSampler

        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        self.keypoint_labels = check_keypoint_labels(keypoint_labels)
        self.bank = bank
        self.sampler = BankSampler(bank, 1, k, weighting, seed, rank=0, world_size=1, **sampler_kwargs)
        self.label_field, self.label, self.extra_labels = label_field, label, dict(extra_labels or {})
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"], state["_pid"] = None, None  # each process starts its own stream
        return state

    def indices(self) -> np.ndarray:
        """int64 ``[k]`` crop indices of the next call's donors."""
        return self.sampler.draw(self._generator(), 1)[0]

    def __call__(self) -> list[dict[str, Any]]:
        return donors_from_indices(self.bank, self.indices(), self.label_field, self.label, self.extra_labels,
                                   self.keypoint_labels)

    def _generator(self) -> np.random.Generator:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            worker = _torch_worker()
            self._rng = (self.sampler.for_worker(*worker) if worker else self.sampler).generator()
        return self._rng


def _torch_worker() -> tuple[int, int] | None:
    """``(worker id, number of workers)`` inside a torch DataLoader worker, else None (torch is not
    imported for that: a process that never imported it is not a worker)."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (info.id, info.num_workers) if info is not None else None
