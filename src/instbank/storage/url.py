"""Where a bank lives: a local directory, or a URL that fsspec opens (``s3://``, ``gs://``, any
fsspec protocol). Imports nothing heavy: fsspec is imported on the first remote access only, so
``import instbank`` and ``instbank --help`` never load it.

- ``is_url``/``location``: a path or ``"scheme://..."`` string -> ``Path`` or ``RemotePath``.
- ``RemotePath``: a URL that answers the few ``Path`` calls the readers make (``/``, ``name``,
  ``parent``, ``read_bytes``, ``exists``, ``is_dir``), so the manifest and shard index files of a
  bank at a URL are read by the same code as on disk, and messages name the URL.
- Fetching: ``fetch_shard`` downloads one shard directory of a bank at a URL (for a pass over the
  shards in order: convert, merge, verify, pull), ``scratch_dir`` holds such copies.
- Staging: a bank written to a URL is written through a local *staging* directory whose
  ``STAGING_MARKER`` file says where its shards go (``{"url", "owner"}``: the bank's URL and the
  id of the writer's lock); ``remote.publish_staged`` (called by ``ShardWriter`` when a shard is
  finished) uploads a staged shard and removes its local copy. A marker file, not an argument,
  because shards are written by ``build_shard`` in worker processes given only the shard
  directory.

Credentials and endpoints are fsspec's and the store client's own (for S3: the ``AWS_*``
environment variables, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for another server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: A shard directory or payload file name: one path component, no dots at all (no ``..``).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: In a staging directory: where its shards go (see the module docstring).
STAGING_MARKER = ".publish"


def is_url(path) -> bool:
    """True for ``"scheme://..."`` strings (a ``RemotePath`` too); local paths are not URLs."""
    return isinstance(path, str) and _URL.match(path) is not None


def safe_name(name) -> bool:
    """True when ``name`` is one plain path component (no separator, no ``..``)."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None and ".." not in name


def location(path) -> Path | RemotePath:
    """``RemotePath`` for a URL, ``Path`` otherwise (never ``Path("s3://b")``, which is ``s3:/b``)."""
    return RemotePath(path) if is_url(path) else Path(path)


class StoreError(OSError):
    """A store request that failed for a reason other than a missing or forbidden object (the
    client's own exception, e.g. no credentials or no connection, carried as an ``OSError`` so
    that the readers' ``except OSError`` turns it into a one-line ``BankError``)."""


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)`` for ``url``; fsspec caches filesystems per process
    (and makes new ones after a fork)."""
    try:
        import fsspec
    except ImportError:
        raise StoreError(f"{url}: reading or writing URLs needs fsspec and the store's client: pip install 'instbank[remote]'") from None
    try:
        # No listings cache: shards are uploaded by other processes, and a stale listing would
        # say a finished shard is missing (or a removed one present).
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError) as e:  # e.g. s3fs missing: fsspec names the package
        raise StoreError(f"{url}: {e}") from None


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Client exceptions that are not ``OSError`` (botocore's ``NoCredentialsError``,
    ``EndpointConnectionError``, ...) re-raised as ``StoreError`` naming ``url``."""
    from instbank.errors import InstbankError

    try:
        yield
    except (OSError, InstbankError):
        raise
    except Exception as e:  # noqa: BLE001 - any client's own exception types
        raise StoreError(f"{url}: {type(e).__name__}: {e}") from None


class RemotePath(str):
    """A URL inside a bank at a URL; see the module docstring. A ``str``: pickles as its text."""

    def __new__(cls, url: str):
        return super().__new__(cls, str(url).rstrip("/"))

    def __truediv__(self, name) -> RemotePath:
        return RemotePath(f"{self}/{name}")

    @property
    def name(self) -> str:
        return self.rpartition("/")[2]

    @property
    def parent(self) -> RemotePath:
        head = self.rpartition("/")[0]
        return RemotePath(head) if not head.endswith(":/") else self

    def fs(self):
        """``(filesystem, path)`` of this URL."""
        return filesystem(self)

    def read_bytes(self) -> bytes:
        fs, path = self.fs()
        with store_errors(self):
            return fs.cat_file(path)

    def exists(self) -> bool:
        fs, path = self.fs()
        with store_errors(self):
            return fs.exists(path)

    def is_dir(self) -> bool:
        fs, path = self.fs()
        with store_errors(self):
            return fs.isdir(path)


def read_all(paths: list) -> list[bytes | None]:
    """The bytes of each ``RemotePath`` in ``paths``, requested together (fsspec runs them
    concurrently); None for a local path or a read that failed (the caller reads it again, for
    the error)."""
    remote = [k for k, p in enumerate(paths) if isinstance(p, RemotePath)]
    out: list[bytes | None] = [None] * len(paths)
    if not remote:
        return out
    fs, _ = paths[remote[0]].fs()
    keys = [paths[k].fs()[1] for k in remote]
    try:
        with store_errors(paths[remote[0]]):
            blobs = fs.cat(keys, on_error="return")
    except OSError:
        return out
    for k, key in zip(remote, keys):
        blob = blobs.get(key) if isinstance(blobs, dict) else None
        out[k] = blob if isinstance(blob, bytes) else None
    return out


# --------------------------------------------------------------------------------------------
# staging


def staged_marker(shard_dir: str | os.PathLike) -> str | None:
    """The ``STAGING_MARKER`` text (JSON ``{"url", "owner"}``) of the staging directory a shard
    directory is in, or None for a shard written in place."""
    try:
        return (Path(shard_dir).parent.parent / STAGING_MARKER).read_text() or None
    except OSError:
        return None


def staged_destination(shard_dir: str | os.PathLike) -> str | None:
    """The URL of the bank a staged shard directory belongs to, or None."""
    marker = staged_marker(shard_dir)
    return json.loads(marker)["url"] if marker else None


def make_staging(marker: str, parent: str | None = None) -> Path:
    """A new local staging directory (under ``parent``, default the system temp directory:
    ``TMPDIR``) with its ``STAGING_MARKER`` text and an empty ``shards/``."""
    staging = Path(tempfile.mkdtemp(prefix="instbank-staging-", dir=parent))
    (staging / STAGING_MARKER).write_text(marker)
    (staging / "shards").mkdir()
    return staging


@contextmanager
def staged_shard(marker: str, name: str) -> Iterator[Path]:
    """A shard directory ``name`` in a fresh staging directory with ``marker`` on this machine
    (for a task on another node than the bank writer's), removed afterwards."""
    staging = make_staging(marker)
    try:
        yield staging / "shards" / name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# fetching


def why(e: BaseException) -> str:
    """An exception's text on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def list_names(url: RemotePath) -> dict[str, int]:
    """Plain file names directly under ``url`` -> size in bytes (``{}`` when nothing is there).
    Names that are not one plain path component (``safe_name``) are left out: a crafted object
    key can never name a file outside the directory it is downloaded into."""
    fs, root = url.fs()
    with store_errors(url):
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            return {}
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rpartition("/")[2]
        if entry.get("type") == "file" and safe_name(name):
            out[name] = int(entry.get("size") or 0)
    return out


def fetch_dir(url: RemotePath, local: Path) -> dict[str, int]:
    """Download every file directly under ``url`` into ``local`` (created; concurrent requests);
    returns name -> size. ``OSError`` (``FileNotFoundError`` when there is nothing) on failure."""
    names = list_names(url)
    if not names:
        raise FileNotFoundError(f"{url}: no files")
    local.mkdir(parents=True, exist_ok=True)
    fs, root = url.fs()
    with store_errors(url):
        fs.get([f"{root}/{n}" for n in names], [str(local / n) for n in names])
    return names


def fetch_shard(remote: RemotePath, local: Path) -> Path:
    """Download the shard directory at ``remote`` into ``local`` unless it is there already (a
    directory appears there only complete: downloaded beside it, then renamed); returns ``local``.
    ``BankError`` naming ``remote`` when it cannot be read."""
    from instbank.errors import BankError

    if not local.is_dir():
        tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fetch_dir(remote, tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BankError(f"{remote}: cannot download the shard ({why(e)})") from None
        os.replace(tmp, local)
    return local


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary local directory for shards fetched one at a time, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="instbank-fetch-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
