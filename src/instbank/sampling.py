"""Which crops to paste, step by step: class-balanced index streams and batch staging.

``BankSampler`` draws ``[B, K]`` crop indices per step (numpy only; torch is not imported to draw).
``BankStaging`` (a ``torch.utils.data.IterableDataset``) turns each step into a ``BankBatch`` with
one vectorised ``bank.get_many`` call; ``bank_loader`` wraps it in a ``DataLoader``.
``BankSampler.numpy_batches`` yields the same batches as numpy dicts for non-torch pipelines.

Weightings (``n_c``: crops of class ``c`` left after the filters, ``N = sum n_c``). Every scheme
gives each crop a weight that depends only on its class, ``w_c``, so a draw picks class ``c`` with
probability ``p_c = n_c * w_c * m_c / sum_j n_j * w_j * m_j`` (``m_c``: the optional
``class_weights`` multiplier, 1.0 for classes not named) and then a crop of ``c`` uniformly:

================  ====================================  ===================================
weighting         crop weight ``w_c``                   class probability ``p_c`` ∝
================  ====================================  ===================================
uniform           1                                     ``n_c``
class_balanced    ``1 / n_c``                           1
sqrt              ``n_c ** -0.5``                       ``sqrt(n_c)``  (Mahajan et al. 2018;
                                                        Kang et al. 2020 "square-root")
repeat_factor     ``max(1, sqrt(t / f_c))``,            ``n_c * r(c)``  (LVIS, Gupta et al.
                  ``f_c = n_c / N``                     2019, with crops as the units)
================  ====================================  ===================================

Streams: the indices of one (worker's) epoch are a function of ``(seed, epoch, rank, worker_id)``
only: ``np.random.SeedSequence([seed, epoch, rank, worker_id])`` seeds a PCG64 generator.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

WEIGHTINGS = ("uniform", "class_balanced", "sqrt", "repeat_factor")

# Duplicates inside a row are redrawn; a row still holding one after this many rounds (weights so
# skewed that the few remaining distinct crops are almost never drawn) is drawn exactly instead.
_MAX_REDRAW_ROUNDS = 16
# Keys per chunk of the exact fallback draw (float64: 32 MiB).
_FALLBACK_KEYS = 1 << 22
# Class names shown in an "unknown class" message before it is cut short (LVIS has 1203).
_NAMES_SHOWN = 20


# --------------------------------------------------------------------------------------------
# class tables


def class_crop_weights(counts: np.ndarray, weighting: str, t: float = 1e-3) -> np.ndarray:
    """float64 ``[C]``: the weight ``w_c`` of each crop of class ``c`` under ``weighting``
    (see the module docstring), from int ``[C]`` crop counts; 0 for classes with no crops."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if weighting == "repeat_factor" and not t > 0:
        raise ValueError(f"repeat_factor threshold t must be > 0, got {t}")
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    if not present.any():
        return np.zeros_like(counts)
    safe = np.where(present, counts, 1.0)
    if weighting == "uniform":
        w = np.ones_like(safe)
    elif weighting == "class_balanced":
        w = 1.0 / safe
    elif weighting == "sqrt":
        w = safe**-0.5
    else:  # repeat_factor, with f_c the fraction of the eligible crops that are of class c
        w = np.maximum(1.0, np.sqrt(t / (safe / counts.sum())))
    return np.where(present, w, 0.0)


def resolve_class_ids(keys: Iterable[Any], names: list[str], what: str) -> list[int]:
    """Contiguous ids of ``keys`` (class names or int ids); ``ValueError`` naming the valid ones."""
    by_name: dict[str, int] = {}
    for i, name in enumerate(names):
        by_name.setdefault(name, i)
    ids = []
    for key in keys:
        if isinstance(key, str) and key in by_name:
            ids.append(by_name[key])
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < len(names):
            ids.append(int(key))
        else:
            shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
            raise ValueError(
                f"unknown class {key!r} in {what}; valid: ids 0..{len(names) - 1} or names {shown}"
            )
    return ids


def _as_key_list(classes: Any) -> list[Any]:
    # A lone name is one class, not an iterable of one-letter names.
    return [classes] if isinstance(classes, (str, int, np.integer)) else list(classes)


# --------------------------------------------------------------------------------------------
# the sampler


class BankSampler:
    """Infinite (or ``steps_per_epoch``-long) stream of int64 ``[batch_size, k]`` crop indices.

    Draws are with replacement across steps; inside one row of ``k`` the crops are distinct
    whenever at least ``k`` crops are eligible (duplicates are redrawn, i.e. weighted sampling
    without replacement), otherwise i.i.d. ``class_probabilities`` are those of a single draw;
    redrawing duplicates lowers a class's share of a row only by O(k / n_c), so only for classes
    with about ``k`` crops or fewer.

    - ``weighting``: one of ``WEIGHTINGS`` (module docstring); ``t``: the repeat-factor threshold.
    - ``class_weights``: ``{name or id: multiplier}`` applied on top of ``weighting`` to every crop
      of that class; classes not named keep 1.0, and 0.0 removes a class. With
      ``weighting="class_balanced"`` the class probabilities are exactly proportional to them.
    - Filters, applied before counting ``n_c``: ``classes`` (names or ids to keep), ``min_area``
      (source mask pixels, ``meta_table["area"] >= min_area``), ``allow_truncated``.
    - ``rank``/``world_size``: default to ``torch.distributed`` when it is initialised, else 0/1.
    - ``steps_per_epoch``: steps of one epoch on this rank, split over DataLoader workers
      (``for_worker``); ``None``: infinite.
    """

    def __init__(
        self,
        bank,
        batch_size: int,
        k: int,
        weighting: str = "uniform",
        seed: int = 0,
        *,
        t: float = 1e-3,
        class_weights: Mapping[Any, float] | None = None,
        classes: Iterable[Any] | None = None,
        min_area: int = 0,
        allow_truncated: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        steps_per_epoch: int | None = None,
    ):
        for name, value in (("batch_size", batch_size), ("k", k)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if steps_per_epoch is not None and steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0 or None, got {steps_per_epoch}")
        self.bank = bank
        self.batch_size, self.k, self.seed = int(batch_size), int(k), int(seed)
        self.weighting = weighting
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.epoch = 0
        self.worker_id, self.num_workers = 0, 1
        names = list(bank.class_names)
        pool = self._eligible(bank, names, classes, min_area, allow_truncated)
        class_of_pool = np.asarray(bank.crop_class_ids, np.int64)[pool]
        counts = np.bincount(class_of_pool, minlength=len(names))
        mass = counts * class_crop_weights(counts, weighting, t) * _multipliers(class_weights, names)
        if not mass.sum() > 0:
            raise ValueError(
                f"{_bank_name(bank)}: no crops left to sample (classes={classes!r}, min_area={min_area}, "
                f"allow_truncated={allow_truncated}, class_weights={class_weights!r})"
            )
        #: float64 ``[C]``: probability that one draw is a crop of class ``c``.
        self.class_probabilities = mass / mass.sum()
        self._build_tables(pool, class_of_pool)

    # ---- setup
    @staticmethod
    def _eligible(bank, names, classes, min_area, allow_truncated) -> np.ndarray:
        """int64 indices of the crops that pass the filters, ascending."""
        keep = np.ones(len(bank), bool)
        if classes is not None:
            wanted = resolve_class_ids(_as_key_list(classes), names, "classes")
            keep &= np.isin(np.asarray(bank.crop_class_ids, np.int64), wanted)
        if min_area > 0 or not allow_truncated:
            meta = bank.meta_table
            keep &= meta["area"] >= min_area
            if not allow_truncated:
                keep &= ~meta["truncated"]
        return np.flatnonzero(keep)

    def _build_tables(self, pool: np.ndarray, class_of_pool: np.ndarray) -> None:
        """CSR over the drawable classes: ``_order[_start[j] : _start[j] + _count[j]]`` are the crops
        of the j-th drawable class; ``_cdf`` its cumulative probability."""
        active = np.flatnonzero(self.class_probabilities > 0)
        in_active = np.isin(class_of_pool, active)
        pool, class_of_pool = pool[in_active], class_of_pool[in_active]
        self._order = pool[np.argsort(class_of_pool, kind="stable")]
        self._count = np.bincount(class_of_pool, minlength=len(self.class_probabilities))[active]
        self._start = np.concatenate([[0], np.cumsum(self._count)[:-1]])
        cdf = np.cumsum(self.class_probabilities[active])
        self._cdf = cdf / cdf[-1]  # exactly 1.0 at the end: a uniform in [0, 1) never falls past it
        self._active = active

    # ---- streams
    def set_epoch(self, epoch: int) -> None:
        """Select the stream of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def for_worker(self, worker_id: int, num_workers: int) -> BankSampler:
        """A copy drawing worker ``worker_id``'s stream and its share of ``steps_per_epoch``."""
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id {worker_id} not in 0..{num_workers - 1}")
        other = copy.copy(self)
        other.worker_id, other.num_workers = int(worker_id), int(num_workers)
        return other

    @property
    def num_steps(self) -> int | None:
        """Steps this worker yields per epoch (``None``: infinite)."""
        if self.steps_per_epoch is None:
            return None
        share, extra = divmod(self.steps_per_epoch, self.num_workers)
        return share + (self.worker_id < extra)

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an infinite BankSampler (steps_per_epoch=None) has no length")
        return self.num_steps

    def generator(self) -> np.random.Generator:
        """The PCG64 generator of this (seed, epoch, rank, worker) stream, from its start."""
        key = [self.seed, self.epoch, self.rank, self.worker_id]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = self.generator()
        steps = self.num_steps
        step = 0
        while steps is None or step < steps:
            yield self.draw(rng, self.batch_size)
            step += 1

    @property
    def pool_size(self) -> int:
        """Number of crops that can be drawn (after filters and zero weights)."""
        return len(self._order)

    # ---- drawing
    def draw(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """int64 ``[rows, k]`` crop indices drawn from ``rng``; rows distinct when possible."""
        idx = self._draw_iid(rng, (rows, self.k))
        if self.k == 1 or self.pool_size < self.k:
            return idx
        for _ in range(_MAX_REDRAW_ROUNDS):
            dup = _later_duplicates(idx)
            n = int(np.count_nonzero(dup))
            if n == 0:
                return idx
            idx[dup] = self._draw_iid(rng, n)
        stuck = _later_duplicates(idx).any(axis=1)
        if stuck.any():
            idx[stuck] = self._draw_rows_without_replacement(rng, int(np.count_nonzero(stuck)))
        return idx

    def _draw_iid(self, rng: np.random.Generator, shape) -> np.ndarray:
        """Independent draws: a class from ``_cdf``, then a crop of it uniformly."""
        cls = np.searchsorted(self._cdf, rng.random(shape), side="right")
        return self._order[self._start[cls] + rng.integers(self._count[cls])]

    def _draw_rows_without_replacement(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """Exact weighted rows of ``k`` distinct crops: the ``k`` smallest ``E_i / w_i`` with
        ``E_i ~ Exp(1)`` (Efraimidis & Spirakis 2006, keys in log form). O(pool) per row, in
        chunks of at most ``_FALLBACK_KEYS`` keys (32 MiB) whatever the bank size."""
        per_crop = np.repeat(self.class_probabilities[self._active] / self._count, self._count)
        chunk = max(1, _FALLBACK_KEYS // self.pool_size)
        out = np.empty((rows, self.k), np.int64)
        for lo in range(0, rows, chunk):
            keys = rng.exponential(size=(min(chunk, rows - lo), self.pool_size)) / per_crop
            out[lo : lo + chunk] = self._order[np.argpartition(keys, self.k - 1, axis=1)[:, : self.k]]
        return out

    # ---- numpy batches (no torch)
    def numpy_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``numpy_batch(indices)`` for every step of this stream (fresh arrays each step)."""
        for indices in self:
            yield self.numpy_batch(indices)

    def numpy_batch(self, indices: np.ndarray, pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The crops at int64 ``[B, K]`` ``indices`` as new arrays: ``pixels`` uint8
        ``[B, K, 4, S, S]``, ``class_ids`` int64 ``[B, K]``, ``indices`` int64 ``[B, K]``,
        ``src_box`` float32 ``[B, K, 4]``, ``scale`` float32 ``[B, K]``, ``offset`` float32
        ``[B, K, 2]`` and, for a bank with keypoints, ``keypoints`` float32 ``[B, K, J, 3]`` and
        ``keypoint_flip`` int64 ``[J]`` (``gather_keypoints``). ``pixels``: an array to read the
        crops into instead of a new one (C-contiguous uint8 of that shape; a caller's buffer
        reused across steps)."""
        if pixels is None:
            pixels = np.empty(pixel_shape(self.bank, indices), np.uint8)
        gather_pixels(self.bank, indices, pixels)
        return {"pixels": pixels, **gather_geometry(self.bank, indices), **gather_keypoints(self.bank, indices)}

    def __repr__(self) -> str:
        steps = "inf" if self.steps_per_epoch is None else self.steps_per_epoch
        return (
            f"BankSampler({self.weighting}, B={self.batch_size}, K={self.k}, seed={self.seed}, "
            f"epoch={self.epoch}, rank={self.rank}/{self.world_size}, worker={self.worker_id}/"
            f"{self.num_workers}, steps={steps}, pool={self.pool_size})"
        )


def _later_duplicates(idx: np.ndarray) -> np.ndarray:
    """bool ``[rows, k]``: True where the value already occurs earlier (by sort order) in its row."""
    order = np.argsort(idx, axis=1, kind="stable")
    ranked = np.take_along_axis(idx, order, axis=1)
    dup = np.zeros(idx.shape, bool)
    np.put_along_axis(dup, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
    return dup


def _multipliers(class_weights: Mapping[Any, float] | None, names: list[str]) -> np.ndarray:
    out = np.ones(len(names))
    if not class_weights:
        return out
    ids = resolve_class_ids(class_weights.keys(), names, "class_weights")
    values = np.asarray(list(class_weights.values()), np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"class_weights must be finite and >= 0, got {dict(class_weights)!r}")
    out[ids] = values
    return out


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if rank is None:
        # torch.distributed cannot be initialised unless torch is imported: no import for numpy users.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in 0..{world_size - 1} for world_size {world_size}")
    return int(rank), int(world_size)


def _bank_name(bank) -> str:
    return str(getattr(bank, "path", type(bank).__name__))


# --------------------------------------------------------------------------------------------
# staging (numpy part, shared by numpy_batches and BankStaging)


def pixel_shape(bank, indices: np.ndarray) -> tuple[int, ...]:
    """The shape of the crops at ``indices`` (any int array shape): ``(*indices.shape, 4, S, S)``."""
    h, w = bank.crop_size
    return (*indices.shape, 4, h, w)


def gather_pixels(bank, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Read crops int64 ``[B, K]`` into ``out`` uint8 ``[B, K, 4, S, S]`` with one ``get_many``."""
    bank.get_many(indices.reshape(-1), out=out.reshape(-1, *out.shape[2:]))
    return out


def gather_geometry(bank, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``class_ids``, ``indices`` int64 ``[B, K]``; ``src_box`` float32 ``[B, K, 4]``; ``scale``
    float32 ``[B, K]``; ``offset`` float32 ``[B, K, 2]`` of crops ``indices`` int64 ``[B, K]``."""
    rows = bank.meta_table[indices.reshape(-1)]
    shape = indices.shape
    return {
        "class_ids": rows["class_id"].astype(np.int64).reshape(shape),
        "indices": np.ascontiguousarray(indices, np.int64),
        "src_box": rows["src_box"].astype(np.float32).reshape(*shape, 4),
        "scale": rows["scale"].astype(np.float32).reshape(shape),
        "offset": rows["offset"].astype(np.float32).reshape(*shape, 2),
    }


def gather_keypoints(bank, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``keypoints`` float32 ``[B, K, J, 3]`` (crop pixels, ``BankBatch.keypoints``) of crops
    ``indices`` int64 ``[B, K]`` and the layout's ``keypoint_flip`` int64 ``[J]``; ``{}`` for a
    bank without keypoints (``bank.keypoint_spec`` is None or absent)."""
    spec = getattr(bank, "keypoint_spec", None)
    if spec is None:
        return {}
    points = bank.get_keypoints(indices.reshape(-1))
    return {"keypoints": points.reshape(*indices.shape, spec.num_keypoints, 3),
            "keypoint_flip": np.asarray(spec.flip, np.int64)}


# --------------------------------------------------------------------------------------------
# staging (torch part)


class _BankStagingImpl:
    """Body of ``BankStaging``; the class itself also derives from torch's ``IterableDataset``,
    so it is assembled on first use (``__getattr__`` below) to keep torch out of numpy-only use."""

    def __init__(self, bank, sampler: BankSampler, pin_memory: bool | None = None):
        self.bank = bank
        self.sampler = sampler
        self.pin_memory = pin_memory

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()  # the one place that reads worker globals
        if info is None:
            # Like DataLoader(pin_memory=True), pinning is skipped where there is no CUDA.
            pin = self.pin_memory is not False and torch.cuda.is_available()
            sampler, alloc = self.sampler, (_pinned_empty if pin else _ReusedBuffers())
        else:
            # Allocate where the batch goes next: the worker's result queue moves tensors to
            # shared memory, so staging into shared memory saves one copy per step. A buffer
            # cannot be reused here: the main process maps the same pages.
            pin = False  # a worker must not touch CUDA; DataLoader(pin_memory=True) pins in the main process
            sampler, alloc = self.sampler.for_worker(info.id, info.num_workers), _shared_empty
        for indices in sampler:
            yield self.stage(indices, alloc, pin)

    def stage(self, indices: np.ndarray, alloc: Callable, pin: bool = False):
        """``BankBatch`` for int64 ``[B, K]`` ``indices``: pixels gathered straight into the tensor
        ``alloc(shape)`` returns; geometry (and keypoint) tensors pinned when ``pin``."""
        import torch

        from instbank.types import BankBatch

        pixels = alloc(pixel_shape(self.bank, indices))
        gather_pixels(self.bank, indices, pixels.numpy())
        arrays = {**gather_geometry(self.bank, indices), **gather_keypoints(self.bank, indices)}
        geometry = {name: torch.from_numpy(a) for name, a in arrays.items()}
        if pin:
            geometry = {name: t.pin_memory() for name, t in geometry.items()}
        return BankBatch(pixels=pixels, num_classes=len(self.bank.class_names), **geometry)

    def __repr__(self) -> str:
        return f"BankStaging({_bank_name(self.bank)}, {self.sampler!r}, pin_memory={self.pin_memory})"


class _ReusedBuffers:
    """Pixel tensors for the main process, over numpy buffers reused once nothing refers to them.

    A fresh 33 MB buffer per step costs more than the gather itself (page faults: measured in
    docs/perf/staging.md), so buffers are recycled, but only when safe: each step hands out
    ``torch.from_numpy(view)`` of a new ndarray view of a buffer, and that tensor, every tensor
    view of it and every ``.numpy()`` of those keep ``view`` alive; once the weak reference to
    ``view`` is dead no one can see the buffer's bytes and it is reused. At most ``slots`` buffers
    are kept; beyond that (a consumer holding many batches) a step gets a buffer of its own.
    """

    def __init__(self, slots: int = 4):
        self.slots = slots
        self._pool: list[tuple[np.ndarray, weakref.ref]] = []

    def __call__(self, shape):
        for slot, (buf, ref) in enumerate(self._pool):
            if ref() is None and buf.shape == shape:
                return self._lend(buf, slot)
        buf = np.empty(shape, np.uint8)  # numpy asks for transparent huge pages: few faults
        return self._lend(buf, None if len(self._pool) < self.slots else -1)

    def _lend(self, buf: np.ndarray, slot: int | None):
        """Tensor over a new view of ``buf``, tracked in ``slot`` (None: a new slot; -1: untracked)."""
        import torch

        view = buf.view()
        if slot is None:
            self._pool.append((buf, weakref.ref(view)))
        elif slot >= 0:
            self._pool[slot] = (buf, weakref.ref(view))
        return torch.from_numpy(view)


def _pinned_empty(shape):
    import torch

    # Served by torch's caching host allocator: after the first steps no cudaHostAlloc per step.
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def _shared_empty(shape):
    import torch

    # As torch's own default_collate does in workers (torch/utils/data/_utils/collate.py).
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _make_bank_staging() -> type:
    import torch

    doc = """``torch.utils.data.IterableDataset`` yielding one ``BankBatch`` per sampler step.

    ``BankStaging(bank, sampler, pin_memory=None)``. Use with
    ``DataLoader(staging, batch_size=None, num_workers=n, pin_memory=...)``; each worker draws its
    own stream (``sampler.for_worker``). Each step is one ``bank.get_many`` straight into the
    memory the batch is handed out in: fresh shared memory in a worker; in the main process
    pinned memory when ``pin_memory`` and CUDA is available (``None``: pin then), else a recycled buffer
    that is reused only once no tensor or array still refers to it. A consumer may keep batches
    (or views of them): nothing it can still see is overwritten.
    """
    bases = (_BankStagingImpl, torch.utils.data.IterableDataset)
    return type("BankStaging", bases, {"__module__": __name__, "__doc__": doc})


def _bank_staging_class() -> type:
    # Built once and cached as a module global, so that pickle (spawn workers) finds the very
    # same class by its name.
    cls = globals().get("BankStaging")
    if cls is None:
        cls = globals()["BankStaging"] = _make_bank_staging()
    return cls


def __getattr__(name: str):
    # PEP 562: BankStaging needs torch to exist as a class; build it on first access only.
    if name == "BankStaging":
        return _bank_staging_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bank_loader(
    bank,
    batch_size: int,
    k: int,
    num_workers: int = 0,
    multiprocessing_context=None,
    pin_memory: bool | None = None,
    **sampler_kwargs,
):
    """``DataLoader`` of ``BankBatch`` over ``BankStaging(bank, BankSampler(bank, batch_size, k,
    **sampler_kwargs))``; ``pin_memory=None`` pins when CUDA is available. Call
    ``loader.dataset.set_epoch(e)`` before each epoch (workers are started per epoch)."""
    import torch

    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    staging = _bank_staging_class()(bank, BankSampler(bank, batch_size, k, **sampler_kwargs), pin_memory=pin)
    return torch.utils.data.DataLoader(
        staging,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )


__all__ = [
    "WEIGHTINGS",
    "BankSampler",
    "BankStaging",
    "bank_loader",
    "class_crop_weights",
    "gather_geometry",
    "gather_keypoints",
    "gather_pixels",
    "resolve_class_ids",
]
