"""The Ray engine writing to object storage (the local moto S3 server of test_object_storage): each
task stages its shard on its own node and uploads it, the driver uploads the manifest; the bank is
the one built to disk. One module-scoped Ray (5-15 s to start here) whose tasks get the server's
address and test credentials through the job's ``runtime_env``, not the machine's environment.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("moto", reason="moto (the local S3 server of these tests) is not installed: pip install 'instbank[test]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'instbank[remote]'")

from test_object_storage import (  # noqa: E402,F401 (fixtures: disk_banks, s3, s3_server, sample)
    S, config, disk_banks, fs, keys, s3, s3_environment, s3_server, sample,
)

from instbank.build import build_bank  # noqa: E402
from instbank.storage import open_bank  # noqa: E402
from instbank.storage.base import LOCK_FILE, MANIFEST, SHARD_MANIFEST  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_with_s3(s3_server):  # noqa: F811 (the imported fixture)
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": s3_environment(s3_server)})
    yield ray
    ray.shutdown()


def test_ray_build_to_s3_is_the_disk_bank_and_resumes(ray_with_s3, s3, sample, disk_banks):  # noqa: F811
    url = f"{s3}/bank"
    report = build_bank(sample, url, config("webdataset"), workers=2, engine="ray")
    disk = open_bank(disk_banks["webdataset"])
    assert report.version == disk.version and report.num_shards == 3
    assert LOCK_FILE not in keys(url) and all(f"shards/{k:06d}/{SHARD_MANIFEST}" in keys(url) for k in range(3))
    # A lost manifest and a lost shard.json: --resume redoes that shard in a task, keeps the rest.
    root = url.removeprefix("s3://")
    fs().rm_file(f"{root}/{MANIFEST}")
    fs().rm_file(f"{root}/shards/000001/{SHARD_MANIFEST}")
    resumed = build_bank(sample, url, config("webdataset"), workers=2, engine="ray", resume=True)
    assert resumed.reused_shards == 2 and resumed.version == disk.version
    assert json.loads(fs().cat_file(f"{root}/{MANIFEST}"))["version"] == disk.version
    assert open_bank(url).get_many([0, 20, 53]).shape == (3, 4, S, S)
