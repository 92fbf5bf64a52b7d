"""Hostile and damaged image files (DESIGN "Hostile input"): the size is checked from the header
before decoding (``too_large``), half-decodable files are skipped (``corrupt_image``), and the
libjpeg-turbo path (EXIF orientation, DCT-domain reduced decoding) agrees with OpenCV's."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_COCO
from instbank.build import BuildConfig, build_bank
from instbank.crops import (
    CORRUPT_IMAGE,
    MAX_IMAGE_PIXELS,
    TOO_LARGE,
    ImageSkip,
    cut_file,
    cut_image,
    decode_image,
    read_image_file,
)
from instbank.formats.coco import read_coco
from instbank.types import ImageRecord, InstanceRecord

SAMPLE_JPEG = sorted((SAMPLE_COCO.parent / "images").glob("*.jpg"))[0]


def _jpeg_bomb(width: int, height: int) -> bytes:
    """A valid 8x8 baseline JPEG (about 630 bytes) whose frame header claims ``width x height``."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (8-bit grey) over a few bytes of image data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def test_bomb_is_refused_from_the_header_under_a_memory_limit(tmp_path):
    """A 630-byte JPEG claiming 30000x30000 (2.7 GB decoded) and a PNG claiming 100000x100000 are
    skipped ``too_large`` in a process whose address space is capped at 1 GiB over its start;
    without the limit the same decode fails for lack of memory (the check is what saves it)."""
    (tmp_path / "bomb.jpg").write_bytes(_jpeg_bomb(30000, 30000))
    (tmp_path / "bomb.png").write_bytes(_png_bomb(100000, 100000))
    assert len((tmp_path / "bomb.jpg").read_bytes()) < 700
    script = textwrap.dedent(f"""
        import resource, sys
        from instbank.crops import ImageSkip, decode_image
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
        for name in ("bomb.jpg", "bomb.png"):
            try:
                decode_image({str(tmp_path)!r} + "/" + name)
                print(name, "decoded")
            except ImageSkip as e:
                print(name, e.reason)
        try:
            decode_image({str(tmp_path)!r} + "/bomb.jpg", max_pixels=0)
            print("unlimited decoded")
        except MemoryError:
            print("unlimited MemoryError")
        except Exception as e:
            print("unlimited", type(e).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["bomb.jpg too_large", "bomb.png too_large"]
    assert lines[2] != "unlimited decoded"


def test_too_large_is_a_counted_skip_with_the_size_in_the_report(tmp_path):
    Image.open(SAMPLE_JPEG).save(tmp_path / "ok.jpg")
    (tmp_path / "bomb.jpg").write_bytes(_jpeg_bomb(30000, 30000))
    ann = _coco(tmp_path, {"ok.jpg": Image.open(SAMPLE_JPEG).size, "bomb.jpg": (30000, 30000)})
    report = build_bank(read_coco(ann, tmp_path), tmp_path / "b", BuildConfig(size=16), workers=1)
    assert report.skipped == {TOO_LARGE: 1} and report.num_crops == 1
    example = report.skip_examples[TOO_LARGE][0]
    assert example["file"].endswith("bomb.jpg") and "30000x30000 = 900 M pixels, over max_image_pixels 537 M" in example["detail"]
    # a smaller limit refuses the real image too; 0 is no limit (the real image is kept)
    w, h = Image.open(SAMPLE_JPEG).size
    with pytest.raises(ImageSkip) as e:
        read_image_file(str(tmp_path / "ok.jpg"), max_pixels=w * h - 1)
    assert e.value.reason == TOO_LARGE
    assert read_image_file(str(tmp_path / "ok.jpg"), max_pixels=w * h).width == w
    assert read_image_file(str(tmp_path / "ok.jpg"), max_pixels=0).height == h
    assert MAX_IMAGE_PIXELS >= 20000 * 20000  # the largest aerial scenes of iSAID/DOTA fit


@pytest.mark.parametrize("value", [-1, 1.5, True, "many"])
def test_max_image_pixels_must_be_a_count(value):
    with pytest.raises(ValueError, match="max_image_pixels"):
        BuildConfig(max_image_pixels=value)


def _coco(tmp_path: Path, files: dict[str, tuple[int, int]]) -> Path:
    """One 20x20 square annotation per image at (10, 10)."""
    images, anns = [], []
    for i, (name, (w, h)) in enumerate(sorted(files.items()), start=1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 20, 20], "area": 400,
                     "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _cut_entropy_data(data: bytes) -> bytes:
    """The real JPEG with 2000 bytes cut out of the middle of its entropy-coded data (the end-of-
    image marker stays: libjpeg warns "premature end of data segment" and OpenCV returns an image)."""
    start = data.find(b"\xff\xda")
    middle = start + (len(data) - start) // 2
    return data[:middle] + data[middle + 2000 :]


def _bad_huffman_table(data: bytes) -> bytes:
    """The real JPEG with 20 bytes of its first Huffman table (DHT segment) overwritten."""
    dht = data.find(b"\xff\xc4")
    return data[: dht + 5] + b"\xff" * 20 + data[dht + 25 :]


def _png(bgr: np.ndarray) -> bytes:
    return cv2.imencode(".png", bgr)[1].tobytes()


def _png_bad_crc(bgr: np.ndarray) -> bytes:
    data = bytearray(_png(bgr))
    data[data.find(b"IDAT") + 104] ^= 0xFF  # one byte of compressed data: the chunk's CRC fails
    return bytes(data)


def _png_truncated_idat(bgr: np.ndarray) -> bytes:
    data = _png(bgr)
    idat = data.find(b"IDAT")
    return data[: idat + 4 + int.from_bytes(data[idat - 4 : idat], "big") // 2]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("cut.jpg", lambda data, bgr: _cut_entropy_data(data)),
        ("dht.jpg", lambda data, bgr: _bad_huffman_table(data)),
        ("crc.png", lambda data, bgr: _png_bad_crc(bgr)),
        ("idat.png", lambda data, bgr: _png_truncated_idat(bgr)),
    ],
)
def test_damaged_real_images_are_corrupt_image_skips(tmp_path, name, damage):
    """Made from a shipped sample image. The cut JPEG is the case that used to be kept: OpenCV
    returns a half-grey image for it."""
    data = SAMPLE_JPEG.read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    (tmp_path / name).write_bytes(damage(data, bgr))
    if name == "cut.jpg":  # what the build used to keep
        assert cv2.imdecode(np.fromfile(tmp_path / name, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageSkip) as e:
        decode_image(str(tmp_path / name))
    assert e.value.reason == CORRUPT_IMAGE and name in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "ok.jpg").write_bytes(data)
    ann = _coco(tmp_path, {name: (bgr.shape[1], bgr.shape[0]), "ok.jpg": (bgr.shape[1], bgr.shape[0])})
    report = build_bank(read_coco(ann, tmp_path), tmp_path / "b", BuildConfig(size=16), workers=1)
    assert report.skipped == {CORRUPT_IMAGE: 1} and report.num_crops == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_opencv(tmp_path, orientation):
    """libjpeg-turbo plus our rotation gives OpenCV's upright image for every EXIF orientation."""
    stored = cv2.imread(str(SAMPLE_JPEG))[:37, :53]  # odd, non-square: a wrong axis shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored[:, :, ::-1]).save(tmp_path / "o.jpg", quality=95, exif=exif)
    image, found = decode_image(str(tmp_path / "o.jpg"))
    expected = cv2.imread(str(tmp_path / "o.jpg"), cv2.IMREAD_COLOR)
    assert found == orientation and image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).max() <= 1
    kept, _ = decode_image(str(tmp_path / "o.jpg"), exif="ignore")
    assert kept.shape == stored.shape


def _big_object_record(width: int, height: int) -> ImageRecord:
    """Two objects of 300 and 180 px in a 480x360 sample crop."""
    a = np.array([[20.5, 30], [320, 25], [300, 200], [40, 330]], np.float64)
    b = np.array([[250, 120], [430, 140], [400, 300]], np.float64)
    return ImageRecord(1, "", width, height, (InstanceRecord(1, 0, (a,)), InstanceRecord(2, 1, (b,))))


@pytest.mark.parametrize("size, reduction", [(64, 2), (40, 4), (20, 8), (128, 1)])
def test_reduced_decode_keeps_geometry_and_content(tmp_path, size, reduction):
    """Decoded at 1/2, 1/4 or 1/8 in the DCT domain when every kept crop shrinks that much: the
    masks, boxes, scales and offsets are those of the full decode, the pixels within a few levels."""
    full = cv2.imread(str(SAMPLE_JPEG))[:360, :480]
    cv2.imwrite(str(tmp_path / "s.jpg"), full, [cv2.IMWRITE_JPEG_QUALITY, 95])
    record = _big_object_record(480, 360)
    cut = cut_file(str(tmp_path / "s.jpg"), record, size)
    assert cut.reduction == reduction and (cut.width, cut.height) == (480, 360)
    decoded, _ = decode_image(str(tmp_path / "s.jpg"))
    rgba, meta, skipped = cut_image(decoded, record, size)
    assert cut.meta.tobytes() == meta.tobytes() and not skipped
    inside, inside_full = cut.rgba[:, 3] >= 128, rgba[:, 3] >= 128
    assert (inside & inside_full).sum() / (inside | inside_full).sum() > 0.95
    # A crop may come from one level coarser than a full decode cuts it from (the 180-px object
    # at S=20 from the 1/8 level instead of 1/4): its edge band blurs by under one crop pixel,
    # which is most of a 20-px canvas (measured 2.5-4.0 levels per channel there, < 3 at S >= 40).
    assert (np.abs(cut.rgba.astype(int) - rgba).mean(axis=(0, 2, 3)) < (4.5 if size < 32 else 3.0)).all()
