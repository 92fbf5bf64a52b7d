"""convert_bank between every pair of backends keeps the content hash; verify_bank passes on the
results; convert refuses to clobber banks and to carry a corrupt source further."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instbank.errors import BankError, BuildError
from instbank.storage import open_bank
from instbank.storage.base import MANIFEST
from instbank.storage.convert import convert_bank
from instbank.storage.verify import verify_bank
from instbank.testing import synthetic_crops, write_synthetic_bank

S = 16
N = 50
SHARDS = [20, 0, 30]


@pytest.fixture
def source(tmp_path):
    return write_synthetic_bank(tmp_path / "src", N, size=S, backend="memmap", shard_sizes=SHARDS)


def test_round_trip_through_every_backend_keeps_the_content_hash(tmp_path, source):
    chain = [("lmdb", None), ("webdataset", {"codec": "png", "maxcount": 8}), ("memmap", None)]
    previous, versions = source.path, [source.version]
    for k, (backend, options) in enumerate(chain):
        dst = tmp_path / f"step{k}-{backend}"
        manifest = convert_bank(previous, dst, backend, options)
        bank = open_bank(dst)
        assert manifest["content_hash"] == source.content_hash
        assert bank.version == f"{backend}@{source.content_hash[:12]}"
        np.testing.assert_array_equal(bank.get_many(np.arange(N)), synthetic_crops(np.arange(N), S))
        np.testing.assert_array_equal(bank.meta_table, source.meta_table)
        assert [s["num_crops"] for s in manifest["shards"]] == SHARDS  # same shards, same names
        report = verify_bank(dst)
        assert report.ok, report.summary()
        assert report.crops_checked == N and report.content_hash == source.content_hash
        previous = dst
        versions.append(bank.version)
    assert len({v.split("@")[0] for v in versions}) == 3 and len({v.split("@")[1] for v in versions}) == 1


def test_options_and_provenance_are_recorded(tmp_path, source):
    manifest = convert_bank(source.path, tmp_path / "dst", "lmdb", {"filter": "none", "level": 1})
    assert manifest["backend_options"] == {"codec": "zstd", "level": 1, "filter": "none"}
    assert manifest["build"]["source"] == "synthetic"
    assert manifest["build"]["converted_from"] == {"path": str(source.path), "version": source.version}


def test_progress_counts_every_crop(tmp_path, source):
    done = []
    convert_bank(source.path, tmp_path / "dst", "webdataset", progress=lambda images, crops: done.append((images, crops)))
    checked = []
    verify_bank(tmp_path / "dst", progress=lambda images, crops: checked.append((images, crops)))
    assert np.sum(done, axis=0).tolist() == np.sum(checked, axis=0).tolist() == [0, N]


def test_refuses_an_existing_destination_unless_overwrite(tmp_path, source):
    dst = tmp_path / "dst"
    write_synthetic_bank(dst, 3, size=S, backend="lmdb")
    with pytest.raises(BuildError, match="a bank already exists"):
        convert_bank(source.path, dst, "lmdb")
    assert len(open_bank(dst)) == 3  # untouched
    convert_bank(source.path, dst, "lmdb", overwrite=True)
    assert len(open_bank(dst)) == N


@pytest.mark.parametrize("where", ["same", "inside"])
def test_refuses_to_write_over_or_inside_its_source(source, where):
    dst = source.path if where == "same" else source.path / "converted"
    with pytest.raises(BuildError, match="must not be the input bank"):
        convert_bank(source.path, dst, "lmdb", overwrite=True)
    assert verify_bank(source.path).ok


def test_unknown_backend_fails_before_writing(tmp_path, source):
    with pytest.raises(ValueError, match="valid backends: memmap, lmdb, webdataset"):
        convert_bank(source.path, tmp_path / "dst", "parquet")
    assert not (tmp_path / "dst").exists()


def test_check_digests_stops_at_a_corrupt_source_crop(tmp_path, source):
    pixels = source.path / "shards" / "000002" / "pixels.u8"
    blob = bytearray(pixels.read_bytes())
    blob[5 * 4 * S * S + 9] ^= 1  # crop 25 = shard 000002, local 5
    pixels.write_bytes(bytes(blob))
    with pytest.raises(BankError, match="crop 25 does not match its digest"):
        convert_bank(source.path, tmp_path / "checked", "lmdb", check_digests=True)
    assert not (tmp_path / "checked" / MANIFEST).exists()
    # unchecked, the copied digest still gives the damage away in the converted bank
    convert_bank(source.path, tmp_path / "unchecked", "lmdb")
    problem = verify_bank(tmp_path / "unchecked").problems[0]
    assert (problem.index, problem.file.name) == (25, "data.mdb")


def test_refuses_a_source_whose_manifest_hash_was_edited(tmp_path, source):
    path = source.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["content_hash"] = "f" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="content_hash does not match"):
        convert_bank(source.path, tmp_path / "dst", "webdataset")
    assert not (tmp_path / "dst" / MANIFEST).exists()


def test_empty_bank_converts_and_verifies(tmp_path):
    empty = write_synthetic_bank(tmp_path / "empty", 0, size=S, backend="webdataset")
    manifest = convert_bank(empty.path, tmp_path / "dst", "lmdb")
    assert manifest["num_crops"] == 0 and manifest["content_hash"] == empty.content_hash
    assert verify_bank(tmp_path / "dst").ok


def test_verify_of_a_directory_that_is_not_a_bank(tmp_path):
    report = verify_bank(tmp_path)
    assert not report.ok and "not a finished instbank bank" in report.problems[0].message
