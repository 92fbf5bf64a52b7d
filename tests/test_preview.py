"""instbank preview: which crops go on the sheet, alpha over the checkerboard, the PNG/HTML files,
the CLI command."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_rich_png
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from instbank.cli import app
from instbank.errors import InputError
from instbank.preview import (
    MAX_THUMB,
    checkerboard,
    grid_columns,
    select_rows,
    thumbnail,
    write_preview,
)


def test_rows_are_classes_with_crops_most_first(sample_coco_bank):
    bank = sample_coco_bank
    rows = select_rows(bank, per_class=3)
    counts = bank.class_frequencies
    assert [r.class_id for r in rows] == [c for c in np.lexsort((np.arange(len(counts)), -counts)) if counts[c] > 0]
    assert [r.count for r in rows] == sorted((r.count for r in rows), reverse=True)
    area, cls = bank.meta_table["area"], bank.crop_class_ids
    for r in rows:
        assert len(r.indices) == min(3, r.count) and (cls[r.indices] == r.class_id).all()
        members = np.flatnonzero(cls == r.class_id)
        assert list(area[r.indices]) == sorted(area[members], reverse=True)[:3]  # the largest objects
    assert [r.class_id for r in select_rows(bank, max_classes=5)] == [r.class_id for r in rows[:5]]


def test_random_sort_is_seeded(sample_coco_bank):
    person = lambda seed: select_rows(sample_coco_bank, 8, ["person"], "random", seed)[0].indices  # noqa: E731
    assert (person(1) == person(1)).all()
    assert set(person(1)) != set(person(2))  # 8 of 24 crops: two seeds almost surely differ


def test_named_classes_in_given_order_deduplicated_empty_kept(sample_coco_bank):
    rows = select_rows(sample_coco_bank, 2, ["dog", "person", 0, 15])
    assert [r.name for r in rows] == ["dog", "person", "cat"]
    assert rows[0].count == 0 and len(rows[0].indices) == 0  # asked for by name: shown, empty
    with pytest.raises(ValueError, match="unknown class 'doge'"):
        select_rows(sample_coco_bank, classes=["doge"])
    with pytest.raises(ValueError, match="sort must be one of"):
        select_rows(sample_coco_bank, sort="size")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(4, 24))
def test_thumbnail_shows_object_over_checkerboard(seed, size):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (4, size, size), dtype=np.uint8)
    opaque = rng.random((size, size)) < 0.5
    rgba[3] = np.where(opaque, 255, 0)
    board = checkerboard(size, 3)
    shown = np.asarray(thumbnail(rgba, size, board))
    expected = np.where(opaque[..., None], rgba[:3].transpose(1, 2, 0), np.asarray(board)[..., :3])
    assert (shown == expected).all()


def test_checkerboard_alternates():
    board = np.asarray(checkerboard(32, 8))[..., 0]
    assert board[0, 0] != board[0, 8] and board[0, 0] == board[8, 8] and board[0, 0] == board[7, 7]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2000), st.integers(100, 3000), st.integers(50, 400))
def test_grid_columns_bounded(rows, panel_w, panel_h):
    columns = grid_columns(rows, panel_w, panel_h)
    assert 1 <= columns <= max(rows, 1)


def test_grid_columns_for_coco_80_classes():
    assert grid_columns(1, 1000, 130) == 1
    assert grid_columns(80, 998, 128) == 4  # the 80-class sheet is about 4:3, not a tall strip


def test_write_preview_png_and_html(sample_coco_bank, tmp_path):
    result = write_preview(sample_coco_bank.path, tmp_path / "sheet.png", per_class=4, html_page=True)
    assert result.png == tmp_path / "sheet.png" and result.html == tmp_path / "sheet.html"
    assert len(result.rows) == int((sample_coco_bank.class_frequencies > 0).sum())
    pixels = assert_rich_png(result.png, result.size)
    # 64 px crops are shown at their own size (MAX_THUMB only shrinks bigger ones).
    assert min(sample_coco_bank.crop_size[0], MAX_THUMB) == 64 and pixels.shape[0] > 64 * 5
    page = result.html.read_text()
    assert '<img src="sheet.png"' in page
    assert page.count("<tr") == 1 + sample_coco_bank.num_classes  # header + every class
    assert "<td>person</td><td>24</td>" in page and "<td>traffic light</td><td>0</td>" in page


def test_cli_preview(sample_coco_bank, tmp_path):
    cmd = ["preview", str(sample_coco_bank.path), "--out"]
    ok = CliRunner().invoke(app, cmd + [str(tmp_path / "p.png"), "--classes", "person,cat", "--per-class", "2", "--html"])
    assert ok.exit_code == 0, ok.output
    assert "2 classes" in ok.output and (tmp_path / "p.html").exists()
    assert_rich_png(tmp_path / "p.png", min_colours=300)
    bad = CliRunner().invoke(app, cmd + [str(tmp_path / "q.png"), "--classes", "doge"])
    # an InputError: `instbank` (cli.main) prints it as one line "error: ..." with exit code 2
    assert isinstance(bad.exception, InputError) and not (tmp_path / "q.png").exists()
    assert str(bad.exception).startswith(f"{sample_coco_bank.path}: unknown class 'doge' in --classes; valid:")


def test_bank_without_crops_gives_a_title_only_sheet(tmp_path):
    from instbank.testing import write_synthetic_bank

    bank = write_synthetic_bank(tmp_path / "empty", 0, size=8, num_classes=3)
    result = write_preview(bank.path, tmp_path / "empty.png")
    assert result.rows == [] and Image.open(result.png).size == result.size and result.size[1] < 100
