"""Images as they come in real data sets: broken files are counted skips, odd formats decode right,
EXIF orientation is followed (or ignored on request) and said, size mismatches follow the file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from instbank.build import BuildConfig, build_bank
from instbank.crops import decode_image, ImageSkip
from instbank.formats.coco import read_coco
from instbank.storage import open_bank

W, H = 60, 40
BOX = (10, 8, 30, 24)  # x0, y0, x1, y1 of the annotated object in the displayed image


def _picture() -> np.ndarray:
    """RGB [H, W, 3]: grey background, a pure red object at BOX."""
    rgb = np.full((H, W, 3), 90, np.uint8)
    x0, y0, x1, y1 = BOX
    rgb[y0:y1, x0:x1] = (255, 0, 0)
    return rgb


def _write_coco(tmp_path: Path, files: dict[str, tuple[int, int]]) -> Path:
    """One annotation (the BOX rectangle) per image; ``files`` maps file name -> (width, height)."""
    x0, y0, x1, y1 = BOX
    images, anns = [], []
    for i, (name, (w, h)) in enumerate(sorted(files.items()), start=1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _crop_centre_rgb(bank, i: int) -> np.ndarray:
    s = bank.crop_size[0]
    return bank[i].rgba[:3, s // 2, s // 2]


@pytest.mark.parametrize(
    "name, save",
    [
        ("gray.png", lambda p, rgb: Image.fromarray(rgb[..., 0]).save(p)),
        ("cmyk.jpg", lambda p, rgb: Image.fromarray(rgb).convert("CMYK").save(p, quality=100)),
        ("deep.png", lambda p, rgb: cv2.imwrite(str(p), (rgb[..., ::-1].astype(np.uint16) * 257))),
        ("rgba.png", lambda p, rgb: Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])).save(p)),
        ("palette.png", lambda p, rgb: Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(p)),
    ],
)
def test_image_modes_decode_to_rgb(tmp_path, name, save):
    save(tmp_path / name, _picture())
    report = build_bank(read_coco(_write_coco(tmp_path, {name: (W, H)}), tmp_path), tmp_path / "b",
                        BuildConfig(size=16), workers=1)
    bank = open_bank(report.out)
    assert len(bank) == 1 and not report.skipped
    centre = _crop_centre_rgb(bank, 0).astype(int)
    if name == "gray.png":
        assert abs(centre[0] - centre[1]) <= 1 and abs(centre[0] - 255) <= 2  # grey replicated
    else:
        np.testing.assert_allclose(centre, (255, 0, 0), atol=6)  # red stays red (RGB order)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "unreadable_image"),
        ("text.jpg", b"this is not an image", "unreadable_image"),
        ("cut.jpg", None, "truncated_image"),
    ],
)
def test_broken_images_are_counted_skips(tmp_path, name, content, reason):
    if content is None:
        Image.fromarray(_picture()).save(tmp_path / "full.jpg", quality=90)
        content = (tmp_path / "full.jpg").read_bytes()[:-300]
    (tmp_path / name).write_bytes(content)
    Image.fromarray(_picture()).save(tmp_path / "ok.jpg", quality=90)
    ann = _write_coco(tmp_path, {name: (W, H), "ok.jpg": (W, H)})
    report = build_bank(read_coco(ann, tmp_path), tmp_path / "b", BuildConfig(size=16), workers=1)
    assert report.skipped == {reason: 1} and report.num_crops == 1
    assert report.skip_examples[reason][0]["file"].endswith(name)
    with pytest.raises(ImageSkip) as e:
        decode_image(str(tmp_path / name))
    assert e.value.reason == reason and "\n" not in str(e.value) and name in str(e.value)


def _exif_rotated_jpeg(path: Path) -> None:
    """Store the picture rotated 90 degrees clockwise *back*, with orientation 6 so viewers show it
    upright: the displayed image is ``_picture()``; the stored pixels are [W, H]."""
    stored = np.rot90(_picture(), k=1)  # counter-clockwise; orientation 6 = rotate 90 CW to display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)


def test_exif_orientation_is_followed_and_said(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg")
    image, orientation = decode_image(str(tmp_path / "rot.jpg"))
    assert orientation == 6 and image.shape[:2] == (H, W)
    report = build_bank(read_coco(_write_coco(tmp_path, {"rot.jpg": (W, H)}), tmp_path), tmp_path / "b",
                        BuildConfig(size=16), workers=1)
    np.testing.assert_allclose(_crop_centre_rgb(open_bank(report.out), 0).astype(int), (255, 0, 0), atol=8)
    assert any("EXIF orientation" in n and "rotated" in n for n in report.notes)
    assert any("EXIF" in n for n in open_bank(report.out).manifest["build"]["notes"])


def test_exif_ignore_keeps_stored_pixels(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg")
    image, _ = decode_image(str(tmp_path / "rot.jpg"), exif="ignore")
    assert image.shape[:2] == (W, H)
    report = build_bank(read_coco(_write_coco(tmp_path, {"rot.jpg": (H, W)}), tmp_path), tmp_path / "b",
                        BuildConfig(size=16, exif="ignore"), workers=1)
    assert any("kept as stored" in n for n in report.notes)


def test_size_mismatch_follows_the_file_and_warns(tmp_path):
    Image.fromarray(_picture()).save(tmp_path / "a.png")
    ann = _write_coco(tmp_path, {"a.png": (2 * W, 2 * H)})
    report = build_bank(read_coco(ann, tmp_path), tmp_path / "b", BuildConfig(size=16), workers=1)
    assert report.num_crops == 1 and not report.skipped
    assert any("differ in size" in n for n in report.notes)
    example = report.skip_examples["size_mismatch"][0]
    assert example["file"].endswith("a.png") and example["detail"] == "file is 60x40, annotations say 120x80"
