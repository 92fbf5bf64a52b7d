"""Banks on object storage, against a real S3 server on this machine: moto in server mode, started
on 127.0.0.1 by a session fixture (a subprocess, stopped at the end), one bucket per test, the
credentials set in the environment by ``monkeypatch`` for the test only. Nothing in instbank is
mocked: the requests go through s3fs/botocore over HTTP to the server.

A bank built to the server must be the bank built to disk (same ``version``), read back exactly
(in place for WebDataset, pulled for memmap/LMDB), in DataLoader workers started with spawn, and
resumable after a SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("moto", reason="moto (the local S3 server of these tests) is not installed: pip install 'instbank[test]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'instbank[remote]'")

from conftest import REPO, SAMPLE_COCO, modules_loaded_by  # noqa: E402
from instbank.build import BuildConfig, build_bank  # noqa: E402
from instbank.errors import BankError, BuildError  # noqa: E402
from instbank.formats.coco import read_coco  # noqa: E402
from instbank.storage import open_bank  # noqa: E402
from instbank.storage.base import LOCK_FILE, MANIFEST, SHARD_MANIFEST  # noqa: E402

SERVER_START_S = 30
S = 16  # small crops: these tests are about where the bytes go


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the process that started it dies, so that
    a killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@contextmanager
def moto_server():
    """``http://127.0.0.1:PORT`` of a moto S3 server in a subprocess, stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, f"moto server exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"moto server not listening on port {port} after {SERVER_START_S}s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point botocore at ``endpoint`` with throwaway credentials (and away
    from any ~/.aws of the machine)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "instbank-test", "AWS_SECRET_ACCESS_KEY": "instbank-test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


_SERVER: dict = {}  # one server per test run, whichever module's fixture starts it


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint of the run's moto server. One per process, also when another test module
    imports this fixture (pytest then counts it as a fixture of its own): fsspec caches its S3
    filesystems by arguments, not by endpoint, so a second server would get the first's clients."""
    if not _SERVER:
        context = moto_server()
        _SERVER.update(endpoint=context.__enter__(), context=context, users=0)
    _SERVER["users"] += 1
    yield _SERVER["endpoint"]
    _SERVER["users"] -= 1
    if not _SERVER["users"]:
        _SERVER.pop("context").__exit__(None, None, None)
        _SERVER.clear()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """``s3://BUCKET`` of a new bucket on the test server; the environment points at it."""
    for name, value in s3_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"instbank-{uuid.uuid4().hex[:12]}"
    fs().mkdir(bucket)
    return f"s3://{bucket}"


def fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)


def keys(url: str) -> list[str]:
    """Object keys under ``url``, relative to it."""
    root = url.removeprefix("s3://")
    return sorted(k[len(root) + 1:] for k in fs().find(root))


@pytest.fixture(scope="module")
def sample():
    return read_coco(SAMPLE_COCO)


def config(backend: str = "memmap", **kw) -> BuildConfig:
    return BuildConfig(**{"size": S, "backend": backend, "shard_images": 3, **kw})


@pytest.fixture(scope="module")
def disk_banks(sample, tmp_path_factory):
    """The sample built to disk, per backend: the reference of every comparison."""
    root = tmp_path_factory.mktemp("disk")
    return {b: build_bank(sample, root / b, config(b), workers=1).out for b in ("memmap", "webdataset")}


def all_crops(bank) -> np.ndarray:
    return bank.get_many(np.arange(len(bank)))


# --------------------------------------------------------------------------------------------
# build, read, pull


@pytest.mark.parametrize("backend", ["memmap", "webdataset"])
def test_build_to_s3_is_the_disk_bank(s3, sample, disk_banks, backend, tmp_path):
    url = f"{s3}/bank"
    report = build_bank(sample, url, config(backend), workers=1)
    disk = open_bank(disk_banks[backend])
    assert report.version == disk.version and report.out == url and report.num_shards == 3
    objects = keys(url)
    assert MANIFEST in objects and LOCK_FILE not in objects  # committed, and the lock released
    for k in range(3):  # every shard complete, nothing staged left behind at the URL
        assert f"shards/{k:06d}/{SHARD_MANIFEST}" in objects
    manifest = json.loads(fs().cat_file(f"{url.removeprefix('s3://')}/{MANIFEST}"))
    assert [s["hash"] for s in manifest["shards"]] == [s["hash"] for s in disk.manifest["shards"]]
    if backend == "webdataset":
        remote = open_bank(url)  # read in place, by range requests
        np.testing.assert_array_equal(remote.meta_table, disk.meta_table)
        np.testing.assert_array_equal(remote.get_many([5, 0, 53, 5]), disk.get_many([5, 0, 53, 5]))
        np.testing.assert_array_equal(all_crops(remote), all_crops(disk))
        streamed = list(remote.stream())
        np.testing.assert_array_equal(np.stack([c.rgba for c in streamed]), all_crops(disk))
    else:
        with pytest.raises(BankError, match=r"memmap bank is read from local disk: pull it first \(instbank pull s3://"):
            open_bank(url)
        pulled = open_bank(url, cache=tmp_path / "cache")
        assert pulled.version == disk.version and pulled.path == tmp_path / "cache"
        np.testing.assert_array_equal(all_crops(pulled), all_crops(disk))


def test_two_local_workers_upload_their_own_shards(s3, sample, disk_banks):
    report = build_bank(sample, f"{s3}/bank", config(), workers=2)
    assert report.version == open_bank(disk_banks["memmap"]).version


def test_an_existing_bank_is_refused_and_overwrite_replaces_it(s3, sample):
    url = f"{s3}/bank"
    build_bank(sample, url, config(), workers=1)
    with pytest.raises(BuildError, match="a bank already exists here"):
        build_bank(sample, url, config(), workers=1)
    fs().pipe_file(f"{url.removeprefix('s3://')}/shards/000009/junk", b"x")  # an old shard the new bank does not have
    report = build_bank(sample, url, config("webdataset"), workers=1, overwrite=True)
    assert report.version.startswith("webdataset@") and not any(k.startswith("shards/000009") for k in keys(url))


def test_foreign_objects_and_a_file_are_refused(s3, sample):
    fs().pipe_file(f"{s3.removeprefix('s3://')}/data/photo.jpg", b"x")
    with pytest.raises(BuildError, match=r"holds files that are not an instbank bank's \(photo.jpg\)"):
        build_bank(sample, f"{s3}/data", config(), workers=1)
    with pytest.raises(BuildError, match="exists and is not a directory"):
        build_bank(sample, f"{s3}/data/photo.jpg", config(), workers=1)
    assert keys(f"{s3}/data") == ["photo.jpg"]  # nothing written


def test_pull_resumes_and_refuses_a_corrupt_bank(s3, sample, disk_banks, tmp_path):
    from instbank.storage.pull import pull_bank

    url = f"{s3}/bank"
    build_bank(sample, url, config("webdataset"), workers=1)
    for name in ("..hidden", "a b", "sub/x"):  # object names that are not one plain file name: never fetched
        fs().pipe_file(f"{url.removeprefix('s3://')}/shards/000000/{name}", b"x")
    dest = tmp_path / "pulled"
    manifest, reused = pull_bank(url, dest)
    assert reused == 0 and manifest["version"] == open_bank(disk_banks["webdataset"]).version
    assert sorted(p.name for p in (dest / "shards" / "000000").iterdir()) == [
        "bank-000000.tar", "digests.npy", "index.npy", "meta.npy", "shard.json"]
    assert pull_bank(url, dest)[1] == 3  # already there: nothing fetched
    # An interrupted pull (no manifest, one shard missing) fetches only that shard.
    (dest / MANIFEST).unlink()
    for f in (dest / "shards" / "000001").iterdir():
        f.unlink()
    (dest / "shards" / "000001").rmdir()
    assert pull_bank(url, dest)[1] == 2
    np.testing.assert_array_equal(all_crops(open_bank(dest)), all_crops(open_bank(disk_banks["webdataset"])))
    # A crop changed at the URL: the pull stops at that shard, names the object, and leaves no bank.
    tar = f"{url.removeprefix('s3://')}/shards/000002/bank-000000.tar"
    data = bytearray(fs().cat_file(tar))
    index = np.load(dest / "shards" / "000002" / "index.npy")
    data[int(index["offset"][0]) + 20] ^= 0xFF
    fs().pipe_file(tar, bytes(data))
    with pytest.raises(BankError, match=rf"{url}/shards/000002.*crop \d+ .*(digest|corrupt)"):
        pull_bank(url, tmp_path / "again")
    assert not (tmp_path / "again" / MANIFEST).exists() and not (tmp_path / "again" / "shards" / "000002").exists()
    build_bank(sample, f"{s3}/other", config("webdataset", size=24), workers=1)
    with pytest.raises(BuildError, match="holds another bank"):
        pull_bank(f"{s3}/other", dest)


# --------------------------------------------------------------------------------------------
# convert, merge, verify, stats


def test_convert_and_merge_to_and_from_s3(s3, sample, disk_banks, tmp_path):
    from instbank.storage.convert import convert_bank
    from instbank.storage.merge import merge_banks

    version = open_bank(disk_banks["memmap"]).version.split("@")[1]
    up = convert_bank(disk_banks["memmap"], f"{s3}/wds", backend="webdataset")  # disk -> URL
    down = convert_bank(f"{s3}/wds", tmp_path / "lmdb", backend="lmdb")  # URL -> disk (read shard by shard)
    across = convert_bank(f"{s3}/wds", f"{s3}/memmap", shard_crops=20)  # URL -> URL, re-sharded
    assert {m["version"].split("@")[1] for m in (up, down, across)} == {version}
    assert len(across["shards"]) == 3 and across["backend"] == "webdataset"
    with pytest.raises(BuildError, match="must not be the input bank"):
        convert_bank(f"{s3}/wds", f"{s3}/wds/inner")
    # The two halves of the build, one at the URL and one on disk, merge into the whole build.
    part = dataclasses.replace(sample, images=sample.images[:3])
    rest = dataclasses.replace(sample, images=sample.images[3:])
    build_bank(part, f"{s3}/part0", config(), workers=1)
    build_bank(rest, tmp_path / "part1", config(), workers=1)
    merged = merge_banks([f"{s3}/part0", tmp_path / "part1"], f"{s3}/merged")
    assert merged["version"] == open_bank(disk_banks["memmap"]).version


def test_verify_and_stats_on_a_url(s3, sample, disk_banks):
    from instbank.stats import bank_stats
    from instbank.storage.verify import verify_bank

    url = f"{s3}/bank"
    build_bank(sample, url, config(), workers=1)
    report = verify_bank(url)
    assert report.ok, report.summary()
    assert report.crops_checked == 54 and report.summary().startswith(f"{url}: memmap bank, 54/54 crops checked, OK")
    stats = bank_stats(url)  # metadata only: a memmap bank at a URL needs no pull for it
    assert stats["num_crops"] == 54 and stats["version"] == open_bank(disk_banks["memmap"]).version
    assert stats["bytes_on_disk"] >= 54 * 4 * S * S
    key = f"{url.removeprefix('s3://')}/shards/000001/pixels.u8"
    data = bytearray(fs().cat_file(key))
    data[4 * S * S * 2 + 7] ^= 0x01  # crop 2 of shard 1
    fs().pipe_file(key, bytes(data))
    report = verify_bank(url)
    first = open_bank(disk_banks["memmap"]).manifest["shards"][0]["num_crops"]
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].message.startswith(f"{url}/shards/000001/pixels.u8: crop {first + 2} (shard 000001, local 2)")


def test_missing_bank_and_bucket_are_one_line_errors(s3):
    with pytest.raises(BankError, match=rf"^{s3}/nothing: no such bank directory$"):
        open_bank(f"{s3}/nothing")
    with pytest.raises(BankError, match="no such bank directory"):
        open_bank("s3://instbank-no-such-bucket-here/bank")


# --------------------------------------------------------------------------------------------
# training: DataLoader workers started with spawn


def test_sampled_read_in_spawn_workers_gives_the_right_crops(s3, sample, disk_banks):
    from instbank.sampling import BankSampler, bank_loader

    url = f"{s3}/bank"
    build_bank(sample, url, config("webdataset"), workers=1)
    bank, disk = open_bank(url), open_bank(disk_banks["webdataset"])
    loader = bank_loader(bank, batch_size=4, k=3, num_workers=2, multiprocessing_context="spawn", pin_memory=False,
                         weighting="class_balanced", seed=7, steps_per_epoch=4)
    batches = list(loader)
    # The draws are the sampler's (per worker, as on disk) ...
    draws = [BankSampler(disk, 4, 3, "class_balanced", 7, steps_per_epoch=4).for_worker(w, 2) for w in range(2)]
    expected = sorted(tuple(i.reshape(-1)) for sampler in draws for i in sampler)
    assert sorted(tuple(b.indices.numpy().reshape(-1)) for b in batches) == expected and len(batches) == 4
    for batch in batches:  # ... and what the workers read from S3 is exactly the crops at them
        indices = batch.indices.numpy().reshape(-1)
        np.testing.assert_array_equal(batch.pixels.numpy().reshape(-1, 4, S, S), disk.get_many(indices))
        np.testing.assert_array_equal(batch.class_ids.numpy().reshape(-1), disk.crop_class_ids[indices])


def ann_id_of(crop) -> int:
    return crop.meta.ann_id


def test_stream_in_spawn_workers_gives_every_crop_once(s3, sample, disk_banks):
    import torch

    url = f"{s3}/bank"
    build_bank(sample, url, config("webdataset", backend_options={"maxcount": 4}), workers=1)
    pipeline = open_bank(url).stream().map(ann_id_of)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = sorted(int(a) for a in loader)
    assert got == sorted(open_bank(disk_banks["webdataset"]).meta_table["ann_id"].tolist())


# --------------------------------------------------------------------------------------------
# the lock


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(s3):
    from instbank.storage.writer import BankWriter

    url = f"{s3}/bank"
    with BankWriter(url, "memmap", S):
        assert LOCK_FILE in keys(url)
        with pytest.raises(BuildError, match=rf"another instbank writer \(pid {os.getpid()} on .*\) is writing into this bank"):
            BankWriter(url, "memmap", S, mode="overwrite").__enter__()
    assert keys(url) == [] or LOCK_FILE not in keys(url)


@pytest.mark.parametrize("expired", [True, False])
def test_another_hosts_lock_lapses_with_its_lease(s3, sample, expired):
    url = f"{s3}/bank"
    holder = {"owner": "x", "host": "elsewhere", "pid": 4242, "expires": time.time() + (-5 if expired else 600)}
    fs().pipe_file(f"{url.removeprefix('s3://')}/{LOCK_FILE}", json.dumps(holder).encode())
    if expired:
        build_bank(sample, url, config(), workers=1)
        assert LOCK_FILE not in keys(url)
    else:
        with pytest.raises(BuildError, match=r"pid 4242 on elsewhere, lease until .* \(locked\); nothing was changed"):
            build_bank(sample, url, config(), workers=1)
        assert keys(url) == [LOCK_FILE]


def test_a_writer_that_lost_its_lock_writes_no_manifest(s3, sample):
    from instbank.storage.writer import BankWriter, shard_dir_name

    url = f"{s3}/bank"
    with BankWriter(url, "memmap", S) as writer:
        with writer.shard(shard_dir_name(0)) as shard:
            shard.append(*_crops(3))
        fs().pipe_file(f"{url.removeprefix('s3://')}/{LOCK_FILE}", b'{"owner": "someone else"}')  # taken over
        with pytest.raises(BuildError, match="lost the lock .*; shard not uploaded, no manifest written"):
            with writer.shard(shard_dir_name(1)) as late:
                late.append(*_crops(2))
        with pytest.raises(BuildError, match="lost the lock"):
            writer.commit(sample.classes, [shard.result], {}, {})
    assert MANIFEST not in keys(url) and not any(k.startswith("shards/000001") for k in keys(url))


def _crops(n: int):
    from instbank.types import META_DTYPE

    rng = np.random.default_rng(n)
    meta = np.zeros(n, META_DTYPE)
    meta["class_id"] = 1
    return rng.integers(0, 256, (n, 4, S, S), dtype=np.uint8), meta


# --------------------------------------------------------------------------------------------
# kill + --resume


REPEATS = 3  # 24 images in 12 shards: a build that lasts long enough to be killed in the middle


def repeated_sample():
    dataset = read_coco(SAMPLE_COCO)
    images = [dataclasses.replace(im, image_id=im.image_id + k * 10**9) for k in range(REPEATS) for im in dataset.images]
    return dataclasses.replace(dataset, images=images)


KILL_CONFIG = BuildConfig(size=S, shard_images=2)


def _finished(url: str) -> tuple[int, bool]:
    """Shards with their shard.json at ``url``, and whether a shard is being uploaded (objects
    there, its shard.json not yet)."""
    names = keys(url)
    done = {n.split("/")[1] for n in names if n.endswith(SHARD_MANIFEST)}
    started = {n.split("/")[1] for n in names if n.startswith("shards/")}
    return len(done), bool(started - done)


@pytest.mark.parametrize("moment", ["between_shards", "mid_upload"])
def test_kill_and_resume_against_s3(s3, tmp_path, moment):
    url = f"{s3}/bank"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
            "from test_object_storage import KILL_CONFIG, repeated_sample\n"
            "from instbank.build import build_bank\n"
            f"build_bank(repeated_sample(), {url!r}, KILL_CONFIG, workers=1)\n")
    # TMPDIR: the killed build's staging directory (one shard) is left in the test's own folder.
    proc = subprocess.Popen([sys.executable, "-c", code],
                            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp_path)})

    def ready() -> bool:
        done, uploading = _finished(url)
        return 2 <= done < 12 and (uploading if moment == "mid_upload" else not uploading)

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the build finished before the moment to kill it"
        assert time.monotonic() < deadline, "the build never reached the moment to kill it"
        if ready():
            proc.send_signal(signal.SIGSTOP)  # re-checked stopped: the state killed in is the one checked
            if ready():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finished, _ = _finished(url)
    assert MANIFEST not in keys(url) and LOCK_FILE in keys(url)  # the dead writer's lock stays
    assert len(list(tmp_path.glob("instbank-staging-*"))) == 1  # and its staging directory
    with pytest.raises(BankError, match="not a finished instbank bank"):
        open_bank(url)
    resumed = build_bank(repeated_sample(), url, KILL_CONFIG, workers=1, resume=True)  # takes over the dead pid's lock
    clean = build_bank(repeated_sample(), tmp_path / "clean", KILL_CONFIG, workers=1)
    assert resumed.reused_shards == finished and resumed.version == clean.version
    assert LOCK_FILE not in keys(url)


# --------------------------------------------------------------------------------------------
# the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instbank.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"})


def test_cli_build_verify_pull_on_urls(s3, disk_banks, tmp_path):
    url = f"{s3}/bank"
    proc = run_cli("build", "--coco", str(SAMPLE_COCO), "--out", url, "--size", str(S), "--shard-images", "3",
                   "--backend", "webdataset", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    version = open_bank(disk_banks["webdataset"]).version
    assert f"bank {url}  version {version}" in proc.stderr
    proc = run_cli("verify", url)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{url}: webdataset bank, 54/54 crops checked, OK"), proc
    proc = run_cli("pull", url, str(tmp_path / "copy"))
    assert proc.returncode == 0 and f"pulled {url} to {tmp_path / 'copy'}: 54 crops, version {version}" in proc.stderr
    proc = run_cli("stats", f"{s3}/missing")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {s3}/missing: no such bank directory", proc.stderr


def test_import_and_help_do_not_load_fsspec():
    code = ("import instbank; from instbank.cli import app; from typer.testing import CliRunner; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "assert CliRunner().invoke(app, ['pull', '--help']).exit_code == 0")
    assert modules_loaded_by(code, ("fsspec", "s3fs", "botocore", "aiobotocore")) == []
