"""Semantic segmentation in Keras 3 with bank copy-paste in the data loader (numpy, on the CPU).

The loader is the usual Keras one (the AlbumentationsX guide's): a sequence whose ``__getitem__``
reads a batch of images and their masks from disk and augments them outside the graph, here a
random horizontal flip. ``BankPasteDataset`` wraps it: every batch also gets ``--k`` crops per image
from an instance bank, drawn class balanced, pasted with the numba kernel, and the semantic map is
painted under them. The model is a few conv layers trained for ``--steps`` on the COCO sample
shipped in ``data/sample/coco`` (8 images, 80 classes + background).

Any Keras 3 backend; without ``KERAS_BACKEND`` set, torch (no tensorflow needed)::

    .venv/bin/python examples/keras_segmentation.py --steps 20 --epochs 3
    KERAS_BACKEND=tensorflow .venv/bin/python examples/keras_segmentation.py --steps 20 --epochs 3
    .venv/bin/python examples/keras_segmentation.py --workers 2 --multiprocessing --bank out/demo-bank
    KERAS_BACKEND=tensorflow .venv/bin/python examples/keras_segmentation.py --tf-data

``--tf-data`` feeds ``model.fit`` a ``tf.data.Dataset`` (``instbank.integrations.keras.tf_dataset``)
instead of the ``PyDataset``: the same batches; it needs tensorflow, whatever the backend.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # read once, when keras is imported

import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

import instbank  # noqa: E402
from instbank.integrations.keras import BankPaste, BankPasteDataset, tf_dataset  # noqa: E402
from instbank.paste import CopyPasteConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "coco" / "annotations.json"


class CocoSemanticBatches:
    """The user's own loader: batch ``i`` is ``{"images": uint8 [B, S, S, 3], "semantic": uint8
    [B, S, S]}`` (0 background, ``1 + contiguous class id`` for objects: ascending COCO category id,
    the bank's order), images read from disk and resized, flipped at random; a new order each epoch.
    """

    def __init__(self, annotations: Path, batch_size: int, size: int, steps: int, seed: int = 0):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO(str(annotations))
        self.root = annotations.parent / "images"
        self.ids = sorted(self.coco.getImgIds())
        self.label_of = {cat: i + 1 for i, cat in enumerate(sorted(self.coco.getCatIds()))}
        self.num_classes = len(self.label_of) + 1
        self.batch_size, self.size, self.steps, self.seed = batch_size, size, steps, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.ids))
        picks = [self.ids[order[(i * self.batch_size + j) % len(self.ids)]] for j in range(self.batch_size)]
        images, maps = zip(*(self.load(image_id, rng.random() < 0.5) for image_id in picks))
        return {"images": np.stack(images), "semantic": np.stack(maps)}

    def load(self, image_id: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        info = self.coco.loadImgs(image_id)[0]
        rgb = cv2.cvtColor(cv2.imread(str(self.root / info["file_name"])), cv2.COLOR_BGR2RGB)
        semantic = np.zeros(rgb.shape[:2], np.uint8)
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)):
            semantic[self.coco.annToMask(ann) > 0] = self.label_of[ann["category_id"]]
        size = (self.size, self.size)
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        semantic = cv2.resize(semantic, size, interpolation=cv2.INTER_NEAREST)
        return (rgb[:, ::-1], semantic[:, ::-1]) if flip else (rgb, semantic)

    def on_epoch_end(self) -> None:
        self.epoch += 1


def small_model(size: int, num_classes: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    # logits: with a softmax layer, the sparse cross-entropy's backward fails on Keras 3.15 with
    # torch 2.13 ("grad_input must be contiguous"); from_logits is also the stabler form
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


def sample_bank(out: Path, size: int):
    """Build the bank of the shipped COCO sample (what ``instbank build --coco ... --size`` does)."""
    from instbank.build import BuildConfig, build_bank
    from instbank.formats.coco import read_coco

    build_bank(read_coco(SAMPLE), out, BuildConfig(size=size), workers=1)
    return instbank.open_bank(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (batches) per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="side of the square training images")
    parser.add_argument("--k", type=int, default=4, help="bank crops pasted per image")
    parser.add_argument("--bank", type=Path, help="an instance bank (default: build the sample's, crops of --size / 2)")
    parser.add_argument("--coco", type=Path, default=SAMPLE, help="COCO json whose images/ folder sits beside it")
    parser.add_argument("--workers", type=int, default=1, help="Keras PyDataset workers")
    parser.add_argument("--multiprocessing", action="store_true", help="workers are processes, not threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf-data", action="store_true", help="a tf.data.Dataset instead of the PyDataset")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        bank = instbank.open_bank(args.bank) if args.bank else sample_bank(Path(tmp) / "bank", args.size // 2)
        source = CocoSemanticBatches(args.coco, args.batch_size, args.size, args.steps, args.seed)
        options = dict(
            k=args.k,
            config=CopyPasteConfig(scale_range=(0.1, 0.5), blend="gaussian"),
            weighting="class_balanced",
            seed=args.seed,
            label_map=np.arange(len(bank.class_names)) + 1,  # the source's labels: 0 is background
            output="semantic",  # (images, semantic) pairs for fit
        )
        if args.tf_data:
            import tensorflow as tf

            train = tf_dataset(BankPaste(source, bank, **options)).prefetch(tf.data.AUTOTUNE)
        else:
            train = BankPasteDataset(source, bank, **options, workers=args.workers, use_multiprocessing=args.multiprocessing)
        model = small_model(args.size, source.num_classes)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        loader = "tf.data" if args.tf_data else "PyDataset"
        print(f"keras {keras.__version__}, backend {keras.backend.backend()}, {loader}; bank {bank.path} ({len(bank)} crops)")
        history = model.fit(train, epochs=args.epochs, verbose=2, shuffle=False)  # the source shuffles each epoch
        losses = history.history["loss"]
        print(f"trained {args.epochs} epoch(s) x {args.steps} steps of {args.batch_size} images with "
              f"{args.k} pasted crops each; loss per epoch: {', '.join(f'{v:.4f}' for v in losses)}")
        return 0 if np.isfinite(losses).all() else 1


if __name__ == "__main__":
    sys.exit(main())
