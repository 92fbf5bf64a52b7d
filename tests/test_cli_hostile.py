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
    assert_one_line_error(proc, "does-not-exist.jpg (1 of 8 images are missing): missing_image", "--strict stops at the first fault")
    assert not out.exists()  # found before anything was written


def test_strict_stops_at_a_fault_found_while_cutting(tmp_path):
    doc = json.loads(SAMPLE_COCO.read_text())
    first = doc["images"][0]
    ann = next(a for a in doc["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"])
    ann["segmentation"] = [[-50.0, -50.0, -40.0, -50.0, -40.0, -40.0]]  # wholly outside the image
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(path), "--images", str(SAMPLE_COCO.parent / "images"), "--out", str(out),
                   "--size", "16", "--strict", "--workers", "1", "--shard-images", "1", check=False)
    assert_one_line_error(proc, f"(image id {first['id']}, annotation {ann['id']}): outside_image", "--strict stops")
    assert not (out / "manifest.json").exists()
    assert not list((out / "shards").glob("*/shard.json"))  # it stopped in the first shard


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


def test_a_wrong_images_folder_fails_naming_it(tmp_path):
    empty = tmp_path / "not-the-images"
    empty.mkdir()
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--images", str(empty), "--out", str(out), check=False)
    assert_one_line_error(proc, f"{empty}: 8 of 8 images are missing, e.g. {empty}/", "is the images folder right?")
    assert not out.exists()


def test_a_few_missing_images_are_counted_with_their_instances(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    doc = json.loads(SAMPLE_COCO.read_text())
    for im in doc["images"][1:]:  # all but the first: 1 of 8 missing, under the 50% threshold
        (images / im["file_name"]).symlink_to(SAMPLE_COCO.parent / "images" / im["file_name"])
    first = doc["images"][0]
    on_first = sum(1 for a in doc["annotations"] if a["image_id"] == first["id"] and not a.get("iscrowd"))
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--images", str(images), "--out", str(out), "--size", "16",
                   "--workers", "1", "--allow-outside-root")  # the links point outside `images`
    assert f"skipped 1 image(s) (missing_image 1), with {on_first} instance(s) on them" in proc.stderr
    assert f"missing_image: {images / first['file_name']} (image {first['id']}): " in proc.stderr
    stats = json.loads(run_cli("stats", str(out), "--json").stdout)
    assert stats["skipped_images"] == {"missing_image": 1} and stats["lost_instances"] == {"missing_image": on_first}
    assert stats["skip_examples"]["missing_image"][0]["image_id"] == first["id"]
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--images", str(images), "--out", str(tmp_path / "c"),
                   "--size", "16", "--max-missing-images", "0.1", "--allow-outside-root", check=False)
    assert_one_line_error(proc, "1 of 8 images are missing", "--max-missing-images allows 10%")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_paths_must_stay_inside_the_images_folder(tmp_path, how):
    images = tmp_path / "images"
    images.mkdir()
    doc = json.loads(SAMPLE_COCO.read_text())
    for im in doc["images"]:
        (images / im["file_name"]).write_bytes((SAMPLE_COCO.parent / "images" / im["file_name"]).read_bytes())
    secret = tmp_path / "secret.jpg"  # a file the annotations must not be able to make us read
    secret.write_bytes((SAMPLE_COCO.parent / "images" / doc["images"][0]["file_name"]).read_bytes())
    hostile = doc["images"][0]
    if how == "dotdot":
        hostile["file_name"] = "../secret.jpg"
    elif how == "absolute":
        hostile["file_name"] = str(secret)
    else:
        (images / hostile["file_name"]).unlink()
        (images / hostile["file_name"]).symlink_to(secret)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "b"
    proc = run_cli("build", "--coco", str(ann), "--images", str(images), "--out", str(out), "--size", "16", "--workers", "1")
    assert "skipped 1 image(s) (outside_root 1)" in proc.stderr, proc.stderr
    assert "outside_root: " in proc.stderr and f"resolves to {secret}" in proc.stderr
    meta = json.loads(run_cli("stats", str(out), "--json").stdout)
    assert meta["num_images"] == 7  # the hostile image's crops are not in the bank
    proc = run_cli("build", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "c"), "--size", "16",
                   "--workers", "1", "--allow-outside-root")
    assert "outside_root" not in proc.stderr
    proc = run_cli("build", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "d"), "--size", "16",
                   "--strict", check=False)
    assert_one_line_error(proc, "outside_root", "--strict")
