"""``merge_banks``: the merge of a build's parts is the whole build (crops, order, version); class
tables are unioned by name with ids remapped and digests recomputed (checked by ``verify_bank``);
bad inputs are refused before anything is written, and an interrupted merge leaves no bank."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_COCO
from instbank.build import BuildConfig, build_bank
from instbank.errors import BankError, BuildError
from instbank.formats.coco import read_coco
from instbank.storage.merge import merge_banks, union_classes
from instbank.storage import open_bank
from instbank.storage.base import SHARDS_DIR
from instbank.storage.verify import verify_bank
from instbank.storage.writer import write_bank
from instbank.testing import synthetic_crops, synthetic_meta, write_synthetic_bank
from instbank.types import ClassInfo

CONFIG = BuildConfig(size=32, shard_images=2)


@pytest.fixture(scope="module")
def halves_and_whole(tmp_path_factory):
    """The sample built whole, and as two banks from its first 3 and last 5 images."""
    root = tmp_path_factory.mktemp("merge")
    dataset = read_coco(SAMPLE_COCO)
    whole = build_bank(dataset, root / "whole", CONFIG, workers=1)
    parts = [dataset.images[:3], dataset.images[3:]]
    for i, images in enumerate(parts):
        build_bank(dataclasses.replace(dataset, images=images), root / f"part{i}", CONFIG, workers=1)
    return root, whole


def test_merged_halves_equal_the_whole_build(halves_and_whole):
    root, whole = halves_and_whole
    done = []
    merged = merge_banks([root / "part0", root / "part1"], root / "merged", progress=lambda images, crops: done.append(crops))
    assert merged["version"] == whole.version
    assert sum(done) == whole.num_crops
    assert len(merged["shards"]) == 2 + 3  # one output shard per input shard
    a, b = open_bank(whole.out), open_bank(root / "merged")
    np.testing.assert_array_equal(a.meta_table, b.meta_table)
    np.testing.assert_array_equal(a.get_many(np.arange(len(a))), b.get_many(np.arange(len(b))))
    assert b.class_names == a.class_names
    assert verify_bank(root / "merged").ok


def test_merge_into_another_backend_keeps_the_content_hash(halves_and_whole):
    root, whole = halves_and_whole
    merged = merge_banks([root / "part0", root / "part1"], root / "merged-lmdb", backend="lmdb")
    assert merged["version"] == "lmdb@" + whole.version.split("@")[1]
    assert verify_bank(root / "merged-lmdb").ok


def _bank_with_classes(path: Path, names: list[str], class_ids: list[list[int]], first: int, size: int = 8):
    """A bank whose class table is ``names`` (ids in list order); ``class_ids`` has one list of
    crop class ids per shard; crop ``k`` of the bank encodes global index ``first + k``."""
    starts = np.cumsum([first, *(len(ids) for ids in class_ids)])
    shards = (
        [(synthetic_crops(np.arange(lo, lo + len(ids)), size), synthetic_meta(np.arange(lo, lo + len(ids)), np.array(ids, np.int64), size))]
        for lo, ids in zip(starts, class_ids)
    )
    classes = [ClassInfo(i, 100 + i, n) for i, n in enumerate(names)]
    write_bank(path, "memmap", size, classes, shards, build={"source": "test"}, overwrite=True)
    return open_bank(path)


NAMES = ["person", "car", "dog", "cat", "bus"]


@st.composite
def bank_specs(draw):
    """2-3 banks: each a class table (distinct names from NAMES) and 1-2 shards of 0-5 class ids."""
    specs = []
    for _ in range(draw(st.integers(2, 3))):
        names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
        shards = draw(st.lists(st.lists(st.integers(0, len(names) - 1), max_size=5), min_size=1, max_size=2))
        specs.append((names, shards))
    return specs


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=bank_specs())
def test_merge_unions_classes_by_name_and_keeps_every_crop(specs):
    root = Path(tempfile.mkdtemp(prefix="merge-prop-"))
    try:
        banks, first = [], 0
        for i, (names, shards) in enumerate(specs):
            banks.append(_bank_with_classes(root / f"in{i}", names, shards, first))
            first += len(banks[-1])
        merged_manifest = merge_banks([b.path for b in banks], root / "out")
        merged = open_bank(root / "out")
        # Class table: the first bank's names in order, then new names in order of appearance.
        expected_names = list(dict.fromkeys(n for names, _ in specs for n in names))
        assert merged.class_names == expected_names
        assert [c.id for c in merged.classes] == list(range(len(expected_names)))
        # Every crop, in order, with the same pixels, geometry and class *name*.
        assert len(merged) == first
        pixels = merged.get_many(np.arange(len(merged)))
        np.testing.assert_array_equal(pixels, synthetic_crops(np.arange(first), 8))
        source_names = [b.class_names[c] for b in banks for c in b.crop_class_ids]
        assert [merged.class_names[c] for c in merged.crop_class_ids] == source_names
        geometry = [n for n in merged.meta_table.dtype.names if n != "class_id"]
        source_meta = np.concatenate([b.meta_table for b in banks])
        for name in geometry:
            np.testing.assert_array_equal(merged.meta_table[name], source_meta[name])
        assert merged_manifest["class_frequencies"] == np.bincount(merged.crop_class_ids, minlength=len(expected_names)).tolist()
        assert verify_bank(root / "out").ok  # digests were recomputed with the new class ids
    finally:
        shutil.rmtree(root)


def test_union_classes_refuses_a_name_twice_in_one_bank():
    table = [ClassInfo(0, 1, "cat"), ClassInfo(1, 2, "cat")]
    with pytest.raises(BuildError, match=r"bankB: class name 'cat' appears 2 times"):
        union_classes([[ClassInfo(0, 1, "dog")], table], ["bankA", "bankB"])


def test_union_classes_refuses_ids_that_are_not_contiguous():
    with pytest.raises(BankError, match=r"bankA: class ids in the manifest are not contiguous 0\.\.1"):
        union_classes([[ClassInfo(0, 1, "dog"), ClassInfo(2, 3, "cat")]], ["bankA"])


def test_union_keeps_the_first_source_id_of_a_name():
    merged, remaps = union_classes([[ClassInfo(0, 7, "dog")], [ClassInfo(0, 3, "cat"), ClassInfo(1, 9, "dog")]], ["a", "b"])
    assert merged == [ClassInfo(0, 7, "dog"), ClassInfo(1, 3, "cat")]
    assert [r.tolist() for r in remaps] == [[0], [1, 0]]


def test_different_crop_sizes_are_refused_naming_both_banks(tmp_path):
    write_synthetic_bank(tmp_path / "s8", 3, size=8)
    write_synthetic_bank(tmp_path / "s16", 3, size=16)
    with pytest.raises(BuildError, match=r"s8 \(S=8\).*s16 \(S=16\)"):
        merge_banks([tmp_path / "s8", tmp_path / "s16"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_and_output_inside_an_input_are_refused(tmp_path):
    write_synthetic_bank(tmp_path / "a", 3, size=8)
    write_synthetic_bank(tmp_path / "b", 3, size=8)
    with pytest.raises(BuildError, match="already exists"):
        merge_banks([tmp_path / "a"], tmp_path / "b")
    with pytest.raises(BuildError, match="must not be the input bank"):
        merge_banks([tmp_path / "a"], tmp_path / "a" / "inner")
    merged = merge_banks([tmp_path / "a"], tmp_path / "b", overwrite=True)
    assert merged["num_crops"] == 3


def test_input_that_is_not_a_bank_is_a_bank_error(tmp_path):
    write_synthetic_bank(tmp_path / "a", 3, size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="empty"):
        merge_banks([tmp_path / "a", tmp_path / "empty"], tmp_path / "out")


def test_corrupt_input_stops_the_merge_without_a_bank(tmp_path):
    write_synthetic_bank(tmp_path / "a", 4, size=8)
    write_synthetic_bank(tmp_path / "b", 4, size=8, shard_sizes=[2, 2])
    (tmp_path / "b" / SHARDS_DIR / "000001" / "meta.npy").write_bytes(b"not numpy")
    with pytest.raises(BankError, match=r"000001/meta\.npy: cannot read crop index"):
        merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(BankError, match="no manifest"):
        open_bank(tmp_path / "out")
