"""instbank stats --plot: the figure's panels agree with the bank, the PNG is real, many or no
classes still draw."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_rich_png as _assert_rich_png
from PIL import Image
from typer.testing import CliRunner

from instbank.cli import app
from instbank.plots import MAX_NAMED_CLASSES, TRUNCATION_CLASSES, plot_stats, stats_figure
from instbank.stats import bank_stats
from instbank.testing import write_synthetic_bank


def assert_rich_png(path, size=None, min_std=20.0, min_colours=50):
    """Plots have few colours but strong contrast."""
    return _assert_rich_png(path, size, min_std, min_colours)


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_panels_agree_with_the_bank(sample_coco_bank):
    bank = sample_coco_bank
    fig = stats_figure(bank)
    classes, area, side, truncated = fig.axes
    counts = bank.class_frequencies
    order = [c for c in np.lexsort((np.arange(len(counts)), -counts)) if counts[c] > 0]
    # sorted bars, one per class with crops, named, on a log axis
    assert [t.get_text() for t in classes.get_xticklabels()] == [bank.class_names[c] for c in order]
    assert [p.get_height() for p in classes.patches] == [counts[c] for c in order]
    assert classes.get_yscale() == "log" and "60 without" in classes.get_title()
    # COCO buckets: the same counts as `instbank stats`
    buckets = bank_stats(bank.path)["area_buckets"]
    assert texts(area) == [f"{name}\n{buckets[name]}" for name in ("small", "medium", "large")]
    assert sum(p.get_height() for p in area.patches) == len(bank)
    # upscaled share against S = 64
    box = bank.meta_table["src_box"]
    up = (np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) < 64).mean()
    assert texts(side)[0] == f"upscaled {100 * up:.0f}%"
    # truncation of the most frequent classes, person first (at the top of a barh)
    labels = [t.get_text() for t in truncated.get_yticklabels()]
    assert labels[-1] == "person (24)" and len(labels) == min(TRUNCATION_CLASSES, len(order))
    person = bank.meta_table["truncated"][bank.crop_class_ids == 0].mean()
    assert truncated.patches[-1].get_width() == pytest.approx(person)


def test_many_classes_are_ranked_not_named(tmp_path):
    bank = write_synthetic_bank(tmp_path / "wide", 2 * (MAX_NAMED_CLASSES + 50), size=4, num_classes=MAX_NAMED_CLASSES + 50)
    classes = stats_figure(bank).axes[0]
    assert classes.get_xlabel() == "class rank"
    assert not any(t.get_text().startswith("class") for t in classes.get_xticklabels())


def test_empty_bank_still_plots(tmp_path):
    bank = write_synthetic_bank(tmp_path / "empty", 0, size=4, num_classes=3)
    fig = stats_figure(bank)
    assert all("no crops" in texts(ax) for ax in fig.axes)
    plot_stats(bank.path, tmp_path / "empty.png")
    assert Image.open(tmp_path / "empty.png").size == (1200, 950)


def test_cli_stats_plot(sample_coco_bank, tmp_path):
    png = tmp_path / "sub" / "s.png"  # the folder is created
    result = CliRunner().invoke(app, ["stats", str(sample_coco_bank.path), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert f"wrote {png}" in result.output and '"num_crops": 54' in result.output
    assert_rich_png(png, (1200, 950))  # 12 x 9.5 inches at 100 dpi: 20 named classes fit the minimum width
