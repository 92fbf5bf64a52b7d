"""Banks on object storage (any fsspec URL: ``s3://``, ``gs://``, ``az://``, ``file://`` ...).

**Writing** (``BankWriter(URL, ...)``: build, convert, merge). An object store has no rename and no
directories, so the commit-last protocol of a local bank is kept with whole-object PUTs, which a
reader sees entirely or not at all:

- every shard is written into a local *staging* directory (``url.make_staging``), then uploaded by
  ``publish_shard``: its payload files, ``meta.npy`` and ``digests.npy`` first, ``shard.json``
  **last**, and its local copy removed. A shard without ``shard.json`` is unfinished, as on disk; a
  shard that is written again (``--resume``, a retried Ray task) loses its ``shard.json`` first.
- ``manifest.json`` is uploaded last of all, after every shard's ``shard.json``: without it the
  URL is not a bank. ``--overwrite`` deletes the old manifest before anything else.
- ``--resume`` lists the ``shard.json`` objects present and keeps each shard whose
  ``digests.npy`` matches the hash recorded in it (``finished_shards``), as on disk.

**The lock** (``StoreLock``): the object ``URL/.lock``, created with an exclusive create
(S3: ``PutObject`` with ``If-None-Match: *``, which S3 has supported since 2024-08; only one of
two writers racing for it succeeds), holding the writer's host, pid and lease expiry. A daemon
thread renews the lease every ``LOCK_TTL / 4`` s with a conditional put on the lock's own ETag
(``If-Match``), and the commit renews it once more just before the manifest is uploaded. A writer
finds a lock *stale*, and takes it over with a put conditional on the stale lock's ETag, when its
holder ran on this host and has ended, or its lease has expired. What it does not protect: a
writer that stalls for longer than ``LOCK_TTL`` (its lease lapses and another may take over; the
commit then fails with "lost the lock", but shards already uploaded by both may mix until the
winner rewrites them), clocks between hosts that disagree by more than the lease, and, on stores
without conditional writes, a race between two writers starting within the same request round
trip (fsspec's exclusive create is then a check-then-write).

Reading is elsewhere: ``open_bank`` of a URL reads a WebDataset bank in place (``wds_bank``: range
requests, or a stream); memmap and LMDB banks are pulled to a local directory first
(``storage.pull``); ``convert``, ``merge`` and ``verify`` read a bank at a URL one shard at a time
(``base.reading``, ``ShardedBank.fetch_to``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

from instbank.errors import BuildError
from instbank.storage.base import LOCK_FILE, MANIFEST, PLAN_FILE, SHARD_MANIFEST, SHARDS_DIR
from instbank.storage.url import RemotePath, staged_marker, store_errors, why

#: Seconds a lock's lease lasts without renewal (renewed every quarter of it while held).
LOCK_TTL = 120.0


# --------------------------------------------------------------------------------------------
# objects


def _keys(url: RemotePath) -> tuple[object, str]:
    return url.fs()


def publish_staged(shard_dir: str | os.PathLike) -> None:
    """Upload a finished shard to its bank's URL and remove its local copy, when it was staged
    (``url.staged_marker``; a no-op for a shard written in place)."""
    marker = staged_marker(shard_dir)
    if marker is not None:
        target = json.loads(marker)
        publish_shard(Path(shard_dir), RemotePath(target["url"]) / SHARDS_DIR / Path(shard_dir).name, target["owner"])


def publish_shard(local: Path, dest: RemotePath, owner: str | None = None) -> None:
    """Upload the finished shard directory ``local`` to ``dest`` (``shard.json`` last) and remove
    ``local``; an earlier upload of the same shard is deleted first, its ``shard.json`` before the
    rest. With ``owner``, the bank's lock must still be that writer's (one read of the lock
    object): a writer that lost its lock uploads nothing more. ``BuildError`` naming ``dest``
    when the store refuses."""
    fs, root = _keys(dest)
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    payload = [n for n in names if n != SHARD_MANIFEST]
    try:
        with store_errors(dest):
            if owner is not None:
                _check_owner(fs, dest.parent.parent, owner)
            try:  # an earlier upload of this shard (--resume, a retried task): unfinished from here on
                old = fs.ls(root, detail=False)
            except FileNotFoundError:
                old = []
            if f"{root}/{SHARD_MANIFEST}" in old:
                fs.rm_file(f"{root}/{SHARD_MANIFEST}")
            if old:
                fs.rm(root, recursive=True)
            fs.put([str(local / n) for n in payload], [f"{root}/{n}" for n in payload])
            fs.put_file(str(local / SHARD_MANIFEST), f"{root}/{SHARD_MANIFEST}")
    except OSError as e:
        raise BuildError(f"{dest}: upload failed ({why(e)}); no manifest written, rerun with --resume") from None
    shutil.rmtree(local, ignore_errors=True)


def _check_owner(fs, bank: RemotePath, owner: str) -> None:
    try:
        holder = json.loads(fs.cat_file((bank / LOCK_FILE).fs()[1]))
    except (FileNotFoundError, ValueError):
        holder = {}
    holder = holder if isinstance(holder, dict) else {}
    if holder.get("owner") != owner:
        raise BuildError(f"{bank}: lost the lock {LOCK_FILE} (held now by {_holder(holder)}); "
                         "shard not uploaded, no manifest written")


def put_json(url: RemotePath, obj, what: str) -> None:
    fs, key = _keys(url)
    try:
        with store_errors(url):
            fs.pipe_file(key, json.dumps(obj, indent=1).encode())
    except OSError as e:
        raise BuildError(f"{url}: cannot write the {what} ({why(e)})") from None


def get_json(url: RemotePath) -> dict | None:
    """The JSON object at ``url``, or None when it is missing or not JSON."""
    try:
        obj = json.loads(url.read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def bytes_stored(url: RemotePath) -> int:
    """Total size of the objects under ``url``."""
    fs, root = _keys(url)
    with store_errors(url):
        return int(fs.du(root, total=True))


# --------------------------------------------------------------------------------------------
# the lock


class StoreLock:
    """The writer's lock on a bank at a URL (see the module docstring): a context manager, like
    ``writer.DirectoryLock``; ``BuildError`` naming the holder when another writer holds it."""

    def __init__(self, bank: RemotePath):
        self.bank = RemotePath(bank)
        self.url = self.bank / LOCK_FILE
        self.lost: str | None = None
        self._etag: str | None = None
        self._pending = self._expires = 0.0
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        self._pending = time.time() + LOCK_TTL
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": self._pending}).encode()

    def __enter__(self) -> StoreLock:
        fs, key = _keys(self.url)
        try:
            with store_errors(self.url):
                try:
                    self._etag = _etag(fs.pipe_file(key, self._body(), mode="create"))
                except FileExistsError:
                    try:
                        self._take_over(fs, key)
                    except FileNotFoundError:  # released between the two requests: create it now
                        self._etag = _etag(fs.pipe_file(key, self._body(), mode="create"))
                if self._etag is None:
                    self._etag = fs.info(key).get("ETag")
                self._expires = self._pending
        except OSError as e:
            raise BuildError(f"{self.bank}: cannot create the lock object {LOCK_FILE} ({why(e)}); nothing was changed") from None
        self._thread = threading.Thread(target=self._heartbeat, name="instbank-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, fs, key: str) -> None:
        holder, etag = _read_lock(fs, key)
        if stale_reason(holder) is None:
            raise BuildError(refusal(self.bank, holder))
        try:
            self._etag = _conditional_put(fs, key, self._body(), etag)
        except OSError:  # another writer took it first
            raise BuildError(refusal(self.bank, _read_lock(fs, key)[0])) from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_TTL / 4):
            self.renew(quiet=True)

    def renew(self, quiet: bool = False) -> None:
        """Extend the lease (a put conditional on the lock's ETag). ``quiet`` (the heartbeat): a
        failed request is retried at the next beat while the lease lasts; otherwise, or once the
        lease has run out, the lock is lost and ``BuildError`` says so."""
        fs, key = _keys(self.url)
        with self._mutex:
            if self.lost is None:
                try:
                    with store_errors(self.url):
                        self._etag = _conditional_put(fs, key, self._body(), self._etag)
                    self._expires = self._pending
                    return
                except OSError as e:
                    if quiet and time.time() < self._expires:
                        return
                    self.lost = f"{self.bank}: lost the lock {LOCK_FILE} ({why(e)}); no manifest written"
            if not quiet:
                raise BuildError(self.lost)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.lost is None and self._etag is not None:
                fs, key = _keys(self.url)
                try:
                    with store_errors(self.url):
                        holder = _read_lock(fs, key)[0]
                        if holder.get("owner") == self.owner:
                            fs.rm_file(key)
                except OSError:
                    pass  # its lease runs out; the next writer takes it over then
            self._etag = None

    @staticmethod
    def probe(bank: RemotePath) -> None:
        """``BuildError`` (as ``__enter__``'s) when a live writer holds the lock now; takes nothing."""
        url = RemotePath(bank) / LOCK_FILE
        fs, key = _keys(url)
        try:
            with store_errors(url):
                if not _exists(fs, key):
                    return
                holder = _read_lock(fs, key)[0]
        except OSError:
            return  # unreadable: __enter__ will say why
        if stale_reason(holder) is None:
            raise BuildError(refusal(RemotePath(bank), holder))


def _etag(response) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


def _exists(fs, key: str) -> bool:
    fs.invalidate_cache(key)
    return fs.exists(key)


def _read_lock(fs, key: str) -> tuple[dict, str | None]:
    """The lock's JSON (``{}`` when unreadable) and its ETag."""
    info = fs.info(key)
    try:
        holder = json.loads(fs.cat_file(key))
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), info.get("ETag")


def _conditional_put(fs, key: str, body: bytes, etag: str | None) -> str | None:
    """Replace the object at ``key`` only if its ETag is still ``etag`` (S3 ``If-Match``); on
    stores whose fsspec filesystem has no conditional put, a plain put. Returns the new ETag."""
    call = getattr(fs, "call_s3", None)
    if call is None or etag is None:
        return _etag(fs.pipe_file(key, body))
    bucket, path, _ = fs.split_path(key)
    response = call("put_object", Bucket=bucket, Key=path, Body=body, IfMatch=etag)
    fs.invalidate_cache(key)
    return response.get("ETag")


def stale_reason(holder: dict) -> str | None:
    """Why the lock described by ``holder`` may be taken over, or None while it is live."""
    pid, expires = holder.get("pid"), holder.get("expires")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _alive(pid):
        return f"its writer (pid {pid}) on this host has ended"
    if isinstance(expires, (int, float)) and time.time() > expires:
        return "its lease has expired"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _holder(holder: dict) -> str:
    pid, host, expires = holder.get("pid"), holder.get("host"), holder.get("expires")
    if pid is None and host is None:
        return "an unknown writer"
    until = f", lease until {time.strftime('%H:%M:%S', time.localtime(expires))}" if isinstance(expires, (int, float)) else ""
    return f"pid {pid} on {host}{until}"


def refusal(bank: RemotePath, holder: dict) -> str:
    return (f"{bank}: another instbank writer ({_holder(holder)}) is writing into this bank (locked); nothing was changed "
            f"(if no writer runs, the lock lapses at the end of its lease or remove {bank / LOCK_FILE})")


# --------------------------------------------------------------------------------------------
# the bank writer's side (BankWriter delegates here for a URL)


def check_destination(url: RemotePath, mode: str, own_entries: frozenset, probe_lock: bool = True) -> None:
    """``writer.check_destination`` for a URL: refuse what the mode must not write to."""
    fs, root = _keys(url)
    try:
        with store_errors(url):
            if fs.isfile(root):
                raise BuildError(f"{url}: exists and is not a directory")
            try:
                names = {e["name"].rstrip("/").rpartition("/")[2] for e in fs.ls(root, detail=True)}
            except FileNotFoundError:
                return
    except OSError as e:
        raise BuildError(f"{url}: cannot list the destination ({why(e)})") from None
    if probe_lock and LOCK_FILE in names:
        StoreLock.probe(url)
    if MANIFEST in names and mode == "new":
        raise BuildError(f"{url}: a bank already exists here (use --overwrite to replace it)")
    foreign = sorted(n for n in names if n not in own_entries)
    if foreign:
        raise BuildError(
            f"{url}: holds files that are not an instbank bank's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty location"
        )


def prepare(url: RemotePath, mode: str) -> None:
    """Clear the destination for a fresh write (not on resume): the manifest first, so that it is
    no longer a bank before any shard goes."""
    if mode == "resume":
        return
    fs, root = _keys(url)
    try:
        with store_errors(url):
            for name in (MANIFEST, PLAN_FILE):
                if fs.exists(f"{root}/{name}"):
                    fs.rm_file(f"{root}/{name}")
            if fs.exists(f"{root}/{SHARDS_DIR}"):
                fs.rm(f"{root}/{SHARDS_DIR}", recursive=True)
    except OSError as e:
        raise BuildError(f"{url}: cannot clear the destination ({why(e)})") from None


def finished_shards(url: RemotePath, names: Sequence[str]) -> list[tuple[bytes, bytes] | None]:
    """Per shard of ``names`` of the bank at ``url``: its ``shard.json`` and ``digests.npy`` bytes,
    or None when it has no ``shard.json``; one listing of the ``shard.json`` objects, concurrent
    reads (``writer.BankWriter.finished_shards`` checks them)."""
    fs, root = _keys(url)
    base = f"{root}/{SHARDS_DIR}"
    try:
        with store_errors(url):
            present = {p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{base}/*/{SHARD_MANIFEST}")}
            wanted = [n for n in names if n in present]
            paths = [f"{base}/{n}/{f}" for n in wanted for f in (SHARD_MANIFEST, "digests.npy")]
            blobs = fs.cat(paths, on_error="return") if paths else {}
    except OSError as e:
        raise BuildError(f"{url}: cannot list the finished shards ({why(e)})") from None
    pairs = {n: (blobs.get(f"{base}/{n}/{SHARD_MANIFEST}"), blobs.get(f"{base}/{n}/digests.npy")) for n in wanted}
    return [pairs[n] if n in pairs and all(isinstance(b, bytes) for b in pairs[n]) else None for n in names]


def commit(url: RemotePath, manifest: dict, lock: StoreLock) -> None:
    """Upload the manifest, last; the lock is renewed first (``BuildError`` if it was lost)."""
    lock.renew()
    put_json(url / MANIFEST, manifest, "bank manifest")


__all__ = ["LOCK_TTL", "StoreLock", "bytes_stored", "publish_shard", "publish_staged"]
