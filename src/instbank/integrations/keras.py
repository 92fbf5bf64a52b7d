"""Bank copy-paste in a Keras data pipeline: a ``PyDataset`` (Keras 3; ``Sequence`` on Keras 2)
and a ``tf.data.Dataset``, both over the user's own batch source, on the CPU, numpy in and out.

The pipeline many Keras users already have (the AlbumentationsX guide's): a ``PyDataset`` whose
``__getitem__`` loads a batch of images and masks and augments it outside the graph. Wrap that
source, and each batch gets ``k`` bank crops per image, drawn by ``BankSampler`` (class balanced by
default) and pasted with ``BankCopyPaste`` (the numba kernel on CPU, all ``B`` images in one call);
the masks, boxes, labels and semantic map come back updated (``instbank.paste.annotations``)::

    ds = BankPasteDataset(my_batches, "banks/coco", k=8, output="semantic", workers=4,
                          use_multiprocessing=True)
    model.fit(ds, epochs=10)

The source: ``source[i]`` (a sequence, e.g. a ``PyDataset``: its length is the epoch's length) or
``source(i)`` (a callable; give ``steps``, or none for an endless stream), returning a dict of
numpy arrays, channels last as Keras has them:

- ``images``: uint8 ``[B, H, W, 3]`` (or float16/float32 in ``[0, value_range]``: ``1.0`` unless
  ``CopyPasteConfig.value_range`` says ``255.0``)
- ``semantic``: integer ``[B, H, W]`` or ``[B, H, W, 1]`` class map (optional)
- ``masks``: bool or integer ``[B, N, H, W]`` instance masks, with ``labels`` integer ``[B, N]``
  and optionally ``boxes`` float ``[B, N, 4]`` (``x0, y0, x1, y1``) and ``valid`` bool ``[B, N]``

Batch ``i`` (``BankPaste.batch``) holds ``images`` (the input's dtype and shape), ``semantic``
(when given: its dtype and shape, painted with the class of each visible pasted pixel),
``masks`` ``[B, N+K, H, W]`` (the input's dtype), ``boxes`` float32 ``[B, N+K, 4]``, ``labels``
int64 ``[B, N+K]``, ``valid`` bool ``[B, N+K]`` (when masks are given: existing instances cut by the
pastes, then the pastes; see ``instbank.paste.BankCopyPaste``), and ``crop_indices`` int64
``[B, K]``. Labels of pasted objects are the bank's contiguous class ids, or ``label_map[id]``.

A source batch that nothing else holds (``_handed_over``: the dict and its ``images``/``semantic``
arrays referred to by nothing else, arrays owning their memory) is painted in place and returned,
without copies; any other (slices of an in-memory data set, cached or kept batches) is copied
first. ``BankPaste.paste`` never changes its input.

Reproducible and worker safe: the crops and the placement of batch ``i`` come from one generator
seeded with ``(seed, epoch, rank, i)``, so a batch does not depend on which Keras worker (thread or
process) made it, nor on the order batches are asked for. ``on_epoch_end`` moves to the next
epoch's draws (and calls the source's own ``on_epoch_end``). The bank travels as its path and each
process opens it for itself; nothing here holds state between batches.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: dtypes ``BankCopyPaste`` composites (numpy has no bfloat16).
IMAGE_DTYPES = (np.uint8, np.float16, np.float32)
INSTANCE_KEYS = ("masks", "boxes", "labels", "valid")


def _semantic_pair(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    if "semantic" not in batch:
        raise ValueError("output='semantic' needs a source batch with a 'semantic' map")
    return batch["images"], batch["semantic"]


#: What ``__getitem__`` returns, by name: the whole dict, or ``(images, semantic)`` for
#: ``model.fit`` on semantic segmentation. A callable ``output`` maps the dict itself.
OUTPUTS: dict[str, Callable[[dict], Any]] = {"dict": dict, "semantic": _semantic_pair}


class BankPaste:
    """Batches of a user's ``source`` with bank crops pasted in; the body of ``BankPasteDataset``
    and ``tf_dataset``, usable on its own (no Keras import).

    - ``source``: sequence or callable of batch dicts (module docstring).
    - ``bank``: an opened bank or its path.
    - ``k``: crops pasted per image (all of them: ``config.prob`` is 1.0 unless set otherwise).
    - ``steps``: batches per epoch; default ``len(source)`` for a sequence, endless for a callable.
    - ``config``: ``CopyPasteConfig`` (default: its defaults; ``impl="auto"`` is numba on CPU).
    - ``weighting``, ``seed`` and other ``BankSampler`` keywords (``classes``, ``min_area``,
      ``class_weights``, ...) choose the crops; ``rank`` defaults as in ``BankSampler``.
    - ``label_map``: int ``[C]``, the label written for bank class ``c`` (e.g. ``np.arange(C) + 1``
      when 0 is the background of the semantic maps); default: the bank's contiguous ids.
    - ``output``: ``"dict"``, ``"semantic"`` or a callable of the dict (see ``OUTPUTS``); a
      callable must be picklable for process workers under spawn/forkserver.
    """

    def __init__(
        self,
        source,
        bank,
        k: int = 8,
        *,
        steps: int | None = None,
        config=None,
        weighting: str = "class_balanced",
        seed: int = 0,
        label_map=None,
        output: str | Callable[[dict], Any] = "dict",
        **sampler_kwargs,
    ):
        from instbank.paste import CopyPasteConfig
        from instbank.sampling import BankSampler

        if isinstance(bank, (str, os.PathLike)):
            from instbank.storage import open_bank

            bank = open_bank(bank)
        self.source = source
        self.bank = bank
        self.steps = _steps_of(source, steps)
        self.config = config if config is not None else CopyPasteConfig()
        if not isinstance(self.config, CopyPasteConfig):
            raise TypeError(f"config must be a CopyPasteConfig, got {type(self.config).__name__}")
        self.sampler = BankSampler(bank, 1, k, weighting, seed, **sampler_kwargs)
        self.label_map = _label_map(label_map, len(bank.class_names))
        if not callable(output) and output not in OUTPUTS:
            raise ValueError(f"output must be a callable or one of {', '.join(OUTPUTS)}, got {output!r}")
        self.output = output
        self._owner = os.getpid()  # the process that made this object; any other one is a worker
        self._lock, self._pid, self._local = threading.Lock(), os.getpid(), threading.local()

    # ---- Keras's sequence protocol
    @property
    def num_batches(self) -> int | None:
        """Batches per epoch (``None``: endless)."""
        return self.steps

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless BankPaste (callable source, steps=None) has no length")
        return self.steps

    def __getitem__(self, index: int):
        fn = self.output if callable(self.output) else OUTPUTS[self.output]
        return fn(self.batch(index))

    def on_epoch_begin(self) -> None:
        _forward(self.source, "on_epoch_begin")

    def on_epoch_end(self) -> None:
        """Next epoch's draws; forwarded to the source (which may reshuffle)."""
        self.set_epoch(self.epoch + 1)
        _forward(self.source, "on_epoch_end")

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    # ---- batches
    def batch(self, index: int, epoch: int | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of the epoch (default: the current one) as a dict (module docstring)."""
        if self.steps is not None and not 0 <= index < self.steps:
            raise IndexError(f"batch index {index} out of range 0..{self.steps - 1}")
        source_batch = self.source[index] if _is_sequence(self.source) else self.source(index)
        # A batch nobody else holds (this name and getrefcount's argument are its only references,
        # and its arrays pass _handed_over) is painted in place: no copy of the images and map.
        inplace = sys.getrefcount(source_batch) == 2 and _handed_over(source_batch)
        return self._paste(source_batch, index, epoch, inplace)

    def paste(self, source_batch: Mapping[str, np.ndarray], index: int, epoch: int | None = None) -> dict[str, np.ndarray]:
        """``source_batch`` with the crops of batch ``index`` pasted in (inputs are not changed)."""
        return self._paste(source_batch, index, epoch, inplace=False)

    def _paste(self, source_batch, index: int, epoch: int | None, inplace: bool) -> dict[str, np.ndarray]:
        import torch

        from instbank.paste import BankCopyPaste
        from instbank.sampling import pixel_shape

        inputs = _check_batch(source_batch, self.config.value_range, self.bank, self.label_map)
        images = inputs["images"]
        b = images.shape[0]
        rng = self.generator(index, epoch)
        indices = self.sampler.draw(rng, b)
        plan_seed = int(rng.integers(2**63))
        if self._pid != os.getpid():
            self._enter_process()
        with self._lock:  # one reader per process at a time: backends may open handles lazily
            crops = self.sampler.numpy_batch(indices, self._crop_buffer(pixel_shape(self.bank, indices)))
        if b == 0:
            return _empty_result(inputs, indices)
        crops["class_ids"] = self.label_map[crops["class_ids"]]
        module = BankCopyPaste(self.config)  # one per call: set_bank_batch is state, workers may be threads
        module.set_bank_batch(_bank_batch(crops, len(self.bank.class_names)))
        semantic = inputs.get("semantic")
        out = module(
            _tensor(images).permute(0, 3, 1, 2),  # a channels-last view: the output keeps that layout
            masks=_tensor(inputs.get("masks")),
            boxes=_tensor(inputs.get("boxes")),
            labels=_tensor(inputs.get("labels")),
            valid=_tensor(inputs.get("valid")),
            semantic=None if semantic is None else _tensor(semantic.reshape(semantic.shape[:3])),
            generator=torch.Generator().manual_seed(plan_seed),
            return_masks="masks" in inputs,  # without instance masks in, none go out
            inplace=inplace,
        )
        result = {"images": out["images"].permute(0, 2, 3, 1).numpy()}
        if semantic is not None:
            result["semantic"] = out["semantic"].numpy().reshape(semantic.shape)
        if "masks" in inputs:
            result.update({key: out[key].numpy() for key in INSTANCE_KEYS})
        result["crop_indices"] = indices
        return result

    def generator(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The PCG64 generator of batch ``index``: ``SeedSequence([seed, epoch, rank, index])``."""
        epoch = self.epoch if epoch is None else int(epoch)
        key = [self.sampler.seed, epoch, self.sampler.rank, int(index)]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))

    # ---- processes and threads
    def _crop_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's uint8 buffer for a batch's crops: they live only inside ``_paste`` (the
        result holds none of them), and a new 4 MB array per batch (B=8, K=8, S=128) costs its
        page faults every time."""
        buffer = getattr(self._local, "crops", None)
        if buffer is None or buffer.shape != shape:
            buffer = self._local.crops = np.empty(shape, np.uint8)
        return buffer

    def _enter_process(self) -> None:
        """First use in this process: a new lock (after fork, the parent's could be held by one of
        its threads forever), and in a worker process one torch thread, as torch's DataLoader sets
        in its workers: workers share the cores, and on a busy machine each multi-threaded op
        waits for a time slice (a 49k-element copy took 8 ms with 2 threads, 4 us with 1, at load 3
        on 2 cores)."""
        self._lock, self._pid, self._local = threading.Lock(), os.getpid(), threading.local()
        if self._pid != self._owner:
            import torch

            torch.set_num_threads(1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"], state["_pid"], state["_local"] = None, None, None
        return state

    def __repr__(self) -> str:
        steps = "endless" if self.steps is None else self.steps
        return f"{type(self).__name__}({self.bank!r}, k={self.sampler.k}, steps={steps}, epoch={self.epoch})"


# ------------------------------------------------------------------------------------------------
# checks and conversions


def _check_batch(batch: Mapping[str, Any], value_range: float | None, bank, label_map: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of one source batch, checked against each other, the bank and the labels pasted;
    ``ValueError`` or ``TypeError`` naming the first array at fault and its shape."""
    if not isinstance(batch, Mapping) or "images" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(f"source batch must be a dict with 'images' (and 'semantic' and/or 'masks' + 'labels'), got {got}")
    out = {key: np.asarray(batch[key]) for key in ("images", "semantic", *INSTANCE_KEYS) if batch.get(key) is not None}
    images = out["images"]
    if images.ndim != 4 or images.shape[-1] != 3:
        first = images.ndim == 4 and images.shape[1] == 3
        hint = " (channels first? Keras arrays are channels last: images.transpose(0, 2, 3, 1))" if first else ""
        raise ValueError(f"images must be [B, H, W, 3], got {_shape(images)}{hint}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"images {_shape(images)} must be uint8, float16 or float32, got {images.dtype}")
    b, h, w, _ = images.shape
    if images.dtype != np.uint8 and images.size:
        _check_range(images, 1.0 if value_range is None else value_range)
    s = bank.crop_size[0]
    if s > min(h, w):
        raise ValueError(
            f"bank {getattr(bank, 'path', type(bank).__name__)}: crops are {s}x{s}, larger than images "
            f"{_shape(images)}; build the bank with --size <= {min(h, w)}"
        )
    if "semantic" in out:
        _check_semantic(out["semantic"], b, h, w, label_map)
    if "masks" in out:
        _check_instances(out, b, h, w)
    elif any(key in out for key in INSTANCE_KEYS):
        raise ValueError(f"{'/'.join(k for k in INSTANCE_KEYS if k in out)} given without masks [B, N, H, W]")
    return out


def _check_range(images: np.ndarray, value_range: float) -> None:
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= 0 and hi <= value_range):  # also False for NaN
        raise ValueError(
            f"images {_shape(images)} {images.dtype} hold values in [{lo:g}, {hi:g}], outside the declared "
            f"range [0, {value_range:g}] (CopyPasteConfig.value_range; 1.0 for float images unless set)"
        )


def _check_semantic(semantic: np.ndarray, b: int, h: int, w: int, label_map: np.ndarray) -> None:
    if semantic.shape not in ((b, h, w), (b, h, w, 1)):
        raise ValueError(
            f"semantic must be [B={b}, H={h}, W={w}] or [{b}, {h}, {w}, 1] like the images, got {_shape(semantic)}"
        )
    if not np.issubdtype(semantic.dtype, np.integer):
        raise ValueError(f"semantic {_shape(semantic)} must be an integer class map, got {semantic.dtype}")
    lo, hi = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
    limits = np.iinfo(semantic.dtype)
    if lo < limits.min or hi > limits.max:  # painting would wrap the labels around
        raise ValueError(f"semantic {_shape(semantic)} {semantic.dtype} cannot hold the pasted labels {lo}..{hi}")


def _check_instances(out: dict[str, np.ndarray], b: int, h: int, w: int) -> None:
    masks = out["masks"]
    if masks.ndim != 4 or masks.shape[0] != b or masks.shape[2:] != (h, w):
        raise ValueError(f"masks must be [B={b}, N, H={h}, W={w}] like the images, got {_shape(masks)}")
    if not (masks.dtype == bool or np.issubdtype(masks.dtype, np.integer)):
        raise ValueError(f"masks {_shape(masks)} must be bool or integer, got {masks.dtype}")
    n = masks.shape[1]
    if "labels" not in out:
        raise ValueError(f"masks {_shape(masks)} need labels [B={b}, N={n}]")
    for key, shape, kinds, what in (
        ("labels", (b, n), "iu", "integer"),
        ("boxes", (b, n, 4), "iuf", "numbers"),
        ("valid", (b, n), "b", "bool"),
    ):
        a = out.get(key)
        if a is None:
            continue
        if a.shape != shape:
            raise ValueError(f"{key} must be {list(shape)} to match masks {_shape(masks)}, got {_shape(a)}")
        if a.dtype.kind not in kinds:
            raise ValueError(f"{key} {_shape(a)} must be {what}, got {a.dtype}")


def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(map(str, a.shape)) + "]"


def _tensor(a: np.ndarray | None):
    """A torch view of ``a`` (a copy only when torch cannot view it: negative strides, such as
    ``bgr[..., ::-1]``, or a read-only array, which ``torch.from_numpy`` warns about)."""
    import torch

    if a is None:
        return None
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = a.copy()
    return torch.from_numpy(a)


def _bank_batch(crops: dict[str, np.ndarray], num_classes: int):
    import torch

    from instbank.types import BankBatch

    return BankBatch(**{key: torch.from_numpy(v) for key, v in crops.items()}, num_classes=num_classes)


def _empty_result(inputs: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """The result of an empty batch (``B = 0``): the inputs, instance arrays with ``N + K`` rows."""
    result = {"images": inputs["images"].copy()}
    if "semantic" in inputs:
        result["semantic"] = inputs["semantic"].copy()
    if "masks" in inputs:
        masks = inputs["masks"]
        n = masks.shape[1] + indices.shape[1]
        result["masks"] = np.zeros((0, n, *masks.shape[2:]), masks.dtype)
        result["boxes"] = np.zeros((0, n, 4), np.float32)
        result["labels"] = np.zeros((0, n), np.int64)
        result["valid"] = np.zeros((0, n), bool)
    result["crop_indices"] = indices
    return result


def _label_map(label_map, num_classes: int) -> np.ndarray:
    if label_map is None:
        return np.arange(num_classes, dtype=np.int64)
    table = np.asarray(label_map)
    if table.shape != (num_classes,) or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            f"label_map must be integer [{num_classes}] (one label per bank class), got {table.dtype} {_shape(table)}"
        )
    return table.astype(np.int64)


def _handed_over(batch: Mapping[str, Any]) -> bool:
    """True when the images (and the semantic map, if any) of a source batch can be painted in
    place without anyone seeing it: plain arrays that own their memory (not views, such as slices
    of an in-memory data set, nor memory maps) and that only the batch refers to (CPython's
    reference counts, as numpy's own elision of temporaries reads them: the dict, ``array`` here
    and getrefcount's argument)."""
    if not isinstance(batch, dict):
        return False
    for key in ("images", "semantic"):
        array = batch.get(key)
        if array is None and key == "semantic":
            continue
        if type(array) is not np.ndarray or not (array.flags.owndata and array.flags.writeable):
            return False
        if sys.getrefcount(array) != 3:
            return False
    return True


def _is_sequence(source) -> bool:
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def _steps_of(source, steps: int | None) -> int | None:
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 0):
        raise ValueError(f"steps must be a non-negative integer or None, got {steps!r}")
    if _is_sequence(source):
        return len(source) if steps is None else min(int(steps), len(source))
    if not callable(source):
        raise TypeError(f"source must be a sequence of batches or a callable source(i), got {type(source).__name__}")
    return None if steps is None else int(steps)


def _forward(source, hook: str) -> None:
    fn = getattr(source, hook, None)
    if callable(fn):
        fn()


# ------------------------------------------------------------------------------------------------
# Keras


def _keras_dataset_class() -> type:
    import keras

    base = getattr(keras.utils, "PyDataset", None)  # Keras 3; Keras 2 has only Sequence
    keras3 = base is not None
    base = base if keras3 else keras.utils.Sequence

    def __init__(self, source, bank, k=8, *, workers=1, use_multiprocessing=False, max_queue_size=10, **kwargs):
        if keras3:
            base.__init__(self, workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        elif (workers, use_multiprocessing, max_queue_size) != (1, False, 10):
            raise TypeError("Keras 2: pass workers, use_multiprocessing and max_queue_size to model.fit")
        BankPaste.__init__(self, source, bank, k, **kwargs)

    doc = f"""``keras.utils.{base.__name__}`` of ``BankPaste`` batches (see ``BankPaste`` and the module
    docstring): ``BankPasteDataset(source, bank, k=8, *, workers=1, use_multiprocessing=False,
    max_queue_size=10, **BankPaste keywords)``. Keras 3 runs ``workers`` threads, or processes with
    ``use_multiprocessing``; every batch is the same whichever ran it."""
    namespace = {"__init__": __init__, "__module__": __name__, "__doc__": doc, "__qualname__": "BankPasteDataset"}
    return type("BankPasteDataset", (BankPaste, base), namespace)


def _dataset_class() -> type:
    # Built once, on first use (keras reads KERAS_BACKEND when imported), and kept as a module
    # global so that pickle (spawn/forkserver workers) finds the very same class by its name.
    cls = globals().get("BankPasteDataset")
    if cls is None:
        cls = globals()["BankPasteDataset"] = _keras_dataset_class()
    return cls


def __getattr__(name: str):
    # PEP 562: BankPasteDataset subclasses a Keras class; keras is imported on first access only.
    if name == "BankPasteDataset":
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# tf.data


def tf_dataset(paste: BankPaste, output_signature=None):
    """``tf.data.Dataset.from_generator`` over ``paste``'s batches, in order, with its cardinality
    (``paste.steps``) when finite; each full pass ends an epoch (``paste.on_epoch_end``), so the
    next pass draws the next epoch's crops.

    ``output_signature``: default from batch 0 for ``output="dict"`` and ``"semantic"``, with the
    batch and instance dimensions ``None`` (the last batch may be smaller, ``N`` may vary); give it
    for a callable ``output``. The generator runs in one Python thread; for parallel loading use
    ``BankPasteDataset`` with ``workers``.
    """
    import tensorflow as tf

    if output_signature is None:
        if callable(paste.output):
            raise ValueError("tf_dataset needs output_signature= for a callable output")
        specs = _tf_specs(tf, paste.batch(0))
        output_signature = specs if paste.output == "dict" else (specs["images"], specs["semantic"])

    def generate():
        for index in range(paste.steps) if paste.steps is not None else itertools.count():
            yield paste[index]
        paste.on_epoch_end()

    dataset = tf.data.Dataset.from_generator(generate, output_signature=output_signature)
    if paste.steps is not None:  # a generator's length is unknown: fit would warn that its input ran out
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(paste.steps))
    return dataset


def _tf_specs(tf, batch: dict[str, np.ndarray]) -> dict:
    """``tf.TensorSpec`` of every array of a batch: the batch dimension ``None``, and for the
    instance arrays (``N + K``) the second one too."""
    specs = {}
    for key, a in batch.items():
        free = 2 if key in INSTANCE_KEYS else 1
        specs[key] = tf.TensorSpec((None,) * free + a.shape[free:], tf.as_dtype(a.dtype))
    return specs


__all__ = ["OUTPUTS", "BankPaste", "BankPasteDataset", "tf_dataset"]
