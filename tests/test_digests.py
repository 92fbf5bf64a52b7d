"""Per-crop digests by bank format version: BLAKE3 in format 2, sha256 in format 1; format-1 banks
are still opened, verified (with their own digest) and converted (into format 2)."""

from __future__ import annotations

import hashlib
import json

import blake3
import numpy as np
import pytest

from instbank.storage import open_bank
from instbank.storage.base import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_MANIFEST,
    SHARDS_DIR,
    content_hash,
    crop_digests,
    make_version,
    shard_hash,
)
from instbank.storage.convert import convert_bank
from instbank.storage.verify import verify_bank
from instbank.testing import synthetic_crops, write_synthetic_bank
from instbank.types import META_DTYPE

S = 16


def _meta(n: int) -> np.ndarray:
    meta = np.zeros(n, META_DTYPE)
    meta["ann_id"] = np.arange(n)
    meta["class_id"] = np.arange(n) % 3
    return meta


@pytest.mark.parametrize("version, new", [(1, hashlib.sha256), (2, blake3.blake3)])
def test_crop_digest_of_each_format_version(version, new):
    """The digest of crop i is ``H(rgba bytes || meta row bytes)`` with H fixed by the version."""
    rgba, meta = synthetic_crops(np.arange(5), S), _meta(5)
    digests = crop_digests(rgba, meta, version)
    for i in range(5):
        assert digests[i].tobytes() == new(rgba[i].tobytes() + meta[i : i + 1].tobytes()).digest()
    assert FORMAT_VERSION == 2 and (crop_digests(rgba, meta) == crop_digests(rgba, meta, 2)).all()
    assert not (crop_digests(rgba, meta, 1) == crop_digests(rgba, meta, 2)).all(axis=1).any()


def test_unknown_digest_version_is_refused():
    with pytest.raises(ValueError, match="format version 3"):
        crop_digests(synthetic_crops(np.arange(1), S), _meta(1), 3)


def _as_format_1(bank_dir) -> str:
    """Rewrite a freshly written bank as instbank wrote it in format 1 (sha256 digests); returns its
    content hash."""
    manifest = json.loads((bank_dir / MANIFEST).read_text())
    bank = open_bank(bank_dir)
    chunks, start = [], 0
    for entry in manifest["shards"]:
        sdir = bank_dir / SHARDS_DIR / entry["dir"]
        n = entry["num_crops"]
        digests = crop_digests(bank.get_many(np.arange(start, start + n)), bank.meta_table[start : start + n], 1)
        np.save(sdir / "digests.npy", digests)
        info = json.loads((sdir / SHARD_MANIFEST).read_text())
        info["hash"] = entry["hash"] = shard_hash(digests)
        (sdir / SHARD_MANIFEST).write_text(json.dumps(info))
        chunks.append(digests)
        start += n
    content = content_hash(S, bank.classes, chunks)
    manifest.update(format_version=1, content_hash=content, version=make_version(manifest["backend"], content))
    (bank_dir / MANIFEST).write_text(json.dumps(manifest))
    return content


def test_format_1_bank_is_read_verified_and_converted_to_format_2(tmp_path):
    source = write_synthetic_bank(tmp_path / "v2", 30, size=S, backend="memmap", shard_sizes=[20, 10])
    v2_hash = source.content_hash
    v1_hash = _as_format_1(source.path)
    old = open_bank(source.path)
    assert old.content_hash == v1_hash != v2_hash
    np.testing.assert_array_equal(old.get_many(np.arange(30)), synthetic_crops(np.arange(30), S))
    report = verify_bank(source.path)
    assert report.ok, report.summary()
    # converting recomputes the digests with today's function: the format-2 bank of the same crops
    manifest = convert_bank(source.path, tmp_path / "lmdb", "lmdb")
    assert manifest["format_version"] == FORMAT_VERSION and manifest["content_hash"] == v2_hash
    assert verify_bank(tmp_path / "lmdb").ok
    # verify of the format-1 bank still finds a damaged crop (by its sha256)
    pixels = source.path / SHARDS_DIR / "000001" / "pixels.u8"
    data = bytearray(pixels.read_bytes())
    data[5] ^= 0xFF
    pixels.write_bytes(bytes(data))
    report = verify_bank(source.path)
    assert not report.ok and "crop 20 " in report.summary()
