"""zstd frames of crops, shared by the LMDB values and the WebDataset ``.rgba.zst`` members.

Every frame carries its content size and an xxhash64 checksum (``write_content_size``,
``write_checksum``), so a reader knows before decoding whether the frame holds one crop of the
bank's size, and zstd itself catches flipped bits.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

_local = threading.local()


def frame_compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor writing the frames readers expect (content size and checksum in each)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def thread_decompressor() -> zstandard.ZstdDecompressor:
    """One reused decompressor per thread (a ZstdDecompressor must not be used concurrently)."""
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def zstd_decode_into(frame, dest: np.ndarray) -> None:
    """Decompress one zstd ``frame`` (any buffer) straight into ``dest`` (C-contiguous uint8).

    The frame must declare exactly ``dest.nbytes`` as its content size; its checksum is checked by
    zstd. Raises ``ValueError`` saying what is wrong (callers add the file and key: building that
    string for every crop would cost more than a small crop's decode).
    """
    try:
        size = zstandard.frame_content_size(frame)
        if size != dest.nbytes:
            raise ValueError(f"decompresses to {size} bytes, expected {dest.nbytes}")
        with thread_decompressor().stream_reader(frame) as reader:
            got = reader.readinto(dest)
    except zstandard.ZstdError as e:
        raise ValueError(f"is not a valid zstd frame ({e})") from None
    if got != dest.nbytes:
        raise ValueError(f"decompressed to {got} bytes, expected {dest.nbytes}")
