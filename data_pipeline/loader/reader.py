"""Reading samples out of tars: by index (random access, what training does) or in stored order
(evaluation, `umt data inspect`). Never raises for bad data: a sample that cannot be read is
None with its reason counted.

A sample is the members of one key (WebDataset's `__key__`: a member's name up to the first
dot of its file name): an image (`jpg`, `jpeg`, `png` or `webp`) and a caption (`txt` or
`caption`, else the json's `caption` or first of `captions`). A `json` member is optional: what
`umt shard` writes there (all captions of the image, its `image_key`) is used when present, so
tars of `webdataset.ShardWriter`, open_clip or img2dataset read as they are. A `cls` member (a
class, as text) is the json field `cls` unless the json has one.

Reasons: `missing_shard` (the file is gone), `bad_index` (the index does not match the tar),
`truncated_tar` (the file ends inside the sample), `missing_image`, `bad_json`,
`missing_caption`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import tempfile
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from data_pipeline import storage
from data_pipeline.loader.dataset import Shard
from data_pipeline.shard_cache import CachedShard, ShardCache, default_cache_dir
from data_pipeline.storage import StorageError
from data_pipeline.tar_index import (
    TarIndex,
    TarIndexError,
    index_of_file,
    load_index,
    member_key,
    read_index,
    split_members,
)

log = logging.getLogger("umt.data")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption")
# Why a sample could not be used (decoding adds `corrupt_image`).
SAMPLE_ERRORS = ("missing_shard", "bad_index", "truncated_tar", "missing_image", "bad_json",
                 "missing_caption", "corrupt_image")  # fmt: skip


@dataclass(frozen=True)
class RawSample:
    key: str
    image_key: str
    image: bytes  # still encoded
    text: str  # the sample's own caption (.txt, else json "caption")
    captions: tuple[str, ...]  # json "captions": all captions of the image
    meta: dict = field(default_factory=dict, compare=False)  # the parsed .json member


def assemble_sample(key: str, members: dict[str, bytes], errors: Counter) -> RawSample | None:
    """Members of one key -> RawSample, or None with the reason counted."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        errors["missing_image"] += 1
        return None
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            errors["bad_json"] += 1
            return None
    if "cls" in members and "cls" not in meta:
        meta["cls"] = members["cls"].decode("utf-8", "replace").strip()
    captions = meta.get("captions") or []
    captions = (
        tuple(c for c in captions if isinstance(c, str)) if isinstance(captions, list) else ()
    )
    caption_ext = next((e for e in CAPTION_EXTENSIONS if e in members), None)
    text = members[caption_ext].decode("utf-8", "replace") if caption_ext else None
    text = text or meta.get("caption") or (captions[0] if captions else None)
    if not isinstance(text, str) or not text:
        errors["missing_caption"] += 1
        return None
    image_key = str(meta.get("image_key", key))
    return RawSample(key, image_key, members[image_ext], text, captions or (text,), meta=meta)


class ShardReader:
    """Random access to samples of many shards, by (shard, index within it).

    Keeps the indexes and open files of the most recently used shards (a worker reads the
    shards of the current windows over and over): `keep_open` of them at first, and one more
    each time a shard closed to make room is needed again, up to `MAX_OPEN`. So the shards read
    in turn stay open however many the windows span (a window over many small shards, or a
    mixture's windows, one per source), where reopening one would read its index again (with a
    lock, a stat and a parse). A remote shard is read from its copy in the node's
    `cache` (downloaded on first use), or by one range request per sample when `cache` is None.
    A remote read that cannot succeed raises `StorageError` (one line naming the URL); local
    damage is counted per sample.
    """

    MAX_OPEN = 128  # two file descriptors each with the cache (the copy and its lock)

    def __init__(
        self, shards: tuple[Shard, ...], cache: ShardCache | None = None, keep_open: int = 32
    ):
        self.shards, self.cache, self.keep_open = shards, cache, keep_open
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._closed: OrderedDict[int, None] = OrderedDict()  # closed to make room, lately
        self._broken: dict[int, str] = {}  # shard -> reason it cannot be read at all
        # Index files the rank's process read before this worker started, each for its shard's
        # first opening by request (`read_indexes_ahead`).
        self.ahead: dict[str, TarIndex] = {}

    def _get(self, shard: int, errors: Counter, opening: Future | None = None) -> _OpenShard | None:
        """`opening`: the shard being opened already (its result or failure is used)."""
        if shard in self._broken:
            errors[self._broken[shard]] += 1
            return None
        if shard in self._open:
            entry = self._open[shard]
            if not (entry.bridging and self.cache.has(self.shards[shard].path)):
                self._open.move_to_end(shard)
                return entry
            del self._open[shard]  # the copy has arrived: read it instead of ranges
            entry.close()
            known = entry.index  # from the shard's index file: the copy needs no other
        else:
            known = None
        try:
            if opening is not None:
                entry = opening.result()
            else:
                path = self.shards[shard].path
                entry = _OpenShard.open(
                    self.shards[shard], self.cache, known, self.ahead.pop(path, None)
                )
        except FileNotFoundError:
            self._broken[shard] = "missing_shard"
        except TarIndexError as exc:
            if storage.is_remote(self.shards[shard].path):  # no usable index: no sample of it
                raise StorageError(str(exc)) from None
            self._broken[shard] = "bad_index"
        except StorageError:
            raise
        except OSError:
            self._broken[shard] = "missing_shard"
        if shard in self._broken:
            errors[self._broken[shard]] += 1
            return None
        if shard in self._closed:  # needed again soon after it made room: keep one more open
            del self._closed[shard]
            self.keep_open = min(self.keep_open + 1, self.MAX_OPEN)
        self._open[shard] = entry
        while len(self._open) > self.keep_open:
            closed, oldest = self._open.popitem(last=False)
            oldest.close()
            self._closed[closed] = None
            if len(self._closed) > self.MAX_OPEN:
                self._closed.popitem(last=False)
        return entry

    def preload(self, wanted: list[tuple[int, int]]) -> None:
        """Fetch at once, concurrently, the samples (shard, index) about to be read by range
        requests: from shards still bridged while their copies arrive, or all remote shards
        with `remote_read: range` (each sample was one request in turn: 32 round trips one
        after the other for a micro-batch of 32). The remote shards this opens are opened
        together (their index files requested at once), and the ranges of all of them
        requested together: one round trip for each, not one per shard."""
        by_shard: dict[int, list[int]] = {}
        for shard, index in wanted:
            by_shard.setdefault(shard, []).append(index)
        to_open = [s for s in by_shard if self.opens_by_request(s)]
        with ThreadPoolExecutor(8, "umt-open") as pool:
            opening = {}
            if len(to_open) > 1:  # one shard alone is opened in this thread, as on any read
                opening = {
                    s: pool.submit(
                        _OpenShard.open,
                        self.shards[s],
                        self.cache,
                        None,
                        self.ahead.pop(self.shards[s].path, None),
                    )  # fmt: skip
                    for s in to_open
                }
            bridged: dict[int, tuple[_OpenShard, list[int]]] = {}
            try:
                for shard, indices in by_shard.items():
                    entry = self._get(shard, Counter(), opening.pop(shard, None))
                    if entry is not None and entry.by_request:
                        indices = [i for i in dict.fromkeys(indices) if i < len(entry.index)]
                        bridged[shard] = (entry, indices)
            finally:  # a failure above: shards opened for nothing are closed
                for future in opening.values():
                    if not future.cancel() and future.exception() is None:
                        future.result().close()
            reads = {
                shard: pool.submit(
                    storage.read_ranges,
                    self.shards[shard].path,
                    [(entry.index.offsets[i], entry.index.lengths[i]) for i in indices],
                    storage.BRIDGE_HOLE_BYTES if entry.bridging else 0,
                )
                for shard, (entry, indices) in bridged.items()
            }
            for shard, read in reads.items():
                entry, indices = bridged[shard]
                entry.fetched.update(zip(indices, read.result()))

    def opens_by_request(self, shard: int) -> bool:
        """Whether opening `shard` now takes a request (a remote shard not open, not copied)."""
        path = self.shards[shard].path
        if shard in self._open or shard in self._broken or not storage.is_remote(path):
            return False
        return self.cache is None or not self.cache.has(path)

    def shard_name(self, shard: int) -> str:
        return storage.basename(self.shards[shard].path)

    def read(self, shard: int, index: int, errors: Counter) -> RawSample | None:
        """Sample `index` of shard `shard`, or None with the reason counted."""
        entry = self._get(shard, errors)
        if entry is None:
            return None
        if index >= len(entry.index):  # the manifest promised more samples than the tar holds
            errors["truncated_tar"] += 1
            return None
        key = entry.index.keys[index]
        try:
            data = entry.fetched.pop(index, None)
            if data is None:
                data = entry.reader.read(entry.index.offsets[index], entry.index.lengths[index])
            members = split_members(data)
        except EOFError:
            errors["truncated_tar"] += 1
            return None
        except (tarfile.TarError, ValueError, zlib.error):
            errors["bad_index"] += 1
            return None
        return assemble_sample(key, members, errors)

    def key(self, shard: int, index: int) -> str | None:
        """The sample key from the index alone (None if the shard cannot be read)."""
        entry = self._get(shard, Counter())
        if entry is None or index >= len(entry.index):
            return None
        return entry.index.keys[index]

    def close(self) -> None:
        for entry in self._open.values():
            entry.close()
        self._open.clear()


@dataclass
class _OpenShard:
    index: TarIndex
    reader: storage.RangeReader
    held: CachedShard | None = None  # the cache copy, kept from eviction while open
    bridging: bool = False  # range reads while the copy is still being fetched
    fetched: dict[int, bytes] = field(default_factory=dict)  # samples preloaded by request

    @property
    def by_request(self) -> bool:
        """Its samples are read by range requests (bridging, or a remote shard with no copy)."""
        return self.bridging or self.reader.remote

    @classmethod
    def open(
        cls,
        shard: Shard,
        cache: ShardCache | None,
        known: TarIndex | None = None,
        ahead: TarIndex | None = None,
    ) -> _OpenShard:
        """`known`: the shard's index already read (while bridging), used for its copy. `ahead`:
        its index file as the rank's process read it before this worker started
        (`read_indexes_ahead`), used for its first opening by request."""
        path = shard.path
        remote = storage.is_remote(path)
        if remote and ahead is None and shard.bytes is not None:
            # Read by this process lately (bridging it before), made for a tar of the size the
            # manifest gives: what a request would return, checked as it would be.
            ahead = _indexes_read.get(path, shard.bytes)
        if remote and cache is not None and not cache.has(path):
            # Not in the cache yet (its prefetch is under way): bridge with range requests when
            # the shard has an index file, rather than wait for the whole shard.
            try:  # checked against the manifest's size where known (no request more)
                remote_index = ahead if ahead is not None else read_index(path, size=shard.bytes)
            except TarIndexError:
                remote_index = None
            if remote_index is not None:
                _indexes_read.keep(path, remote_index)
                return cls(remote_index, storage.RangeReader(path), bridging=True)
        if remote and cache is not None:
            held = cache.acquire(path, shard.bytes)
            try:
                local = str(held.path)
                if known is None or known.bytes != os.path.getsize(local):
                    known = copy_index(path, held)
                return cls(known, storage.RangeReader(local), held)
            except BaseException:
                held.release()
                raise
        if remote and ahead is not None:  # `remote_read: range`
            return cls(ahead, storage.RangeReader(path))
        return cls(load_index(path), storage.RangeReader(path))

    def close(self) -> None:
        self.reader.close()
        if self.held is not None:
            self.held.release()


class _IndexesRead:
    """The index files of remote shards this process has read lately (bridging their copies),
    for the copies' indexes: the prefetch that finishes a copy asked the store for the index
    file again, a request in the first batches' busiest moment (measured: 0.05-0.13 s each)."""

    SIZE = 256

    def __init__(self):
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, TarIndex] = OrderedDict()

    def keep(self, location: str, index: TarIndex) -> None:
        with self._lock:
            self._indexes[location] = index
            self._indexes.move_to_end(location)
            while len(self._indexes) > self.SIZE:
                self._indexes.popitem(last=False)

    def get(self, location: str, size: int) -> TarIndex | None:
        """The index read for `location`, if it was made for a tar of `size` bytes."""
        with self._lock:
            index = self._indexes.get(location)
        return index if index is not None and index.bytes == size else None

    def after_fork(self) -> None:  # a lock held by another thread at fork stays held in the child
        self._lock = threading.Lock()


_indexes_read = _IndexesRead()
os.register_at_fork(after_in_child=_indexes_read.after_fork)


def read_indexes_ahead(shards: list[Shard]) -> dict[str, TarIndex]:
    """{location: index} of the remote `shards`' index files, requested together, once each.
    One try (the tar's size too, where the manifest gives none): a shard whose index file is
    missing, stale or failing is left out, and its reader does what it does without this (tries
    itself, or scans its copy)."""

    def one(shard: Shard) -> TarIndex | None:
        try:
            return read_index(shard.path, size=shard.bytes, attempts=1)
        except Exception as exc:  # noqa: BLE001 - best effort: the reader tries again itself
            log.debug("index of %s not read ahead: %s", shard.path, exc)
            return None

    remote = list({s.path: s for s in shards if storage.is_remote(s.path)}.values())
    if not remote:
        return {}
    with ThreadPoolExecutor(min(32, len(remote)), "umt-index") as pool:
        found = dict(zip((s.path for s in remote), pool.map(one, remote)))
    return {path: index for path, index in found.items() if index is not None}


def keep_indexes(indexes: dict[str, TarIndex]) -> None:
    """Indexes read by another process (`read_indexes_ahead` in the rank's process), for this
    one's readers."""
    for location, index in indexes.items():
        _indexes_read.keep(location, index)


def copy_index(location: str, held: CachedShard) -> TarIndex:
    """The tar index of a shard's copy in the node cache: from the index kept beside the copy,
    else the one this process read bridging the copy, else the shard's own index file (one
    request), else built from the copy's headers; kept beside the copy for the node's other
    processes. A header scan costs ~1.4 s of CPU for 10,000
    samples (73 ms for 512), reading an index ~5 ms; each worker of each rank opens every shard
    of its windows, so the node reads each index once, not once per worker."""
    local = str(held.path)
    size = os.path.getsize(local)
    try:
        index = TarIndex.from_json(json.loads(held.index_path.read_bytes()), str(held.index_path))
        if index.bytes == size:
            return index
    except (OSError, ValueError, TarIndexError):
        pass  # none yet, or not this copy's: built again below
    index = _indexes_read.get(location, size)
    try:  # checked against the copy's size; a stale or damaged one is left for the scan. One
        # attempt: a failing store would cost its retries' backoff (~8 s) where the scan of the
        # copy on local disk costs at most a few seconds and cannot fail that way.
        if index is None and storage.is_remote(location):
            index = read_index(location, local_copy=local, attempts=1)
    except (TarIndexError, StorageError) as exc:
        log.debug("%s; the copy's headers are read instead", exc)
        index = None
    if index is None:
        index = index_of_file(location, local)
    tmp = None
    try:  # kept whole or not at all (a temporary name, then a rename)
        handle, tmp = tempfile.mkstemp(
            prefix=held.index_path.name, suffix=".tmp", dir=held.path.parent
        )
        with os.fdopen(handle, "w") as out:
            json.dump(index.to_json(), out, separators=(",", ":"))
        os.replace(tmp, held.index_path)
    except OSError as exc:  # a full or read-only disk: this process has its index all the same
        log.debug("could not keep the index of %s beside its copy: %s", location, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return index


def read_tar_samples(
    shard: Shard, errors: Counter, cache: ShardCache | None = None
) -> Iterator[RawSample]:
    """Stream one tar's samples in stored order (a remote one from its copy in `cache`, the
    node's default cache if None); a truncated or unreadable tar ends its stream, counted."""
    held = None
    path = shard.path
    if storage.is_remote(path):
        held = (cache or ShardCache(default_cache_dir())).acquire(path, shard.bytes)
        path = str(held.path)
    try:
        yield from _stream_tar(path, shard.count, errors)
    finally:
        if held is not None:
            held.release()


def _stream_tar(path: str, count: int, errors: Counter) -> Iterator[RawSample]:
    seen = 0
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                name_key = member_key(info.name)
                if name_key != key:
                    if members:
                        seen += 1
                        if (sample := assemble_sample(key, members, errors)) is not None:
                            yield sample
                    key, members = name_key, {}
                extension = info.name.rsplit("/", 1)[-1].partition(".")[2].lower()
                members[extension] = tar.extractfile(info).read()
            if members:
                seen += 1
                if (sample := assemble_sample(key, members, errors)) is not None:
                    yield sample
    except FileNotFoundError:
        errors["missing_shard"] += 1
        return
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        errors["truncated_tar"] += 1  # the half-read sample is lost with it
        return
    if seen < count:  # cut exactly at a header boundary reads as a clean end
        errors["truncated_tar"] += 1
