"""A node-local cache of remote shards, shared by every rank and loader worker of the node.

`ShardCache.local(url)` returns the path of a complete local copy, downloading it first if no
process of the node has. Safe under concurrency and crashes, with files and `flock` only:

* a copy is downloaded to a temporary name, fsynced, checked against the object's size and
  renamed: a file under its final name is always complete (a half-written one is never taken for
  a shard), and temporaries left by a crash are removed by the next download of that shard;
* one process downloads a shard at a time (an exclusive lock on `NAME.lock`); the others wait on
  the lock, then use the copy;
* readers hold a shared lock on `NAME.lock` while they keep the shard open, and eviction only
  removes shards whose lock it can take exclusively: a shard some rank still reads stays. Locks
  die with their process, so a crash leaves none behind;
* beside a copy, `NAME.index.json` keeps its tar index for the node's other processes (written
  whole by the first that needs it, while holding the copy; removed with the copy, and before a
  new copy takes its name, under the exclusive lock).

Eviction keeps the cache under `limit_bytes` by removing the least recently used shards not in
use; a limit smaller than the shards in use at once is exceeded rather than broken.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import time
from pathlib import Path

from data_pipeline import storage

LOCK_POLL_S = 0.1


def default_cache_dir() -> str:
    """Node-local by default: $TMPDIR (node-local scratch on most clusters) or /tmp."""
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"umt-shard-cache-{os.getuid()}")


SIDECAR_SUFFIX = ".index.json"  # a copy's tar index, beside it (see `index_path`)


class CachedShard:
    """A complete local copy, held (shared lock) until `release()`."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd

    @property
    def index_path(self) -> Path:
        """Where the copy's tar index is kept for every process of the node (written by the first
        that needs it; removed with the copy, and before a new copy takes its name)."""
        return index_path_of(self.path)

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the shared lock
            self._lock_fd = -1

    def __del__(self) -> None:
        self.release()


class ShardCache:
    def __init__(self, root: str | os.PathLike, limit_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if limit_bytes is None or limit_bytes <= 0:  # 90% of what is free now, plus what is cached
            free = shutil.disk_usage(self.root).free
            limit_bytes = int(0.9 * free) + self._cached_bytes()
        self.limit_bytes = limit_bytes

    def has(self, url: str) -> bool:
        """Whether a complete copy is there now (it may be evicted at any time: `acquire` it)."""
        return self.path_for(url).is_file()

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.root / digest / storage.basename(url)

    def acquire(
        self, url: str, expected_bytes: int | None = None, deadline_s: float = 3600.0
    ) -> CachedShard:
        """A complete local copy of `url`, downloaded if needed, held until released.

        Waits (polling, at most `deadline_s`) only while another process downloads or evicts
        that shard; a copy that appears meanwhile is taken at once, even while readers hold it.
        """
        path = self.path_for(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        end = time.monotonic() + deadline_s
        try:
            while True:
                if path.is_file() and _try_lock(lock_fd, fcntl.LOCK_SH):
                    if path.is_file():  # not evicted between the check and the lock
                        os.utime(path)  # most recently used
                        storage.count(cache_hits=1)
                        return CachedShard(path, lock_fd)
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
                elif not path.is_file() and _try_lock(lock_fd, fcntl.LOCK_EX):
                    try:
                        if not path.is_file():
                            self._download(url, path, expected_bytes)
                    finally:
                        fcntl.flock(lock_fd, fcntl.LOCK_UN)  # then take it shared, as a reader
                    continue
                if time.monotonic() > end:  # another process downloads it, or evicts it
                    raise storage.StorageError(
                        f"waited {deadline_s:.0f} s for another process to download {url}"
                    )
                time.sleep(LOCK_POLL_S)
        except BaseException:
            os.close(lock_fd)
            raise

    def _download(self, url: str, path: Path, expected_bytes: int | None) -> None:
        for stale in path.parent.glob(
            f"{glob.escape(path.name)}.*.part"
        ):  # a crashed download's leftovers
            stale.unlink(missing_ok=True)
        self.evict(need_bytes=expected_bytes or 0)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        try:
            storage.download(url, str(tmp), expected_bytes)
            remove_index_of(path)  # that of an earlier copy
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._copies())

    def _copies(self) -> list[Path]:
        return [
            p
            for p in self.root.glob("*/*")
            if p.is_file() and not p.name.endswith((".lock", ".part", ".tmp", SIDECAR_SUFFIX))
        ]

    def evict(self, need_bytes: int = 0) -> int:
        """Remove least recently used copies no process holds until `need_bytes` more fit under the
        limit; returns the bytes freed."""
        copies = sorted(self._copies(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in copies)
        freed = 0
        for path in copies:
            if total + need_bytes - freed <= self.limit_bytes:
                break
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)  # in use by some reader: keep it
                continue
            try:
                size = path.stat().st_size
                path.unlink()
                remove_index_of(path)
                freed += size
                storage.count(evictions=1)
            except FileNotFoundError:
                pass
            finally:
                os.close(lock_fd)
        return freed


def index_path_of(copy: Path) -> Path:
    return copy.with_name(copy.name + SIDECAR_SUFFIX)


def remove_index_of(copy: Path) -> None:
    """The index kept beside a copy, and any half-written one (its writer was killed). Called
    under the copy's exclusive lock: no process holds the copy, so none is writing one."""
    index_path_of(copy).unlink(missing_ok=True)
    for stale in copy.parent.glob(f"{glob.escape(copy.name)}{SIDECAR_SUFFIX}*.tmp"):
        stale.unlink(missing_ok=True)


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
