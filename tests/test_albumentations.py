"""Bank crops as AlbumentationsX CopyAndPaste donors: donor format, class-balanced choice, streams,
and a real CopyAndPaste run with instance binding (masks, boxes and labels stay aligned)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_COCO
from instbank.integrations.albumentations import MASK_THRESHOLD, BankDonors, crop_to_donor, donors_from_indices

A = pytest.importorskip("albumentations")


def tight_box(mask: np.ndarray) -> np.ndarray:
    """float ``[4]`` x0, y0, x1, y1 (exclusive) of a non-empty ``[H, W]`` mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 20))
def test_donor_is_the_tight_cut_of_the_object(seed, size):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (4, size, size), dtype=np.uint8)
    rgba[3] = np.where(rng.random((size, size)) < 0.3, rgba[3], 0)
    if not rgba[3].any():
        rgba[3, size // 2, size // 2] = 1  # a bank crop always has some alpha
    donor = crop_to_donor(rgba, {"class_labels": 7})
    image, mask = donor["image"], donor["mask"]
    assert image.dtype == mask.dtype == np.uint8 and image.shape == (*mask.shape, 3)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    h, w = mask.shape
    assert tight_box(mask).tolist() == [0, 0, w, h]  # cut to the mask's tight box
    full = (rgba[3] >= MASK_THRESHOLD) if (rgba[3] >= MASK_THRESHOLD).any() else rgba[3] > 0
    x0, y0, x1, y1 = tight_box(full).astype(int)
    assert (mask == full[y0:y1, x0:x1]).all()
    assert (image == rgba[:3, y0:y1, x0:x1].transpose(1, 2, 0)).all()
    assert donor["bbox_labels"] == {"class_labels": 7}


def test_donor_labels(sample_coco_bank):
    bank = sample_coco_bank
    person = int(np.flatnonzero(bank.crop_class_ids == 0)[0])
    by = {label: donors_from_indices(bank, [person], "cls", label, {"is_crowd": 0})[0]["bbox_labels"]
          for label in ("id", "source_id", "name")}
    assert by == {"id": {"cls": 0, "is_crowd": 0}, "source_id": {"cls": 1, "is_crowd": 0},
                  "name": {"cls": "person", "is_crowd": 0}}
    with pytest.raises(ValueError, match="label must be one of"):
        BankDonors(bank, label="category")


def test_class_balanced_by_default(sample_coco_bank):
    bank = sample_coco_bank
    donors = BankDonors(bank, k=1, seed=3)
    classes = np.array([bank.crop_class_ids[donors.indices()[0]] for _ in range(600)])
    present = np.flatnonzero(bank.class_frequencies > 0)
    share = np.bincount(classes, minlength=bank.num_classes)[present] / len(classes)
    # person is 24 of 54 crops (44%); balanced, each of the 20 classes gets 5% (3 sigma: +-2.7%)
    assert share.max() < 0.09 and share.min() > 0.015
    uniform = BankDonors(bank, k=1, seed=3, weighting="uniform")
    people = np.mean([bank.crop_class_ids[uniform.indices()[0]] == 0 for _ in range(300)])
    assert 0.33 < people < 0.56


def test_streams_seeded_distinct_and_picklable(sample_coco_bank):
    first = [BankDonors(sample_coco_bank, k=4, seed=5).indices() for _ in range(2)]
    assert (first[0] == first[1]).all() and len(set(first[0])) == 4
    donors = BankDonors(sample_coco_bank, k=4, seed=5)
    calls = [donors.indices() for _ in range(3)]
    assert not (calls[0] == calls[1]).all()
    copy = pickle.loads(pickle.dumps(donors))  # a fresh process starts the stream from the top
    assert (copy.indices() == calls[0]).all()


def test_dataloader_workers_draw_their_own_streams(sample_coco_bank):
    torch = pytest.importorskip("torch")

    class Steps(torch.utils.data.Dataset):
        def __init__(self, donors):
            self.donors = donors

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.from_numpy(self.donors.indices())

    donors = BankDonors(sample_coco_bank, k=3, seed=1)
    loader = torch.utils.data.DataLoader(Steps(donors), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    rows = [tuple(r.tolist()) for r in loader]
    # workers 0 and 1 alternate items: with one shared stream each pair would be equal
    assert rows[0::2] != rows[1::2]


def sample_instances(index: int):
    """Image ``index`` of the shipped COCO sample (RGB) and its instances as AlbumentationsX
    ``instances`` dicts (full-image mask, pascal_voc tight box, label)."""
    from instbank.crops import decode_image, instance_mask
    from instbank.formats.coco import read_coco

    record = read_coco(SAMPLE_COCO).images[index]
    bgr, _ = decode_image(record.path)
    h, w = bgr.shape[:2]
    instances = []
    for inst in record.instances:
        cut, x0, y0 = instance_mask(inst, h, w)
        mask = np.zeros((h, w), np.uint8)
        mask[y0 : y0 + cut.shape[0], x0 : x0 + cut.shape[1]] = cut
        box = np.array([x0, y0, x0 + cut.shape[1], y0 + cut.shape[0]], np.float32)
        instances.append({"mask": mask, "bbox": box, "bbox_labels": {"class_labels": inst.class_id}})
    return np.ascontiguousarray(bgr[:, :, ::-1]), instances


@pytest.mark.parametrize("index", [3, 5])
def test_copy_and_paste_keeps_masks_boxes_labels_aligned(sample_coco_bank, index):
    image, instances = sample_instances(index)
    transform = A.Compose(
        [A.CopyAndPaste(p=1.0, scale_range=(0.3, 1.0))],
        bbox_params=A.BboxParams(coord_format="pascal_voc", label_fields=["class_labels"]),
        instance_binding=["masks", "bboxes"],
        seed=index,
        telemetry=False,
    )
    donors = BankDonors(sample_coco_bank, k=4, seed=index)()
    out = transform(image=image, instances=instances, copy_paste_metadata=donors)
    result = out["instances"]
    pasted, kept = result[-len(donors):], result[: -len(donors)]
    assert len(kept) <= len(instances)
    # pastes come last, in donor order, with the donors' labels and a box that is their mask's tight box
    assert [p["bbox_labels"]["class_labels"] for p in pasted] == [d["bbox_labels"]["class_labels"] for d in donors]
    for inst in pasted:
        assert inst["mask"].shape == image.shape[:2] and inst["mask"].any()
        assert np.allclose(inst["bbox"], tight_box(inst["mask"]), atol=1e-3)
    # survivors: the mask is cut by the pastes, the box is not refit (AlbumentationsX behaviour)
    # but still holds what is left of the mask
    union = np.any([p["mask"] > 0 for p in pasted], axis=0)
    for inst in kept:
        assert not (inst["mask"][union]).any()
        x0, y0, x1, y1 = tight_box(inst["mask"])
        bx0, by0, bx1, by1 = inst["bbox"]
        assert bx0 <= x0 + 1e-3 and by0 <= y0 + 1e-3 and x1 <= bx1 + 1e-3 and y1 <= by1 + 1e-3
    # hard blending: pixels change only under the pasted masks, and there they show the donors
    changed = (out["image"] != image).any(axis=2)
    assert not changed[~union].any() and changed[union].mean() > 0.5
