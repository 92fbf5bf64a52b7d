"""BankSampler: weighting targets (chi-square), streams, filters, distinct rows, >255 classes."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instbank.sampling import WEIGHTINGS, BankSampler
from instbank.testing import write_synthetic_bank

# A clear long tail: halving class sizes, and a last class with no crops at all.
TAIL_COUNTS = np.array([8000, 4000, 2000, 1000, 500, 250, 125, 64, 0])
N_CLASSES = len(TAIL_COUNTS)
EMPTY_CLASS = N_CLASSES - 1


@pytest.fixture(scope="module")
def tail_bank(tmp_path_factory):
    cids = np.repeat(np.arange(N_CLASSES), TAIL_COUNTS)
    path = tmp_path_factory.mktemp("tail") / "bank"
    return write_synthetic_bank(path, len(cids), size=4, num_classes=N_CLASSES, class_ids=cids)


@pytest.fixture(scope="module")
def wide_bank(tmp_path_factory):
    # 300 classes, long-tailed (default_class_ids): ids above 255 must work everywhere.
    return write_synthetic_bank(tmp_path_factory.mktemp("wide") / "bank", 3000, size=4, num_classes=300)


def chi2_critical_999(df: int) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty (1931); ~1% above the exact value for
    df >= 3 (df=7: 24.53 vs 24.32), i.e. slightly conservative."""
    z = 3.090232  # standard normal quantile at 0.999
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(draw_classes: np.ndarray, target: np.ndarray) -> tuple[float, int]:
    """Pearson statistic of the class counts of ``draw_classes`` against probabilities ``target``
    (classes of target 0 must not occur), and its degrees of freedom."""
    observed = np.bincount(draw_classes.ravel(), minlength=len(target))
    assert observed[target == 0].sum() == 0, "drew a class whose target probability is 0"
    live = target > 0
    expected = target[live] * draw_classes.size
    return float(((observed[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1


def draw_classes(bank, sampler: BankSampler) -> np.ndarray:
    return bank.crop_class_ids[next(iter(sampler))]


def normalized(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / x.sum()


N = TAIL_COUNTS.sum()
REPEAT_T = 0.1  # f_c < 0.1 for classes 3..7: those repeat, 0..2 do not
TARGETS = {
    "uniform": normalized(TAIL_COUNTS),
    "class_balanced": normalized(TAIL_COUNTS > 0),
    "sqrt": normalized(np.sqrt(TAIL_COUNTS)),
    "repeat_factor": normalized(TAIL_COUNTS * np.maximum(1.0, np.sqrt(REPEAT_T / np.maximum(TAIL_COUNTS / N, 1e-300)))),
}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_empirical_class_frequencies_match_target(tail_bank, weighting):
    sampler = BankSampler(tail_bank, batch_size=5000, k=4, weighting=weighting, seed=1, t=REPEAT_T)
    target = TARGETS[weighting]
    np.testing.assert_allclose(sampler.class_probabilities, target, rtol=1e-12)
    stat, df = chi2_statistic(draw_classes(tail_bank, sampler), target)  # 20 000 draws
    assert stat < chi2_critical_999(df)


def test_chi_square_check_has_power(tail_bank):
    # The same check rejects draws from another weighting: it can fail.
    classes = draw_classes(tail_bank, BankSampler(tail_bank, 5000, 4, "uniform", seed=1))
    stat, df = chi2_statistic(classes, TARGETS["sqrt"])
    assert stat > 10 * chi2_critical_999(df)


def test_repeat_factor_repeats_only_rare_classes(tail_bank):
    base = BankSampler(tail_bank, 1, 1, "uniform").class_probabilities
    rf = BankSampler(tail_bank, 1, 1, "repeat_factor", t=REPEAT_T).class_probabilities
    ratio = rf[:EMPTY_CLASS] / base[:EMPTY_CLASS]
    # classes 0..2 keep r = 1 (their ratio is the common renormalisation); 3..7 are boosted
    np.testing.assert_allclose(ratio[:3], ratio[0])
    assert (ratio[3:] > ratio[0] * 1.05).all()
    assert (np.diff(ratio[3:]) > 0).all()  # rarer -> repeated more


@pytest.mark.parametrize(
    ("weighting", "base"),
    [("class_balanced", TAIL_COUNTS > 0), ("uniform", TAIL_COUNTS)],
)
def test_explicit_class_weights_multiply_the_weighting(tail_bank, weighting, base):
    weights = {"class0": 0.1, 3: 2.0}
    sampler = BankSampler(tail_bank, 5000, 4, weighting, seed=2, class_weights=weights)
    multiplier = np.ones(N_CLASSES)
    multiplier[0], multiplier[3] = 0.1, 2.0
    target = normalized(base * multiplier)
    np.testing.assert_allclose(sampler.class_probabilities, target, rtol=1e-12)
    stat, df = chi2_statistic(draw_classes(tail_bank, sampler), target)
    assert stat < chi2_critical_999(df)


def test_zero_class_weight_removes_the_class(tail_bank):
    sampler = BankSampler(tail_bank, 500, 8, "class_balanced", class_weights={"class1": 0.0})
    assert sampler.class_probabilities[1] == 0
    assert not (draw_classes(tail_bank, sampler) == 1).any()


def test_class_with_no_crops_is_never_drawn(tail_bank):
    sampler = BankSampler(tail_bank, 2000, 8, "class_balanced", class_weights={EMPTY_CLASS: 100.0})
    assert sampler.class_probabilities[EMPTY_CLASS] == 0
    assert not (draw_classes(tail_bank, sampler) == EMPTY_CLASS).any()


def test_fallback_draw_is_exact_weighted_sampling(tail_bank):
    # The exact row sampler (used when redrawing duplicates stalls) has the same marginals for k=1.
    sampler = BankSampler(tail_bank, 1, 1, "sqrt", classes=[5, 6, 7])
    rows = sampler._draw_rows_without_replacement(np.random.default_rng(3), 20000)
    target = normalized(np.sqrt(TAIL_COUNTS) * np.isin(np.arange(N_CLASSES), [5, 6, 7]))
    stat, df = chi2_statistic(tail_bank.crop_class_ids[rows], target)
    assert stat < chi2_critical_999(df)


def test_skewed_weights_still_give_distinct_rows(tmp_path):
    # 10 crops, k=10: every row must hold all of them, although crop 9 is almost never drawn.
    bank = write_synthetic_bank(tmp_path / "b", 10, size=4, num_classes=2, class_ids=[0] * 9 + [1])
    sampler = BankSampler(bank, 4, 10, "uniform", class_weights={1: 1e-9})
    rows = np.sort(next(iter(sampler)), axis=1)
    np.testing.assert_array_equal(rows, np.tile(np.arange(10), (4, 1)))


def test_rows_repeat_crops_when_pool_is_smaller_than_k(tail_bank):
    sampler = BankSampler(tail_bank, 3, 100, classes=["class7"])  # 64 crops < k
    idx = next(iter(sampler))
    assert idx.shape == (3, 100)
    assert (tail_bank.crop_class_ids[idx] == 7).all()


# ---- streams


def first_batches(sampler: BankSampler, n: int = 3) -> np.ndarray:
    it = iter(sampler)
    return np.stack([next(it) for _ in range(n)])


def test_same_seed_same_stream_and_epochs_differ(tail_bank):
    a = BankSampler(tail_bank, 8, 4, "sqrt", seed=7)
    b = BankSampler(tail_bank, 8, 4, "sqrt", seed=7)
    first = first_batches(a)
    np.testing.assert_array_equal(first, first_batches(b))
    np.testing.assert_array_equal(first, first_batches(a))  # each iteration restarts the epoch
    a.set_epoch(1)
    assert not np.array_equal(first, first_batches(a))
    a.set_epoch(0)
    np.testing.assert_array_equal(first, first_batches(a))
    assert not np.array_equal(first, first_batches(BankSampler(tail_bank, 8, 4, "sqrt", seed=8)))


def test_streams_of_workers_ranks_epochs_are_independent(tail_bank):
    streams = {}
    for rank in range(2):
        for epoch in range(2):
            for worker in range(3):
                s = BankSampler(tail_bank, 16, 8, "uniform", seed=5, rank=rank, world_size=2)
                s.set_epoch(epoch)
                streams[rank, epoch, worker] = first_batches(s.for_worker(worker, 3), 4)
    keys = list(streams)
    for i, ka in enumerate(keys):
        for kb in keys[i + 1 :]:
            # Uniform over ~16k crops: the same index in the same slot is a 1-in-16k event.
            assert (streams[ka] == streams[kb]).mean() < 0.01, (ka, kb)


def test_steps_per_epoch_split_across_workers(tail_bank):
    sampler = BankSampler(tail_bank, 2, 2, steps_per_epoch=10)
    assert len(sampler) == 10
    shares = [sampler.for_worker(w, 3) for w in range(3)]
    assert [len(s) for s in shares] == [4, 3, 3]
    assert [sum(1 for _ in s) for s in shares] == [4, 3, 3]
    with pytest.raises(ValueError, match="worker_id 3"):
        sampler.for_worker(3, 3)


def test_infinite_sampler_has_no_length(tail_bank):
    sampler = BankSampler(tail_bank, 2, 2)
    with pytest.raises(TypeError, match="infinite"):
        len(sampler)
    it = iter(sampler)
    assert all(next(it).shape == (2, 2) for _ in range(50))


def test_rank_arguments_are_checked(tail_bank):
    with pytest.raises(ValueError, match="both rank and world_size"):
        BankSampler(tail_bank, 2, 2, rank=1)
    with pytest.raises(ValueError, match="rank 2 not in 0..1"):
        BankSampler(tail_bank, 2, 2, rank=2, world_size=2)


# ---- filters and argument errors


def test_class_filter_by_names_and_ids(tail_bank):
    sampler = BankSampler(tail_bank, 400, 8, "class_balanced", classes=["class2", 6])
    assert set(np.unique(draw_classes(tail_bank, sampler))) == {2, 6}
    np.testing.assert_allclose(sampler.class_probabilities[[2, 6]], [0.5, 0.5])
    assert BankSampler(tail_bank, 1, 1, classes="class5").pool_size == TAIL_COUNTS[5]


def test_area_and_truncation_filters(tail_bank):
    meta = tail_bank.meta_table
    sampler = BankSampler(tail_bank, 500, 8, min_area=20, allow_truncated=False)
    rows = meta[next(iter(sampler))]
    assert (rows["area"] >= 20).all() and not rows["truncated"].any()
    assert sampler.pool_size == int(((meta["area"] >= 20) & ~meta["truncated"]).sum())


def test_filter_that_leaves_nothing_raises(tail_bank):
    with pytest.raises(ValueError, match="no crops left to sample"):
        BankSampler(tail_bank, 2, 2, min_area=10**9)
    with pytest.raises(ValueError, match="no crops left to sample"):
        BankSampler(tail_bank, 2, 2, classes=[EMPTY_CLASS])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ["dog"]}, r"unknown class 'dog' in classes; valid: ids 0..8 or names class0, class1"),
        ({"class_weights": {"cat": 2.0}}, r"unknown class 'cat' in class_weights"),
        ({"class_weights": {N_CLASSES: 2.0}}, r"unknown class 9 in class_weights"),
        ({"class_weights": {0: -1.0}}, r"finite and >= 0"),
        ({"weighting": "inverse"}, r"unknown weighting 'inverse'; valid: uniform, class_balanced, sqrt, repeat_factor"),
        ({"weighting": "repeat_factor", "t": 0.0}, r"t must be > 0"),
        ({"k": 0}, r"k must be a positive integer"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(tail_bank, kwargs, message):
    args = {"batch_size": 2, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        BankSampler(tail_bank, **args)


def test_unknown_class_message_is_cut_short_for_many_classes(wide_bank):
    with pytest.raises(ValueError) as err:
        BankSampler(wide_bank, 2, 2, classes=["nope"])
    assert "class19, ..." in str(err.value) and "class20" not in str(err.value)


def test_more_than_255_classes(wide_bank):
    counts = wide_bank.class_frequencies
    sampler = BankSampler(wide_bank, 5000, 4, "class_balanced", seed=4, class_weights={299: 0.0})
    target = normalized((counts > 0) & (np.arange(300) != 299))
    np.testing.assert_allclose(sampler.class_probabilities, target)
    classes = draw_classes(wide_bank, sampler)
    assert classes.max() > 255 and not (classes == 299).any()
    stat, df = chi2_statistic(classes, target)
    assert stat < chi2_critical_999(df)


# ---- property test over every argument


@st.composite
def sampler_args(draw):
    return {
        "batch_size": draw(st.integers(1, 6)),
        "k": draw(st.integers(1, 12)),
        "weighting": draw(st.sampled_from(WEIGHTINGS)),
        "seed": draw(st.integers(0, 2**32)),
        "classes": draw(st.none() | st.lists(st.integers(0, N_CLASSES - 1), min_size=1, max_size=4)),
        "class_weights": draw(
            st.none()
            | st.dictionaries(st.integers(0, N_CLASSES - 1), st.sampled_from([0.0, 1e-6, 0.5, 3.0]), max_size=3)
        ),
        "min_area": draw(st.integers(0, 24)),  # synthetic areas are 12..22 at size 4
        "allow_truncated": draw(st.booleans()),
    }


@settings(max_examples=60, deadline=None)
@given(args=sampler_args())
def test_every_draw_respects_the_arguments(tail_bank, args):
    meta = tail_bank.meta_table
    cids = tail_bank.crop_class_ids
    ok = (meta["area"] >= args["min_area"]) & (args["allow_truncated"] | ~meta["truncated"])
    if args["classes"] is not None:
        ok &= np.isin(cids, args["classes"])
    zero = [c for c, w in (args["class_weights"] or {}).items() if w == 0]
    ok &= ~np.isin(cids, zero)
    if not ok.any():
        with pytest.raises(ValueError, match="no crops left"):
            BankSampler(tail_bank, **args)
        return
    sampler = BankSampler(tail_bank, **args)
    assert sampler.pool_size == ok.sum()
    assert sampler.class_probabilities.sum() == pytest.approx(1.0)
    idx = next(iter(sampler))
    assert idx.shape == (args["batch_size"], args["k"]) and idx.dtype == np.int64
    assert ((idx >= 0) & (idx < len(tail_bank))).all()
    assert ok[idx].all()
    if ok.sum() >= args["k"]:
        assert (np.diff(np.sort(idx, axis=1), axis=1) != 0).all()


def test_sampling_and_numpy_batches_do_not_import_torch(tail_bank):
    code = (
        "import sys; from instbank import open_bank; from instbank.sampling import BankSampler; "
        f"b = open_bank({str(tail_bank.path)!r}); s = BankSampler(b, 2, 3, 'sqrt', steps_per_epoch=2); "
        "batches = list(s.numpy_batches()); assert len(batches) == 2, batches; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_batches_hold_the_sampled_crops(tail_bank):
    from instbank.testing import decode_index

    sampler = BankSampler(tail_bank, 3, 5, "sqrt", seed=9, steps_per_epoch=3)
    batches = list(sampler.numpy_batches())
    meta = tail_bank.meta_table
    for batch, idx in zip(batches, sampler, strict=True):
        np.testing.assert_array_equal(batch["indices"], idx)
        np.testing.assert_array_equal(decode_index(batch["pixels"]), idx)  # earlier ones not overwritten
        np.testing.assert_array_equal(batch["class_ids"], tail_bank.crop_class_ids[idx])
        np.testing.assert_array_equal(batch["src_box"], meta["src_box"][idx].astype(np.float32))
        np.testing.assert_array_equal(batch["scale"], meta["scale"][idx].astype(np.float32))
        np.testing.assert_array_equal(batch["offset"], meta["offset"][idx].astype(np.float32))
        assert batch["pixels"].dtype == np.uint8 and batch["pixels"].shape == (3, 5, 4, 4, 4)
        assert batch["src_box"].dtype == batch["scale"].dtype == batch["offset"].dtype == np.float32


def test_random_access_batches_from_keyed_generators(tail_bank):
    # The Keras PyDataset pattern of docs/sampling.md: batch i from its own (seed, epoch, i) key.
    sampler = BankSampler(tail_bank, 4, 3, "class_balanced", seed=6)

    def batch(epoch, i):
        return sampler.numpy_batch(sampler.draw(np.random.default_rng([sampler.seed, epoch, i]), sampler.batch_size))

    again = batch(0, 5)
    np.testing.assert_array_equal(batch(0, 5)["pixels"], again["pixels"])
    assert again["indices"].shape == (4, 3)
    assert not np.array_equal(batch(0, 6)["indices"], again["indices"])
    assert not np.array_equal(batch(1, 5)["indices"], again["indices"])


def _rank_of_sampler_in_process_group(rank: int, world_size: int, store_path: str, bank_path: str, out_dir: str):
    import torch.distributed as dist

    from instbank import open_bank

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        sampler = BankSampler(open_bank(bank_path), 4, 2)
        np.save(f"{out_dir}/rank{rank}.npy", np.array([sampler.rank, sampler.world_size]))
        np.save(f"{out_dir}/draw{rank}.npy", next(iter(sampler)))
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_come_from_torch_distributed(tail_bank, tmp_path):
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "store"), str(tail_bank.path), str(tmp_path))
    mp.start_processes(_rank_of_sampler_in_process_group, args=args, nprocs=2, start_method="fork")
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), [rank, 2])
    assert not np.array_equal(np.load(tmp_path / "draw0.npy"), np.load(tmp_path / "draw1.npy"))
