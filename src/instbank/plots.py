"""Plots of what is in a bank (``instbank stats --plot``): class frequencies, object sizes, truncation.

Four panels, from the bank's index only (no pixel is read):

- crops per class, sorted, log scale: the long tail is what class-balanced sampling is for; class
  names on the axis up to ``MAX_NAMED_CLASSES`` classes, class rank beyond (LVIS: 1203);
- source object area (mask pixels), log bins, with COCO's small / medium / large limits;
- the tight box's longer side at the source against the crop side ``S``: left of ``S`` the crop
  was enlarged (upscaled), right of it shrunk;
- truncated fraction (mask touches the image border) of the most frequent classes, and overall.

matplotlib through its object API on an Agg canvas: no pyplot, no global backend switch, nothing
shown on screen, safe in a notebook or a headless job.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from instbank.stats import SIZE_BUCKETS

#: Above this many classes the class axis shows ranks, not names (names would overlap).
MAX_NAMED_CLASSES = 100
#: Classes in the truncation panel (the most frequent ones).
TRUNCATION_CLASSES = 15
BAR, ACCENT, LIMIT = "#4c72b0", "#dd8452", "#555555"
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5}


def stats_figure(bank):
    """A ``matplotlib.figure.Figure`` of the four panels for an open ``bank``."""
    from matplotlib.figure import Figure

    counts = np.asarray(bank.class_frequencies, np.int64)
    named = len(counts) <= MAX_NAMED_CLASSES
    shown = int((counts > 0).sum())
    width = float(np.clip(0.17 * shown + 2.5, 12, 24)) if named else 14.0
    fig = Figure(figsize=(width, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=(1.15, 1))
    meta = bank.meta_table
    fig.suptitle(f"{bank.path.name}  {bank.version}: {len(bank)} crops of {bank.crop_size[0]}px, "
                 f"{len(counts)} classes", fontsize=12)
    class_panel(fig.add_subplot(grid[0, :]), counts, bank.class_names, named)
    area_panel(fig.add_subplot(grid[1, 0]), meta["area"])
    side_panel(fig.add_subplot(grid[1, 1]), meta["src_box"], bank.crop_size[0])
    truncation_panel(fig.add_subplot(grid[1, 2]), meta["class_id"], meta["truncated"], bank.class_names)
    return fig


def plot_stats(bank_path: str | os.PathLike, png_path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write the stats figure of the bank at ``bank_path`` to ``png_path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from instbank.storage import open_bank

    fig = stats_figure(open_bank(bank_path))
    FigureCanvasAgg(fig)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def class_panel(ax, counts: np.ndarray, names: list[str], named: bool) -> None:
    """Bars of crops per class (int64 ``[C]``), most first, log scale; empty classes counted in the
    title (a log axis cannot draw a zero)."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    order = order[counts[order] > 0]
    empty = len(counts) - len(order)
    ax.set_title(f"crops per class, sorted ({len(order)} classes with crops, {empty} without)", fontsize=11)
    if not len(order):
        _no_crops(ax)
        return
    x = np.arange(len(order))
    ax.bar(x, counts[order], width=0.8 if named else 1.0, color=BAR)
    ax.set_yscale("log")
    ax.set_ylim(0.7, counts.max() * 1.6)
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.set_ylabel("crops (log)")
    ax.set_xlim(-0.6, len(order) - 0.4)
    if named:
        ax.set_xticks(x, [names[c] for c in order], rotation=90, fontsize=8 if len(order) <= 50 else 7)
    else:
        ax.set_xlabel("class rank")
    ax.grid(axis="y", which="major", alpha=0.3)


def area_panel(ax, area: np.ndarray) -> None:
    """Histogram of int ``[N]`` source mask areas on log bins, with COCO's size limits."""
    ax.set_title("source object area (mask pixels)", fontsize=11)
    area = np.asarray(area, np.float64)
    if not len(area):
        _no_crops(ax)
        return
    limits = [lo for _, lo, _ in SIZE_BUCKETS if lo > 0]
    heights, _, _ = ax.hist(area, bins=_log_bins(area), color=BAR)
    left, right = _log_axis(ax, np.concatenate([area, limits]))
    ax.set_ylim(0, heights.max() * 1.3)  # headroom for the bucket labels
    ax.set_xlabel("area (log)")
    ax.set_ylabel("crops")
    for name, lo, hi in SIZE_BUCKETS:
        n = int(((area >= lo) & (area < hi)).sum())
        if lo > 0:
            ax.axvline(lo, color=LIMIT, linestyle="--", linewidth=1)
        middle = np.sqrt(max(lo, left) * min(hi, right))  # geometric middle of the visible bucket
        ax.text(middle, 0.97, f"{name}\n{n}", transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=9, color=LIMIT, bbox=_LABEL_BOX)


def side_panel(ax, src_box: np.ndarray, crop_side: int) -> None:
    """Histogram of the longer side of int ``[N, 4]`` source boxes, with the crop side ``S``."""
    ax.set_title(f"object longer side at the source vs crop side S={crop_side}", fontsize=11)
    side = np.maximum(src_box[:, 2] - src_box[:, 0], src_box[:, 3] - src_box[:, 1]).astype(np.float64)
    if not len(side):
        _no_crops(ax)
        return
    heights, _, _ = ax.hist(side, bins=_log_bins(side), color=BAR)
    _log_axis(ax, np.append(side, crop_side))
    ax.set_ylim(0, heights.max() * 1.2)
    ax.set_xlabel("longer side, source pixels (log)")
    ax.set_ylabel("crops")
    ax.axvline(crop_side, color=ACCENT, linewidth=2)
    up = float((side < crop_side).mean())
    ax.text(0.02, 0.97, f"upscaled {100 * up:.0f}%", transform=ax.transAxes, ha="left", va="top", color=ACCENT, bbox=_LABEL_BOX)
    ax.text(0.98, 0.97, f"shrunk {100 * (1 - up):.0f}%", transform=ax.transAxes, ha="right", va="top", color=ACCENT,
            bbox=_LABEL_BOX)


def truncation_panel(ax, class_ids: np.ndarray, truncated: np.ndarray, names: list[str]) -> None:
    """Truncated fraction of the ``TRUNCATION_CLASSES`` most frequent classes (int ``[N]`` class
    ids, bool ``[N]`` truncated), and overall as a dashed line."""
    ax.set_title("truncated crops (mask on the image border)", fontsize=11)
    if not len(class_ids):
        _no_crops(ax)
        return
    counts = np.bincount(class_ids, minlength=len(names))
    hit = np.bincount(class_ids, weights=truncated.astype(np.float64), minlength=len(names))
    top = np.lexsort((np.arange(len(counts)), -counts))[:TRUNCATION_CLASSES]
    top = top[counts[top] > 0][::-1]  # barh draws bottom-up: most frequent on top
    y = np.arange(len(top))
    ax.barh(y, hit[top] / counts[top], color=BAR)
    ax.set_yticks(y, [f"{names[c]} ({counts[c]})" for c in top], fontsize=8)
    overall = float(truncated.mean())
    ax.axvline(overall, color=ACCENT, linestyle="--", linewidth=1.5, label=f"all crops {100 * overall:.1f}%")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the class's crops")
    ax.legend(loc="lower right", fontsize=9)


def _plain_numbers():
    """Tick labels 1, 10, 100, 1000 instead of powers of ten: counts and pixels read faster."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}" if v < 1e6 else f"{v:.0e}")


def _log_axis(ax, values: np.ndarray) -> tuple[float, float]:
    """Log x axis over whole decades around ``values`` (so that labelled ticks always show);
    returns the limits."""
    from matplotlib.ticker import NullFormatter

    left = 10.0 ** np.floor(np.log10(max(float(values.min()), 1.0)))
    right = 10.0 ** np.ceil(np.log10(max(float(values.max()), 1.0)) + 1e-9)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.xaxis.set_major_formatter(_plain_numbers())
    ax.xaxis.set_minor_formatter(NullFormatter())
    return left, right


def _log_bins(values: np.ndarray, per_decade: int = 8) -> np.ndarray:
    lo, hi = max(float(values.min()), 1.0), max(float(values.max()), 2.0)
    decades = max(np.log10(hi) - np.log10(lo), 0.5)
    return np.logspace(np.log10(lo), np.log10(hi) + 1e-9, int(np.ceil(decades * per_decade)) + 1)


def _no_crops(ax) -> None:
    ax.text(0.5, 0.5, "no crops", transform=ax.transAxes, ha="center", va="center", color=LIMIT)
    ax.set_xticks([])
    ax.set_yticks([])
