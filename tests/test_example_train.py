"""examples/train.py: a few real training steps on the shipped COCO sample under fork and spawn
workers, and every batch the model saw checked afterwards (its ``--dump``): masks, boxes, labels,
validity and the semantic map agree with each other, with the padding, and with the staged crops."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO

EXAMPLE = REPO / "examples" / "train.py"
IGNORE = -100  # examples/train.py's semantic value of padding
NUM_CLASSES = 80  # the shipped sample's COCO categories; background is painted as this id


def load_example():
    spec = importlib.util.spec_from_file_location("instbank_example_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def check_batch(saved: dict) -> dict:
    """Assert one step's batch is consistent; return counts for the caller's non-vacuity check."""
    masks, boxes, labels, valid = saved["masks"], saved["boxes"], saved["labels"], saved["valid"]
    semantic, padding, staged = saved["semantic"], saved["padding_mask"], saved["staged_class_ids"]
    images, n = saved["images"], saved["existing"]
    b, total, h, w = masks.shape
    k = staged.shape[1]
    assert masks.dtype == torch.bool and total == n + k
    assert boxes.shape == (b, total, 4) and labels.shape == valid.shape == (b, total)
    assert semantic.shape == padding.shape == (b, h, w) and images.shape == (b, 3, h, w)
    # the pastes carry the staged crops' classes, in order
    assert torch.equal(labels[:, n:], staged) and torch.equal(saved["paste_labels"], staged)
    assert torch.equal(saved["paste_masks"], masks[:, n:]) and torch.equal(saved["paste_valid"], valid[:, n:])
    for i in range(b):
        for j in range(total):
            if valid[i, j]:
                assert masks[i, j].any(), f"valid instance {j} of image {i} has an empty mask"
                assert boxes[i, j].tolist() == tight_box(masks[i, j]), f"box of instance {j} of image {i} is not tight"
    # nothing in the padding; pastes disjoint from each other and from what they cover
    assert not (masks & padding[:, None]).any()
    assert (images * padding[:, None]).eq(0).all()
    pasted, existing = masks[:, n:], masks[:, :n]
    assert (pasted.sum(dim=1) <= 1).all()
    assert not (existing & pasted.any(dim=1, keepdim=True)).any()
    # the semantic map: padding ignored, each paste's class where it shows, existing classes
    # under the existing masks, background elsewhere
    assert (semantic[padding] == IGNORE).all() and (semantic[~padding] != IGNORE).all()
    for i in range(b):
        for j in range(k):
            assert (semantic[i][pasted[i, j]] == staged[i, j]).all()
        under = existing[i].any(dim=0)
        if n:
            allowed = torch.tensor(sorted(set(labels[i, :n][existing[i].flatten(1).any(dim=1)].tolist())) or [-1])
            assert torch.isin(semantic[i][under], allowed).all()
        free = ~padding[i] & ~under & ~pasted[i].any(dim=0)
        assert (semantic[i][free] == NUM_CLASSES).all()
    return {"valid_pastes": int(valid[:, n:].sum()), "existing": int(valid[:, :n].sum())}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_training_steps_see_aligned_batches(sample_coco_bank, tmp_path, start_method):
    steps = 3
    result = run_example(
        "--bank", str(sample_coco_bank.path), "--size", "128", "--batch-size", "2", "--k", "4",
        "--steps", str(steps), "--workers", "1", "--bank-workers", "1", "--start-method", start_method,
        "--dump", str(tmp_path), "--seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == steps
    for line in step_lines:
        for field in ("loss", "wait", "staging", "paste", "fwd+bwd", "paste share"):
            assert field in line, line
    assert lines[-1].startswith(f"median of steps 2..{steps}")
    dumps = sorted(tmp_path.glob("step*.pt"))
    assert len(dumps) == steps
    counts = [check_batch(torch.load(path)) for path in dumps]
    # not vacuous: objects were pasted and real instances survived beside them
    assert sum(c["valid_pastes"] for c in counts) >= steps
    assert sum(c["existing"] for c in counts) >= 1


@pytest.mark.parametrize("seed", range(6))
def test_instance_warp_is_the_full_mask_warp(seed):
    """``warp_instance`` warps only a mask's box, into the rectangle it lands on; placed back it is
    exactly the full-image mask warped by the image's own matrix (so masks and pixels stay
    aligned), clipped to the valid region."""
    import numpy as np

    module = load_example()
    rng = np.random.default_rng(seed)
    height, width, size = 37, 53, int(rng.integers(24, 80))
    x0, y0 = int(rng.integers(0, 40)), int(rng.integers(0, 25))
    box = (rng.random((int(rng.integers(3, 12)), int(rng.integers(3, 13)))) < 0.7).astype(np.uint8) * 255
    box = box[: height - y0, : width - x0]
    full = np.zeros((height, width), np.uint8)
    full[y0 : y0 + box.shape[0], x0 : x0 + box.shape[1]] = box
    matrix, (vw, vh) = module.jitter_transform(height, width, size, float(rng.uniform(0.1, 2.0)), rng.random(2))
    expected = module.cv2.warpAffine(full, matrix, (size, size), flags=module.cv2.INTER_LINEAR, borderValue=0) >= 128
    expected[vh:], expected[:, vw:] = False, False
    got = np.zeros((size, size), bool)
    found = module.warp_instance(box, x0, y0, matrix, (vw, vh))
    if found is not None:
        part, rx, ry = found
        got[ry : ry + part.shape[0], rx : rx + part.shape[1]] = part
    np.testing.assert_array_equal(got, expected)


def one_line_error(capsys, module, *argv: str) -> str:
    assert module.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_missing_cuda_device_is_one_line(capsys, sample_coco_bank):
    module = load_example()
    err = one_line_error(capsys, module, "--device", "cuda:99", "--bank", str(sample_coco_bank.path))
    assert "--device cuda:99" in err


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_maskrcnn_without_torchvision_is_one_line(capsys, sample_coco_bank):
    err = one_line_error(capsys, load_example(), "--model", "maskrcnn", "--bank", str(sample_coco_bank.path))
    assert "--model maskrcnn needs torchvision" in err


def test_crops_larger_than_the_images_are_one_line(capsys, sample_coco_bank):
    err = one_line_error(capsys, load_example(), "--size", "48", "--bank", str(sample_coco_bank.path))
    assert "64x64 crops, larger than the 48x48 training images" in err


def test_bank_of_other_classes_is_one_line(capsys, tmp_path):
    from instbank.testing import write_synthetic_bank

    bank = write_synthetic_bank(tmp_path / "bank", 20, size=16)
    err = one_line_error(capsys, load_example(), "--size", "64", "--bank", str(bank.path))
    assert "build the bank from the same data set" in err


def test_missing_annotations_are_one_line_from_the_command_line(tmp_path):
    result = run_example("--coco", str(tmp_path / "nope.json"), "--bank", str(tmp_path / "bank"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --coco {tmp_path / 'nope.json'}: no such file"
