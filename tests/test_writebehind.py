"""WriteBehindFile: the bytes on disk are the bytes written, in every chunking; faults are precise."""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instbank.storage import writebehind
from instbank.storage.writebehind import WriteBehindFile


def _pieces(sizes: list[int]) -> list[bytes]:
    """Self-describing pieces: piece ``i`` is bytes ``(i * 7 + j) % 251``, so a lost, doubled or
    reordered piece shows in the file."""
    return [((np.arange(n) + i * 7) % 251).astype(np.uint8).tobytes() for i, n in enumerate(sizes)]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 50_000), max_size=30), chunk=st.sampled_from([4096, 12_288, 65_536, 1 << 20]))
def test_file_holds_exactly_what_was_written(tmp_path_factory, sizes, chunk):
    path = tmp_path_factory.mktemp("wb") / "pixels.u8"
    pieces = _pieces(sizes)
    f = WriteBehindFile(path, chunk_bytes=chunk)
    for piece in pieces:
        assert f.write(piece) == len(piece)
    f.close()
    assert path.read_bytes() == b"".join(pieces)


def test_numpy_arrays_are_written_as_their_bytes(tmp_path):
    crops = np.arange(3 * 4 * 37 * 37, dtype=np.uint32).astype(np.uint8).reshape(3, 4, 37, 37)
    f = WriteBehindFile(tmp_path / "x", chunk_bytes=4096)
    f.write(crops)
    f.write(crops[1:])
    f.close()
    on_disk = np.fromfile(tmp_path / "x", np.uint8).reshape(-1, 4, 37, 37)
    np.testing.assert_array_equal(on_disk, np.concatenate([crops, crops[1:]]))


def _assert_plain_fallback(path) -> None:
    """Write ten pieces across several chunks: write-behind turns itself off, nothing is lost."""
    pieces = _pieces([5000] * 10)
    f = WriteBehindFile(path, chunk_bytes=4096)
    for piece in pieces:
        f.write(piece)
    assert not f._behind
    f.close()
    assert path.read_bytes() == b"".join(pieces)


def _failing_sync_file_range(code: int):
    def fake(fd, offset, length, flags):  # a fake only to provoke the file system's answer
        ctypes.set_errno(code)
        return -1

    return fake


@pytest.mark.skipif(writebehind._SYNC_FILE_RANGE is None, reason="no sync_file_range here (not Linux)")
def test_unsupported_file_system_falls_back_to_plain_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(writebehind, "_SYNC_FILE_RANGE", _failing_sync_file_range(errno.EINVAL))
    _assert_plain_fallback(tmp_path / "x")


@pytest.mark.skipif(writebehind._SYNC_FILE_RANGE is None, reason="no sync_file_range here (not Linux)")
def test_a_write_fault_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(writebehind, "_SYNC_FILE_RANGE", _failing_sync_file_range(errno.EIO))
    f = WriteBehindFile(tmp_path / "x", chunk_bytes=4096)
    with pytest.raises(OSError) as caught:
        f.write(b"\x00" * 5000)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp_path / "x")
    f.abort()


def test_abort_closes_without_fsync_and_twice_is_harmless(tmp_path, monkeypatch):
    f = WriteBehindFile(tmp_path / "x")
    f.write(b"abc")
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    f.abort()
    f.abort()
    assert synced == [] and (tmp_path / "x").read_bytes() == b"abc"


@pytest.mark.skipif(writebehind._SYNC_FILE_RANGE is None, reason="no sync_file_range here (not Linux)")
def test_refused_cache_advice_falls_back_to_plain_writes(tmp_path, monkeypatch):
    def refuse(fd, offset, length, advice):  # a fake only to provoke a file system that refuses it
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    _assert_plain_fallback(tmp_path / "x")
