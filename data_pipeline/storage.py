"""The storage seam: every read and write of a manifest, an index, a shard or a run record goes
through here, for local paths, `s3://bucket/key` (and S3-compatible stores) and `http(s)://`.

Remote locations go through fsspec (s3fs for S3, aiohttp for HTTP), which read the standard
AWS settings: environment variables, profiles, `AWS_ENDPOINT_URL` for an S3-compatible store.
The bytes of an S3 object (a shard, its ranges, an index, a manifest) are read over plain HTTP
at a presigned URL (signed here, with the same credentials; see `_reading`).
Transient failures (timeouts, connection resets, 5xx, throttling) are retried with exponential
backoff and counted in `io_counters`; what no retry can fix (not found, access denied, missing
credentials, or still failing after the last try) raises `StorageError`, whose message is one
line naming the URL.

Remote writes are whole objects (an S3 PUT, multipart or not, appears complete or not at all);
local writes go to a temporary name, are fsynced and renamed, with the same promise.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import posixpath
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from data_pipeline import faults, presigned

log = logging.getLogger("umt.data")
T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "http", "https")
RETRIES = int(os.environ.get("UMT_STORAGE_RETRIES", 6))  # attempts of one operation
PRESIGN_EXPIRES_S = 3600
# A shard's samples read while its copy is on its way (whose bytes are downloaded anyway) that
# lie at most this far apart are one request: a request's first byte costs what ~1 MB more of
# it does (S3: 20-50 ms against ~100 MB/s per connection; Arrow sizes its hole limit the same
# way), and the store counts requests. By range alone (no copy) only adjacent ones are merged:
# every byte more is a byte more of egress.
BRIDGE_HOLE_BYTES = 1 << 20
RANGE_SPAN_BYTES = 8 << 20  # a merged request's most
DOWNLOAD_PART_BYTES = 50 << 20  # larger objects are downloaded in concurrent parts, as by s3fs
DOWNLOAD_CONCURRENCY = 8
BACKOFF_S = float(os.environ.get("UMT_STORAGE_BACKOFF_S", 0.25))  # first wait; doubles, max 8 s
# Counters of this process (a loader worker sends their changes with each batch).
IO_COUNTERS = ("retries", "requests", "bytes", "downloads", "cache_hits", "evictions", "uploads")
io_counters: Counter = Counter()
_io_lock = threading.Lock()


def count(**deltas: int) -> None:
    """Add to `io_counters`, from any thread (prefetch, concurrent opens and reads). On CPython
    with the GIL an item's `+=` is not interrupted (tried: 4 threads x 20,000 lost nothing);
    without the GIL it is a read and a write, and two threads between them lose an increment."""
    with _io_lock:
        io_counters.update(deltas)


def _new_locks_after_fork() -> None:
    # A lock held by another thread at fork (a download counting, a client being made) stays
    # held in the child, where no thread will release it: the child's first use would hang.
    global _io_lock, _filesystems_lock
    _io_lock, _filesystems_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_new_locks_after_fork)


class StorageError(RuntimeError):
    """A storage operation that cannot succeed; the message names the URL or path."""


# --- locations -------------------------------------------------------------------------------


def scheme(location: str) -> str:
    head, sep, _ = location.partition("://")
    return head.lower() if sep else "file"


def is_remote(location: str) -> bool:
    return scheme(location) in REMOTE_SCHEMES


def normalize(location: str) -> str:
    if location.startswith("file://"):
        location = location[len("file://") :]
    return location if is_remote(location) else os.path.expanduser(location)


def join(folder: str, name: str) -> str:
    if is_remote(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def parent(location: str) -> str:
    if is_remote(location):
        head, _, path = location.partition("://")
        return f"{head}://{posixpath.dirname(path.rstrip('/'))}"
    return os.path.dirname(location)


def basename(location: str) -> str:
    return (
        posixpath.basename(location.rstrip("/"))
        if is_remote(location)
        else os.path.basename(location.rstrip("/"))
    )


# --- remote filesystems and retries ----------------------------------------------------------

_filesystems: dict[tuple, Any] = {}
_filesystems_lock = threading.Lock()


def filesystem(location: str, kind: str | None = None):
    """The fsspec filesystem of a remote location, one per process (fork-safe: a child makes its
    own). `kind="presigned"`: HTTP sending URLs exactly as given (a signature covers them)."""
    kind = kind or ("s3" if scheme(location) == "s3" else "http")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), kind, endpoint if kind == "s3" else None)
    fs = _filesystems.get(key)
    if fs is None:
        with _filesystems_lock:  # threads of a process (prefetch, reads) share one client
            fs = _filesystems.get(key) or _new_filesystem(kind, endpoint)
            _filesystems[key] = fs
    return fs


def _new_filesystem(kind: str, endpoint: str | None):
    import fsspec

    if kind != "s3":
        extra = {"get_client": presigned.session} if kind == "presigned" else {}
        return fsspec.filesystem(
            "http",
            skip_instance_cache=True,
            encoded=kind == "presigned",
            client_kwargs=presigned.session_options(kind),
            **extra,
        )
    client = {"endpoint_url": endpoint} if endpoint else {}
    # One try per call (s3fs's and botocore's retries off): retries are ours, so they are
    # counted and bounded.
    fs = fsspec.filesystem(
        "s3",
        client_kwargs=client,
        config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}},
        session=_s3_session(),
        skip_instance_cache=True,
    )
    fs.retries = 1
    # The client now, once: s3fs makes it on the first request, and threads whose first
    # requests run together each made one (measured: two index files at once took 0.10 s
    # where one after the other took 0.065 s; 0.3 s in a loader worker at start).
    fs.connect()
    # botocore presigns with SigV2 unless a signature version is set, which buckets made since
    # 2020 refuse; setting one for the client would take S3 Express's session auth from every
    # request. So only presigned URLs are told to keep SigV4.
    fs.s3.meta.events.register_first("choose-signer.s3", presigned.presign_with_sigv4)
    return fs


def presigned_reads() -> bool:
    """UMT_S3_PRESIGNED_READS: S3 objects' bytes read at presigned URLs (1, the default) or
    through s3fs as every other S3 operation (0)."""
    value = os.environ.get("UMT_S3_PRESIGNED_READS", "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise StorageError(f"UMT_S3_PRESIGNED_READS={value!r}: use 1 (the default) or 0")


_buckets_read_by_s3fs: set[str] = set()  # presigned reads refused there (this process)


def _reading(location: str, read: Callable[[Any, str], T], presign: bool = True) -> T:
    """`read(fs, path)` of a remote object's bytes. An S3 object is read over plain HTTP at a
    presigned URL: botocore's request handling costs ~2 ms of CPU per request and s3fs's
    download twice curl's per byte, where signing a URL costs 0.3 ms and aiohttp reads a range
    in ~0.6 ms (measured against moto on loopback: 32 ranges in 19 ms of the client's CPU
    against 64 ms; a 5 MB object in 4.3 ms against 9.2). Loader workers read the samples of a
    shard still being copied by range, and every shard of known size whole.

    What s3fs handles and a URL cannot is read through s3fs: directory buckets (S3 Express's
    session auth) and access point ARNs always; and a bucket whose store refused the URL (a
    3xx or 4xx other than not found: another region than the client's, a store without
    presigning) or whose certificate or proxy the HTTP client could not use, once s3fs has
    read it (from then on, in this process)."""
    if scheme(location) != "s3" or not presign or not presigned_reads():
        return read(filesystem(location), location)
    bucket = location.partition("://")[2].partition("/")[0]
    s3 = filesystem(location)
    if bucket in _buckets_read_by_s3fs or bucket.endswith("--x-s3") or bucket.startswith("arn:"):
        return read(s3, location)
    url = s3.url(location, expires=PRESIGN_EXPIRES_S)
    try:
        return read(filesystem(url, "presigned"), url)
    except Exception as exc:  # noqa: BLE001 - a refusal is read again below; the rest raises
        status = _status(exc)
        refused = status is not None and 300 <= status < 500
        if status in (404, 408, 410, 416, 429) or not (
            refused or presigned.unusable_connection(exc)
        ):
            raise
        why = f"HTTP {status}" if status is not None else type(exc).__name__
    result = read(s3, location)
    if bucket not in _buckets_read_by_s3fs:
        log.warning(
            "s3://%s: a presigned read failed (%s) where s3fs's succeeded; this process reads "
            "its objects through s3fs (slower; UMT_S3_PRESIGNED_READS=0 does so from the start)",
            bucket, why,
        )  # fmt: skip
        _buckets_read_by_s3fs.add(bucket)
    return result


_botocore_loader: Any = None


def _s3_session():
    """A new aiobotocore session per process (its credentials and clients are its own) sharing
    one botocore data loader: the parsed service models and endpoint rules, pure data. A loader
    worker forked from a process that has used S3 inherits it, and its first client starts in
    0.05 s of CPU instead of 0.13-0.15 s (measured against moto on loopback)."""
    global _botocore_loader
    from aiobotocore.session import AioSession

    session = AioSession()
    if _botocore_loader is None:
        _botocore_loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _botocore_loader)
    return session


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def fatal_reason(exc: BaseException) -> str | None:
    """Why no retry can fix `exc` (None: it may be transient)."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and _status(cause) is not None:
        exc = cause  # fsspec's HTTP `info` reports any failed request as "not found"
    if isinstance(exc, FileNotFoundError) or _status(exc) in (404, 410):
        return "not found"
    if isinstance(exc, PermissionError):
        return "access denied"
    if type(exc).__name__ in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "InvalidConfigError",
    ):
        return f"no usable credentials ({exc})"
    if type(exc).__name__ == "ParamValidationError":  # botocore's: a bucket name, an empty key
        return "not a valid S3 object: " + " ".join(str(exc).split()).removeprefix(
            "Parameter validation failed: "
        )
    status = _status(exc)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return f"HTTP {status}"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, ValueError, TypeError)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        return str(exc)
    if "cannot schedule new futures after shutdown" in str(exc):
        # The interpreter is exiting (botocore wraps asyncio's RuntimeError): a retry would
        # only sleep and fail again, holding up the exit.
        return "the process is exiting"
    return None


def retrying(
    what: str, location: str, operation: Callable[[], T], attempts: int | None = None
) -> T:
    """`operation()`, retried on transient failures with exponential backoff (with jitter), up
    to `attempts` times in all (default RETRIES)."""
    attempts = RETRIES if attempts is None else attempts
    for attempt in range(attempts):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            reason = fatal_reason(exc)
            if reason is not None:
                raise StorageError(
                    f"{what} {location}: {presigned.without_signatures(reason)}"
                ) from None
            if attempt == attempts - 1:
                raise StorageError(
                    f"{what} {location}: still failing after {attempts} attempt"
                    f"{'s' if attempts > 1 else ''} "
                    f"({type(exc).__name__}: {presigned.without_signatures(str(exc))[:200]})"
                ) from None
            count(retries=1)
            wait = min(8.0, BACKOFF_S * 2**attempt) * (0.5 + random.random())
            log.warning(
                "%s %s failed (%s: %s); retry %d of %d in %.1f s",
                what, location, type(exc).__name__, presigned.without_signatures(str(exc))[:120],
                attempt + 1, attempts - 1, wait,
            )  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


# --- reading ---------------------------------------------------------------------------------


def is_dir(location: str) -> bool:
    """A folder (of shards): a local directory, or a remote location not naming a .tar."""
    if is_remote(location):
        return not location.endswith(".tar") and "{" not in location
    return os.path.isdir(location)


def is_file(location: str) -> bool:
    if is_remote(location):
        return retrying("checking", location, lambda: filesystem(location).isfile(location))
    return os.path.isfile(location)


def size(location: str, attempts: int | None = None) -> int:
    """Bytes of a file or object; a remote one asked up to `attempts` times (see `retrying`)."""
    if is_remote(location):
        return int(
            retrying(
                "reading the size of",
                location,
                lambda: filesystem(location).size(location),
                attempts,
            )
        )
    return os.path.getsize(location)


def read_bytes(location: str, attempts: int | None = None) -> bytes:
    """The whole file or object; a remote one tried up to `attempts` times (see `retrying`)."""
    if not is_remote(location):
        with open(location, "rb") as handle:
            return handle.read()

    def fetch() -> bytes:
        data = _reading(location, lambda fs, path: fs.cat_file(path))
        count(requests=1, bytes=len(data))
        return data

    return retrying("reading", location, fetch, attempts)


def read_text(location: str, attempts: int | None = None) -> str:
    return read_bytes(location, attempts).decode("utf-8")


def read_text_if_exists(location: str, attempts: int | None = None) -> str | None:
    """The text at `location`, or None where there is nothing (other failures raise)."""
    if not is_remote(location):
        return read_text(location) if os.path.isfile(location) else None
    try:
        return read_text(location, attempts)
    except StorageError as exc:
        if str(exc).endswith(": not found"):
            return None
        raise


def read_range(location: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a remote object (a range request)."""
    return read_ranges(location, [(offset, length)])[0]


def read_ranges(location: str, ranges: list[tuple[int, int]], hole: int = 0) -> list[bytes]:
    """Several (offset, length) ranges of one remote object, requested concurrently; ranges at
    most `hole` bytes apart are requested as one (see `merge_ranges`)."""
    spans = merge_ranges(ranges, hole)
    starts = [start for start, _ in spans]
    ends = [end for _, end in spans]

    def fetch() -> list[bytes]:
        got = _reading(
            location,
            lambda fs, path: fs.cat_ranges([path] * len(spans), starts, ends, on_error="raise"),
        )
        count(requests=len(spans), bytes=sum(len(p) for p in got))
        for data, (start, end) in zip(got, spans):
            if len(data) != end - start:
                raise EOFError(f"{end - start} bytes wanted at {start}, {len(data)} returned")
        parts = []
        for offset, length in ranges:
            i = bisect.bisect_right(starts, offset) - 1
            parts.append(got[i][offset - starts[i] : offset - starts[i] + length])
        return parts

    return retrying("reading", location, fetch)


def merge_ranges(ranges: list[tuple[int, int]], hole: int = 0) -> list[tuple[int, int]]:
    """(start, end) spans covering `ranges` ((offset, length)), sorted, with ranges at most
    `hole` bytes apart in one span of at most `RANGE_SPAN_BYTES` (a longer range alone)."""
    spans: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        end = offset + length
        if (
            spans
            and offset - spans[-1][1] <= hole
            and (max(end, spans[-1][1]) - spans[-1][0] <= RANGE_SPAN_BYTES)
        ):
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((offset, end))
    return spans


class RangeReader:
    """Reads byte ranges of one local file (kept open) or remote object (range requests)."""

    def __init__(self, location: str):
        self.location = location
        self.remote = is_remote(location)
        self._fd = -1 if self.remote else os.open(location, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        if self._fd < 0:
            return read_range(self.location, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # the file ends early: a truncated copy
            raise EOFError(f"{self.location}: {length} bytes wanted at {offset}, {len(data)} read")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def download(location: str, destination: str, expected_bytes: int | None = None) -> int:
    """Copy a remote object to a local file, retried from the start; returns its size, checked
    against what the server announced and `expected_bytes` (the manifest's) when given.

    An S3 object of known size is read from a presigned URL (half s3fs's CPU per byte, measured
    on loopback: 28 against 50 ms for 54 MB): in one stream below `DOWNLOAD_PART_BYTES`, else in
    parts fetched concurrently, as s3fs does (one stream is capped at tens of MB/s on S3). One of
    unknown size goes through s3fs.
    The caller gives a temporary path and renames it once complete (see `ShardCache`)."""

    def get(fs, path: str, progress: _DownloadProgress) -> None:
        if path != location and expected_bytes >= DOWNLOAD_PART_BYTES:  # a presigned URL
            presigned.get_in_parts(
                fs, path, destination, expected_bytes, progress,
                DOWNLOAD_PART_BYTES, DOWNLOAD_CONCURRENCY,
            )  # fmt: skip
        else:
            fs.get_file(path, destination, callback=progress)

    def copy() -> int:
        progress = _DownloadProgress()
        _reading(
            location, lambda fs, path: get(fs, path, progress), presign=expected_bytes is not None
        )
        with open(destination, "rb+") as handle:
            os.fsync(handle.fileno())
        written = os.path.getsize(destination)
        for want, source in (
            (progress.size, "the server announced"),
            (expected_bytes, "the manifest says"),
        ):
            if want is not None and written != want:
                raise EOFError(f"{written} bytes arrived, {source} {want}")
        count(downloads=1, bytes=written)
        return written

    return retrying("downloading", location, copy)


class _DownloadProgress:
    """fsspec callback: the announced size; and, for tests of crash safety, a kill after the
    first chunk (UMT_FAULT_KILL_IN_DOWNLOAD=1) with part of the file on disk."""

    def __init__(self):
        self.size: int | None = None
        self.kill = faults.kill_in_download()

    def set_size(self, size):
        self.size = size

    def relative_update(self, inc=1):
        if self.kill and inc:
            faults.kill_self()

    def absolute_update(self, value):
        pass

    def call(self, *args, **kwargs):
        pass

    def branched(self, *args, **kwargs):
        return None


# --- writing ---------------------------------------------------------------------------------


def put_file(local_path: str, location: str) -> None:
    """Publish a finished local file at `location` whole: an object PUT, or copy + rename."""
    if is_remote(location):
        if scheme(location) != "s3":
            raise StorageError(f"writing {location}: only s3:// and local paths can be written")
        retrying(
            "uploading to", location, lambda: filesystem(location).put_file(local_path, location)
        )
        count(uploads=1)
        return
    os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
    tmp = f"{location}.{os.getpid()}.tmp"
    with open(local_path, "rb") as source, open(tmp, "wb") as sink:
        while chunk := source.read(8 << 20):
            sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, location)


def list_names(folder: str) -> list[str]:
    """Names of the objects or files directly in `folder` (sorted; empty if it does not exist)."""
    if is_remote(folder):
        fs = filesystem(folder)

        def listing() -> list[str]:
            try:
                return [basename(p) for p in fs.ls(folder, detail=False, refresh=True)]
            except FileNotFoundError:
                return []

        return sorted(retrying("listing", folder, listing))
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def object_sizes(folder: str) -> dict[str, int]:
    """{name: bytes} of the objects directly in an S3 `folder`, from one listing (a request per
    1000 objects); {} elsewhere (an HTTP index page gives no reliable sizes)."""
    if scheme(folder) != "s3":
        return {}
    fs = filesystem(folder)

    def listing() -> dict[str, int]:
        try:
            entries = fs.ls(folder, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {
            basename(e["name"]): int(e["size"])
            for e in entries
            if e.get("type") == "file" and e.get("size") is not None
        }

    return retrying("listing", folder, listing)


def remove(location: str) -> None:
    if is_remote(location):
        fs = filesystem(location)
        retrying(
            "deleting", location, lambda: fs.rm_file(location) if fs.exists(location) else None
        )
    elif os.path.exists(location):
        os.remove(location)
