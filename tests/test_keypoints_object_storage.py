"""Banks with keypoints on object storage (the moto S3 server of ``test_object_storage``):
``keypoints.npy`` goes up with its shard, is read in place (WebDataset), pulled (memmap) and copied
by convert, and the bank keeps the version it has on disk. The keypoints are SYNTHETIC, made on
the sample's real persons (``test_keypoints_data.synthetic_keypoints_json``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("moto", reason="moto (the local S3 server of these tests) is not installed: pip install 'instbank[test]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'instbank[remote]'")

from conftest import SAMPLE_COCO  # noqa: E402
from test_keypoints_data import SAMPLE_IMAGES, synthetic_keypoints_json  # noqa: E402
from test_object_storage import keys, s3, s3_server  # noqa: E402, F401  (fixtures)

from instbank.build import BuildConfig, build_bank  # noqa: E402
from instbank.formats.coco import read_coco  # noqa: E402
from instbank.storage import open_bank  # noqa: E402
from instbank.storage.base import KEYPOINTS_FILE  # noqa: E402
from instbank.storage.convert import convert_bank  # noqa: E402
from instbank.storage.verify import verify_bank  # noqa: E402


@pytest.mark.parametrize("backend", ["memmap", "webdataset"])
def test_keypoints_travel_to_and_from_s3(s3, backend, tmp_path):  # noqa: F811
    synthetic_keypoints_json(SAMPLE_COCO, tmp_path / "kp.json")
    dataset = read_coco(tmp_path / "kp.json", SAMPLE_IMAGES)
    config = BuildConfig(size=16, backend=backend, shard_images=3)
    disk = open_bank(build_bank(dataset, tmp_path / "disk", config, workers=1).out)
    url = f"{s3}/bank"
    assert build_bank(dataset, url, config, workers=1).version == disk.version
    assert [k for k in keys(url) if k.endswith(KEYPOINTS_FILE)] == [f"shards/{n:06d}/{KEYPOINTS_FILE}" for n in range(3)]
    assert verify_bank(url).ok
    if backend == "webdataset":
        remote = open_bank(url)  # read in place: the keypoint files are fetched together
        np.testing.assert_array_equal(remote.keypoint_table, disk.keypoint_table)
        np.testing.assert_array_equal(np.stack([c.keypoints for c in remote.stream()]), disk.keypoint_table)
    else:
        pulled = open_bank(url, cache=tmp_path / "cache")
        assert pulled.version == disk.version
        np.testing.assert_array_equal(pulled.keypoint_table, disk.keypoint_table)
    convert_bank(url, tmp_path / "lmdb", "lmdb")
    np.testing.assert_array_equal(open_bank(tmp_path / "lmdb").keypoint_table, disk.keypoint_table)
