"""One conformance suite for every storage backend (memmap, lmdb, webdataset and their codecs).

Banks are self-describing (``instbank.testing``: crop i's pixels encode i), so every read is
checked against what was written without a reference copy. Backend-specific behaviour (LMDB
filters and map growth, WebDataset streaming) sits at the end.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading

import numpy as np
import pytest

from instbank.errors import BuildError
from hypothesis import given, settings
from hypothesis import strategies as st

from instbank.storage import open_bank
from instbank.storage.writer import write_bank
from instbank.testing import decode_index, synthetic_crops, synthetic_meta, write_synthetic_bank
from instbank.types import ClassInfo, CropMeta

#: (backend, options) per variant: every codec, and a WebDataset bank cut into many tars.
VARIANTS = {
    "memmap": ("memmap", {}),
    "lmdb": ("lmdb", {}),
    "lmdb-nofilter": ("lmdb", {"filter": "none"}),
    "wds-zstd": ("webdataset", {}),
    "wds-raw-manytars": ("webdataset", {"codec": "raw", "maxcount": 64}),
    "wds-png": ("webdataset", {"codec": "png"}),
}
N, S = 400, 32  # 1.6 MB of pixels: enough to show that a pickle carries none of them
SHARD_SIZES = [150, 0, 170, 80]  # an empty shard in the middle, boundaries at 150 and 320


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    return {
        name: write_synthetic_bank(root / name, N, size=S, backend=backend, shard_sizes=SHARD_SIZES, options=opts)
        for name, (backend, opts) in VARIANTS.items()
    }


@pytest.fixture(params=list(VARIANTS))
def bank(request, banks):
    return banks[request.param]


# --------------------------------------------------------------------------------------------
# reading


def test_every_crop_reads_back_as_written(bank):
    everything = bank.get_many(np.arange(N))
    np.testing.assert_array_equal(everything, synthetic_crops(np.arange(N), S))
    expected_meta = synthetic_meta(np.arange(N), bank.crop_class_ids, S)
    for i in (0, 149, 150, 319, 320, N - 1):
        crop = bank[i]
        assert decode_index(crop.rgba) == i
        assert crop.class_id == bank.crop_class_ids[i]
        assert crop.meta == CropMeta.from_row(expected_meta[i])
        assert crop.embedding is None


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_get_many_equals_stacked_items(banks, data):
    bank = banks[data.draw(st.sampled_from(sorted(banks)))]
    indices = data.draw(st.lists(st.integers(-N, N - 1), max_size=40))
    got = bank.get_many(np.array(indices, np.int64))
    assert got.shape == (len(indices), 4, S, S)
    if indices:
        np.testing.assert_array_equal(got, np.stack([bank[i].rgba for i in indices]))
        np.testing.assert_array_equal(decode_index(got), np.array(indices) % N)


def test_get_many_across_shards_into_given_buffer(bank):
    indices = np.array([[319, 320, 0], [149, 150, -1]])  # any shape is flattened, order kept
    out = np.full((6, 4, S, S), 7, np.uint8)
    assert bank.get_many(indices, out=out) is out
    np.testing.assert_array_equal(decode_index(out), [319, 320, 0, 149, 150, N - 1])


def test_out_of_range_indices_raise_index_error(bank):
    for bad in (N, N + 5, -N - 1):
        with pytest.raises(IndexError):
            bank[bad]
    with pytest.raises(IndexError):
        bank.get_many([0, N])
    assert decode_index(bank[-N].rgba) == 0
    assert decode_index(bank[-1].rgba) == N - 1


def _write_bank(path, crops: np.ndarray, backend: str, options: dict, shard_sizes) -> None:
    s = crops.shape[-1]
    bounds = np.cumsum([0, *shard_sizes])
    shards = ([(crops[lo:hi], synthetic_meta(np.arange(lo, hi), np.zeros(hi - lo, np.int64), s))] for lo, hi in zip(bounds[:-1], bounds[1:]))
    write_bank(path, backend, s, [ClassInfo(0, 1, "thing")], shards, options=options, build={"source": "test"}, overwrite=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incompressible_content_round_trips(tmp_path, variant):
    # Random bytes: no run the codecs could shortcut, and every filter delta wraps around 255.
    backend, options = VARIANTS[variant]
    crops = np.random.default_rng(3).integers(0, 256, (37, 4, 16, 16), dtype=np.uint8)
    _write_bank(tmp_path / "bank", crops, backend, options, [20, 17])
    np.testing.assert_array_equal(open_bank(tmp_path / "bank").get_many(np.arange(37)), crops)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_empty_bank(tmp_path, variant):
    backend, options = VARIANTS[variant]
    bank = write_synthetic_bank(tmp_path / "empty", 0, size=8, backend=backend, options=options)
    assert len(bank) == 0
    assert bank.get_many(np.array([], np.int64)).shape == (0, 4, 8, 8)
    assert len(bank.meta_table) == 0 and len(bank.crop_class_ids) == 0
    assert bank.class_frequencies.tolist() == [0] * 5
    assert list(bank) == []
    with pytest.raises(IndexError):
        bank[0]


# --------------------------------------------------------------------------------------------
# same content, same answers, in every backend


def test_index_and_hash_agree_across_backends(banks):
    reference = banks["memmap"]
    for name, other in banks.items():
        np.testing.assert_array_equal(other.crop_class_ids, reference.crop_class_ids, err_msg=name)
        np.testing.assert_array_equal(other.class_frequencies, reference.class_frequencies, err_msg=name)
        np.testing.assert_array_equal(other.meta_table, reference.meta_table, err_msg=name)
        assert other.version.split("@")[1] == reference.version.split("@")[1], name
        assert other.version.split("@")[0] == other.manifest["backend"]
        assert (other.class_names, other.crop_size, other.has_embeddings) == (
            reference.class_names,
            (S, S),
            False,
        )
    assert reference.class_frequencies.sum() == N


# --------------------------------------------------------------------------------------------
# processes: pickle, fork, DataLoader workers


def test_pickle_is_small_and_reads_right_before_and_after_first_read(bank):
    assert 4 * S * S * N > 1 << 20
    fresh = pickle.loads(pickle.dumps(open_bank(bank.path)))  # never read
    assert decode_index(fresh[321].rgba) == 321
    bank.get_many([0, 200])  # now with open handles
    blob = pickle.dumps(bank)
    assert len(blob) < 64 << 10
    copy = pickle.loads(blob)
    # the copy and the original live in one process, both read (lmdb refuses a second open of a
    # file per process unless environments are shared)
    np.testing.assert_array_equal(decode_index(copy.get_many([5, 399, 151])), [5, 399, 151])
    np.testing.assert_array_equal(decode_index(bank.get_many([5, 399, 151])), [5, 399, 151])
    copy.close()
    assert decode_index(bank[7].rgba) == 7


def test_fork_after_the_parent_has_read(bank):
    everything = bank.get_many(np.arange(N))
    pid = os.fork()
    if pid == 0:  # child: same object, must reopen its own handles
        try:
            ok = np.array_equal(bank.get_many(np.arange(N)), everything)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    np.testing.assert_array_equal(bank.get_many(np.arange(N)), everything)  # the parent still reads


def test_bank_rewritten_in_place_reads_new_content(tmp_path, bank):
    backend, options = bank.manifest["backend"], bank.manifest["backend_options"]
    path = tmp_path / "bank"
    old = write_synthetic_bank(path, 30, size=8, backend=backend, options=_writer_options(backend, options))
    old.get_many(np.arange(30))  # handles open on the files about to be replaced
    crops = np.random.default_rng(5).integers(0, 256, (30, 4, 8, 8), dtype=np.uint8)
    _write_bank(path, crops, backend, _writer_options(backend, options), [30])
    np.testing.assert_array_equal(open_bank(path).get_many(np.arange(30)), crops)


def _writer_options(backend: str, manifest_options: dict) -> dict:
    """The options a writer takes back from what it recorded in the manifest."""
    return {} if backend == "memmap" else dict(manifest_options)


class CropsDataset:
    """Map-style dataset over several banks at once (module level: picklable for spawn)."""

    def __init__(self, banks: dict):
        self.banks = banks

    def __len__(self) -> int:
        return len(next(iter(self.banks.values())))

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **{name: bank[i].rgba for name, bank in self.banks.items()}}


@pytest.fixture(scope="module")
def tiny_banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: write_synthetic_bank(root / name, 96, size=8, backend=backend, shard_sizes=[40, 56], options=opts)
        for name, (backend, opts) in VARIANTS.items()
    }


@pytest.mark.parametrize(
    "start_method",
    ["fork", pytest.param("spawn", marks=pytest.mark.slow), pytest.param("forkserver", marks=pytest.mark.slow)],
)
def test_dataloader_workers_read_what_the_parent_reads(tiny_banks, start_method):
    from torch.utils.data import DataLoader

    direct = {name: bank.get_many(np.arange(96)) for name, bank in tiny_banks.items()}  # parent reads first
    loader = DataLoader(
        CropsDataset(tiny_banks), batch_size=16, shuffle=True, num_workers=2, multiprocessing_context=start_method
    )
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        seen.extend(idx.tolist())
        for name in tiny_banks:
            np.testing.assert_array_equal(batch[name].numpy(), direct[name][idx], err_msg=name)
    assert sorted(seen) == list(range(96))
    for name, bank in tiny_banks.items():  # and the parent still reads after its workers are gone
        np.testing.assert_array_equal(bank.get_many(np.arange(96)), direct[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# LMDB specifics


@settings(max_examples=30, deadline=None)
@given(
    crops=st.integers(1, 4).flatmap(
        lambda n: st.integers(1, 9).flatmap(
            lambda s: st.binary(min_size=n * 4 * s * s, max_size=n * 4 * s * s).map(
                lambda b: np.frombuffer(b, np.uint8).reshape(n, 4, s, s).copy()
            )
        )
    ),
    name=st.sampled_from(["none", "up-rgb"]),
)
def test_lmdb_filters_invert_exactly(crops, name):
    from instbank.storage.lmdb_bank import apply_filter, undo_filter

    stored = apply_filter(crops, name)
    if name == "up-rgb":
        np.testing.assert_array_equal(stored[:, 3], crops[:, 3])  # alpha is stored as is
        np.testing.assert_array_equal(stored[:, :, 0], crops[:, :, 0])  # so is the first row
    undo_filter(stored, name)
    np.testing.assert_array_equal(stored, crops)


def test_lmdb_map_grows_while_writing(tmp_path, monkeypatch):
    from instbank.storage import lmdb_bank

    monkeypatch.setattr(lmdb_bank, "INITIAL_MAP_SIZE", 64 << 10)  # random crops: ~4 KiB each
    crops = np.random.default_rng(9).integers(0, 256, (60, 4, 32, 32), dtype=np.uint8)
    _write_bank(tmp_path / "bank", crops, "lmdb", {"level": 1}, [60])
    bank = open_bank(tmp_path / "bank")
    assert bank.manifest["shards"][0]["payload"]["size"] > 64 << 10
    np.testing.assert_array_equal(bank.get_many(np.arange(60)), crops)


def test_lmdb_fork_while_another_thread_reads(banks):
    # The fork hook closes every environment: it must wait for reads in flight in other threads,
    # and a read that looked its handle up before the fork must not use the closed environment.
    bank = banks["lmdb"]
    expected = bank.get_many(np.arange(N))
    stop, failures = threading.Event(), []

    def read_until_stopped():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            idx = rng.integers(0, N, 64)
            try:
                if not np.array_equal(bank.get_many(idx), expected[idx]):
                    failures.append(idx)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                failures.append(e)

    thread = threading.Thread(target=read_until_stopped)
    thread.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                os._exit(0 if np.array_equal(bank.get_many(np.arange(N)), expected) else 1)
            assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0
    finally:
        stop.set()
        thread.join()
    assert failures == []


def test_lmdb_records_its_codec(banks):
    assert banks["lmdb"].manifest["backend_options"] == {"codec": "zstd", "level": 3, "filter": "up-rgb"}
    assert banks["lmdb-nofilter"].manifest["shards"][0]["payload"]["filter"] == "none"


def test_writers_refuse_unknown_options(tmp_path):
    for backend, options in [("lmdb", {"filter": "paeth"}), ("lmdb", {"dict": 1}), ("webdataset", {"codec": "jpg"})]:
        with pytest.raises(BuildError, match="paeth|dict|jpg"):  # user-given options: a one-line error
            write_synthetic_bank(tmp_path / "b", 4, size=8, backend=backend, options=options)


# --------------------------------------------------------------------------------------------
# WebDataset streaming


@pytest.fixture(scope="module")
def stream_bank(tmp_path_factory):
    # 6 tars over 2 shards, so that 2 workers both get tars
    path = tmp_path_factory.mktemp("stream") / "bank"
    return write_synthetic_bank(path, 120, size=8, backend="webdataset", shard_sizes=[60, 60], options={"maxcount": 20})


def test_stream_yields_every_crop_once_per_epoch_with_workers(stream_bank):
    from torch.utils.data import DataLoader

    loader = DataLoader(stream_bank.stream(), batch_size=None, num_workers=2)
    for _ in range(2):  # two epochs
        crops = list(loader)
        got = [int(decode_index(c.rgba)) for c in crops]
        assert sorted(got) == list(range(120))
        for c, i in zip(crops, got):
            np.testing.assert_array_equal(c.rgba, stream_bank[i].rgba)
            assert (c.class_id, c.meta) == (stream_bank[i].class_id, stream_bank[i].meta)


def test_stream_shuffle_is_a_permutation(stream_bank):
    got = [int(decode_index(c.rgba)) for c in stream_bank.stream(shuffle=50, seed=0)]
    assert sorted(got) == list(range(120))
    assert got != sorted(got)


def test_stream_resampled_never_ends(stream_bank):
    got = [int(decode_index(c.rgba)) for c in itertools.islice(stream_bank.stream(resampled=True, seed=1), 300)]
    assert len(got) == 300 and set(got) <= set(range(120))


def test_stream_reads_given_urls(stream_bank):
    tars = stream_bank.tar_paths()
    assert len(tars) == 6
    got = [int(decode_index(c.rgba)) for c in stream_bank.stream(urls=[str(tars[4])])]
    assert got == list(range(80, 100))  # tar 4 = shard 1's second tar


def test_stream_of_an_empty_bank_is_empty(tmp_path):
    bank = write_synthetic_bank(tmp_path / "empty", 0, size=8, backend="webdataset")
    assert list(bank.stream()) == []
