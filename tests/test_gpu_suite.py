"""benchmarks/gpu_suite.py: ``--smoke`` runs every part's code on the CPU, in a subprocess where
lmdb, zstandard, pycocotools and webdataset cannot be imported (the GPU machines lack them); a
full run names in one line what it lacks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"
BLOCKED = ("lmdb", "zstandard", "pycocotools", "webdataset")


def blocking_env(tmp_path) -> dict:
    """Environment whose Python processes (this one's children and theirs) cannot import BLOCKED:
    a ``sitecustomize`` on PYTHONPATH puts None in ``sys.modules`` for each."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))


def test_smoke_runs_every_part_without_the_storage_and_coco_libraries(tmp_path):
    env = blocking_env(tmp_path)
    for name in BLOCKED:  # the shim works (else this test would prove nothing)
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "halted; None in sys.modules" in probe.stderr, name
    log = tmp_path / "suite.log"
    done = subprocess.run(
        [sys.executable, str(SUITE), "--smoke", "--log", str(log)],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = log.read_text()
    assert text == done.stdout  # one log, the same as what was printed
    for part in ("[tests]", "[module]", "[kernel]", "[e2e]", "[maskrcnn]"):
        assert part in text
    assert "FAIL" not in text and "Traceback" not in text
    # each part really ran: its checks and figures are in the log
    assert "PASS: CUDA tests" in text
    assert "PASS: masks equal" in text and "PASS: boxes of valid instances are the tight boxes" in text
    assert "host synchronisation, training inputs" in text
    assert "numba / torch at 64x64" in text and "of the copy's" in text
    assert "= plan " in text and "annotations" in text
    assert "paste share of a" in text and "PASS: training loss is finite" in text
    if importlib.util.find_spec("torchvision") is None:
        assert "Mask R-CNN: skipped: no torchvision" in text
    summary = text.strip().splitlines()[-1]
    assert summary.startswith("summary: ") and " 0 failed" in summary and "not run: none" in summary


def suite_main(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("instbank_gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(list(argv))


def one_line_error(capsys, *argv: str) -> str:
    assert suite_main(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # failed before writing a log
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "Traceback" not in captured.err
    return captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_full_run_without_cuda_names_what_is_missing(capsys, tmp_path):
    err = one_line_error(capsys, "--log", str(tmp_path / "x.log"))
    assert "the GPU suite needs CUDA" in err and "--smoke" in err
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision for the maskrcnn part" in err
    err = one_line_error(capsys, "--log", str(tmp_path / "x.log"), "--parts", "kernel")
    assert "torchvision" not in err
    assert not (tmp_path / "x.log").exists()


def test_bank_with_crops_larger_than_the_images_is_one_line(capsys, sample_coco_bank, tmp_path):
    err = one_line_error(capsys, "--smoke", "--bank", str(sample_coco_bank.path), "--log", str(tmp_path / "x.log"))
    assert "has 64x64 crops, larger than the 48x48 images" in err


def test_missing_bank_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, "--smoke", "--bank", str(tmp_path / "nope"), "--log", str(tmp_path / "x.log"))
    assert str(tmp_path / "nope") in err
