"""Ctrl-C and SIGTERM stop a build cleanly (DESIGN "One writer per directory": interrupts end every
worker and say how to resume).

The real CLI builds into each backend with two worker processes, in its own process group; the
signal goes to the whole group at a random moment, as a Ctrl-C in a terminal (or `timeout -s INT`)
does. A watchdog fails the test if the build has not ended 20 s later. After the signal: exit code
130 / 143 (or a finished bank when the build won the race), no traceback, one line saying how far it got and the
command that continues it, no process of the group left alive; and `--resume` then finishes the
bank an undisturbed build makes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import SAMPLE_COCO

from instbank.storage import open_bank

INSTBANK = [sys.executable, "-c", "from instbank.cli import main; main()"]
WATCHDOG_S = 20
TRIES = 2  # per backend and signal; each try is a different random moment


@pytest.fixture(scope="module")
def repeated_coco(tmp_path_factory):
    """The shipped sample's images listed 6 times (new ids): a build of about a second."""
    doc = json.loads(SAMPLE_COCO.read_text())
    images, annotations = [], []
    for k in range(6):
        for im in doc["images"]:
            images.append({**im, "id": im["id"] + k * 10**6})
        for ann in doc["annotations"]:
            annotations.append({**ann, "id": ann["id"] + k * 10**7, "image_id": ann["image_id"] + k * 10**6})
    path = tmp_path_factory.mktemp("coco") / "annotations.json"
    path.write_text(json.dumps({**doc, "images": images, "annotations": annotations}))
    return path


def _build_args(ann, out, backend):
    return ["build", "--coco", str(ann), "--images", str(SAMPLE_COCO.parent / "images"), "--out", str(out),
            "--backend", backend, "--size", "64", "--workers", "2", "--shard-images", "4"]


@pytest.fixture(scope="module")
def undisturbed(repeated_coco, tmp_path_factory):
    versions = {}
    for backend in ("memmap", "lmdb", "webdataset"):
        out = tmp_path_factory.mktemp("clean") / backend
        subprocess.run([*INSTBANK, *_build_args(repeated_coco, out, backend)], check=True, capture_output=True, timeout=120)
        versions[backend] = open_bank(out).version
    return versions


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memmap", "lmdb", "webdataset"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_a_random_moment_stops_the_build_cleanly(tmp_path, repeated_coco, undisturbed, backend, signum):
    rng = random.Random(f"{backend}-{signum}")
    for attempt in range(TRIES):
        out = tmp_path / f"bank{attempt}"
        args = _build_args(repeated_coco, out, backend)
        proc = subprocess.Popen([*INSTBANK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        time.sleep(rng.uniform(0.3, 1.4))  # start-up ~0.6 s, then ~0.6 s of building
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass  # already finished
        try:
            _, stderr = proc.communicate(timeout=WATCHDOG_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{backend}: the build did not stop within {WATCHDOG_S} s of {signal.Signals(signum).name}")
        deadline = time.time() + 5
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)  # workers killed by the main process are reaped by it or by init
        assert not _group_alive(proc.pid), "a worker of the build outlived it"
        assert "Traceback" not in stderr, stderr
        if proc.returncode in (0, -signum):
            # The build won the race: done (0), or the signal came while the finished process was
            # shutting down, after Python had put the default handlers back (-signum).
            assert open_bank(out).version == undisturbed[backend], stderr
            continue
        assert proc.returncode == 128 + signum, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and signal.Signals(signum).name in last, stderr
        if "continue with:" in last:
            resume = last.split("continue with: ", 1)[1]
            assert resume.endswith("--resume") and f"--out {out}" in resume
            done = subprocess.run([*INSTBANK, *args, "--resume"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert open_bank(out).version == undisturbed[backend]
        else:
            assert "nothing was committed" in last
