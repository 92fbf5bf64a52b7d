"""One writer per bank directory (DESIGN "One writer per directory"), with real processes.

A first writer (build, convert or merge) runs in a subprocess and is held mid-way by its progress
callback (it waits for a file the test creates). While it is held, every kind of second writer is
started with the real CLI into the same directory: each is refused with one line, exit code 2,
and removes nothing. Then the first writer is released; its bank must verify and have the version
of an undisturbed run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_COCO

from instbank.build import BuildConfig, build_bank
from instbank.formats.coco import read_coco
from instbank.storage import open_bank
from instbank.storage.merge import merge_banks
from instbank.storage.verify import verify_bank

CONFIG = BuildConfig(size=16, shard_images=1)  # one shard per image: many progress calls
INSTBANK = [sys.executable, "-c", "from instbank.cli import main; main()"]

# The first writer: blocks in its first progress call (lock held, its first crops written)
# until GATE/release exists.
FIRST = """
import sys, time
from pathlib import Path
gate = Path(sys.argv[1]); job = sys.argv[2]; args = sys.argv[3:]
calls = []
def progress(images, crops):
    calls.append(1)
    if len(calls) == 1:
        (gate / "started").touch()
        deadline = time.time() + 60
        while not (gate / "release").exists():
            if time.time() > deadline:
                sys.exit("never released")
            time.sleep(0.02)
if job == "build":
    from instbank.build import BuildConfig, build_bank
    from instbank.formats.coco import read_coco
    build_bank(read_coco(args[0]), args[1], BuildConfig(size=16, shard_images=1), workers=1, progress=progress)
elif job == "convert":
    from instbank.storage.convert import convert_bank
    convert_bank(args[0], args[1], progress=progress)
else:
    from instbank.storage.merge import merge_banks
    merge_banks(args[:-1], args[-1], progress=progress)
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-sources")
    a = build_bank(read_coco(SAMPLE_COCO), root / "a", CONFIG, workers=1)
    b = build_bank(read_coco(SAMPLE_COCO), root / "b", CONFIG, workers=1)
    return a.out, b.out


def _second_writers(dst: Path, src: Path) -> dict[str, list[str]]:
    build = [*INSTBANK, "build", "--coco", str(SAMPLE_COCO), "--out", str(dst), "--size", "16", "--workers", "1"]
    return {
        "build": build,
        "build --overwrite": [*build, "--overwrite"],
        "build --resume": [*build, "--shard-images", "1", "--resume"],
        "convert --overwrite": [*INSTBANK, "convert", str(src), str(dst), "--overwrite"],
        "merge --overwrite": [*INSTBANK, "merge", str(src), "--out", str(dst), "--overwrite"],
    }


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.mark.parametrize("first", ["build", "convert", "merge"])
def test_a_second_writer_is_refused_and_the_first_finishes(tmp_path, sources, first):
    src_a, src_b = sources
    dst, gate = tmp_path / "dst", tmp_path / "gate"
    gate.mkdir()
    args = {"build": [str(SAMPLE_COCO), str(dst)], "convert": [str(src_a), str(dst)],
            "merge": [str(src_a), str(src_b), str(dst)]}[first]
    writer = subprocess.Popen([sys.executable, "-c", FIRST, str(gate), first, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (gate / "started").exists():
            assert writer.poll() is None, writer.stderr.read()
            assert time.time() < deadline, "the first writer never started"
            time.sleep(0.02)
        for name, command in _second_writers(dst, src_a).items():
            before = _files(dst)
            second = subprocess.run(command, capture_output=True, text=True, timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2, (name, second.stderr)
            assert len(lines) == 1 and "another instbank writer" in lines[0] and "nothing was changed" in lines[0], (name, lines)
            assert str(dst) in lines[0]
            assert before <= _files(dst), f"{name} removed files of the running writer"
        (gate / "release").touch()
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    finally:
        (gate / "release").touch()
        writer.kill()
        writer.wait()
    assert verify_bank(dst).ok
    undisturbed = {
        "build": lambda: build_bank(read_coco(SAMPLE_COCO), tmp_path / "alone", CONFIG, workers=1).version,
        "convert": lambda: open_bank(src_a).version,
        "merge": lambda: merge_banks([src_a, src_b], tmp_path / "alone")["version"],
    }[first]()
    assert open_bank(dst).version == undisturbed


def test_the_lock_is_free_again_after_a_writer_dies(tmp_path):
    # flock belongs to the open file: a killed writer leaves no stale lock behind.
    dst = tmp_path / "dst"
    dst.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom instbank.storage.writer import DirectoryLock\n"
        f"lock = DirectoryLock({str(dst)!r}).__enter__()\nprint('held', flush=True)\ntime.sleep(60)"
    )], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    refused = subprocess.run([*INSTBANK, "build", "--coco", str(SAMPLE_COCO), "--out", str(dst), "--size", "16"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"(pid {holder.pid})" in refused.stderr
    holder.kill()
    holder.wait()
    done = subprocess.run([*INSTBANK, "build", "--coco", str(SAMPLE_COCO), "--out", str(dst), "--size", "16",
                           "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert verify_bank(dst).ok


def test_foreign_directories_are_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not ours")
    refused = subprocess.run([*INSTBANK, "build", "--coco", str(SAMPLE_COCO), "--out", str(folder), "--size", "16"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert refused.returncode == 2
    assert "holds files that are not an instbank bank's (holiday.jpg)" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
