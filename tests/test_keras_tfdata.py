"""instbank.integrations.keras.tf_dataset: tf.data gives BankPaste's batches, one epoch per pass.

tensorflow is not a dependency of instbank (about 600 MB): the test skips where it is not
installed. It runs in a subprocess so that tensorflow's threads are never inside the pytest
process that later tests fork.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
from instbank.integrations.keras import BankPaste, tf_dataset

H, W = 70, 90

def source(i):
    rng = np.random.default_rng(i)
    masks = np.zeros((2, 1, H, W), bool)
    masks[:, 0, 10:40, 20:60] = True
    return {"images": rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8), "masks": masks,
            "labels": np.array([[3], [4]]), "semantic": np.where(masks[:, 0], 3, 0).astype(np.int32)}

paste = BankPaste(source, sys.argv[1], k=3, steps=3, seed=1)
reference = BankPaste(source, sys.argv[1], k=3, steps=3, seed=1)
dataset = tf_dataset(paste).prefetch(2)
spec = dataset.element_spec
assert spec["images"].shape.as_list() == [None, H, W, 3] and spec["masks"].shape.as_list() == [None, None, H, W]
assert spec["crop_indices"].shape.as_list() == [None, 3] and spec["semantic"].dtype == tf.int32
assert int(dataset.cardinality()) == 3
for epoch in range(2):
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 3
    for i, got in enumerate(batches):
        want = reference.batch(i, epoch=epoch)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (epoch, i, key)
assert paste.epoch == 2
assert not np.array_equal(reference.batch(0, epoch=0)["crop_indices"], reference.batch(0, epoch=1)["crop_indices"])
pairs = BankPaste(source, sys.argv[1], k=3, steps=2, output="semantic")
images, semantic = next(iter(tf_dataset(pairs)))
assert images.shape == (2, H, W, 3) and semantic.shape == (2, H, W)
print("tf.data ok", tf.__version__)
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_tf_dataset_yields_the_same_batches_epoch_after_epoch(sample_coco_bank):
    # tensorflow 2.21 imported before Triton aborts the process (both register LLVM's options);
    # with KERAS_BACKEND=torch (set by test_keras.py) tensorflow's keras import pulls Triton in
    # through torch._dynamo, so the tf.data process gets the tensorflow backend.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(sample_coco_bank.path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tf.data ok" in done.stdout
