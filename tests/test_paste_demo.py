"""instbank paste-demo: letterboxed batch, a real BankCopyPaste run on the shipped sample, the PNG,
the CLI command."""

from __future__ import annotations

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import SAMPLE, SAMPLE_COCO, assert_rich_png
from instbank.cli import app
from instbank.errors import InputError
from instbank.paste_demo import DemoImage, coco_images, folder_images, letterbox_batch, paste_batch, render_paste_demo

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sample_images():
    return coco_images(SAMPLE_COCO, None, 2)


def test_coco_images_carry_their_instances(sample_images):
    images, names = sample_images
    assert len(images) == 2 and len(names) == 80
    for im in images:
        h, w, _ = im.pixels.shape
        assert im.masks.shape == (len(im.labels), h, w) and im.masks.any(axis=(1, 2)).all()
        assert im.name.startswith("image ")


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 60), st.integers(8, 60), st.integers(0, 2**32 - 1))
def test_letterbox_keeps_content_top_left_and_masks_out_of_padding(h, w, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((2, h, w)) < 0.3
    im = DemoImage("x", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), masks, np.array([3, 5]))
    batch = letterbox_batch([im, DemoImage("y", im.pixels[:4, :4], masks[:1, :4, :4], np.array([1]))], canvas=32)
    nh, nw = batch.sizes[0]
    s = 32 / max(h, w)
    assert max(nh, nw) == 32 and abs(nh - h * s) <= 0.5 and abs(nw - w * s) <= 0.5  # aspect kept
    padding = batch.padding[0].numpy()
    assert not padding[:nh, :nw].any() and padding.sum() == 32 * 32 - nh * nw
    assert not (batch.masks[0].numpy() & padding).any()
    assert batch.labels.tolist()[1] == [1, 0] and batch.valid[1, 1].item() is False  # second row padded


def test_paste_batch_pastes_outside_padding_and_keeps_annotations_aligned(sample_coco_bank, sample_images):
    images, _ = sample_images
    batch = letterbox_batch(images, canvas=128)
    out = paste_batch(sample_coco_bank, batch, k=3, seed=0)
    n = batch.masks.shape[1]
    assert out["masks"].shape == (2, n + 3, 128, 128) and out["labels"].shape == out["valid"].shape == (2, n + 3)
    assert (out["labels"][:, :n] == batch.labels).all()
    assert torch.isin(out["paste_labels"], torch.as_tensor(np.ascontiguousarray(sample_coco_bank.crop_class_ids))).all()
    # nothing is pasted into the letterbox padding: its pixels stay black, no mask reaches it
    assert (out["images"].permute(0, 2, 3, 1)[batch.padding] == 0).all()
    assert not (out["masks"] & batch.padding[:, None]).any()
    # every valid paste's box is its visible mask's tight box; existing masks lost what the pastes cover
    from instbank.paste.annotations import boxes_from_masks

    tight, nonempty = boxes_from_masks(out["paste_masks"])
    assert (out["paste_boxes"][out["paste_valid"]] == tight[out["paste_valid"]]).all()
    covered = out["paste_masks"].any(dim=1)
    assert not (out["masks"][:, :n] & covered[:, None]).any()
    assert (out["paste_valid"] <= nonempty).all()


def test_render_coco_demo(sample_coco_bank, tmp_path):
    result = render_paste_demo(sample_coco_bank.path, tmp_path / "d" / "demo.png", coco=SAMPLE_COCO, n=2, k=3, canvas=160)
    assert result.png == tmp_path / "d" / "demo.png" and (result.images, result.staged) == (2, 6)
    assert 0 < result.pasted <= 6 and result.refit + result.dropped <= 6  # the first two images hold 6 instances
    with Image.open(result.png) as im:
        assert im.width == 2 * 160 + 3 * 8 and im.height > 2 * 100
    assert_rich_png(result.png)


def test_folder_images_and_errors(tmp_path):
    folder = SAMPLE / "yolo" / "images" / "train"
    images = folder_images(folder, 2)
    assert len(images) == 2 and all(len(im.labels) == 0 for im in images)
    assert [im.name for im in images] == sorted(p.name for p in folder.iterdir())[:2]
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no decodable image"):
        folder_images(tmp_path, 2)
    with pytest.raises(InputError, match="not a directory"):
        folder_images(tmp_path / "missing", 2)


def test_cli_paste_demo(sample_coco_bank, tmp_path):
    cmd = ["paste-demo", str(sample_coco_bank.path), "--out", str(tmp_path / "p.png")]
    ok = CliRunner().invoke(app, cmd + ["--images", str(SAMPLE / "yolo" / "images" / "val"), "--n", "1", "--k", "2", "--size", "96"])
    assert ok.exit_code == 0, ok.output
    assert "(1 image; " in ok.output and "of 2 pastes visible; existing instances: 0 boxes refit, 0 dropped" in ok.output
    assert_rich_png(tmp_path / "p.png", min_colours=300)
    bad = CliRunner().invoke(app, cmd)
    assert isinstance(bad.exception, InputError) and str(bad.exception) == "paste-demo: give --coco ANN.json or --images DIR"


def test_render_demo_with_keypoints_panoptic_and_in_batch(sample_coco_bank, tmp_path):
    """The targets beyond masks: synthetic person keypoints (the sample has none), a third panel with
    the panoptic map, objects of the batch's other images."""
    from instbank.paste_demo import main

    result = render_paste_demo(sample_coco_bank.path, tmp_path / "t.png", coco=SAMPLE_COCO, n=2, k=3, canvas=160,
                               keypoints=True, panoptic=True)
    assert result.images == 2 and result.pasted > 0
    width = Image.open(result.png).size[0]
    assert width == 3 * 160 + 4 * 8  # three panels per row
    assert_rich_png(result.png)
    main([str(sample_coco_bank.path), "--coco", str(SAMPLE_COCO), "--out", str(tmp_path / "b.png"), "--n", "2",
          "--k", "2", "--size", "128", "--in-batch", "1"])
    assert Image.open(tmp_path / "b.png").size[0] == 2 * 128 + 3 * 8


def test_synthetic_keypoints_follow_the_box_and_mask():
    from instbank.paste_demo import PERSON_LAYOUT, synthetic_keypoints

    mask = np.zeros((1, 40, 30), bool)
    mask[0, 10:30, 5:25] = True
    points = synthetic_keypoints(mask, np.array([[5.0, 10.0, 25.0, 50.0]]))
    assert points.shape == (1, 17, 3)
    assert points[0, 0, :2].tolist() == pytest.approx([5 + 20 * PERSON_LAYOUT[0][0], 10 + 40 * PERSON_LAYOUT[0][1]])
    assert set(points[0, :, 2].tolist()) == {1.0, 2.0}  # ankles below the mask: labeled, not visible
    assert (synthetic_keypoints(mask, np.zeros((1, 4))) == 0).all()
