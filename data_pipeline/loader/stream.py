"""The loader a rank iterates: workers that make this rank's micro-batches of the global order,
and the state that resumes it anywhere.

`StreamingLoader` is an infinite iterator of `Batch`. Its state is one number, the stream
position after the last micro-batch round it yielded (plus what identifies the stream: seed,
data, window, tail rule), the same on every rank: `state_dict()` saved by any rank resumes any
other topology at exactly that sample.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from data_pipeline.loader.reader import RawSample, ShardReader, read_tar_samples
from data_pipeline.shard_cache import ShardCache, default_cache_dir
from data_pipeline.storage import StorageError
from data_pipeline.transforms import load_tokenizer

log = logging.getLogger("umt.data")
STATE_FORMAT_VERSION = 2


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
    ):
        self.dataset, self.cfg, self.rank, self.world_size = dataset, cfg, rank, world_size
        self.start, self.tokenizer = start, tokenizer
        self.order = GlobalOrder(dataset, cfg, cfg.batch_size * cfg.grad_accum * world_size)
        self.cache = shard_cache(cfg, dataset)
        # With the node cache, hold few copies open: a copy held cannot be evicted.
        self.reader = ShardReader(dataset.shards, self.cache, keep_open=4 if self.cache else 32)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetched: OrderedDict[int, None] = OrderedDict()
        self._io_seen: Counter = Counter()

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

    def io_since_last(self) -> dict[str, int]:
        """Storage counters of this process since the previous call (retries, downloads ...)."""
        now = Counter(storage.io_counters)
        delta = {
            k: v - self._io_seen.get(k, 0) for k, v in now.items() if v != self._io_seen.get(k, 0)
        }
        self._io_seen = now
        return delta

    def sample_at(
        self, position: int, errors: Counter, failures: list | None
    ) -> DecodedSample | None:
        """Read and decode the sample at a stream position; a failure is counted (and recorded)."""
        (sample_id,), _ = self.order.samples(position, 1)
        (shard,), (index,) = self.dataset.locate(np.array([sample_id]))
        mine: Counter = Counter()
        raw: RawSample | None = self.reader.read(int(shard), int(index), mine)
        decoded = decode_sample(raw, self.cfg, position, mine) if raw is not None else None
        if decoded is None:
            errors.update(mine)
            if failures is not None:
                failures.append(
                    {
                        "position": position,
                        "shard": self.dataset.shards[int(shard)].path,
                        "index": int(index),
                        "key": self.reader.key(int(shard), int(index)),
                        "reason": next(iter(mine), "unknown"),
                    }
                )
        return decoded

    def micro_batch(self, round_index: int) -> Batch:
        cfg, b = self.cfg, self.cfg.batch_size
        first = micro_batch_positions(self.start, round_index, self.rank, self.world_size, b)
        errors: Counter = Counter()
        failures: list[dict] = []
        shards, indices = self.dataset.locate(self.order.samples(first, b)[0])
        self.reader.preload(list(zip(shards.tolist(), indices.tolist())))
        decoded = [self.sample_at(first + j, errors, failures) for j in range(b)]
        filled = fill_slots(decoded)
        if filled is None:
            filled = self._fill_from_round(round_index, first, failures)
        batch = collate_batch(filled, cfg, self.tokenizer)
        _, epochs = self.order.samples(first, 1)
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
        for round_index in rounds:
            try:
                self.maker.prefetch(round_index)
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
        self.global_batch = cfg.batch_size * cfg.grad_accum * world_size
        self.order = GlobalOrder(self.dataset, cfg, self.global_batch)  # checks the tail rule
        self.round_size = world_size * cfg.batch_size
        self.position = epoch * self.order.epoch_length
        self._errors: Counter = Counter()
        self._io: Counter = Counter()
        # Loaded once here, not per worker: importing transformers takes seconds.
        wants_tokens = cfg.decode_images and cfg.tokenizer
        self.tokenizer = load_tokenizer(cfg.tokenizer) if wants_tokens else None

    @property
    def samples_per_epoch(self) -> int:
        return self.order.samples_per_epoch

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
            self.dataset, self.cfg, self.rank, self.world_size, self.position, self.tokenizer
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, count: int | None = None) -> Iterator[Batch]:
        """The next `count` batches (default: endless); with a count, workers make no more."""
        workers = self.cfg.num_workers
        loader = DataLoader(
            RankStream(self.maker(), self.cfg.slots_per_rank, count),
            batch_size=None,
            num_workers=workers,
            collate_fn=_as_is,
            pin_memory=self.cfg.pin_memory,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            worker_init_fn=_set_up_worker if workers > 0 else None,
            # in_order stays True: round k comes from worker k mod K, and each batch's round is
            # checked below to catch a change.
        )
        for expected, item in enumerate(loader):
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

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records of its training data (the model card of an export says it):
        the dataset digest (shard names and counts), samples per epoch and the sources."""
        dataset = self.dataset
        return {
            "digest": dataset.digest(),
            "samples": dataset.total_samples,
            "shards": len(dataset.shards),
            "sources": [
                {
                    "name": s.name,
                    "samples": s.total_samples,
                    "shards": len(s.shards),
                    "weight": s.weight,
                }
                for s in dataset.sources
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        """The stream position reached, plain JSON; the same on every rank."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "mode": "resampled" if self.cfg.resampled else "epoch",
            "seed": self.cfg.seed,
            "position": self.position,
            "epoch": self.epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "shuffle_window": self.cfg.shuffle_window,
            "epoch_tail": self.cfg.epoch_tail,
            "global_batch": self.global_batch,
            "data_digest": self.dataset.digest(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position, on any topology. Refused (LoaderStateError) when what
        defines the stream differs: seed, mode, data, shuffle window or tail rule."""
        version = state.get("format_version")
        if version == 1:  # the per-rank shard split of UMT before the global order
            self.position = (int(state["epoch"]) + 1) * self.order.epoch_length
            log.warning(
                "loader state from an older UMT (per-rank shard split): continuing at the start of "
                "epoch %d; the rest of epoch %d is not seen",
                state["epoch"] + 1, state["epoch"],
            )  # fmt: skip
            return
        if version != STATE_FORMAT_VERSION:
            raise LoaderStateError(
                f"loader state format_version {version!r} is not {STATE_FORMAT_VERSION}"
            )
        mine = self.state_dict()
        for key in ("mode", "seed", "data_digest", "shuffle_window", "epoch_tail"):
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
        self.position = int(state["position"])


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, epoch: int = 0) -> StreamingLoader:
    """The trainer's entry point: a StreamingLoader for this rank, starting at `epoch`."""
    return StreamingLoader(cfg, rank, world_size, epoch)


def shard_cache(cfg: LoaderConfig, dataset: Dataset) -> ShardCache | None:
    """The node cache for a dataset's remote shards (None: all local, or range reads)."""
    if cfg.remote_read != "cache" or not any(storage.is_remote(s.path) for s in dataset.shards):
        return None
    limit = int(cfg.cache_limit_gb * 2**30) if cfg.cache_limit_gb else None
    return ShardCache(cfg.cache_dir or default_cache_dir(), limit)


def _prefetch_one(cache: ShardCache, shard) -> None:
    try:
        cache.acquire(shard.path, shard.bytes).release()
    except Exception as exc:  # noqa: BLE001 - the read that needs it reports the error
        log.debug("prefetch of %s failed: %s", shard.path, exc)


def iter_raw_samples(
    shards: str | list[str], errors: Counter | None = None, cache_dir: str | None = None
) -> Iterator[RawSample]:
    """Every sample of the given shards in stored order, no shuffling (evaluation, inspection);
    remote shards through the node cache."""
    errors = Counter() if errors is None else errors
    dataset = resolve_dataset(shards, resampled=True)  # True: accept `:weight` specs too
    cache = None
    if any(storage.is_remote(s.path) for s in dataset.shards):
        cache = ShardCache(cache_dir or default_cache_dir())
    for shard in dataset.shards:
        yield from read_tar_samples(shard, errors, cache)
