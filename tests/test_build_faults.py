"""Build faults: a full disk or an unwritable output is one clear line and never a manifest; a
rerun with --resume after the fault finishes the same bank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import SAMPLE_COCO
from instbank.build import BuildConfig, build_bank
from instbank.errors import BankError
from instbank.formats.coco import read_coco
from instbank.storage import open_bank

# Runs the CLI with a file-size limit (ulimit -f): writes past it fail with EFBIG, as on a full disk.
# SIGXFSZ is ignored so the write returns the error instead of killing the process.
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["instbank"] + sys.argv[2:]
from instbank.cli import main
main()
"""


def test_disk_full_is_one_line_and_leaves_no_manifest(tmp_path):
    out = tmp_path / "bank"
    args = ["build", "--coco", str(SAMPLE_COCO), "--out", str(out), "--size", "64", "--workers", "1",
            "--shard-images", "2"]
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(100_000), *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk full" in last and str(out) in last and "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists()
    # with room again, --resume finishes it and keeps what was written
    clean = build_bank(read_coco(SAMPLE_COCO), tmp_path / "clean", BuildConfig(size=64, shard_images=2), workers=1)
    resumed = build_bank(read_coco(SAMPLE_COCO), out, BuildConfig(size=64, shard_images=2), workers=1, resume=True)
    assert resumed.version == clean.version and resumed.reused_shards >= 1


def test_output_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "instbank.cli", "build", "--coco", str(SAMPLE_COCO), "--out",
                           str(blocker / "bank")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(blocker / "bank") in last and "cannot create" in last


def test_read_only_output_is_one_line(tmp_path):
    if os.geteuid() == 0:
        out = "/proc/instbank-bank"  # root ignores file modes; /proc refuses new directories
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = str(ro / "bank")
    proc = subprocess.run([sys.executable, "-m", "instbank.cli", "build", "--coco", str(SAMPLE_COCO), "--out", out],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {out}")


def test_unfinished_bank_does_not_open(tmp_path):
    out = tmp_path / "bank"
    build_bank(read_coco(SAMPLE_COCO), out, BuildConfig(size=16), workers=1)
    (out / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "instbank.cli", "stats", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(BankError, match="no manifest.json"):
        open_bank(out)
