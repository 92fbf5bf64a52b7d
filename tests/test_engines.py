"""The Ray Data engine against the local one: same bank (same ``version``) on the same input, several
shards; the caller's Ray left running; errors of a task re-raised in the driver as they were
raised; a clear error when Ray is not installed.

Starting Ray costs 5-15 s on the shared 2-core machine, so one module-scoped ``ray.init`` serves
every test. (That a build which starts its own Ray also stops it is checked by
benchmarks/build_throughput.py's Ray arm, which must start one anyway.)
"""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from conftest import SAMPLE_COCO, shared_path
from instbank.build import BuildConfig, build_bank
from instbank.errors import BuildError
from instbank.formats.coco import read_coco
from instbank.formats.yolo import read_yolo
from instbank.storage import open_bank

# Ray Data copies its DataContext into every task, setting its deprecated aliases on the way.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_cluster():
    """The caller's Ray (two CPUs), shared by the tests of this module; yields the ``ray`` module.
    Imported here, not at module level: importing Ray takes ~5 s, paid only when these tests run."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


def _build_both(dataset, tmp_path, config):
    """A one-process local build and a two-worker Ray build of ``dataset``; returns both reports
    and the Ray build's progress calls."""
    local = build_bank(dataset, tmp_path / "local", config, workers=1)
    calls = []
    remote = build_bank(dataset, tmp_path / "ray", config, workers=2, engine="ray",
                        progress=lambda images, crops: calls.append((images, crops)))
    return local, remote, calls


def _assert_same_bank(local, remote):
    assert remote.version == local.version
    assert (remote.num_crops, remote.num_shards, remote.skipped) == (local.num_crops, local.num_shards, local.skipped)
    a, b = open_bank(local.out), open_bank(remote.out)
    np.testing.assert_array_equal(a.meta_table, b.meta_table)
    np.testing.assert_array_equal(a.get_many(np.arange(len(a))), b.get_many(np.arange(len(b))))


def test_ray_build_equals_local_on_the_sample(tmp_path, ray_cluster):
    dataset = read_coco(SAMPLE_COCO)
    local, remote, calls = _build_both(dataset, tmp_path, BuildConfig(size=32, shard_images=2))
    assert remote.num_shards == 4
    _assert_same_bank(local, remote)
    # One progress call per shard, adding up to the whole build.
    assert len(calls) == remote.num_shards
    assert tuple(map(sum, zip(*calls))) == (len(dataset.images), remote.num_crops)


def test_ray_build_on_coco128_seg_equals_local(tmp_path, ray_cluster):
    dataset = read_yolo(shared_path("coco128-seg"))
    local, remote, _ = _build_both(dataset, tmp_path, BuildConfig(size=32, shard_images=16))
    assert remote.num_shards == 8
    _assert_same_bank(local, remote)


def test_callers_ray_and_settings_are_left_as_they_were_and_resume_reuses_shards(tmp_path, ray_cluster):
    dataset = read_coco(SAMPLE_COCO)
    config = BuildConfig(size=16, shard_images=3)
    ctx = ray_cluster.data.DataContext.get_current()
    settings = ("enable_progress_bars", "op_resource_reservation_enabled")
    before = [getattr(ctx, name) for name in settings]
    first = build_bank(dataset, tmp_path / "b", config, workers=2, engine="ray")
    assert ray_cluster.is_initialized()
    assert [getattr(ctx, name) for name in settings] == before
    # As after a kill while shard 1 was being written: no manifest, shard 1 unfinished.
    (tmp_path / "b" / "manifest.json").unlink()
    (tmp_path / "b" / "shards" / "000001" / "shard.json").unlink()
    again = build_bank(dataset, tmp_path / "b", config, workers=2, engine="ray", resume=True)
    assert (again.version, again.reused_shards) == (first.version, first.num_shards - 1)


def test_task_error_is_reraised_with_its_remote_traceback(tmp_path, ray_cluster):
    from instbank.engines.ray import RemoteTraceback, run as run_ray

    dataset = read_coco(SAMPLE_COCO)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a shard directory cannot be created under a regular file
    jobs = [(dataset.images[:2], tmp_path / "ok" / "000000"), (dataset.images[2:4], blocker / "000001")]
    with pytest.raises(BuildError, match=r"not-a-dir/000001: write failed \(Not a directory\)") as info:
        list(run_ray(jobs, BuildConfig(size=16), workers=2))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in build_shard" in str(info.value.__cause__)  # where the task raised it


def test_missing_ray_is_a_build_error(tmp_path, monkeypatch):
    from instbank.engines.ray import run as run_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when Ray is not installed
    dataset = read_coco(SAMPLE_COCO)
    with pytest.raises(BuildError, match=r"instbank\[ray\]"):
        list(run_ray([(dataset.images[:1], tmp_path / "000000")], BuildConfig(size=16), workers=1))


def test_an_exception_that_cannot_cross_processes_keeps_its_text():
    from instbank.crops import ImageSkip
    from instbank.engines.ray import _pickle_error

    # ImageSkip(reason, detail) pickles but does not unpickle (its args are (detail,) only).
    error = pickle.loads(_pickle_error(ImageSkip("missing_image", "a.jpg: no such file")))
    assert isinstance(error, BuildError) and str(error) == "ImageSkip: a.jpg: no such file"


def test_local_pool_progress_adds_up_to_the_whole_build(tmp_path):
    """The pool's progress comes through a queue; whatever is still in flight when the last shard
    ends is topped up from the shards' results, so the totals are exact (and each call positive)."""
    dataset = read_coco(SAMPLE_COCO)
    calls = []
    report = build_bank(dataset, tmp_path / "b", BuildConfig(size=16, shard_images=2), workers=2,
                        progress=lambda images, crops: calls.append((images, crops)))
    assert report.num_shards > 2
    assert tuple(map(sum, zip(*calls))) == (len(dataset.images), report.num_crops)
    assert all(images >= 0 and crops >= 0 and images + crops > 0 for images, crops in calls)
