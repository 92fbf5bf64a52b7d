"""Damaged banks: every fault is caught by the reader (a one-line BankError naming the file) or by
``verify_bank`` (naming the first bad crop, its shard and file), never read back silently wrong
by both."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest

from instbank.errors import BankError
from instbank.storage import open_bank
from instbank.storage.base import FORMAT_VERSION, MANIFEST, SHARD_MANIFEST
from instbank.storage.verify import verify_bank
from instbank.testing import decode_index, synthetic_crops, write_synthetic_bank

S = 16
BAD = 27  # global index of the damaged crop: shard 000001, local 7
SHARD = "000001"


def _bank(tmp_path, backend, options=None):
    return write_synthetic_bank(tmp_path / "bank", 40, size=S, backend=backend, shard_sizes=[20, 20], options=options)


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


def _truncate(path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - nbytes)


def _edit_manifest(bank_path, **changes) -> None:
    path = bank_path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _shard_dir(bank):
    return bank.path / "shards" / SHARD


def _assert_verify_names(bank_path, file_name: str, index: int = BAD):
    report = verify_bank(bank_path)
    assert not report.ok
    problem = report.problems[0]
    assert problem.index == index
    assert problem.shard_dir.name == SHARD
    assert problem.file.name == file_name
    assert f"crop {index}" in problem.message and file_name in problem.message
    with pytest.raises(BankError, match=file_name):
        report.raise_for_problems()
    return problem


def _lmdb_value_offset(data_file, local: int) -> tuple[int, int]:
    """Byte offset and length of the stored value of ``local`` inside the LMDB file."""
    env = lmdb.open(str(data_file), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            value = txn.get(int(local).to_bytes(8, "big"))
    finally:
        env.close()
    blob = data_file.read_bytes()
    assert blob.count(value) == 1
    return blob.find(value), len(value)


def _tar_member(shard_dir, local: int) -> tuple:
    info = json.loads((shard_dir / SHARD_MANIFEST).read_text())["payload"]
    row = np.load(shard_dir / info["index"])[local]
    return shard_dir / info["tars"][row["tar"]]["file"], int(row["offset"]), int(row["size"])


# --------------------------------------------------------------------------------------------
# one flipped byte in a crop


def test_flipped_memmap_pixel_is_caught_by_verify(tmp_path):
    bank = _bank(tmp_path, "memmap")
    _flip_byte(_shard_dir(bank) / "pixels.u8", 7 * 4 * S * S + 100)
    damaged = open_bank(bank.path)[BAD].rgba  # memmap reads are not checksummed: verify's job
    assert not np.array_equal(damaged, synthetic_crops([BAD], S)[0])
    _assert_verify_names(bank.path, "pixels.u8")


def test_flipped_lmdb_value_is_refused_by_the_reader_and_verify(tmp_path):
    bank = _bank(tmp_path, "lmdb")
    offset, length = _lmdb_value_offset(_shard_dir(bank) / "data.mdb", 7)
    _flip_byte(_shard_dir(bank) / "data.mdb", offset + length // 2)
    with pytest.raises(BankError, match=r"shards/000001/data\.mdb key 7"):
        open_bank(bank.path)[BAD]
    assert decode_index(open_bank(bank.path)[BAD - 1].rgba) == BAD - 1  # its neighbours still read
    problem = _assert_verify_names(bank.path, "data.mdb")
    assert "cannot be decoded" in problem.message


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_flipped_tar_member_is_refused_by_the_reader_and_verify(tmp_path, codec):
    bank = _bank(tmp_path, "webdataset", {"codec": codec})
    tar, offset, size = _tar_member(_shard_dir(bank), 7)
    _flip_byte(tar, offset + size // 2)
    with pytest.raises(BankError, match=r"bank-000000\.tar member of crop 7"):
        open_bank(bank.path)[BAD]
    _assert_verify_names(bank.path, "bank-000000.tar")


def test_flipped_raw_tar_member_is_caught_by_verify_naming_its_tar(tmp_path):
    bank = _bank(tmp_path, "webdataset", {"codec": "raw", "maxcount": 5})
    tar, offset, size = _tar_member(_shard_dir(bank), 7)
    assert tar.name == "bank-000001.tar"
    _flip_byte(tar, offset + size // 2)
    _assert_verify_names(bank.path, "bank-000001.tar")


def test_flipped_digest_is_caught_by_verify(tmp_path):
    bank = _bank(tmp_path, "memmap")
    _flip_byte(_shard_dir(bank) / "digests.npy", 128 + 7 * 32)  # past the 128-byte .npy header
    report = verify_bank(bank.path)
    assert any("000001/digests.npy" in p.message and "shard hash" in p.message for p in report.problems)


def test_verify_counts_every_bad_crop_of_a_shard(tmp_path):
    bank = _bank(tmp_path, "memmap")
    for local in (7, 8, 15):
        _flip_byte(_shard_dir(bank) / "pixels.u8", local * 4 * S * S + 3)
    problem = _assert_verify_names(bank.path, "pixels.u8")
    assert "3 bad crops in this shard" in problem.message


# --------------------------------------------------------------------------------------------
# truncated payload files


@pytest.mark.parametrize(
    "backend, file_name",
    [("memmap", "pixels.u8"), ("lmdb", "data.mdb"), ("webdataset", "bank-000000.tar")],
)
def test_truncated_payload_is_named_on_first_read_and_by_verify(tmp_path, backend, file_name):
    bank = _bank(tmp_path, backend)
    _truncate(_shard_dir(bank) / file_name, 512)
    reopened = open_bank(bank.path)
    assert decode_index(reopened[3].rgba) == 3  # the intact shard still reads
    with pytest.raises(BankError, match=rf"000001/{file_name}: .*truncated"):
        reopened[BAD]
    report = verify_bank(bank.path)
    assert [p.shard_dir.name for p in report.problems] == [SHARD]
    assert file_name in report.problems[0].message


def test_missing_tar_index_is_named(tmp_path):
    bank = _bank(tmp_path, "webdataset")
    (_shard_dir(bank) / "index.npy").unlink()
    with pytest.raises(BankError, match=r"000001/index\.npy"):
        open_bank(bank.path)[BAD]


# --------------------------------------------------------------------------------------------
# manifest edited by hand, or from the future


def test_edited_content_hash_is_reported(tmp_path):
    bank = _bank(tmp_path, "lmdb")
    _edit_manifest(bank.path, content_hash="0" * 64)
    report = verify_bank(bank.path)
    assert [p.file.name for p in report.problems] == [MANIFEST]
    assert "content_hash 000000000000... does not match" in report.problems[0].message
    assert report.content_hash == bank.content_hash


def test_edited_version_is_reported(tmp_path):
    bank = _bank(tmp_path, "lmdb")
    _edit_manifest(bank.path, version="memmap@" + bank.content_hash[:12])
    (problem,) = verify_bank(bank.path).problems
    assert f"should be 'lmdb@{bank.content_hash[:12]}'" in problem.message


def test_edited_num_crops_is_reported_and_pixels_still_checked(tmp_path):
    bank = _bank(tmp_path, "webdataset")
    _edit_manifest(bank.path, num_crops=41)
    with pytest.raises(BankError, match="manifest says 41"):
        open_bank(bank.path)
    report = verify_bank(bank.path)
    assert len(report.problems) == 1
    assert "num_crops is 41 but the shards hold 40" in report.problems[0].message
    assert report.crops_checked == 40


def test_edited_class_frequencies_are_reported(tmp_path):
    bank = _bank(tmp_path, "memmap")
    freqs = bank.class_frequencies.tolist()
    freqs[0] += 1
    _edit_manifest(bank.path, class_frequencies=freqs)
    report = verify_bank(bank.path)
    assert len(report.problems) == 1 and "class_frequencies" in report.problems[0].message


def test_newer_format_version_is_refused(tmp_path):
    bank = _bank(tmp_path, "lmdb")
    _edit_manifest(bank.path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BankError, match="newer than this instbank reads"):
        open_bank(bank.path)
    assert "newer" in verify_bank(bank.path).problems[0].message


@pytest.mark.parametrize("backend", ["lmdb", "webdataset"])
def test_unknown_codec_is_refused_naming_the_file(tmp_path, backend):
    bank = _bank(tmp_path, backend)
    _edit_manifest(bank.path, backend_options={**bank.manifest["backend_options"], "codec": "brotli"})
    name = "LMDB" if backend == "lmdb" else "webdataset"
    with pytest.raises(BankError, match=rf"{MANIFEST}: unknown {name} codec 'brotli'"):
        open_bank(bank.path)


def test_unknown_lmdb_filter_in_a_shard_is_refused_on_read(tmp_path):
    bank = _bank(tmp_path, "lmdb")
    manifest = json.loads((bank.path / MANIFEST).read_text())
    manifest["shards"][1]["payload"]["filter"] = "paeth"
    (bank.path / MANIFEST).write_text(json.dumps(manifest))
    reopened = open_bank(bank.path)
    reopened[0]
    with pytest.raises(BankError, match=rf"000001/{SHARD_MANIFEST}: unknown LMDB filter 'paeth'"):
        reopened[BAD]


# --------------------------------------------------------------------------------------------
# WebDataset members outside the digests: class id, JSON meta, tar headers


def test_edited_json_member_is_caught_by_verify(tmp_path):
    bank = _bank(tmp_path, "webdataset")
    tar, offset, _ = _tar_member(_shard_dir(bank), 7)
    blob = bytearray(tar.read_bytes())
    at = blob.rfind(b'"area": ', 0, offset)  # the .json member just before crop 7's pixels
    blob[at + 8] = ord("9") if blob[at + 8] != ord("9") else ord("8")
    tar.write_bytes(bytes(blob))
    problem = _assert_verify_names(bank.path, "bank-000000.tar")
    assert "json disagrees with meta.npy" in problem.message
    assert verify_bank(bank.path).crops_checked == 40  # the pixels themselves are fine


def test_damaged_tar_header_is_caught_by_verify(tmp_path):
    bank = _bank(tmp_path, "webdataset")
    tar, offset, _ = _tar_member(_shard_dir(bank), 7)
    _flip_byte(tar, offset - 512 + 3)  # in the name field of crop 7's pixel member header
    assert decode_index(open_bank(bank.path)[BAD].rgba) == BAD  # random access does not parse headers
    (problem,) = verify_bank(bank.path).problems
    assert problem.file.name == "bank-000000.tar" and "samples readable" in problem.message


@pytest.mark.parametrize("crop_size", [S // 2, S * 2])
def test_memmap_payload_shape_must_match_the_manifest(tmp_path, crop_size):
    # The manifest says one crop size, the payload was written for another: the pixels would be
    # read as garbage of the wrong stride, so the first read refuses, naming both files.
    bank = _bank(tmp_path, "memmap")
    _edit_manifest(bank.path, crop_size=[crop_size, crop_size])
    with pytest.raises(BankError, match=rf"{MANIFEST}: shard 000000 says pixels\.u8 holds \[20, 4, {S}, {S}\].*crop_size {crop_size}"):
        open_bank(bank.path).get_many([0])
