"""The command line: build/stats on the shipped sample, lazy imports, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_COCO, SAMPLE_YOLO, modules_loaded_by


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "instbank.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_help_does_not_import_torch():
    code = ("from instbank.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['build', '--help']); assert r.exit_code == 0, r.output")
    assert modules_loaded_by(code, ("torch", "triton", "numba", "lmdb", "webdataset", "ray")) == []


def test_build_and_stats_json(tmp_path):
    out = tmp_path / "bank"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "32", "--workers", "1")
    assert "kept 54 crops from 8 images" in proc.stderr and "skipped 1 annotation(s) (crowd 1)" in proc.stderr
    assert "  crowd: " in proc.stderr and "(image " in proc.stderr and "annotation " in proc.stderr  # an example
    stats = json.loads(run_cli("stats", str(out), "--json").stdout)
    for key in ("num_crops", "crop_size", "num_classes", "class_names", "class_frequencies", "version", "backend", "skipped"):
        assert key in stats
    assert stats["num_crops"] == 54 and stats["crop_size"] == [32, 32] and stats["num_classes"] == 80
    assert stats["skipped"] == {"crowd": 1} and stats["version"].startswith("memmap@")
    text = run_cli("stats", str(out)).stdout
    assert "person" in text and stats["version"] in text


def test_build_yolo_with_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("build:\n  size: 24\n  min-area: 50\n")
    out = tmp_path / "bank"
    run_cli("build", "--yolo", str(SAMPLE_YOLO), "--out", str(out), "--config", str(cfg), "--size", "16")
    stats = json.loads(run_cli("stats", str(out), "--json").stdout)
    assert stats["crop_size"] == [16, 16]  # the command line wins over the config file
    assert stats["build"]["filters"]["min_area"] == 50


def test_script_wrapper_runs_the_same_build(tmp_path):
    out = tmp_path / "bank"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_instance_bank.py"), "--coco", str(SAMPLE_COCO),
                    "--out", str(out), "--size", "16", "--workers", "1"], check=True, capture_output=True)
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["build", "--coco", "nope.json", "--out", "{tmp}/b"], ["nope.json"]),
        (["build", "--coco", str(SAMPLE_COCO), "--out", "{tmp}/b", "--backend", "zip"], ["backend", "memmap"]),
        (["build", "--out", "{tmp}/b"], ["--coco"]),
        (["stats", "{tmp}/missing"], ["missing"]),
        (["build", "--coco", str(SAMPLE_COCO), "--out", "{tmp}/b", "--config", "{tmp}/no.yaml"], ["no.yaml"]),
        (["build", "--coco", str(SAMPLE_COCO), "--out", "{tmp}/b", "--backend", "lmdb", "-O", "nope=1"], ["nope", "level"]),
        (["build", "--coco", str(SAMPLE_COCO), "--out", "{tmp}/b", "-O", "novalue"], ["KEY=VALUE"]),
    ],
)
def test_errors_are_one_line(tmp_path, args, needles):
    proc = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
    assert_one_line_error(proc, *[n.replace("{tmp}", str(tmp_path)) for n in needles])


def test_existing_bank_is_refused(tmp_path):
    args = ["build", "--coco", str(SAMPLE_COCO), "--out", str(tmp_path / "b"), "--size", "16", "--workers", "1"]
    run_cli(*args)
    assert_one_line_error(run_cli(*args, check=False), "already exists", "--overwrite")
    run_cli(*args, "--overwrite")


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "stats", str(tmp_path / "missing"), check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_convert_verify_merge(tmp_path):
    src, lm, merged = tmp_path / "src", tmp_path / "lmdb", tmp_path / "merged"
    run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(src), "--size", "16", "--workers", "1")
    run_cli("convert", str(src), str(lm), "--backend", "lmdb")
    v_src = json.loads(run_cli("stats", str(src), "--json").stdout)["version"]
    v_lm = json.loads(run_cli("stats", str(lm), "--json").stdout)["version"]
    assert v_lm.startswith("lmdb@") and v_lm.split("@")[1] == v_src.split("@")[1]
    assert "54/54 crops checked, OK" in run_cli("verify", str(lm)).stdout
    run_cli("merge", str(src), str(lm), "--out", str(merged))
    assert json.loads(run_cli("stats", str(merged), "--json").stdout)["num_crops"] == 108
    assert_one_line_error(run_cli("convert", str(src), str(tmp_path / "x"), "--backend", "zip", check=False), "zip")


def test_verify_names_a_corrupt_crop(tmp_path):
    bank = tmp_path / "b"
    run_cli("build", "--coco", str(SAMPLE_COCO), "--out", str(bank), "--size", "16", "--workers", "1")
    pixels = next(bank.glob("shards/*/pixels.u8"))
    data = bytearray(pixels.read_bytes())
    data[5 * 4 * 16 * 16 + 7] ^= 0xFF  # one byte of crop 5
    pixels.write_bytes(bytes(data))
    proc = run_cli("verify", str(bank), check=False)
    assert proc.returncode == 1 and "problem" in proc.stdout and "5" in proc.stdout and "pixels.u8" in proc.stdout


def test_build_sa1b_with_filters(tmp_path):
    out = tmp_path / "bank"
    sample = REPO / "data" / "sample" / "sa1b"
    proc = run_cli("build", "--sa1b", str(sample), "--out", str(out), "--size", "16", "--workers", "1",
                   "--category", "thing", "--min-predicted-iou", "0.0")
    assert "read sa1b" in proc.stderr and "kept 36 crops from 4 images" in proc.stderr
    stats = json.loads(run_cli("stats", str(out), "--json").stdout)
    assert stats["class_names"] == ["thing"] and stats["num_crops"] == 36
    proc = run_cli("build", "--sa1b", str(sample), "--coco", str(SAMPLE_COCO), "--out", str(tmp_path / "x"), check=False)
    assert_one_line_error(proc, "give exactly one of --coco ANN.json, --yolo DATA.yaml|DIR or --sa1b DIR")
