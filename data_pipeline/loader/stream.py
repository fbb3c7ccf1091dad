"""The loader a rank iterates: workers that make this rank's micro-batches of the global order,
and the state that resumes it anywhere.

`StreamingLoader` is an infinite iterator of `Batch`. Its state is one number, the stream
position after the last micro-batch round it yielded (plus what identifies the stream: seed,
data, window, tail rule, and the mixture phases), the same on every rank: `state_dict()` saved
by any rank resumes any other topology at exactly that sample. A state of another mixture is
refused, naming the sources that differ, unless `load_state_dict(new_mixture=True)`: the new
mixture then starts a phase at the state's position (see `order`), recorded in the state.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import storage
from data_pipeline.loader.batch import (
    Batch,
    DecodedSample,
    collate_batch,
    decode_sample,
    fill_slots,
)
from data_pipeline.loader.config import (
    LoaderConfig,
    LoaderConfigError,
    LoaderDataError,
    LoaderStateError,
)
from data_pipeline.loader.dataset import Dataset, resolve_dataset
from data_pipeline.loader.order import GlobalOrder, micro_batch_positions
from data_pipeline.loader.reader import (
    RawSample,
    ShardReader,
    copy_index,
    keep_indexes,
    read_indexes_ahead,
    read_tar_samples,
)
from data_pipeline.loader.state import (
    data_change,
    describe_phase,
    earlier_phases,
    next_phase_epoch,
    phase_record,
)
from data_pipeline.shard_cache import ShardCache, default_cache_dir
from data_pipeline.storage import StorageError
from data_pipeline.tar_index import index_location
from data_pipeline.transforms import load_tokenizer

log = logging.getLogger("umt.data")
STATE_FORMAT_VERSION = 3


@dataclass
class _Failure:
    """A worker's fatal data error, sent as an item (a raised one arrives wrapped in a traceback)."""

    message: str


class MicroBatchMaker:
    """Makes rank `rank`'s micro-batch of any round, from the order, in whatever process."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: LoaderConfig,
        rank: int,
        world_size: int,
        start: int,
        tokenizer: Any,
        origin: tuple[int, int] = (0, 0),
    ):
        self.dataset, self.cfg, self.rank, self.world_size = dataset, cfg, rank, world_size
        self.start, self.tokenizer = start, tokenizer
        global_batch = cfg.batch_size * cfg.grad_accum * world_size
        self.order = GlobalOrder(dataset, cfg, global_batch, origin)
        self.cache = shard_cache(cfg, dataset)
        # With the node cache, hold few copies open: a copy held cannot be evicted.
        self.reader = ShardReader(dataset.shards, self.cache, keep_open=4 if self.cache else 32)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetched: OrderedDict[int, None] = OrderedDict()
        self._io_seen: Counter = Counter()

    MAX_INDEXES_AHEAD = 64

    def read_indexes_ahead(self, rounds: int) -> None:
        """In the rank's process, before its workers start: the index files of the remote shards
        that the first `rounds` micro-batches (each worker's first) open by request, read once
        and together for every worker (`reader.ahead`). Each worker read them all itself: the
        same files K times per rank where the micro-batches share shards (a shuffle window's
        draws do), on the first batch's path. Those most shared first, up to
        `MAX_INDEXES_AHEAD`: the rest are each worker's own, read by it as before."""
        b, rounds_of = self.cfg.batch_size, Counter()
        for round_index in range(rounds):
            first = micro_batch_positions(self.start, round_index, self.rank, self.world_size, b)
            shards, _ = self.dataset.locate(self.order.samples(first, b)[0])
            rounds_of.update(set(shards.tolist()))
        wanted = [s for s, _ in rounds_of.most_common() if self.reader.opens_by_request(s)]
        shards = [self.dataset.shards[s] for s in wanted[: self.MAX_INDEXES_AHEAD]]
        self.reader.ahead = read_indexes_ahead(shards)

    def prefetch(self, round_index: int) -> None:
        """Fetch into the node cache, in the background, the remote shards of the stream from
        this round on: the rest of the current window and the next one (reads stay within a
        window, so its shards are all needed soon), plus `prefetch_rounds` rounds."""
        if self.cache is None:
            return
        round_size = self.world_size * self.cfg.batch_size
        start = self.start + round_index * round_size
        ahead = self.cfg.shuffle_window + (self.cfg.prefetch_rounds + 1) * round_size
        shards, _ = self.dataset.locate(self.order.samples(start, ahead)[0])
        wanted = [int(s) for s in dict.fromkeys(shards.tolist()) if s not in self._prefetched]
        if not wanted:
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="umt-prefetch")
        for shard in wanted:
            self._prefetched[shard] = None
            self._prefetcher.submit(_prefetch_one, self.cache, self.dataset.shards[shard])
        while len(self._prefetched) > 1024:  # shards drawn again later are fetched again
            self._prefetched.popitem(last=False)

    def close(self) -> None:
        """Stop prefetching: shards not started are left (a download under way finishes)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

    def io_since_last(self) -> dict[str, int]:
        """Storage counters of this process since the previous call (retries, downloads ...)."""
        now = Counter(storage.io_counters)
        delta = {
            k: v - self._io_seen.get(k, 0) for k, v in now.items() if v != self._io_seen.get(k, 0)
        }
        self._io_seen = now
        return delta

    def sample_at(
        self, position: int, errors: Counter, failures: list | None, sample_id: int | None = None
    ) -> DecodedSample | None:
        """Read and decode the sample at a stream position (its id, when known); a failure is
        counted (and recorded). Keys come qualified by their source (`Dataset.qualify`)."""
        if sample_id is None:
            (sample_id,), _ = self.order.samples(position, 1)
        (shard,), (index,) = self.dataset.locate(np.array([sample_id]))
        shard, index = int(shard), int(index)
        mine: Counter = Counter()
        raw: RawSample | None = self.reader.read(shard, index, mine)
        if raw is not None and len(self.dataset.sources) > 1:
            qualify = self.dataset.qualify
            raw = replace(raw, key=qualify(shard, raw.key), image_key=qualify(shard, raw.image_key))
        decoded = decode_sample(raw, self.cfg, position, mine) if raw is not None else None
        if decoded is None:
            errors.update(mine)
            if failures is not None:
                failures.append(
                    {
                        "position": position,
                        "shard": self.dataset.shards[shard].path,
                        "index": index,
                        "key": self.dataset.qualify(shard, self.reader.key(shard, index)),
                        "reason": next(iter(mine), "unknown"),
                    }
                )
        return decoded

    def micro_batch(self, round_index: int) -> Batch:
        cfg, b = self.cfg, self.cfg.batch_size
        first = micro_batch_positions(self.start, round_index, self.rank, self.world_size, b)
        errors: Counter = Counter()
        failures: list[dict] = []
        ids, epochs = self.order.samples(first, b)
        shards, indices = self.dataset.locate(ids)
        self.reader.preload(list(zip(shards.tolist(), indices.tolist())))
        # Copies are fetched once this micro-batch's own samples are in: started before, the
        # downloads delay the first batch's requests (one event loop, the same cores).
        self.prefetch(round_index)
        decoded = [self.sample_at(first + j, errors, failures, ids[j]) for j in range(b)]
        filled = fill_slots(decoded)
        if filled is None:
            filled = self._fill_from_round(round_index, first, failures)
        batch = collate_batch(filled, cfg, self.tokenizer)
        batch.round, batch.position, batch.epoch = round_index, first, int(epochs[0])
        batch.errors, batch.failures = dict(errors), failures
        batch.io = self.io_since_last()
        return batch

    def _fill_from_round(self, round_index: int, first: int, failures: list[dict]) -> list:
        """No sample of the micro-batch decodes: copy the first one that does among the round's
        other positions, after this micro-batch and cyclically."""
        b = self.cfg.batch_size
        round_start = self.start + round_index * self.world_size * b
        size = self.world_size * b
        others = [round_start + (first - round_start + b + k) % size for k in range(size - b)]
        for position in others:
            if (decoded := self.sample_at(position, Counter(), None)) is not None:
                return [decoded] * b
        shards = sorted({f["shard"] for f in failures})
        reasons = Counter(f["reason"] for f in failures)
        raise LoaderDataError(
            f"no sample of the global batch at stream positions [{round_start}, "
            f"{round_start + size}) can be read or decoded ({dict(reasons)}); shards: "
            f"{', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}"
        )


class RankStream(IterableDataset):
    """What one DataLoader worker runs: rounds worker, worker + K, worker + 2K, ... of its rank
    (below `limit`, when one is given)."""

    def __init__(self, maker: MicroBatchMaker, num_workers: int, limit: int | None = None):
        self.maker, self.num_workers, self.limit = maker, num_workers, limit

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rounds = itertools.count(worker, self.num_workers)
        if self.limit is not None:
            rounds = range(worker, self.limit, self.num_workers)
        keep_indexes(self.maker.reader.ahead)  # for the copies' indexes too
        for round_index in rounds:
            try:
                yield self.maker.micro_batch(round_index)
            except (LoaderDataError, StorageError) as exc:
                yield _Failure(str(exc))
                return


def _set_up_worker(worker_id: int) -> None:
    # Workers are the parallelism: one thread each, or 2 cores x (K workers x N threads) thrash.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole foreground process group; the trainer (the parent) owns it and
    # stops its workers itself. A forked worker would otherwise run the parent's handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(item):
    return item  # batches come out of the workers whole


class StreamingLoader:
    """Infinite iterator of this rank's `Batch`es; `state_dict()` after any batch resumes exactly."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int, epoch: int = 0):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise LoaderConfigError(f"rank must be in [0, world_size={world_size}) (got {rank})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.dataset = resolve_dataset(cfg.shards, cfg.resampled)
        if rank == 0:
            warn_if_unindexed(self.dataset)
        self.global_batch = cfg.batch_size * cfg.grad_accum * world_size
        self.round_size = world_size * cfg.batch_size
        self._errors: Counter = Counter()
        self._io: Counter = Counter()
        self.start_phase((0, 0), [], {})  # checks the tail rule
        self.position = self.order.epoch_start(epoch)
        # Loaded once here, not per worker: importing transformers takes seconds.
        wants_tokens = cfg.decode_images and cfg.tokenizer
        self.tokenizer = load_tokenizer(cfg.tokenizer) if wants_tokens else None

    def start_phase(
        self, origin: tuple[int, int], earlier: list[dict], seen: dict, record: dict | None = None
    ) -> None:
        """This loader's mixture as the stream from `origin` (position, epoch) on, after the
        `earlier` phases that gave `seen` samples per source (`record`: this phase's, as saved)."""
        self.order = GlobalOrder(self.dataset, self.cfg, self.global_batch, origin)
        record = record or phase_record(self.dataset, self.cfg, origin, self.global_batch)
        self.phases = [*earlier, record]
        self._seen_before = Counter(seen)
        self._counted = (origin[0], np.zeros(len(self.dataset.sources), dtype=np.int64))

    @property
    def samples_per_epoch(self) -> int:
        """The current epoch's samples (an epoch's count varies by a sample or so with fractional
        repeats or proportions)."""
        return self.order.epoch_length(self.epoch)

    @property
    def epoch(self) -> int:
        """The epoch of the next sample this rank's stream holds."""
        return self.order.epoch_of(self.position)

    @property
    def total_samples(self) -> int:
        return self.dataset.total_samples

    def maker(self) -> MicroBatchMaker:
        """Micro-batches from the current position, made in this process (no workers)."""
        return MicroBatchMaker(
            self.dataset, self.cfg, self.rank, self.world_size, self.position, self.tokenizer,
            self.order.origin,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, count: int | None = None) -> Iterator[Batch]:
        """The next `count` batches (default: endless); with a count, workers make no more."""
        workers = self.cfg.num_workers
        maker = self.maker()  # in this process without workers; else each worker has a copy
        try:
            if workers > 0:
                maker.read_indexes_ahead(workers if count is None else min(workers, count))
            yield from self._batches(maker, workers, count)
        finally:
            maker.close()

    def _batches(self, maker: MicroBatchMaker, workers: int, count: int | None) -> Iterator[Batch]:
        loader = DataLoader(
            RankStream(maker, self.cfg.slots_per_rank, count),
            batch_size=None,
            num_workers=workers,
            collate_fn=_as_is,
            pin_memory=self.cfg.pin_memory,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            worker_init_fn=_set_up_worker if workers > 0 else None,
            # in_order stays True: round k comes from worker k mod K, and each batch's round is
            # checked below to catch a change.
        )
        items = iter(loader)  # the workers start, each with its copy of the maker
        maker.reader.ahead = {}
        for expected, item in enumerate(items):
            if isinstance(item, _Failure):
                raise LoaderDataError(f"rank {self.rank}: {item.message}")
            if item.round != expected:
                raise RuntimeError(
                    f"loader order broken: expected round {expected}, got {item.round}"
                )
            self.position += self.round_size
            self._errors.update(item.errors)
            self._io.update(item.io)
            yield item

    def error_counts(self) -> dict[str, int]:
        """Samples this rank could not use, per reason, since this loader started."""
        return dict(self._errors)

    def io_counts(self) -> dict[str, int]:
        """This rank's storage counters since this loader started: `retries` (transient failures
        retried), `downloads`, `cache_hits`, `evictions`, `requests`, `bytes`."""
        return dict(self._io)

    def sample_counts(self) -> dict[str, int]:
        """Samples each source gave the stream before this loader's position, over every phase:
        the whole global stream's (the same on every rank), not this rank's share."""
        counted, counts = self._counted
        if self.position < counted:
            counted, counts = self.order.origin[0], counts * 0
        counts = counts + self.order.source_counts(counted, self.position)
        self._counted = (self.position, counts)
        total = Counter(self._seen_before)
        total.update(dict(zip(self.dataset.names, counts.tolist())))
        return {name: total[name] for name in [*self._seen_before, *self.dataset.names]}

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records of its training data: `Dataset.summary`, each source's
        samples per epoch and samples seen, and the mixture phases."""
        out = self.dataset.summary()
        seen = self.sample_counts()
        for source, share in zip(out["sources"], self.order.shares):
            if not self.cfg.resampled:
                source["per_epoch"] = float(share)
            source["seen"] = seen[source["name"]]
        return out | {"mode": mode_of(self.cfg), "seen": seen, "phases": self.phases}

    def state_dict(self) -> dict[str, Any]:
        """The stream position reached, plain JSON; the same on every rank."""
        epoch = self.epoch
        return {
            "format_version": STATE_FORMAT_VERSION,
            "mode": mode_of(self.cfg),
            "seed": self.cfg.seed,
            "position": self.position,
            "epoch": epoch,
            "epoch_start": self.order.epoch_start(epoch),
            "samples_per_epoch": self.order.epoch_length(epoch),
            "shuffle_window": self.cfg.shuffle_window,
            "epoch_tail": self.cfg.epoch_tail,
            "global_batch": self.global_batch,
            "data_digest": self.dataset.digest(),
            "sources": {s.name: s.digest() for s in self.dataset.sources},
            "phases": self.phases,  # the current one last
            "seen_before": dict(self._seen_before),  # samples per source of earlier phases
            "samples_by_source": self.sample_counts(),
        }

    def load_state_dict(self, state: dict[str, Any], new_mixture: bool = False) -> None:
        """Continue at the saved position, on any topology. Refused (LoaderStateError) when what
        defines the stream differs: seed, mode, shuffle window, tail rule, or the data (naming
        the sources that differ) unless `new_mixture`: this loader's mixture then starts a phase
        at the saved position, with a whole epoch."""
        version = state.get("format_version")
        if version == 1:  # the per-rank shard split of UMT before the global order
            self.position = self.order.epoch_start(int(state["epoch"]) + 1)
            log.warning(
                "loader state from an older UMT (per-rank shard split): continuing at the start of "
                "epoch %d; the rest of epoch %d is not seen",
                state["epoch"] + 1, state["epoch"],
            )  # fmt: skip
            return
        if version not in (2, STATE_FORMAT_VERSION):
            raise LoaderStateError(
                f"loader state format_version {version!r} is not {STATE_FORMAT_VERSION}"
            )
        mine = self.state_dict()
        for key in ("mode", "seed", "shuffle_window", "epoch_tail"):
            if state[key] != mine[key]:
                raise LoaderStateError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; "
                    "the sample order would differ, so it cannot continue where it stopped"
                )
        if self.cfg.epoch_tail == "drop" and state["global_batch"] != self.global_batch:
            log.warning(
                "epoch_tail=drop with another global batch (%d, was %d): epochs are cut at other "
                "places, so up to one global batch per epoch is seen twice or not at all",
                self.global_batch, state["global_batch"],
            )  # fmt: skip
        position = int(state["position"])
        if state["data_digest"] != mine["data_digest"]:
            if not new_mixture:
                raise LoaderStateError(data_change(state, self.dataset))
            origin = (position, next_phase_epoch(state))
            self.start_phase(origin, earlier_phases(state), state.get("samples_by_source", {}))
            log.warning(
                "a new mixture from stream position %d on (epoch %d of it): %s",
                position, origin[1], describe_phase(self.phases[-1]),
            )  # fmt: skip
        elif version == 2 and len(self.dataset.sources) > 1:
            # Sources were one pool before mixtures; each is its own stream now.
            self.position = self.order.epoch_start(int(state["epoch"]) + 1)
            log.warning(
                "loader state of several sources from before mixtures: the order of their samples "
                "within an epoch has changed, so epoch %d is continued at the start of epoch %d",
                state["epoch"], state["epoch"] + 1,
            )  # fmt: skip
            return
        elif version == STATE_FORMAT_VERSION:
            current = state["phases"][-1]
            origin = (int(current["start"]), int(current["epoch"]))
            self.start_phase(origin, state["phases"][:-1], state["seen_before"], current)
        self.position = position


def mode_of(cfg: LoaderConfig) -> str:
    return "resampled" if cfg.resampled else "epoch"


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, epoch: int = 0) -> StreamingLoader:
    """The trainer's entry point: a StreamingLoader for this rank, starting at `epoch`."""
    return StreamingLoader(cfg, rank, world_size, epoch)


def warn_if_unindexed(dataset: Dataset, checked: int = 64) -> None:
    """One warning when local shards have no index file (looked for beside the first `checked`
    local shards: shards come indexed all or none). Then every loader worker of every rank
    scans a shard's tar headers each time it opens it, ~1.4 s of CPU per 10,000 samples, to
    read its own small share of them. Remote shards are scanned once per node (node cache)."""
    local = [s.path for s in dataset.shards if not storage.is_remote(s.path)][:checked]
    missing = [p for p in local if not os.path.exists(index_location(p))]
    if missing:
        folder = os.path.dirname(missing[0]) or "."
        log.warning(
            "%d of the first %d local shards have no index file (%s): every loader worker "
            "scans their tar headers when it opens them (~1.4 s of CPU per 10,000 samples, in "
            "each worker); `umt data index %s` writes the indexes once",
            len(missing), len(local), missing[0], folder,
        )  # fmt: skip


def shard_cache(cfg: LoaderConfig, dataset: Dataset) -> ShardCache | None:
    """The node cache for a dataset's remote shards (None: all local, or range reads)."""
    if cfg.remote_read != "cache" or not any(storage.is_remote(s.path) for s in dataset.shards):
        return None
    limit = int(cfg.cache_limit_gb * 2**30) if cfg.cache_limit_gb else None
    return ShardCache(cfg.cache_dir or default_cache_dir(), limit)


def _prefetch_one(cache: ShardCache, shard) -> None:
    try:
        held = cache.acquire(shard.path, shard.bytes)
        try:
            copy_index(shard.path, held)  # kept beside the copy: ready before any worker reads
        finally:
            held.release()
    except Exception as exc:  # noqa: BLE001 - the read that needs it reports the error
        log.debug("prefetch of %s failed: %s", shard.path, exc)


def iter_raw_samples(
    shards: str | list, errors: Counter | None = None, cache_dir: str | None = None
) -> Iterator[RawSample]:
    """Every sample of the given shards in stored order, no shuffling (evaluation, inspection);
    remote shards through the node cache. Of a subset's shard, its kept samples only. Mixing
    fields (repeat, proportion, weight) are ignored; with several sources, keys come as
    `source/key` (image keys too: two datasets' images are never taken for one)."""
    errors = Counter() if errors is None else errors
    dataset = resolve_dataset(shards)
    cache = None
    if any(storage.is_remote(s.path) for s in dataset.shards):
        cache = ShardCache(cache_dir or default_cache_dir())
    for i, shard in enumerate(dataset.shards):
        for sample in _shard_samples(shard, errors, cache):
            if len(dataset.sources) > 1:
                key, image_key = (
                    dataset.qualify(i, sample.key),
                    dataset.qualify(i, sample.image_key),
                )
                sample = replace(sample, key=key, image_key=image_key)
            yield sample


def _shard_samples(shard, errors: Counter, cache: ShardCache | None) -> Iterator[RawSample]:
    if shard.kept is None:
        yield from read_tar_samples(shard, errors, cache)
        return
    reader = ShardReader((shard,), cache, keep_open=1)
    try:
        for position in shard.kept.tolist():
            if (sample := reader.read(0, position, errors)) is not None:
                yield sample
    finally:
        reader.close()
