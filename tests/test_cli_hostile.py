"""What a user who mistypes sees (issue #14): every option is checked before anything is written,
each mistake is one line, `--strict` stops at the first fault of the data but lets the user's own
policies pass, a resume with other options names them, and output that is not a terminal is never
wrapped or cut."""

from __future__ import annotations

import json
import re

import pytest

from conftest import SAMPLE_COCO
from test_cli import assert_one_line_error, run_cli


@pytest.mark.parametrize("args, needle", [
    (["--size", "0"], "size (crop side S) must be an integer in 8..4096, got 0"),
    (["--size", "-5"], "got -5"),
    (["--size", "3.5"], "Invalid value for '--size'"),
    (["--size", "100000"], "8..4096"),
    (["--backend", "lmdb", "--codec", "raw"], "lmdb codec must be one of ('zstd',), got 'raw'"),
    (["--backend", "memmap", "--codec", "zstd"], "memmap codec must be one of ('raw',)"),
    (["-O", "nope=1"], "unknown memmap backend options ['nope']"),
    (["--backend", "webdataset", "-O", "maxcount=0"], "maxcount must be a positive integer"),
    (["--min-area", "-1"], "min_area must be an integer >= 0"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--crowd", "maybe"], "--crowd must be one of skip, include"),
    (["--nope"], "No such option: --nope"),
])  # fmt: skip
def test_a_bad_option_is_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "bank"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), *args, check=False)
    assert_one_line_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # not even the "read coco" line
    assert not out.exists()


def test_an_existing_bank_is_refused_before_the_input_is_read(tmp_path):
    out = tmp_path / "bank"
    run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "16", "--workers", "1")
    garbage = tmp_path / "huge.json"
    garbage.write_text("{ not json")  # reading it would fail: the bank check must come first
    proc = run_cli("build", "--coco", str(garbage), "--out", str(out), check=False)
    assert_one_line_error(proc, f"{out}: a bank already exists here (use --overwrite to replace it)")


def test_strict_passes_the_users_own_policies(tmp_path):
    # The sample holds one crowd annotation (skipped by the default --crowd skip policy) and
    # --min-area filters more: both are choices, not faults.
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(tmp_path / "b"), "--size", "16", "--strict",
                   "--min-area", "500", "--workers", "1")
    assert "crowd 1" in proc.stderr and "small_area" in proc.stderr


def test_strict_stops_at_the_first_fault_before_the_rest_is_built(tmp_path):
    doc = json.loads(SAMPLE_COCO.read_text())
    doc["images"][0]["file_name"] = "does-not-exist.jpg"  # the first image of the first shard
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(ann), "--images", str(SAMPLE_COCO.parent / "images"), "--out", str(out),
                   "--size", "16", "--strict", "--workers", "1", "--shard-images", "1", check=False)
    assert_one_line_error(proc, "does-not-exist.jpg", "missing_image", "--strict stops at the first fault")
    assert not (out / "manifest.json").exists()
    assert len(list((out / "shards").glob("*/shard.json"))) == 0  # no shard finished: it stopped at once


def test_strict_fails_on_faults_found_while_reading_before_writing(tmp_path):
    doc = json.loads(SAMPLE_COCO.read_text())
    doc["annotations"][0]["category_id"] = 999_999  # unknown_category: a fault of the data
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(ann), "--images", str(SAMPLE_COCO.parent / "images"), "--out", str(out),
                   "--size", "16", "--strict", check=False)
    assert_one_line_error(proc, "--strict", "unknown_category: 1")
    assert not out.exists()


def test_resume_with_other_options_names_them(tmp_path):
    out = tmp_path / "b"
    run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "16", "--workers", "1")
    (out / "manifest.json").unlink()  # as if interrupted
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "24", "--min-side", "3",
                   "--resume", check=False)
    assert_one_line_error(proc, "size was 16, now 24", "filters.min_side was 0, now 3")


def test_usage_errors_are_one_line():
    for args, needle in ((["build"], "Missing option '--out'"), (["frobnicate"], "No such command 'frobnicate'")):
        proc = run_cli(*args, check=False)
        assert_one_line_error(proc, needle)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_flags_as_flags_and_every_backends_codecs():
    from instbank.cli import _CODECS_HELP
    from instbank.storage.registry import CODECS

    text = run_cli("build", "--help").stdout
    assert "<bool>" not in text and re.search(r"--strict / --no-strict\s", text)
    assert _CODECS_HELP == "; ".join(
        f"{backend}: " + ", ".join(f"{c} (default)" if k == 0 and len(codecs) > 1 else c for k, c in enumerate(codecs))
        for backend, codecs in CODECS.items()
    )
    assert "webdataset: zstd (default), raw, png" in " ".join(text.split())


def test_output_off_a_terminal_is_never_wrapped(tmp_path):
    out = tmp_path / ("a-rather-long-directory-name-" * 4) / "bank"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "16", "--workers", "1")
    lines = proc.stderr.splitlines()
    assert any(line.startswith("bank ") and str(out) in line for line in lines), proc.stderr
    stats = run_cli("stats", str(out)).stdout.splitlines()
    assert stats[0].split() == ["bank", str(out)]  # whole, not cut with an ellipsis
    on_disk = next(line for line in stats if line.startswith("on disk"))
    assert "codec raw" in on_disk and "{" not in on_disk
    assert all(line == line.rstrip() for line in stats[:10])
