"""instbank.integrations.keras: batches aligned with their pasted pixels, reproducible whichever
Keras worker makes them, clear errors on bad arrays; the Keras example trains a few steps.

Keras runs on the torch backend here (no tensorflow needed); KERAS_BACKEND is read once, when
keras is first imported, so it is set before that (a backend already chosen by the caller stays).
keras itself is imported by the tests that use it, not when this file is collected: its torch
backend imports torch._dynamo and so Triton, which test_paste_triton.py must import first (it sets
TRITON_INTERPRET for CPU-only machines before that).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import weakref

import cv2
import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
if importlib.util.find_spec("keras") is None:
    pytest.skip("keras is not installed (extra 'keras')", allow_module_level=True)

from instbank.integrations.keras import BankPaste  # noqa: E402
from instbank.paste import BankCopyPaste, CopyPasteConfig  # noqa: E402
from instbank.paste.annotations import boxes_from_masks  # noqa: E402
from instbank.types import BankBatch  # noqa: E402

from conftest import REPO  # noqa: E402

# Odd sizes; the sample bank's crops are 64 x 64, which must fit.
H, W, N, K = 67, 83, 3, 4
#: Hard blend: inside its mask an object replaces the target's pixels, outside only the bilinear
#: rim of its edge blends (see ``near``). Large scales: pastes overlap each other and the instances.
HARD = CopyPasteConfig(scale_range=(0.3, 0.8), blend="hard")


class Batches:
    """A user's batch source: batch ``i`` has ``size`` images of random pixels and ``N`` ellipse
    instances (some padded out with ``valid=False`` and an empty mask), the semantic map they make
    (255: unlabelled), all a function of ``i``. Counts ``on_epoch_end`` calls."""

    def __init__(self, steps=5, size=3, image_dtype=np.uint8, semantic_shape="bhw", log=None):
        self.steps, self.size, self.image_dtype, self.semantic_shape = steps, size, image_dtype, semantic_shape
        self.epochs_ended = 0
        self.log = log  # a folder: each batch leaves a file named by the process that made it

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        if self.log is not None:
            (self.log / f"{os.getpid()}-{i}").touch()
        return self.make(i)

    def make(self, i):
        rng = np.random.default_rng([7, i])
        b = self.size
        images = rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8)
        if self.image_dtype != np.uint8:
            images = (images / 255).astype(self.image_dtype)
        yy, xx = np.mgrid[:H, :W]
        masks = np.zeros((b, N, H, W), bool)
        labels = rng.integers(0, 80, (b, N))
        valid = np.ones((b, N), bool)
        semantic = np.full((b, H, W), 255, np.uint8)
        for bi in range(b):
            for n in range(N - (bi % 2)):  # odd images have one padding instance
                cx, cy = rng.uniform(0, W), rng.uniform(0, H)
                rx, ry = rng.uniform(5, 25, 2)
                masks[bi, n] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
                semantic[bi][masks[bi, n]] = labels[bi, n]
            valid[bi, N - (bi % 2) :] = False
        boxes, _ = boxes_from_masks(torch.from_numpy(masks))
        if self.semantic_shape == "bhw1":
            semantic = semantic[..., None]
        return {"images": images, "masks": masks, "labels": labels, "boxes": boxes.numpy(), "valid": valid, "semantic": semantic}

    def on_epoch_end(self):
        self.epochs_ended += 1


def near(masks: np.ndarray) -> np.ndarray:
    """bool ``[B, H, W]`` masks grown by 2 pixels: the rim a paste blends with an alpha under 128
    (bilinear taps of a hard edge, at most ``scale`` < 2 target pixels wide here) is outside its
    mask but changes pixels."""
    kernel = np.ones((5, 5), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in masks]).reshape(masks.shape)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# what a batch holds


@pytest.mark.parametrize("index", [0, 1, 2])
def test_masks_boxes_labels_and_semantic_follow_the_pasted_pixels(sample_coco_bank, index):
    source = Batches()
    label_map = np.arange(len(sample_coco_bank.class_names)) + 100  # pasted labels are told apart
    paste = BankPaste(source, sample_coco_bank, k=K, config=HARD, seed=3, label_map=label_map)
    given, out = source[index], paste.batch(index)
    b = given["images"].shape[0]
    assert out["images"].shape == given["images"].shape and out["images"].dtype == np.uint8
    assert out["masks"].shape == (b, N + K, H, W) and out["boxes"].shape == (b, N + K, 4)
    pasted = out["masks"][:, N:]
    covered = pasted.any(axis=1)
    assert covered.any(), "nothing was pasted"
    assert (pasted.sum(axis=1) <= 1).all()  # visible masks of the pastes are disjoint
    changed = (out["images"] != given["images"]).any(axis=-1)
    assert not (changed & ~near(covered)).any()  # no pixel changes away from a pasted mask
    assert changed.sum() > 0.5 * covered.sum()  # ... and the masks are where the pixels changed
    assert np.array_equal(out["masks"][:, :N], given["masks"] & ~covered[:, None])
    tight, nonempty = boxes_from_masks(torch.from_numpy(out["masks"]))
    assert np.array_equal(out["boxes"], tight.numpy())  # the given boxes were tight, so all are
    assert not (out["valid"] & ~nonempty.numpy()).any()
    assert not out["valid"][:, :N][~given["valid"]].any()  # padding instances stay invalid
    crop_classes = np.asarray(sample_coco_bank.crop_class_ids)[out["crop_indices"]]
    assert np.array_equal(out["labels"], np.concatenate([given["labels"], crop_classes + 100], axis=1))
    expected = given["semantic"].astype(np.int64)
    for bi, ki in zip(*np.nonzero(pasted.any(axis=(2, 3)))):
        expected[bi][pasted[bi, ki]] = crop_classes[bi, ki] + 100
    assert out["semantic"].dtype == np.uint8 and np.array_equal(out["semantic"], expected)


def test_a_batch_is_what_bank_copy_paste_gives_for_the_same_draw(sample_coco_bank):
    """The numpy, channels-last path is the torch path: same crops and plan, same outputs."""
    source = Batches()
    paste = BankPaste(source, sample_coco_bank, k=K, seed=5)  # default config: Gaussian blend
    out = paste.batch(2)
    given = source[2]
    rng = paste.generator(2)
    indices = paste.sampler.draw(rng, given["images"].shape[0])
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    crops = {key: torch.from_numpy(v) for key, v in paste.sampler.numpy_batch(indices).items()}
    module = BankCopyPaste(CopyPasteConfig())
    module.set_bank_batch(BankBatch(**crops, num_classes=len(sample_coco_bank.class_names)))
    ref = module(
        torch.from_numpy(given["images"]).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(given["masks"]),
        boxes=torch.from_numpy(given["boxes"]),
        labels=torch.from_numpy(given["labels"]),
        valid=torch.from_numpy(given["valid"]),
        semantic=torch.from_numpy(given["semantic"]),
        generator=generator,
    )
    assert np.array_equal(out["crop_indices"], indices)
    assert np.array_equal(out["images"], ref["images"].permute(0, 2, 3, 1).numpy())
    for key in ("masks", "boxes", "labels", "valid", "semantic"):
        assert np.array_equal(out[key], ref[key].numpy()), key


class Remembered:
    """A source that keeps weak references to the arrays it hands out (which keeps them alive only
    as long as someone else does): lets a test see whether a batch was painted in place."""

    def __init__(self, source):
        self.source, self.handed = source, {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        batch = self.source[i]
        self.handed[i] = {key: weakref.ref(a) for key, a in batch.items()}
        return batch


def test_a_batch_only_the_loader_holds_is_painted_in_place(sample_coco_bank):
    """The guide's source makes new arrays per batch and forgets them: those images and that map
    are painted, not copied, and the batch is the one ``paste`` (never in place) gives."""
    source = Remembered(Batches())
    paste = BankPaste(source, sample_coco_bank, k=K, seed=5)
    out = paste.batch(1)
    handed = source.handed[1]
    assert np.shares_memory(out["images"], handed["images"]())
    assert np.shares_memory(out["semantic"], handed["semantic"]())
    assert_same(out, paste.paste(Batches().make(1), 1))


def held_sources(data):
    """Sources whose batches someone else still holds: slices of an in-memory data set, a cache
    of batch dicts, arrays the source also keeps, a map held apart from fresh images."""
    cache = {}

    def cached(i):
        return cache.setdefault(i, data.make(i))

    kept = {}

    def keeps_images(i):
        return {**data.make(i), "images": kept.setdefault(i, data.make(i)["images"])}

    maps = [data.make(i)["semantic"] for i in range(3)]
    everything = [data.make(i) for i in range(3)]
    stacked = {key: np.concatenate([b[key] for b in everything]) for key in everything[0]}
    return {
        "slices of an in-memory data set": lambda i: {key: a[3 * i : 3 * i + 3] for key, a in stacked.items()},
        "a cache of batches": cached,
        "images the source keeps": keeps_images,
        "a semantic map held apart": lambda i: {**data.make(i), "semantic": maps[i]},
    }


@pytest.mark.parametrize("kind", list(held_sources(Batches())))
def test_batches_someone_else_holds_are_never_painted(sample_coco_bank, kind):
    data = Batches()
    source = held_sources(data)[kind]
    before = [{key: a.copy() for key, a in source(i).items()} for i in range(3)]
    paste = BankPaste(source, sample_coco_bank, k=K, steps=3, seed=5)
    for i in range(3):
        assert_same(paste.batch(i), paste.paste(data.make(i), i))
        for key, a in source(i).items():
            assert np.array_equal(a, before[i][key]), (kind, i, key)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float_images_and_a_trailing_semantic_axis(sample_coco_bank, dtype):
    source = Batches(image_dtype=dtype, semantic_shape="bhw1")
    out = BankPaste(source, sample_coco_bank, k=K, config=HARD).batch(0)
    given = source[0]
    assert out["images"].dtype == dtype and out["semantic"].shape == (3, H, W, 1)
    assert 0 <= out["images"].min() and out["images"].max() <= 1
    covered = out["masks"][:, N:].any(axis=1)
    changed = (out["images"] != given["images"]).any(axis=-1)
    assert covered.any() and not (changed & ~near(covered)).any()
    assert not ((out["semantic"] != given["semantic"])[..., 0] & ~covered).any()


def test_images_in_0_255_as_floats_with_their_declared_range(sample_coco_bank):
    source = Batches(image_dtype=np.float32)
    as_255 = lambda i: {**source[i], "images": source[i]["images"] * 255}  # noqa: E731
    config = CopyPasteConfig(blend="hard", value_range=255.0)
    out = BankPaste(as_255, sample_coco_bank, k=K, steps=2, config=config).batch(0)
    assert out["images"].max() > 1 and out["images"].max() <= 255
    with pytest.raises(ValueError, match=r"images \[3, 67, 83, 3\] float32 hold values in \[0, 255\], outside the declared range \[0, 1\]"):
        BankPaste(as_255, sample_coco_bank, k=K, steps=2).batch(0)


def test_semantic_only_and_images_only_sources(sample_coco_bank):
    source = Batches()
    only_semantic = lambda i: {"images": source[i]["images"], "semantic": source[i]["semantic"]}  # noqa: E731
    out = BankPaste(only_semantic, sample_coco_bank, k=K, steps=1, output="semantic")[0]
    assert isinstance(out, tuple) and out[0].shape == (3, H, W, 3) and out[1].shape == (3, H, W)
    assert (out[1] != source[0]["semantic"]).any()
    only_images = BankPaste(lambda i: {"images": source[i]["images"]}, sample_coco_bank, k=K, steps=1).batch(0)
    assert sorted(only_images) == ["crop_indices", "images"]
    assert (only_images["images"] != source[0]["images"]).any()


def test_an_empty_batch(sample_coco_bank):
    source = Batches(size=0)
    out = BankPaste(source, sample_coco_bank, k=K).batch(0)
    assert out["images"].shape == (0, H, W, 3) and out["masks"].shape == (0, N + K, H, W)
    assert out["labels"].shape == out["valid"].shape == (0, N + K) and out["crop_indices"].shape == (0, K)


# ------------------------------------------------------------------------------------------------
# reproducible, whoever makes the batch


def test_batches_depend_on_seed_epoch_and_index_only(sample_coco_bank):
    source = Batches()
    first = BankPaste(source, sample_coco_bank, k=K, seed=11)
    second = BankPaste(Batches(), sample_coco_bank, k=K, seed=11)
    backwards = [second.batch(i) for i in reversed(range(3))][::-1]  # asked in another order
    for i in range(3):
        assert_same(first.batch(i), backwards[i])
    assert not np.array_equal(first.batch(0)["crop_indices"], first.batch(1)["crop_indices"])
    other_seed = BankPaste(source, sample_coco_bank, k=K, seed=12).batch(0)
    assert not np.array_equal(first.batch(0)["images"], other_seed["images"])
    again = pickle.loads(pickle.dumps(first))  # how a spawn/forkserver worker receives it
    assert_same(first.batch(1), again.batch(1))
    epoch0 = first.batch(0)
    first.on_epoch_end()
    assert first.epoch == 1 and source.epochs_ended == 1  # forwarded: the source may reshuffle
    assert not np.array_equal(epoch0["crop_indices"], first.batch(0)["crop_indices"])
    assert_same(first.batch(0), first.batch(0, epoch=1))
    assert_same(epoch0, first.batch(0, epoch=0))


def keras_epoch(dataset) -> list[dict]:
    """One epoch of ``dataset`` as ``model.fit`` reads it: Keras's own adapter, which runs the
    ``workers`` (threads, or processes with ``use_multiprocessing``) through its enqueuer."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(dataset)
    adapter.on_epoch_begin()
    batches = list(adapter.get_numpy_iterator())
    adapter.on_epoch_end()
    return batches


@pytest.fixture(scope="module")
def keras():
    return importlib.import_module("keras")


def test_keras_workers_threads_and_processes_give_the_same_batches(sample_coco_bank, tmp_path, keras):
    from instbank.integrations.keras import BankPasteDataset

    assert issubclass(BankPasteDataset, keras.utils.PyDataset)
    runs = {}
    for workers, processes in ((0, False), (2, False), (2, True)):
        log = tmp_path / f"{workers}-{processes}"
        log.mkdir()
        dataset = BankPasteDataset(Batches(steps=4, log=log), sample_coco_bank.path, k=K, seed=4,
                                   workers=workers, use_multiprocessing=processes)
        runs[workers, processes] = [keras_epoch(dataset), keras_epoch(dataset)]  # two epochs
        assert dataset.epoch == 2 and dataset.source.epochs_ended == 2
        makers = {int(name.split("-")[0]) for name in os.listdir(log)}
        assert (os.getpid() not in makers) if processes else makers == {os.getpid()}
    again = pickle.loads(pickle.dumps(dataset))  # the Keras class too, as spawn would send it
    assert type(again) is BankPasteDataset and again.workers == 2 and again.use_multiprocessing
    assert_same(again.batch(1, epoch=0), runs[0, False][0][1])
    reference = runs[0, False]
    assert len(reference[0]) == 4
    assert not np.array_equal(reference[0][0]["crop_indices"], reference[1][0]["crop_indices"])
    for run in runs.values():
        for epoch, batches in enumerate(run):
            for i, batch in enumerate(batches):
                assert_same(reference[epoch][i], batch)


def test_output_semantic_pair_feeds_model_fit(sample_coco_bank, keras):
    from instbank.integrations.keras import BankPasteDataset

    source = Batches(steps=2)
    only_semantic = [{"images": source[i]["images"], "semantic": source[i]["semantic"]} for i in range(2)]
    dataset = BankPasteDataset(only_semantic, sample_coco_bank, k=K, output="semantic")
    inputs = keras.Input((H, W, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(256, 1)(keras.layers.Rescaling(1 / 255)(inputs)))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(dataset, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert dataset.epoch >= 2  # fit ended each epoch (Keras 3.15 also calls on_epoch_end before the first)


# ------------------------------------------------------------------------------------------------
# bad input: one line naming the array and its shape


def bad(**changes):
    batch = Batches()[0]
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


@pytest.mark.parametrize(
    "batch, message",
    [
        (bad(images=np.zeros((3, 3, H, W), np.uint8)), r"images must be \[B, H, W, 3\], got \[3, 3, 67, 83\] \(channels first"),
        (bad(images=np.zeros((3, H, W), np.uint8)), r"images must be \[B, H, W, 3\], got \[3, 67, 83\]"),
        (bad(images=np.zeros((3, H, W, 3), np.float64)), r"images \[3, 67, 83, 3\] must be uint8, float16 or float32, got float64"),
        (bad(images=np.full((3, H, W, 3), 1.5, np.float32)), r"images \[3, 67, 83, 3\] float32 hold values in \[1.5, 1.5\], outside"),
        (bad(images=np.full((3, H, W, 3), np.nan, np.float32)), r"images \[3, 67, 83, 3\] float32 hold values in \[nan"),
        (bad(masks=np.zeros((3, N, H - 1, W), bool)), r"masks must be \[B=3, N, H=67, W=83\] like the images, got \[3, 3, 66, 83\]"),
        (bad(masks=np.zeros((3, H, W, N), bool)), r"masks must be .* got \[3, 67, 83, 3\]"),
        (bad(masks=np.zeros((3, N, H, W), np.float32)), r"masks \[3, 3, 67, 83\] must be bool or integer, got float32"),
        (bad(labels=None), r"masks \[3, 3, 67, 83\] need labels \[B=3, N=3\]"),
        (bad(labels=np.zeros((3, 2), np.int64)), r"labels must be \[3, 3\] to match masks \[3, 3, 67, 83\], got \[3, 2\]"),
        (bad(masks=None), r"boxes/labels/valid given without masks \[B, N, H, W\]"),
        (bad(semantic=np.zeros((3, W, H), np.uint8)), r"semantic must be \[B=3, H=67, W=83\] or \[3, 67, 83, 1\] like the images, got \[3, 83, 67\]"),
        (bad(semantic=np.zeros((3, H, W), np.float32)), r"semantic \[3, 67, 83\] must be an integer class map, got float32"),
        (bad(images=None), r"source batch must be a dict with 'images'"),
    ],
)
def test_bad_arrays_are_named_with_their_shape(sample_coco_bank, batch, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        BankPaste([batch], sample_coco_bank, k=K).batch(0)
    assert "\n" not in str(info.value)


def test_crops_larger_than_the_images_and_labels_too_wide_for_the_semantic_map(sample_coco_bank):
    small = {"images": np.zeros((2, 40, 90, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"sample-coco: crops are 64x64, larger than images \[2, 40, 90, 3\]; build the bank with --size <= 40"):
        BankPaste([small], sample_coco_bank, k=K).batch(0)
    wide = np.arange(len(sample_coco_bank.class_names)) + 250
    batch = bad()
    with pytest.raises(ValueError, match=r"semantic \[3, 67, 83\] uint8 cannot hold the pasted labels 250..329"):
        BankPaste([batch], sample_coco_bank, k=K, label_map=wide).batch(0)
    batch["semantic"] = batch["semantic"].astype(np.int16)
    assert BankPaste([batch], sample_coco_bank, k=K, label_map=wide).batch(0)["semantic"].max() >= 250


def test_bad_arguments(sample_coco_bank):
    with pytest.raises(ValueError, match=r"label_map must be integer \[80\]"):
        BankPaste([], sample_coco_bank, label_map=np.arange(3))
    with pytest.raises(ValueError, match="output must be a callable or one of dict, semantic"):
        BankPaste([], sample_coco_bank, output="tuple")
    with pytest.raises(TypeError, match="source must be a sequence of batches or a callable"):
        BankPaste(3, sample_coco_bank)
    with pytest.raises(ValueError, match="needs a source batch with a 'semantic' map"):
        BankPaste([{"images": bad()["images"]}], sample_coco_bank, output="semantic")[0]
    with pytest.raises(IndexError, match=r"batch index 1 out of range 0..0"):
        BankPaste([bad()], sample_coco_bank).batch(1)


# ------------------------------------------------------------------------------------------------
# the example


def test_keras_example_trains_a_few_steps_on_the_torch_backend(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--steps", "3", "--epochs", "1", "--batch-size", "2", "--size", "96", "--k", "3"]
    done = subprocess.run([sys.executable, str(REPO / "examples" / "keras_segmentation.py"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend torch" in done.stdout
    assert "trained 1 epoch(s) x 3 steps of 2 images with 3 pasted crops each; loss per epoch: " in done.stdout
