"""The global sample order: one stream of samples from (seed, data), whatever the topology.

An epoch is a permutation of every sample, built from shard counts alone (no shard is read):
the shards are permuted from (seed, epoch), grouped into consecutive windows of at least
`shuffle_window` samples, and the samples of each window shuffled from (seed, epoch, window). A
window spans a few shards, so reading stays local (the window's shards are the ones in use),
and the order of every position is computable on its own, without materialising the epoch.
Resampled mode builds its epochs the same way from shards drawn with replacement: each draw
picks a source with probability proportional to weight / mean shard size (so each source gives
its weight's share of samples) and one of its shards uniformly; an epoch is nominally as many
samples as the data holds.

The stream is the concatenation of the epochs, and the loader state is a position in it:

* `carry` (default): the epochs follow each other directly, so the last partial global batch of
  an epoch is completed by the first samples of the next one. Every sample is seen exactly once
  per epoch, and the stream depends on nothing but the seed and the data.
* `drop`: each epoch is cut to a multiple of the global batch G (the tail is unseen that epoch),
  so every epoch starts on a step boundary; the stream then depends on G.

Dealing (the rule every rank and worker applies on its own): the loader starts at position P0.
Round k covers positions [P0 + kR, P0 + (k+1)R), R = ranks x micro-batch b; rank r's
micro-batch in round k is [P0 + kR + rb, P0 + kR + (r+1)b), made by its worker k mod K. An
optimizer step of A micro-batches per rank is A consecutive rounds, i.e. G = A R consecutive
positions: global step t (counted from P0) takes positions [P0 + tG, P0 + (t+1)G), whatever W,
b, A or K divide G into.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from data_pipeline.loader.config import LoaderConfig, LoaderConfigError
from data_pipeline.loader.dataset import Dataset

DRAW_CHUNK = 4096  # resampled shard draws per seeded chunk


def seeded(seed: int, *parts: object) -> np.random.Generator:
    """A generator from a string of (seed, parts): the same in every process, never from hash()."""
    text = "/".join(["umt", str(seed), *map(str, parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def group_windows(counts: np.ndarray, window: int) -> np.ndarray:
    """Block indices where windows start: consecutive blocks until they hold >= window samples."""
    starts, total = [0], 0
    for i, c in enumerate(counts[:-1]):
        total += int(c)
        if total >= window:
            starts.append(i + 1)
            total = 0
    return np.array(starts, dtype=np.int64)


@dataclass
class EpochPlan:
    """One epoch as blocks (whole shards, in order) grouped into windows."""

    epoch: int
    blocks: np.ndarray  # (n,) shard index of each block
    block_counts: np.ndarray  # (n,) samples taken from it (the last resampled one may be cut)
    window_blocks: np.ndarray  # (w,) first block of each window
    window_starts: np.ndarray  # (w + 1,) first position of each window, then the epoch length

    @property
    def length(self) -> int:
        return int(self.window_starts[-1])


def epoch_blocks(dataset: Dataset, cfg: LoaderConfig, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shards, samples taken) of the epoch's blocks, in order."""
    counts = dataset.counts
    if not cfg.resampled:
        order = seeded(cfg.seed, "shards", epoch).permutation(len(counts))
        order = order[counts[order] > 0]
        return order, counts[order]
    sources = dataset.sources
    weights = np.array([s.weight * len(s.shards) / s.total_samples for s in sources])
    probabilities = weights / weights.sum()
    members = [
        np.flatnonzero((dataset.source_of_shard == i) & (counts > 0)) for i in range(len(sources))
    ]
    target, taken, chosen = dataset.total_samples, 0, []
    chunk = 0
    while taken < target:
        rng = seeded(cfg.seed, "resampled", epoch, chunk)
        which = rng.choice(len(sources), size=DRAW_CHUNK, p=probabilities)
        pick = rng.random(DRAW_CHUNK)
        for s, u in zip(which, pick):
            shard = members[s][int(u * len(members[s]))]
            chosen.append(shard)
            taken += int(counts[shard])
            if taken >= target:
                break
        chunk += 1
    blocks = np.array(chosen, dtype=np.int64)
    taken_counts = counts[blocks].copy()
    taken_counts[-1] -= taken - target  # nominal epoch: exactly as many samples as the data
    return blocks, taken_counts


def plan_epoch(dataset: Dataset, cfg: LoaderConfig, epoch: int) -> EpochPlan:
    blocks, counts = epoch_blocks(dataset, cfg, epoch)
    window_blocks = group_windows(counts, cfg.shuffle_window)
    block_starts = np.concatenate([[0], np.cumsum(counts)])
    window_starts = np.append(block_starts[window_blocks], block_starts[-1])
    return EpochPlan(epoch, blocks, counts, window_blocks, window_starts)


class GlobalOrder:
    """Stream position -> (global sample id, epoch), for any position, cheaply and repeatably."""

    def __init__(self, dataset: Dataset, cfg: LoaderConfig, global_batch: int | None = None):
        self.dataset, self.cfg = dataset, cfg
        self.samples_per_epoch = dataset.total_samples
        self.epoch_length = self.samples_per_epoch
        if cfg.epoch_tail == "drop":
            if global_batch is None:
                raise LoaderConfigError("data.epoch_tail=drop needs the global batch size")
            if global_batch > self.samples_per_epoch:
                raise LoaderConfigError(
                    f"data.epoch_tail=drop: an epoch of {self.samples_per_epoch} samples holds no "
                    f"full global batch of {global_batch}; use epoch_tail=carry"
                )
            self.epoch_length -= self.samples_per_epoch % global_batch
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans[epoch] = plan_epoch(self.dataset, self.cfg, epoch)
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def window(self, epoch: int, w: int) -> np.ndarray:
        """Global sample ids of window w of the epoch, in their shuffled order."""
        key = (epoch, w)
        if key not in self._windows:
            plan = self.plan(epoch)
            first = plan.window_blocks[w]
            last = (
                plan.window_blocks[w + 1] if w + 1 < len(plan.window_blocks) else len(plan.blocks)
            )
            starts = self.dataset.starts[plan.blocks[first:last]]
            ids = np.concatenate(
                [np.arange(s, s + n) for s, n in zip(starts, plan.block_counts[first:last])]
            )
            self._windows[key] = ids[
                seeded(self.cfg.seed, "window", epoch, w).permutation(len(ids))
            ]
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return self._windows[key]

    def epoch_of(self, position: int) -> int:
        return position // self.epoch_length

    def samples(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(global sample ids, epochs) of stream positions [start, start + count)."""
        ids, epochs = [], []
        position, left = start, count
        while left > 0:
            epoch, offset = divmod(position, self.epoch_length)
            plan = self.plan(epoch)
            w = int(np.searchsorted(plan.window_starts, offset, side="right") - 1)
            within = offset - int(plan.window_starts[w])
            take = min(left, int(plan.window_starts[w + 1]) - offset, self.epoch_length - offset)
            ids.append(self.window(epoch, w)[within : within + take])
            epochs.append(np.full(take, epoch, dtype=np.int64))
            position += take
            left -= take
        return np.concatenate(ids), np.concatenate(epochs)


def micro_batch_positions(
    start: int, round_index: int, rank: int, world_size: int, batch: int
) -> int:
    """First stream position of `rank`'s micro-batch in round `round_index` (see the module docstring)."""
    return start + round_index * world_size * batch + rank * batch
