"""BankStaging / bank_loader: DataLoader under every start method and backend; BankBatch layout."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch

from instbank.sampling import BankSampler, BankStaging, bank_loader
from instbank.storage import BACKENDS
from instbank.testing import decode_index, write_synthetic_bank
from instbank.types import BankBatch

SIZE = 8
STEPS = 5


def _skip_unwritten(backend: str) -> None:
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"backend {backend!r}: module {BACKENDS[backend]} is not in the tree yet")


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """``banks(backend)``: a 500-crop bank of that backend, written once per module."""
    cache = {}

    def get(backend: str):
        _skip_unwritten(backend)
        if backend not in cache:
            path = tmp_path_factory.mktemp(backend) / "bank"
            # Two shards: a step's indices span both, so get_many takes its multi-shard path too.
            cache[backend] = write_synthetic_bank(
                path, 500, size=SIZE, num_classes=5, backend=backend, shard_sizes=[300, 200]
            )
        return cache[backend]

    return get


@pytest.fixture(scope="module")
def memmap_bank(tmp_path_factory):
    return write_synthetic_bank(tmp_path_factory.mktemp("mm") / "bank", 500, size=SIZE, num_classes=5)


def round_robin(sampler: BankSampler, num_workers: int) -> list[np.ndarray]:
    """The order a DataLoader returns the workers' batches in: worker 0, 1, ..., skipping done ones."""
    streams = [list(sampler.for_worker(w, max(num_workers, 1))) for w in range(max(num_workers, 1))]
    rounds = itertools.zip_longest(*streams)
    return [idx for batch_round in rounds for idx in batch_round if idx is not None]


def assert_batch_matches_bank(batch: BankBatch, indices: np.ndarray, bank) -> None:
    b, k = indices.shape
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (b, k, 4, SIZE, SIZE)
    assert batch.class_ids.dtype == batch.indices.dtype == torch.int64
    assert batch.src_box.shape == (b, k, 4) and batch.offset.shape == (b, k, 2) and batch.scale.shape == (b, k)
    assert batch.src_box.dtype == batch.scale.dtype == batch.offset.dtype == torch.float32
    np.testing.assert_array_equal(batch.indices.numpy(), indices)
    np.testing.assert_array_equal(decode_index(batch.pixels.numpy()), indices)
    np.testing.assert_array_equal(batch.pixels.numpy(), bank.get_many(indices).reshape(batch.pixels.shape))
    meta = bank.meta_table[indices]
    np.testing.assert_array_equal(batch.class_ids.numpy(), meta["class_id"])
    np.testing.assert_array_equal(batch.src_box.numpy(), meta["src_box"].astype(np.float32))
    np.testing.assert_array_equal(batch.scale.numpy(), meta["scale"].astype(np.float32))
    np.testing.assert_array_equal(batch.offset.numpy(), meta["offset"].astype(np.float32))
    assert batch.num_classes == 5


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("context", "num_workers"), [(None, 0), ("fork", 2)])
def test_dataloader_batches_are_the_sampled_crops(banks, backend, context, num_workers):
    bank = banks(backend)
    loader = bank_loader(
        bank, 3, 4, num_workers=num_workers, multiprocessing_context=context,
        weighting="sqrt", seed=3, steps_per_epoch=STEPS,
    )
    batches = list(loader)
    assert len(batches) == len(loader) == STEPS
    expected = round_robin(loader.dataset.sampler, num_workers)
    for batch, indices in zip(batches, expected, strict=True):
        assert_batch_matches_bank(batch, indices, bank)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_pickling_start_methods_read_every_backend(banks, context):
    # spawn/forkserver pickle the dataset, so each bank must travel as a path. One loader chains
    # every backend: a loader with these start methods costs seconds (each worker imports torch).
    available = [b for b in BACKENDS if importlib.util.find_spec(BACKENDS[b]) is not None]
    stagings = [
        BankStaging(banks(b), BankSampler(banks(b), 3, 4, "sqrt", seed=i, steps_per_epoch=STEPS), pin_memory=False)
        for i, b in enumerate(available)
    ]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.ChainDataset(stagings), batch_size=None, num_workers=2, multiprocessing_context=context
    )
    # Each worker runs through the chain (its share of every backend's steps); the loader takes
    # the workers' batches in turn.
    per_worker = [[(st.bank, idx) for st in stagings for idx in st.sampler.for_worker(w, 2)] for w in range(2)]
    expected = [item for turn in itertools.zip_longest(*per_worker) for item in turn if item is not None]
    batches = list(loader)
    assert len(batches) == STEPS * len(available)
    for batch, (bank, indices) in zip(batches, expected, strict=True):
        assert_batch_matches_bank(batch, indices, bank)


def test_set_epoch_reaches_the_workers(memmap_bank):
    loader = bank_loader(memmap_bank, 2, 3, num_workers=2, multiprocessing_context="fork", steps_per_epoch=4)
    epoch0 = [b.indices for b in loader]
    loader.dataset.set_epoch(1)
    epoch1 = [b.indices for b in loader]
    assert not any(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    np.testing.assert_array_equal(torch.stack(epoch1).numpy(), np.stack(round_robin(loader.dataset.sampler, 2)))


def test_plain_iteration_keeps_earlier_batches_intact(memmap_bank):
    # No DataLoader (e.g. a hand-written loop): batches a consumer keeps are never overwritten.
    sampler = BankSampler(memmap_bank, 4, 2, "class_balanced", steps_per_epoch=6)
    kept = list(BankStaging(memmap_bank, sampler))
    for batch, indices in zip(kept, sampler, strict=True):
        assert_batch_matches_bank(batch, indices, memmap_bank)
        assert not batch.pixels.is_pinned()  # pin_memory=None: pinned only when CUDA is available


def test_buffers_are_reused_only_once_released(memmap_bank):
    sampler = BankSampler(memmap_bank, 4, 2, steps_per_epoch=8)
    expected = list(sampler)
    it = iter(BankStaging(memmap_bank, sampler, pin_memory=False))
    first = next(it)
    address = first.pixels.data_ptr()
    part = first.pixels[1]  # a tensor view outlives the batch
    array = first.pixels.numpy()[0]  # and so does an array made from it
    del first
    second = next(it)
    assert second.pixels.data_ptr() != address
    np.testing.assert_array_equal(decode_index(part.numpy()), expected[0][1])
    np.testing.assert_array_equal(decode_index(array), expected[0][0])
    del part, array, second
    third = next(it)
    assert third.pixels.data_ptr() == address  # released: the first buffer is recycled
    assert_batch_matches_bank(third, expected[2], memmap_bank)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_pin_memory_without_cuda_stages_unpinned(memmap_bank):
    sampler = BankSampler(memmap_bank, 2, 2, steps_per_epoch=1)
    (batch,) = list(BankStaging(memmap_bank, sampler, pin_memory=True))
    assert not batch.pixels.is_pinned()
    assert_batch_matches_bank(batch, next(iter(sampler)), memmap_bank)


def test_staging_agrees_with_numpy_batches(memmap_bank):
    sampler = BankSampler(memmap_bank, 2, 3, "sqrt", seed=11, steps_per_epoch=3)
    for batch, arrays in zip(BankStaging(memmap_bank, sampler), sampler.numpy_batches(), strict=True):
        for name in ("pixels", "class_ids", "indices", "src_box", "scale", "offset"):
            np.testing.assert_array_equal(getattr(batch, name).numpy(), arrays[name])


def test_staging_is_an_iterable_dataset_with_a_length(memmap_bank):
    staging = BankStaging(memmap_bank, BankSampler(memmap_bank, 2, 2, steps_per_epoch=7))
    assert isinstance(staging, torch.utils.data.IterableDataset)
    assert len(staging) == 7
    with pytest.raises(TypeError, match="infinite"):
        len(BankStaging(memmap_bank, BankSampler(memmap_bank, 2, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_staging_and_transfer(memmap_bank):
    sampler = BankSampler(memmap_bank, 2, 3, steps_per_epoch=2)
    batch = next(iter(BankStaging(memmap_bank, sampler)))  # pin_memory=None -> pinned here
    assert all(getattr(batch, name).is_pinned() for name in BankBatch._TENSORS)
    assert batch.pin_memory().pixels.data_ptr() == batch.pixels.data_ptr()  # no second copy
    on_gpu = batch.to("cuda")
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.pixels.cpu(), batch.pixels)


# ---- BankBatch.packed


def staged_batch(bank, **kwargs) -> BankBatch:
    sampler = BankSampler(bank, 3, 4, steps_per_epoch=1, **kwargs)
    return next(iter(BankStaging(bank, sampler, pin_memory=False)))


def test_packed_is_pixels_plus_class_plane(memmap_bank):
    batch = staged_batch(memmap_bank)
    packed = batch.packed()
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4, 5, SIZE, SIZE)
    assert torch.equal(packed[:, :, :4], batch.pixels)
    plane = batch.class_ids[:, :, None, None].expand(3, 4, SIZE, SIZE).to(torch.uint8)
    assert torch.equal(packed[:, :, 4], plane)


def test_packed_widens_for_more_than_255_classes(tmp_path):
    bank = write_synthetic_bank(tmp_path / "wide", 3000, size=4, num_classes=300)
    batch = staged_batch(bank, weighting="class_balanced", classes=list(range(256, 300)))
    packed = batch.packed()
    assert packed.dtype == torch.int16
    assert (packed[:, :, 4] >= 256).all()
    assert torch.equal(packed[:, :, 4, 0, 0], batch.class_ids.to(torch.int16))
    assert torch.equal(packed[:, :, :4], batch.pixels.to(torch.int16))


def test_packed_refuses_a_dtype_too_narrow_for_the_class_ids():
    batch = BankBatch(
        pixels=torch.zeros(1, 2, 4, 4, 4, dtype=torch.uint8),
        class_ids=torch.tensor([[0, 1202]]),
        indices=torch.zeros(1, 2, dtype=torch.int64),
        src_box=torch.zeros(1, 2, 4),
        scale=torch.ones(1, 2),
        offset=torch.zeros(1, 2, 2),
        num_classes=1203,  # LVIS
    )
    with pytest.raises(ValueError, match="cannot hold class ids up to 1202"):
        batch.packed(torch.uint8)
    assert batch.packed().dtype == torch.int16
    assert int(batch.packed()[0, 1, 4, 0, 0]) == 1202
