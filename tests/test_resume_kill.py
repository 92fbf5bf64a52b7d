"""A build killed with SIGKILL (no cleanup runs) resumes to the same bank as an uninterrupted build.

The build runs in a subprocess (one worker, 2-image shards, the sample repeated so that it lasts
about a second); the test watches the shards directory and kills it at a chosen moment: after a
random number of finished shards, or while a shard's pixels are being written. Until the resume,
the directory must not open as a bank.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_COCO
from instbank.build import BuildConfig, build_bank
from instbank.errors import BankError
from instbank.formats.coco import read_coco
from instbank.storage import open_bank
from instbank.storage.base import SHARD_MANIFEST, SHARDS_DIR

CONFIG = BuildConfig(size=96, shard_images=2)
REPEATS = 3  # 24 images, 12 shards: long enough to be killed mid-build on a fast machine
POLL_S = 0.002
TIMEOUT_S = 60


def repeated_sample():
    """The shipped COCO sample, its image list repeated ``REPEATS`` times (distinct image ids)."""
    dataset = read_coco(SAMPLE_COCO)
    images = [dataclasses.replace(im, image_id=im.image_id + k * 10**9) for k in range(REPEATS) for im in dataset.images]
    return dataclasses.replace(dataset, images=images)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return build_bank(repeated_sample(), tmp_path_factory.mktemp("clean") / "bank", CONFIG, workers=1)


def _start_build(out: Path) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_resume_kill import CONFIG, repeated_sample\n"
        "from instbank.build import build_bank\n"
        f"build_bank(repeated_sample(), {str(out)!r}, CONFIG, workers=1)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def _finished(out: Path) -> int:
    return len(list((out / SHARDS_DIR).glob(f"*/{SHARD_MANIFEST}")))


def _writing(out: Path) -> bool:
    """Some shard has pixels on disk but no shard.json yet."""
    return any(not (d / SHARD_MANIFEST).exists() and (d / "pixels.u8").exists() for d in (out / SHARDS_DIR).glob("*"))


def _kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL ``proc`` at a moment when ``ready()`` holds. The process is stopped (SIGSTOP) before
    the check is repeated, so the state it is killed in is the state that was checked."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert proc.poll() is None, "the build finished before the moment to kill it"
        assert time.monotonic() < deadline, "the build never reached the moment to kill it"
        if ready():
            proc.send_signal(signal.SIGSTOP)
            if ready():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.parametrize(
    "moment",
    ["after_random_shards", "mid_shard"],
)
def test_resume_after_sigkill_gives_the_uninterrupted_bank(moment, tmp_path, uninterrupted):
    out = tmp_path / "bank"
    proc = _start_build(out)
    if moment == "after_random_shards":
        k = random.Random(os.getpid()).randint(1, 4)
        _kill_when(proc, lambda: _finished(out) >= k)
    else:
        _kill_when(proc, lambda: _finished(out) >= 1 and _writing(out))
        assert _writing(out)  # a half-written shard is left behind
    done = _finished(out)
    with pytest.raises(BankError, match="no manifest"):
        open_bank(out)
    resumed = build_bank(repeated_sample(), out, CONFIG, workers=1, resume=True)
    assert resumed.version == uninterrupted.version
    assert resumed.reused_shards == done < resumed.num_shards
    assert len(open_bank(out)) == uninterrupted.num_crops


def test_rerun_without_resume_after_sigkill_starts_over(tmp_path, uninterrupted):
    out = tmp_path / "bank"
    proc = _start_build(out)
    _kill_when(proc, lambda: _finished(out) >= 2)
    rebuilt = build_bank(repeated_sample(), out, CONFIG, workers=1)
    assert (rebuilt.version, rebuilt.reused_shards) == (uninterrupted.version, 0)
