"""Keypoints on the data side (issue #16): read from COCO person keypoints and YOLO-pose, stored
with each crop in crop pixels in every backend, in the content hash only when present, carried by
convert/merge/re-shard and verify, staged by the sampler, passed to AlbumentationsX donors, drawn
by the preview; bad keypoint input is a one-line error or a counted skip.

The keypoints here are SYNTHETIC: no real keypoint annotation is among the shipped or shared data
(and none can be downloaded here). ``synthetic_keypoints_json`` makes them from real COCO persons
(the shipped sample, ``data/sample/coco``, and the shared ``coco_tiny_2017``): 17 points drawn at
random inside each person's real mask (pycocotools decodes it), with random visibility (0, 1, 2),
under the COCO person category's real 17 names, skeleton and left/right flip pairs. A YOLO-pose
layout is written from the same points (``yolo_pose_layout``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_COCO, assert_rich_png, shared_path
from test_formats_fuzz import check_coco, corrupted
from instbank.build import BuildConfig, build_bank
from instbank.errors import BankError, BuildError, InputError, InstbankError
from instbank.formats import REASONS, read_coco, read_yolo
from instbank.storage import open_bank
from instbank.storage.base import KEYPOINTS_FILE, MANIFEST, SHARDS_DIR
from instbank.storage.convert import convert_bank
from instbank.storage.merge import merge_banks
from instbank.storage.verify import verify_bank
from instbank.storage.writer import BankWriter, ShardWriter, write_bank
from instbank.testing import synthetic_crops, synthetic_meta, write_synthetic_bank
from instbank.types import ClassInfo, KeypointSpec, flip_from_names

SAMPLE_IMAGES = SAMPLE_COCO.parent / "images"
#: COCO's person keypoints and skeleton (``person_keypoints_*.json``, ``categories[0]``).
COCO_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
]  # fmt: skip
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
                 [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
BACKENDS = ["memmap", "lmdb", "webdataset"]
#: The content hash of ``write_synthetic_bank(path, 30, size=16, shard_sizes=[20, 10])`` as written
#: before keypoints existed (instbank at commit 8843506): a bank without keypoints keeps it.
NO_KEYPOINTS_HASH = "87cce0b260ff474756fdad6ecefbb40ba75638401a4e3d38b5c9745cd5c95197"


# --------------------------------------------------------------------------------------------
# synthetic keypoints on real persons


def person_mask(ann: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if isinstance(seg, list) else seg
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, height, width)
    return mask_utils.decode(rle)


def synthetic_keypoints_json(src: Path, dst: Path) -> dict[int, np.ndarray]:
    """Write ``src`` (a real COCO instances json) to ``dst`` with SYNTHETIC person keypoints (see
    the module docstring); returns float64 ``[17, 3]`` keypoints per annotation id (zeros for
    annotations without keypoints)."""
    doc = json.loads(Path(src).read_text())
    size = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    person = next(c["id"] for c in doc["categories"] if c["name"] == "person")
    for cat in doc["categories"]:
        if cat["id"] == person:
            cat["keypoints"], cat["skeleton"] = COCO_NAMES, COCO_SKELETON
    points = {}
    for ann in doc["annotations"]:
        kp = np.zeros((17, 3))
        if ann["category_id"] == person and not ann["iscrowd"]:
            ys, xs = np.nonzero(person_mask(ann, *size[ann["image_id"]]))
            rng = np.random.default_rng(ann["id"])
            pick, vis = rng.integers(len(xs), size=17), rng.choice([0, 1, 2, 2], size=17)
            kp = np.stack([xs[pick] + rng.random(17), ys[pick] + rng.random(17), vis], axis=1)  # inside the pixel
            kp[vis == 0] = 0
            ann["keypoints"] = kp.reshape(-1).tolist()
            ann["num_keypoints"] = int((vis > 0).sum())
        points[ann["id"]] = kp
    Path(dst).write_text(json.dumps(doc))
    return points


def expected_crop_keypoints(meta: np.ndarray, source: dict[int, np.ndarray]) -> np.ndarray:
    """float32 ``[n, J, 3]``: each crop's source keypoints mapped by its own geometry
    (``crop_xy = (src_xy - src_box[:2]) * scale + offset``, float64, rounded once), 0 where v = 0."""
    src = np.stack([source[int(a)] for a in meta["ann_id"]])
    xy = (src[..., :2] - meta["src_box"][:, None, :2]) * meta["scale"][:, None, None] + meta["offset"][:, None, :]
    out = np.concatenate([xy, src[..., 2:]], axis=-1)
    out[src[..., 2] == 0] = 0
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def sample_kp(tmp_path_factory):
    """The shipped COCO sample with synthetic person keypoints: (json path, keypoints by ann id)."""
    path = tmp_path_factory.mktemp("kp") / "person_keypoints.json"
    return path, synthetic_keypoints_json(SAMPLE_COCO, path)


@pytest.fixture(scope="module")
def kp_bank(sample_kp, tmp_path_factory):
    """A memmap bank (S=40) of the sample with synthetic keypoints, in two shards."""
    out = tmp_path_factory.mktemp("kpbank") / "bank"
    build_bank(read_coco(sample_kp[0], SAMPLE_IMAGES), out, BuildConfig(size=40, shard_images=5), workers=1)
    return open_bank(out)


@pytest.fixture(scope="module")
def plain_bank(sample_kp, tmp_path_factory):
    """``kp_bank`` built with ``keypoints=False``: the same crops, no keypoints."""
    out = tmp_path_factory.mktemp("plainbank") / "bank"
    build_bank(read_coco(sample_kp[0], SAMPLE_IMAGES, keypoints=False), out, BuildConfig(size=40, shard_images=5),
               workers=1)
    return open_bank(out)


# --------------------------------------------------------------------------------------------
# reading


def test_coco_reader_gives_the_layout_and_each_annotations_keypoints(sample_kp):
    path, source = sample_kp
    ds = read_coco(path, SAMPLE_IMAGES)
    spec = ds.keypoint_spec
    assert spec.names == tuple(COCO_NAMES) and spec.flip == tuple(COCO_FLIP)
    assert spec.skeleton == tuple((a - 1, b - 1) for a, b in COCO_SKELETON)  # 0-based
    records = [inst for im in ds.images for inst in im.instances]
    assert all(inst.keypoints.shape == (17, 3) for inst in records)
    for inst in records:
        np.testing.assert_array_equal(inst.keypoints, source[inst.ann_id])  # non-persons: all v = 0
    assert sum((inst.keypoints[:, 2] > 0).any() for inst in records) >= 20
    plain = read_coco(path, SAMPLE_IMAGES, keypoints=False)
    assert plain.keypoint_spec is None and all(i.keypoints is None for im in plain.images for i in im.instances)
    assert read_coco(SAMPLE_COCO).keypoint_spec is None  # an instances json: no keypoints


def test_flip_pairs_come_from_the_names():
    assert flip_from_names(COCO_NAMES) == tuple(COCO_FLIP)
    assert flip_from_names(["head", "left_paw", "right_paw", "left_tail"]) == (0, 2, 1, 3)  # no twin: stays
    with pytest.raises(ValueError, match="permutation"):
        KeypointSpec(("a", "b"), (), (0, 0))
    with pytest.raises(ValueError, match="distinct"):
        KeypointSpec(("a", "a"))
    with pytest.raises(ValueError, match="skeleton"):
        KeypointSpec(("a", "b"), ((0, 2),))


# --------------------------------------------------------------------------------------------
# the bank


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_crop_holds_its_source_keypoints_mapped_by_its_geometry(sample_kp, tmp_path, backend):
    path, source = sample_kp
    report = build_bank(read_coco(path, SAMPLE_IMAGES), tmp_path / "b", BuildConfig(size=37, backend=backend,
                        shard_images=3), workers=1)
    bank = open_bank(tmp_path / "b")
    spec = bank.keypoint_spec
    assert spec is not None and spec.names == tuple(COCO_NAMES) and report.num_crops == len(bank) == 54
    expected = expected_crop_keypoints(bank.meta_table, source)
    assert bank.keypoint_table.dtype == np.float32 and bank.keypoint_table.shape == (54, 17, 3)
    np.testing.assert_array_equal(bank.keypoint_table, expected)  # exact, not close
    idx = np.array([[5, 0], [53, 17]])
    np.testing.assert_array_equal(bank.get_keypoints(idx), expected[idx.reshape(-1)])
    np.testing.assert_array_equal(bank[7].keypoints, expected[7])
    # the synthetic points were drawn inside the persons' masks: in the crop they sit on alpha
    labeled = expected[..., 2] > 0
    crop, joint = np.nonzero(labeled)
    x, y = np.floor(expected[crop, joint, :2]).astype(int).T
    inside = (x >= 0) & (x < 37) & (y >= 0) & (y < 37)
    assert inside.mean() > 0.95
    alpha = bank.get_many(np.arange(len(bank)))[:, 3]
    assert (alpha[crop[inside], y[inside], x[inside]] > 0).mean() > 0.95
    assert verify_bank(bank.path).ok
    assert all((sdir / KEYPOINTS_FILE).is_file() for sdir in bank.shard_dirs())
    assert json.loads((bank.path / MANIFEST).read_text())["keypoints"] == spec.to_json()


def test_every_backend_has_the_same_content_hash(sample_kp, tmp_path):
    ds = read_coco(sample_kp[0], SAMPLE_IMAGES)
    hashes = {b: build_bank(ds, tmp_path / b, BuildConfig(size=24, backend=b), workers=1).version for b in BACKENDS}
    assert len({v.partition("@")[2] for v in hashes.values()}) == 1, hashes


def test_shared_coco_persons_in_a_two_worker_build(tmp_path):
    ann = shared_path("coco_tiny_2017", "annotations", "instances_train2017.json")
    source = synthetic_keypoints_json(ann, tmp_path / "kp.json")
    ds = read_coco(tmp_path / "kp.json", ann.parent.parent / "train2017")
    report = build_bank(ds, tmp_path / "bank", BuildConfig(size=32, shard_images=40), workers=2)
    bank = open_bank(tmp_path / "bank")
    assert report.num_crops == len(bank) > 300 and (bank.keypoint_table[..., 2] > 0).any(axis=1).sum() > 100
    np.testing.assert_array_equal(bank.keypoint_table, expected_crop_keypoints(bank.meta_table, source))


def test_a_bank_without_keypoints_keeps_its_version(tmp_path, sample_kp, kp_bank, sample_coco_bank):
    plain = write_synthetic_bank(tmp_path / "plain", 30, size=16, shard_sizes=[20, 10])
    assert plain.content_hash == NO_KEYPOINTS_HASH and plain.keypoint_spec is None and plain.keypoint_table is None
    assert "keypoints" not in plain.manifest and not any((d / KEYPOINTS_FILE).exists() for d in plain.shard_dirs())
    # the keypoint json read without keypoints builds the very bank the instances json builds
    report = build_bank(read_coco(sample_kp[0], SAMPLE_IMAGES, keypoints=False), tmp_path / "nokp", BuildConfig(size=64),
                        workers=1)
    assert report.version == sample_coco_bank.version
    with_kp = build_bank(read_coco(sample_kp[0], SAMPLE_IMAGES), tmp_path / "kp", BuildConfig(size=64), workers=1)
    assert with_kp.version != report.version


def test_keypoints_and_layout_are_in_the_content_hash(tmp_path):
    spec = KeypointSpec(("left_a", "right_a", "c"))
    idx = np.arange(6)
    points = np.zeros((6, 3, 3), np.float32)
    points[:, 0] = [2.5, 3.5, 2]

    def bank(name, pts, layout):
        write_bank(tmp_path / name, "memmap", 8, [ClassInfo(0, 1, "a")],
                   [[(synthetic_crops(idx, 8), synthetic_meta(idx, np.zeros(6), 8), None, pts)]], keypoints=layout)
        return open_bank(tmp_path / name)

    base = bank("base", points, spec)
    moved = points.copy()
    moved[4, 0, 0] += 0.25
    assert bank("moved", moved, spec).content_hash != base.content_hash
    assert bank("flip", points, KeypointSpec(spec.names, (), (0, 1, 2))).content_hash != base.content_hash
    assert bank("skeleton", points, KeypointSpec(spec.names, ((0, 2),))).content_hash != base.content_hash
    assert bank("again", points.copy(), spec).content_hash == base.content_hash


def test_convert_reshard_and_merge_keep_keypoints(kp_bank, tmp_path):
    convert_bank(kp_bank.path, tmp_path / "lmdb", "lmdb", shard_crops=7)
    other = open_bank(tmp_path / "lmdb")
    assert other.content_hash == kp_bank.content_hash and other.keypoint_spec == kp_bank.keypoint_spec
    assert len(other.manifest["shards"]) == 8
    np.testing.assert_array_equal(other.keypoint_table, kp_bank.keypoint_table)
    merge_banks([kp_bank.path, tmp_path / "lmdb"], tmp_path / "merged", "webdataset")
    merged = open_bank(tmp_path / "merged")
    np.testing.assert_array_equal(merged.keypoint_table, np.concatenate([kp_bank.keypoint_table] * 2))
    assert verify_bank(merged.path).ok
    crops = list(merged.stream())  # the tars carry the keypoints too, for plain WebDataset readers
    np.testing.assert_array_equal(np.stack([c.keypoints for c in crops]), merged.keypoint_table)


def test_merging_banks_of_different_layouts_is_one_line(kp_bank, plain_bank, tmp_path):
    with pytest.raises(BuildError, match=r"different keypoint layouts: .* \(no keypoints\)") as e:
        merge_banks([kp_bank.path, plain_bank.path], tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    manifest = json.loads((kp_bank.path / MANIFEST).read_text())
    shutil.copytree(kp_bank.path, tmp_path / "flipped")
    manifest["keypoints"]["flip"] = list(range(17))  # another layout (its hash no longer matches: not read)
    (tmp_path / "flipped" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="different keypoint layouts"):
        merge_banks([kp_bank.path, tmp_path / "flipped"], tmp_path / "out")


def test_writer_refuses_mixed_or_mismatched_keypoints(tmp_path):
    idx = np.arange(3)
    rgba, meta = synthetic_crops(idx, 8), synthetic_meta(idx, np.zeros(3), 8)
    with pytest.raises(ValueError, match="all have keypoints or none"):
        with ShardWriter(tmp_path / "s", "memmap", 8) as shard:
            shard.append(rgba, meta, keypoints=np.zeros((3, 2, 3), np.float32))
            shard.append(rgba, meta)
    with pytest.raises(ValueError, match=r"keypoints \[3, 4, 3\]"):
        with ShardWriter(tmp_path / "s", "memmap", 8, num_keypoints=4) as shard:
            shard.append(rgba, meta, keypoints=np.zeros((3, 2, 3), np.float32))
    with BankWriter(tmp_path / "bank", "memmap", 8) as bank:
        with bank.shard("000000") as shard:
            shard.append(rgba, meta, keypoints=np.zeros((3, 2, 3), np.float32))
        with pytest.raises(BankError, match="crops with 2 keypoints, but the bank's layout has none"):
            bank.commit([ClassInfo(0, 1, "a")], [shard.result], {}, {})
        with pytest.raises(BankError, match="crops with 2 keypoints, but the bank's layout has 3"):
            bank.commit([ClassInfo(0, 1, "a")], [shard.result], {}, {}, KeypointSpec(("a", "b", "c")))


# --------------------------------------------------------------------------------------------
# sampling, donors, preview


@pytest.mark.slow
def test_sampler_stages_keypoints_in_spawn_workers(kp_bank):
    torch = pytest.importorskip("torch")
    from instbank.sampling import BankSampler, bank_loader

    loader = bank_loader(kp_bank, 3, 4, num_workers=2, multiprocessing_context="spawn", seed=2, steps_per_epoch=4,
                         pin_memory=False)
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch.keypoints.dtype == torch.float32 and batch.keypoints.shape == (3, 4, 17, 3)
        np.testing.assert_array_equal(batch.keypoints.numpy(), kp_bank.get_keypoints(batch.indices.numpy()).reshape(3, 4, 17, 3))
        assert batch.keypoint_flip.tolist() == COCO_FLIP
    numpy_batch = next(BankSampler(kp_bank, 2, 3, seed=1).numpy_batches())
    np.testing.assert_array_equal(numpy_batch["keypoints"], kp_bank.keypoint_table[numpy_batch["indices"]])


def test_banks_without_keypoints_stage_none(sample_coco_bank):
    from instbank.sampling import BankSampler, BankStaging

    batch = next(iter(BankStaging(sample_coco_bank, BankSampler(sample_coco_bank, 2, 2), pin_memory=False)))
    assert batch.keypoints is None and batch.keypoint_flip is None
    assert "keypoints" not in next(BankSampler(sample_coco_bank, 2, 2).numpy_batches())


@pytest.mark.filterwarnings("ignore:label_fields are set but label_mapping is not provided")  # no flip here
def test_albumentations_donors_carry_labeled_keypoints_through_copy_and_paste(kp_bank):
    A = pytest.importorskip("albumentations")
    from instbank.integrations.albumentations import BankDonors

    donors = BankDonors(kp_bank, k=3, seed=4, classes=["person"])
    indices = donors.indices()
    donors = BankDonors(kp_bank, k=3, seed=4, classes=["person"])()
    for donor, i in zip(donors, indices):
        crop = kp_bank.keypoint_table[i]
        labeled = np.flatnonzero(crop[:, 2] > 0)
        alpha = kp_bank[int(i)].rgba[3] >= 128
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        np.testing.assert_array_equal(donor["keypoints"], crop[labeled, :2] - np.array([cols[0], rows[0]], np.float32))
        assert donor["keypoint_labels"]["keypoint_ids"] == labeled.tolist()
        assert donor["keypoint_labels"]["keypoint_names"] == [COCO_NAMES[j] for j in labeled]
        assert donor["keypoint_labels"]["keypoint_visibility"] == crop[labeled, 2].astype(int).tolist()
    transform = A.Compose(
        [A.CopyAndPaste(p=1.0)],
        bbox_params=A.BboxParams(coord_format="pascal_voc", label_fields=["class_labels"]),
        keypoint_params=A.KeypointParams(coord_format="xy", label_fields=["keypoint_ids"], remove_invisible=False),
        seed=0, telemetry=False,
    )
    out = transform(image=np.zeros((160, 240, 3), np.uint8), bboxes=np.zeros((0, 4), np.float32), class_labels=[],
                    keypoints=np.zeros((0, 2), np.float32), keypoint_ids=[], copy_paste_metadata=donors)
    counts = [len(d["keypoints"]) for d in donors]
    assert len(out["keypoints"]) == sum(counts)
    assert [int(v) for v in out["keypoint_ids"]] == [v for d in donors for v in d["keypoint_labels"]["keypoint_ids"]]
    # each pasted object's points land inside its pasted box (they were drawn inside its mask)
    starts = np.cumsum([0] + counts)
    for box, lo, hi in zip(out["bboxes"], starts[:-1], starts[1:]):
        pts = out["keypoints"][lo:hi]
        assert ((pts >= box[:2] - 1) & (pts <= box[2:] + 1)).all()


def test_preview_draws_keypoints(kp_bank, plain_bank, tmp_path):
    from instbank.preview import CAPTION_FONT, LABEL_FONT, PAD, write_preview

    sheets = []
    for bank in (kp_bank.path, plain_bank.path):
        png = tmp_path / f"{Path(bank).parent.name}.png"
        write_preview(bank, png, per_class=4, classes=["person", "car"], thumb=40)
        sheets.append(assert_rich_png(png, min_colours=500))
    a, b = sheets
    assert a.shape == b.shape
    changed = (a != b).any(axis=2)  # the same crops: only the title, legend and keypoints differ
    header, cell = 2 * LABEL_FONT + 3 * PAD, 40 + 2 * CAPTION_FONT + 3 * PAD
    assert changed[header : header + cell].sum() > 200  # the person row: dots and lines over the crops
    assert not changed[header + cell :].any()  # the car row: cars have no labeled keypoints


# --------------------------------------------------------------------------------------------
# YOLO-pose


def yolo_pose_layout(root: Path, coco_json: Path, source: dict[int, np.ndarray], dim: int = 3) -> Path:
    """A YOLO-pose data set of the sample's persons (SYNTHETIC keypoints; see the module
    docstring): per person ``0 cx cy w h`` (its COCO bbox) and 17 keypoints (``dim`` values each),
    normalised. Returns the data.yaml."""
    doc = json.loads(coco_json.read_text())
    person = next(c["id"] for c in doc["categories"] if c["name"] == "person")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    by_image = {im["id"]: im for im in doc["images"]}
    lines: dict[int, list[str]] = {im_id: [] for im_id in by_image}
    for ann in doc["annotations"]:
        if ann["category_id"] != person or ann["iscrowd"]:
            continue
        im = by_image[ann["image_id"]]
        w, h = im["width"], im["height"]
        x, y, bw, bh = ann["bbox"]
        kp = source[ann["id"]] / [w, h, 1]
        values = [0, (x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] + kp[:, :dim].reshape(-1).tolist()
        lines[im["id"]].append(" ".join(repr(float(v)) if k else "0" for k, v in enumerate(values)))
    for im_id, im in by_image.items():
        shutil.copy(SAMPLE_IMAGES / im["file_name"], root / "images" / "train" / im["file_name"])  # a link would
        # resolve outside the data set's root (skipped as outside_root)
        (root / "labels" / "train" / Path(im["file_name"]).with_suffix(".txt")).write_text("\n".join(lines[im_id]))
    data = {"path": str(root), "train": "images/train", "names": {0: "person"}, "kpt_shape": [17, dim],
            "flip_idx": COCO_FLIP, "kpt_names": {0: COCO_NAMES}}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_yolo_pose_layout_end_to_end(sample_kp, tmp_path):
    data = yolo_pose_layout(tmp_path / "pose", *sample_kp)
    ds = read_yolo(data, box_masks=True)
    assert ds.keypoint_spec == KeypointSpec(tuple(COCO_NAMES), (), tuple(COCO_FLIP))
    assert ds.num_instances == 24 and set(ds.skipped) <= {"empty_label_file"}  # images without persons
    build_bank(ds, tmp_path / "bank", BuildConfig(size=32), workers=1)
    bank = open_bank(tmp_path / "bank")
    assert len(bank) == 24 and bank.keypoint_spec == ds.keypoint_spec
    # the expected points: the normalised label values times the decoded image's size
    from instbank.crops import read_image_file

    records = {inst.ann_id: (im, inst) for im in ds.images for inst in im.instances}
    source = {}
    for ann_id, (im, inst) in records.items():
        f = read_image_file(im.path)
        source[ann_id] = inst.keypoints * [f.width, f.height, 1]
    np.testing.assert_array_equal(bank.keypoint_table, expected_crop_keypoints(bank.meta_table, source))
    assert verify_bank(bank.path).ok
    # without box_masks a pose line has no shape to cut: counted, with a note saying so
    plain = read_yolo(data)
    assert plain.skipped["box_only"] == 24 and plain.num_instances == 0 and any("box_masks" in n for n in plain.notes)
    boxes = read_yolo(data, box_masks=True, keypoints=False)  # the boxes alone: a bank without keypoints
    assert boxes.keypoint_spec is None and boxes.num_instances == 24
    assert all(i.keypoints is None for im in boxes.images for i in im.instances)


def test_yolo_pose_without_visibility(sample_kp, tmp_path):
    data = yolo_pose_layout(tmp_path / "pose2", *sample_kp, dim=2)
    ds = read_yolo(data, box_masks=True)
    _, source = sample_kp
    for inst in (i for im in ds.images for i in im.instances):
        v = inst.keypoints[:, 2]
        assert set(np.unique(v)) <= {0.0, 2.0}  # no v column: visible, except the missing 0 0
        assert (v == 0).sum() == ((inst.keypoints[:, :2] == 0).all(axis=1)).sum()


# --------------------------------------------------------------------------------------------
# bad input


def _coco_with(tmp_path, sample_kp, edit) -> Path:
    doc = json.loads(sample_kp[0].read_text())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def _first_person(doc) -> dict:
    return next(a for a in doc["annotations"] if "keypoints" in a)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (lambda kp: kp[:-3], "bad_keypoints"),  # 16 keypoints
        (lambda kp: kp + [1.0], "bad_keypoints"),
        (lambda kp: kp[:2] + [3] + kp[3:], "bad_keypoints"),  # v = 3
        (lambda kp: [float("nan")] + kp[1:], "bad_keypoints"),  # JSON NaN, which json reads
        (lambda kp: ["1"] + kp[1:], "malformed_annotation"),
        (lambda kp: {"x": 1}, "malformed_annotation"),
    ],
)
def test_bad_annotation_keypoints_are_counted_skips(tmp_path, sample_kp, value, reason):
    def edit(doc):
        ann = _first_person(doc)
        ann["keypoints"] = value(ann["keypoints"])

    ds = read_coco(_coco_with(tmp_path, sample_kp, edit), SAMPLE_IMAGES)
    assert ds.skipped[reason] == 1 and reason in REASONS
    assert ds.num_instances == 54 - 1


def test_unlabeled_keypoints_lose_their_position(tmp_path, sample_kp):
    def edit(doc):
        ann = _first_person(doc)
        ann["keypoints"][:3] = [12.0, 34.0, 0]  # v = 0 with a position (some tools write this)

    ds = read_coco(_coco_with(tmp_path, sample_kp, edit), SAMPLE_IMAGES)
    first = next(i for im in ds.images for i in im.instances if i.keypoints[:, 2].any())
    assert first.keypoints[0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(keypoints="nose"), "'keypoints' and 'skeleton' must be lists"),
        (lambda c: c.update(skeleton=[[0, 1]]), r"'skeleton' must be pairs of keypoint numbers 1\.\.17"),
        (lambda c: c.update(skeleton=[[1, 18]]), r"1\.\.17"),
        (lambda c: c.update(keypoints=COCO_NAMES[:-1] + ["nose"]), "distinct"),
    ],
)
def test_malformed_keypoint_categories_are_one_line_errors(tmp_path, sample_kp, edit, message):
    def change(doc):
        edit(next(c for c in doc["categories"] if c["name"] == "person"))

    with pytest.raises(InputError, match=message) as e:
        read_coco(_coco_with(tmp_path, sample_kp, change), SAMPLE_IMAGES)
    assert "\n" not in str(e.value) and "edited.json: categories[0]" in str(e.value)


def test_two_keypoint_layouts_in_one_json_are_refused(tmp_path, sample_kp):
    def edit(doc):
        dog = next(c for c in doc["categories"] if c["name"] == "dog")
        dog["keypoints"], dog["skeleton"] = [f"paw{i}" for i in range(4)], []

    path = _coco_with(tmp_path, sample_kp, edit)
    with pytest.raises(InputError, match="name different keypoints or skeletons; a bank holds one keypoint layout"):
        read_coco(path, SAMPLE_IMAGES)
    assert read_coco(path, SAMPLE_IMAGES, keypoints=False).keypoint_spec is None


def test_keypoints_outside_the_image_are_counted_or_stop_strict(tmp_path, sample_kp):
    def edit(doc):
        ann = _first_person(doc)
        labeled = next(j for j in range(17) if ann["keypoints"][3 * j + 2] > 0)
        ann["keypoints"][3 * labeled] = -4.0

    ds = read_coco(_coco_with(tmp_path, sample_kp, edit), SAMPLE_IMAGES)
    report = build_bank(ds, tmp_path / "bank", BuildConfig(size=16), workers=1)
    assert report.skipped["keypoint_outside_image"] == 1 and report.num_crops == 53
    example = report.skip_examples["keypoint_outside_image"][0]
    assert example["ann_id"] == _first_person(json.loads(sample_kp[0].read_text()))["id"]
    with pytest.raises(BuildError, match="keypoint_outside_image"):
        build_bank(ds, tmp_path / "strict", BuildConfig(size=16), workers=1, strict=True)


@st.composite
def keypoint_documents(draw) -> dict:
    """A small COCO keypoint json (SYNTHETIC values): a 3-keypoint category, a category without
    keypoints, annotations of both with ``3 * J`` or other numbers of values."""
    points = st.lists(st.floats(-5, 70) | st.sampled_from([0, 1, 2]), min_size=0, max_size=12)
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["left_a", "right_a", "c"], "skeleton": [[1, 2], [2, 3]]},
                       {"id": 2, "name": "cat"}],
        "annotations": [{"id": k, "image_id": 1, "category_id": draw(st.sampled_from([1, 2])), "iscrowd": 0,
                         "segmentation": [[1, 1, 20, 1, 20, 20]], "keypoints": draw(points)}
                        for k in range(draw(st.integers(0, 4)))],
    }


@settings(max_examples=60, deadline=None)
@given(doc=st.data())
def test_keypoint_json_fuzz_keeps_or_counts_every_annotation(tmp_path_factory, doc):
    value = doc.draw(corrupted(keypoint_documents()))
    root = tmp_path_factory.mktemp("fuzz")
    (root / "ann.json").write_text(json.dumps(value))
    check_coco(root / "ann.json", root)  # a Dataset keeping or counting each annotation, or one InputError line


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kpt_shape": [17]}, r"'kpt_shape' must be \[J, 2 or 3\]"),
        ({"kpt_shape": [17, 4]}, r"'kpt_shape' must be \[J, 2 or 3\]"),
        ({"kpt_shape": [10**9, 3]}, r"J in 1\.\.1024"),
        ({"flip_idx": COCO_FLIP[:-1]}, r"'flip_idx' must be a permutation of 0\.\.16"),
        ({"flip_idx": [0] * 17}, r"'flip_idx' must be a permutation"),
        ({"kpt_names": {0: COCO_NAMES[:3]}}, "'kpt_names' must be 17 distinct names"),
        ({"kpt_names": {0: COCO_NAMES, 1: COCO_NAMES[::-1]}}, "'kpt_names' differ between classes"),
        ({"kpt_shape": None}, "'flip_idx' without 'kpt_shape'"),
    ],
)
def test_malformed_pose_yaml_is_a_one_line_error(sample_kp, tmp_path, changes, message):
    data = yolo_pose_layout(tmp_path / "pose", *sample_kp)
    cfg = yaml.safe_load(data.read_text())
    cfg.update(changes)
    data.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match=message) as e:
        read_yolo(data, box_masks=True)
    assert str(e.value).startswith(str(data)) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 0.5 0.5 0.2 0.2" + " 0.5 0.5 2" * 16, "bad_keypoints"),  # 16 keypoints
        ("0 0.5 0.5 0.2 0.2" + " 0.5 0.5 2" * 16 + " 0.5 0.5 5", "bad_keypoints"),  # v = 5
        ("0 0.5 0.5 0 0.2" + " 0.5 0.5 2" * 17, "bad_label_line"),  # empty box
        ("3 0.5 0.5 0.2 0.2" + " 0.5 0.5 2" * 17, "class_out_of_range"),
        ("0 0.5 0.5 0.2 0.2" + " 0.5 nan 2" * 17, "bad_label_line"),
    ],
)
def test_bad_pose_lines_are_counted(sample_kp, tmp_path, line, reason):
    data = yolo_pose_layout(tmp_path / "pose", *sample_kp)
    label = sorted((tmp_path / "pose" / "labels" / "train").iterdir())[0]
    before = read_yolo(data, box_masks=True)
    label.write_text(label.read_text() + "\n" + line)
    ds = read_yolo(data, box_masks=True)
    assert ds.skipped[reason] == 1 and reason in REASONS and ds.num_instances == before.num_instances


# --------------------------------------------------------------------------------------------
# crafted banks with keypoints


def _damage(bank: Path, how: str) -> None:
    target = bank / SHARDS_DIR / "000000" / KEYPOINTS_FILE
    points = np.load(target)
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif how == "float64":
        np.save(target, points.astype(np.float64))
    elif how == "shape":
        np.save(target, points[:, :5])
    elif how == "nan":
        points[1, 2, 0] = np.nan
        np.save(target, points)
    elif how == "visibility":
        points[1, 2, 2] = 7
        np.save(target, points)
    elif how == "moved":  # still a valid array: only the digests can tell
        points[0, 0, 0] += 1
        np.save(target, points)


@pytest.mark.parametrize("how", ["missing", "truncated", "float64", "shape", "nan", "visibility", "moved"])
def test_a_damaged_keypoints_file_is_a_one_line_error(kp_bank, tmp_path, how):
    bank = tmp_path / "bank"
    shutil.copytree(kp_bank.path, bank)
    _damage(bank, how)
    report = verify_bank(bank)
    assert not report.ok and all("\n" not in p.message for p in report.problems)
    assert KEYPOINTS_FILE in report.problems[0].message or how == "moved"
    if how == "moved":
        assert "does not match its digest" in report.problems[0].message
        with pytest.raises(BankError, match="does not match its digest"):
            convert_bank(bank, tmp_path / "copy", "lmdb", check_digests=True)
        return
    with pytest.raises(BankError, match=KEYPOINTS_FILE) as e:
        open_bank(bank).get_keypoints([0])
    assert "\n" not in str(e.value)


KEYPOINT_VALUES = st.one_of(
    st.sampled_from([None, [], {}, "x", 7, -1, True, 1.5, ["a"], [[0, 1]], [0, 0], list(range(20)), "nose" * 100]),
    st.lists(st.integers(-3, 30), max_size=20), st.lists(st.text(max_size=3), max_size=20),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_crafted_keypoint_layout_is_refused_in_one_line(kp_bank, tmp_path_factory, data):
    bank = tmp_path_factory.mktemp("crafted") / "bank"
    shutil.copytree(kp_bank.path, bank)
    manifest = json.loads((bank / MANIFEST).read_text())
    field = data.draw(st.sampled_from(["names", "skeleton", "flip", None]), label="field")
    value = data.draw(KEYPOINT_VALUES, label="value")
    if field is None:
        manifest["keypoints"] = value
    else:
        manifest["keypoints"][field] = value
    (bank / MANIFEST).write_text(json.dumps(manifest))
    steps = [lambda: open_bank(bank).get_keypoints([0, 1]), lambda: verify_bank(bank).summary(),
             lambda: convert_bank(bank, bank.parent / "out", "memmap", overwrite=True)]
    for step in steps:
        try:
            step()
        except InstbankError as e:
            assert "\n" not in str(e) and str(e)
