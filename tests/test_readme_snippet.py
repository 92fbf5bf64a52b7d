"""The README's training-loop snippet runs as written, on the CPU: the test supplies what the
snippet says is the reader's (``train_loader``, ``model``) and a bank at ``banks/coco``, swaps the
device line, and checks what the model was given."""

from __future__ import annotations

import os
import re

import torch

from conftest import REPO
from instbank.paste.plan import tight_boxes

DEVICE_LINE = 'device = "cuda"'
B, N, SIZE, STEPS = 16, 3, 96, 2  # B: the snippet's batch_size


def readme_training_snippet() -> str:
    """The python block of README.md that pastes with ``BankCopyPaste`` in a loop."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    found = [b for b in blocks if "BankCopyPaste(" in b and "for " in b]
    assert len(found) == 1, "README.md should hold exactly one training-loop snippet"
    return found[0]


def train_batches(generator: torch.Generator) -> list:
    """``STEPS`` batches of ``(images uint8 [B, 3, S, S], masks bool [B, N, S, S], labels [B, N])``:
    rectangles at random places, the last one of each image left empty (a padded slot)."""
    batches = []
    for _ in range(STEPS):
        images = torch.randint(0, 256, (B, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        masks = torch.zeros((B, N, SIZE, SIZE), dtype=torch.bool)
        corners = torch.randint(0, SIZE // 2, (B, N - 1, 2), generator=generator)
        for b in range(B):
            for i, (x, y) in enumerate(corners[b].tolist()):
                masks[b, i, y : y + SIZE // 3, x : x + SIZE // 4] = True
        labels = torch.randint(0, 5, (B, N), generator=generator)
        batches.append((images, masks, labels))
    return batches


class RecordingModel(torch.nn.Module):
    """Returns a differentiable loss and keeps what it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, images, masks, boxes, labels, valid):
        self.seen.append((images, masks, boxes, labels, valid))
        return self.weight * images.float().mean()


def test_readme_training_loop_runs_as_written_on_cpu(sample_coco_bank, tmp_path, monkeypatch):
    snippet = readme_training_snippet()
    assert snippet.count(DEVICE_LINE) == 1, f"the snippet should choose its device in one line: {DEVICE_LINE}"
    (tmp_path / "banks").mkdir()
    os.symlink(sample_coco_bank.path, tmp_path / "banks" / "coco")
    monkeypatch.chdir(tmp_path)
    model = RecordingModel()
    namespace = {"train_loader": train_batches(torch.Generator().manual_seed(0)), "model": model}
    exec(compile(snippet.replace(DEVICE_LINE, 'device = "cpu"'), "README.md", "exec"), namespace)

    assert len(model.seen) == STEPS
    assert model.weight.item() != 1.0  # the optimizer stepped
    k = 8  # the snippet's k
    for images, masks, boxes, labels, valid in model.seen:
        assert images.shape == (B, 3, SIZE, SIZE) and masks.shape == (B, N + k, SIZE, SIZE)
        assert boxes.shape == (B, N + k, 4) and labels.shape == valid.shape == (B, N + k)
        assert torch.equal(boxes[valid], tight_boxes(masks)[valid])
        assert not valid[:, N - 1].any()  # the empty slot stays invalid
        assert set(labels[:, N:].flatten().tolist()) <= set(range(len(sample_coco_bank.class_names)))
        assert valid[:, N:].sum() >= B  # crops were really pasted
