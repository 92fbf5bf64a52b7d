"""A crafted bank (DESIGN "Hostile input": a bank's manifest and shard metadata cannot point outside
its directory) makes ``open_bank``, reads, ``verify``, ``convert`` and ``merge`` either work or fail
with a one-line ``InstbankError``, and never touch a file outside the bank and their output.

Hypothesis mutates one field of a real bank's ``manifest.json`` or of a ``shard.json`` at a time:
path traversal in shard and payload file names, absurd counts and sizes, wrong JSON types. An
audit hook (``sys.addaudithook``) records every file the operations open, remove or map below the
sandbox, so a read outside the bank is seen even where it would not fail.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instbank.errors import InstbankError
from instbank.storage import open_bank
from instbank.storage.base import MANIFEST, SHARD_MANIFEST
from instbank.storage.convert import convert_bank
from instbank.storage.merge import merge_banks
from instbank.storage.verify import verify_bank
from instbank.testing import write_synthetic_bank

_WATCH: dict[str, object] = {"root": None, "seen": []}


def _audit(event: str, args: tuple) -> None:
    root = _WATCH["root"]
    if root is None or event not in ("open", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.mkdir"):
        return
    path = args[0] if args else None
    if isinstance(path, (str, bytes, os.PathLike)):
        resolved = os.path.realpath(os.fsdecode(path))
        if resolved.startswith(root):
            _WATCH["seen"].append((event, resolved))


sys.addaudithook(_audit)  # cannot be removed: it does nothing while _WATCH["root"] is None

HOSTILE_NAMES = ["../outside", "../../outside", "/etc/hostname", "..", ".", "", "a/b", "shards/../..", "..\\x", None, 7]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.sampled_from([-1, 0, 1, 2**31, 2**62, 10**30, 1.5, float("nan"), True, [], {}, [1, 2], "x" * 300]),
    st.integers(), st.text(max_size=12), st.none(),
)


@pytest.fixture(scope="module", params=["memmap", "lmdb", "webdataset"])
def real_bank(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"real-{request.param}") / "bank"
    write_synthetic_bank(path, 12, size=8, backend=request.param, shard_sizes=[5, 7])
    return path


def _fields(obj, prefix=()):
    """Every (path, value) of a JSON document, containers included."""
    yield prefix, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _fields(value, (*prefix, key))


def _set(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _run_everything(bank: Path, out: Path) -> None:
    """Every operation on a bank, each allowed to fail only with the project's one-line errors."""
    steps = [
        lambda: open_bank(bank).get_many(list(range(len(open_bank(bank))))),
        lambda: open_bank(bank).meta_table,
        lambda: verify_bank(bank).summary(),
        lambda: convert_bank(bank, out / "converted", "memmap"),
        lambda: merge_banks([bank], out / "merged"),
    ]
    for step in steps:
        try:
            step()
        except InstbankError as e:
            assert "\n" not in str(e) and str(e), repr(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_crafted_field_never_reaches_outside_the_bank(tmp_path_factory, real_bank, data):
    sandbox = tmp_path_factory.mktemp("sandbox")
    bank, out = sandbox / "bank", sandbox / "out"
    shutil.copytree(real_bank, bank)
    out.mkdir()
    (sandbox / "outside").write_bytes(b"\0" * 4096)  # what a traversal would find
    target = data.draw(st.sampled_from([bank / MANIFEST, bank / "shards" / "000000" / SHARD_MANIFEST]), label="file")
    doc = json.loads(target.read_text())
    paths = [p for p, _ in _fields(doc) if p]
    where = data.draw(st.sampled_from(paths), label="field")
    _set(doc, where, data.draw(HOSTILE_VALUES, label="value"))
    target.write_text(json.dumps(doc))

    _WATCH["root"], _WATCH["seen"] = os.path.realpath(sandbox), []
    try:
        _run_everything(bank, out)
    finally:
        _WATCH["root"] = None
    allowed = (os.path.realpath(bank) + os.sep, os.path.realpath(out) + os.sep)
    outside = [(e, p) for e, p in _WATCH["seen"] if not p.startswith(allowed)]
    assert not outside, f"{where} of {target.name}: touched {outside}"


@pytest.mark.parametrize("name", ["../outside", "/tmp", "..", "a/b"])
def test_a_traversing_shard_name_is_one_line(tmp_path, name):
    bank = write_synthetic_bank(tmp_path / "bank", 4, size=8).path
    manifest = json.loads((bank / MANIFEST).read_text())
    manifest["shards"][0]["dir"] = name
    (bank / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InstbankError, match="is not a plain file name inside the bank"):
        open_bank(bank)
    assert not verify_bank(bank).ok


def test_an_absurd_crop_size_is_refused_before_any_allocation(tmp_path):
    bank = write_synthetic_bank(tmp_path / "bank", 4, size=8).path
    manifest = json.loads((bank / MANIFEST).read_text())
    manifest["crop_size"] = [10**6, 10**6]  # a get_many of one crop would ask for 4 TB
    (bank / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InstbankError, match=r"crop_size must be \[S, S\] with S in 1\.\.16384"):
        open_bank(bank)
