"""The global sample order: one stream of samples from (seed, data), whatever the topology.

An epoch is built from shard counts alone (no shard is read), and every position of it is
computable on its own, without materialising the epoch.

Each source is a stream of its own: its epoch's blocks (whole shards, once per whole repeat,
plus the shard pieces of its rotating part: `mixture`) are permuted from (seed, epoch), grouped
into consecutive windows of at least `shuffle_window` samples, and the samples of each window
shuffled from (seed, epoch, window). A window spans a few shards, so reading stays local: the
shards in use are those of each source's current window. With one source and no repeat this is
the whole epoch, a permutation of every sample.

How sources interleave within a step: the epoch's positions are dealt to the sources by the fixed
pattern of `mixture.interleave`, in proportion to their counts for the epoch; the sample at a
source's j-th position is the j-th of its stream. So every global batch, at every step, holds
close to each source's proportion, not just the epoch: of G consecutive positions, a source with
c of the epoch's N samples holds G c / N +- less than d, d = ceil(log2 k) for k sources (the
floor or ceiling of its share with two sources, less than 2 samples off with three or four, 3 up
to eight). A global batch that spans two epochs (or two mixture phases) holds each part's share
of that part. Which sample fills a source's position is random (its window's shuffle); which
source a position takes is not, so with micro-batches of 1 sample a rank may see one source only.

Resampled mode builds its epochs the same way from shards drawn with replacement, as one stream:
each draw picks a source with probability proportional to weight / mean shard size (so each
source gives its weight's share of samples) and one of its shards uniformly; an epoch is
nominally as many samples as the data holds.

The stream is the concatenation of the epochs, and the loader state is a position in it:

* `carry` (default): the epochs follow each other directly, so the last partial global batch of
  an epoch is completed by the first samples of the next one. Every sample is seen exactly once
  per epoch (a source's count times), and the stream depends on nothing but the seed and the data.
* `drop`: each epoch is cut to a multiple of the global batch G (the tail is unseen that epoch,
  a few samples of each source), so every epoch starts on a step boundary; the stream then
  depends on G.

A mixture changed on resume starts a phase: from the checkpoint's position P on, the stream is
the new mixture's, beginning with a whole epoch (the order's `origin`: position P is the start
of epoch e, the epoch after the one P was in).

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
from fractions import Fraction

import numpy as np

from data_pipeline.loader.config import LoaderConfig, LoaderConfigError
from data_pipeline.loader.dataset import Dataset
from data_pipeline.loader.mixture import (
    counts_before,
    epoch_counts,
    epoch_shares,
    interleave,
    prefix_counts,
    rotating_part,
)

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
    """One stream's epoch (a source's; resampled mode's draw) as blocks, grouped into windows."""

    epoch: int
    blocks: np.ndarray  # (n,) shard index of each block
    block_counts: np.ndarray  # (n,) samples taken from it
    window_blocks: np.ndarray  # (w,) first block of each window
    window_starts: np.ndarray  # (w + 1,) first position of each window, then the epoch length
    offsets: np.ndarray | None = None  # (n,) first sample taken within the shard (None: all 0)

    @property
    def length(self) -> int:
        return int(self.window_starts[-1])


def source_tag(dataset: Dataset, source: int) -> tuple:
    """Seed parts that keep sources' streams apart (none for a lone source: its order is the one
    a dataset had before mixtures, so its runs resume as they were)."""
    return () if len(dataset.sources) == 1 else ("source", dataset.sources[source].name)


def source_blocks(
    dataset: Dataset, cfg: LoaderConfig, epoch: int, source: int, share: Fraction
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shards, first samples, counts) of a source's epoch blocks, in order: its whole passes
    and the pieces of its rotating part, permuted from (seed, epoch)."""
    first, last = (int(i) for i in dataset.first_shard[source : source + 2])
    shards = np.arange(first, last, dtype=np.int64)
    counts = dataset.counts[first:last]
    passes, start, take = rotating_part(share, dataset.sources[source].total_samples, epoch)
    blocks = [np.tile(shards, passes)]
    offsets = [np.zeros(passes * len(shards), dtype=np.int64)]
    taken = [np.tile(counts, passes)]
    if take:
        pieces = cycle_pieces(dataset, cfg, source, start, take)
        blocks.append(pieces[0]), offsets.append(pieces[1]), taken.append(pieces[2])
    blocks, offsets, taken = (np.concatenate(x) for x in (blocks, offsets, taken))
    tag = source_tag(dataset, source)
    order = seeded(cfg.seed, "shards", epoch, *tag).permutation(len(blocks))
    order = order[taken[order] > 0]
    return blocks[order], offsets[order], taken[order]


def cycle_pieces(
    dataset: Dataset, cfg: LoaderConfig, source: int, start: int, take: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shards, first samples, counts) of positions [start, start + take) of the source's cycle
    (its shards in one fixed permutation, each shard's samples in order), wrapping around."""
    first, last = (int(i) for i in dataset.first_shard[source : source + 2])
    counts = dataset.counts[first:last]
    cycle = seeded(cfg.seed, "cycle", *source_tag(dataset, source)).permutation(len(counts))
    bounds = np.concatenate([[0], np.cumsum(counts[cycle])])
    total = int(bounds[-1])
    shards, offsets, taken = [], [], []
    for lo, hi in ((start, min(start + take, total)), (0, start + take - total)):
        if hi <= lo:
            continue
        low = np.maximum(bounds[:-1], lo)
        high = np.minimum(bounds[1:], hi)
        inside = high > low
        shards.append(cycle[inside] + first)
        offsets.append((low - bounds[:-1])[inside])
        taken.append((high - low)[inside])
    return tuple(np.concatenate(x).astype(np.int64) for x in (shards, offsets, taken))


def resampled_blocks(dataset: Dataset, cfg: LoaderConfig, epoch: int) -> tuple:
    """(shards, counts) of a resampled epoch: shards drawn with replacement, as many samples as
    the data holds (the last block cut to that)."""
    counts = dataset.counts
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


def plan_epoch(dataset: Dataset, cfg: LoaderConfig, epoch: int, source: int = 0) -> EpochPlan:
    """Source `source`'s stream for the epoch (resampled mode: the one stream of draws)."""
    if cfg.resampled:
        blocks, counts = resampled_blocks(dataset, cfg, epoch)
        offsets = None
    else:
        share = epoch_shares(dataset)[source]
        blocks, offsets, counts = source_blocks(dataset, cfg, epoch, source, share)
    window_blocks = group_windows(counts, cfg.shuffle_window)
    block_starts = np.concatenate([[0], np.cumsum(counts)])
    window_starts = np.append(block_starts[window_blocks], block_starts[-1])
    return EpochPlan(epoch, blocks, counts, window_blocks, window_starts, offsets)


class GlobalOrder:
    """Stream position -> (global sample id, epoch), for any position, cheaply and repeatably.

    `origin` (position, epoch): where this order's stream starts, (0, 0) but for a mixture phase
    begun on resume."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: LoaderConfig,
        global_batch: int | None = None,
        origin: tuple[int, int] = (0, 0),
    ):
        self.dataset, self.cfg = dataset, cfg
        self.origin = (int(origin[0]), int(origin[1]))
        sources = len(dataset.sources)
        self.streams = 1 if cfg.resampled else sources
        self.shares = [Fraction(dataset.total_samples)] if cfg.resampled else epoch_shares(dataset)
        self.samples_per_epoch = int(sum(self.shares))  # on average, rounded down
        self.cut = None
        if cfg.epoch_tail == "drop":
            if global_batch is None:
                raise LoaderConfigError("data.epoch_tail=drop needs the global batch size")
            if global_batch > self.samples_per_epoch:
                raise LoaderConfigError(
                    f"data.epoch_tail=drop: an epoch of {self.samples_per_epoch} samples holds no "
                    f"full global batch of {global_batch}; use epoch_tail=carry"
                )
            self.cut = global_batch
        self._drop_starts = [self.origin[0]]  # drop: starts of epochs origin, origin + 1, ...
        self._plans: OrderedDict[tuple[int, int], EpochPlan] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._keep_plans, self._keep_windows = 2 * self.streams + 1, 4 * self.streams + 4

    # --- epochs ---------------------------------------------------------------------------------
    def counts(self, epoch: int) -> np.ndarray:
        """(streams,) samples each stream (source) gives the epoch, before a drop cut."""
        return epoch_counts(self.shares, epoch)

    def epoch_length(self, epoch: int) -> int:
        length = int(self.counts(epoch).sum())
        return length - length % self.cut if self.cut else length

    def epoch_start(self, epoch: int) -> int:
        position, first = self.origin
        if epoch < first:
            raise ValueError(f"epoch {epoch} is before this order's first epoch {first}")
        if self.cut is None:
            return position + int(counts_before(self.shares, first, epoch).sum())
        while len(self._drop_starts) <= epoch - first:
            e = first + len(self._drop_starts) - 1
            self._drop_starts.append(self._drop_starts[-1] + self.epoch_length(e))
        return self._drop_starts[epoch - first]

    def epoch_of(self, position: int) -> int:
        start, first = self.origin
        if position < start:
            raise ValueError(f"position {position} is before this order's start {start}")
        epoch = first + int(Fraction(position - start) / sum(self.shares))  # about; then exact
        while epoch > first and self.epoch_start(epoch) > position:
            epoch -= 1
        while self.epoch_start(epoch + 1) <= position:
            epoch += 1
        return epoch

    # --- streams --------------------------------------------------------------------------------
    def plan(self, epoch: int, stream: int = 0) -> EpochPlan:
        key = (epoch, stream)
        if key not in self._plans:
            self._plans[key] = plan_epoch(self.dataset, self.cfg, epoch, stream)
            if len(self._plans) > self._keep_plans:
                self._plans.popitem(last=False)
        return self._plans[key]

    def window(self, epoch: int, w: int, stream: int = 0) -> np.ndarray:
        """Global sample ids of window w of a stream's epoch, in their shuffled order."""
        key = (epoch, stream, w)
        if key not in self._windows:
            plan = self.plan(epoch, stream)
            first = plan.window_blocks[w]
            last = (
                plan.window_blocks[w + 1] if w + 1 < len(plan.window_blocks) else len(plan.blocks)
            )
            starts = self.dataset.starts[plan.blocks[first:last]]
            if plan.offsets is not None:
                starts = starts + plan.offsets[first:last]
            ids = np.concatenate(
                [np.arange(s, s + n) for s, n in zip(starts, plan.block_counts[first:last])]
            )
            tag = () if self.cfg.resampled else source_tag(self.dataset, stream)
            shuffle = seeded(self.cfg.seed, "window", epoch, w, *tag).permutation(len(ids))
            self._windows[key] = ids[shuffle]
            if len(self._windows) > self._keep_windows:
                self._windows.popitem(last=False)
        return self._windows[key]

    def stream_samples(self, epoch: int, stream: int, items: np.ndarray) -> np.ndarray:
        """Global sample ids of items (positions within the stream's epoch, ascending)."""
        plan = self.plan(epoch, stream)
        which = np.searchsorted(plan.window_starts, items, side="right") - 1
        out = np.empty(len(items), dtype=np.int64)
        for w in np.unique(which):
            mine = which == w
            out[mine] = self.window(epoch, int(w), stream)[items[mine] - plan.window_starts[w]]
        return out

    def epoch_samples(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """Global sample ids of epoch positions [offset, offset + count)."""
        if self.streams == 1:
            return self.stream_samples(epoch, 0, np.arange(offset, offset + count))
        stream, index = interleave(self.counts(epoch), offset, count)
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(stream):
            mine = stream == s
            out[mine] = self.stream_samples(epoch, int(s), index[mine])
        return out

    def pieces(self, start: int, end: int):
        """(epoch, first offset, last offset) of each epoch's part of positions [start, end)."""
        position = start
        while position < end:
            epoch = self.epoch_of(position)
            offset = position - self.epoch_start(epoch)
            take = min(end - position, self.epoch_length(epoch) - offset)
            yield epoch, offset, offset + take
            position += take

    def samples(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(global sample ids, epochs) of stream positions [start, start + count)."""
        ids, epochs = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for epoch, lo, hi in self.pieces(start, start + count):
            ids.append(self.epoch_samples(epoch, lo, hi - lo))
            epochs.append(np.full(hi - lo, epoch, dtype=np.int64))
        return np.concatenate(ids), np.concatenate(epochs)

    # --- counts per source ----------------------------------------------------------------------
    def source_counts(self, start: int, end: int) -> np.ndarray:
        """(sources,) how many of stream positions [start, end) each source gives."""
        out = np.zeros(len(self.dataset.sources), dtype=np.int64)
        for epoch, lo, hi in self.pieces(start, end):
            out += self.counts_before(epoch, hi) - self.counts_before(epoch, lo)
        return out

    def counts_before(self, epoch: int, offset: int) -> np.ndarray:
        """(sources,) each source's count among the epoch's first `offset` positions."""
        if not self.cfg.resampled:
            return prefix_counts(self.counts(epoch), offset)
        plan = self.plan(epoch)
        out = np.zeros(len(self.dataset.sources), dtype=np.int64)
        w = int(np.searchsorted(plan.window_starts, offset, side="right") - 1)
        whole = plan.window_blocks[w] if w < len(plan.window_blocks) else len(plan.blocks)
        np.add.at(out, self.dataset.source_of_shard[plan.blocks[:whole]], plan.block_counts[:whole])
        within = offset - int(plan.window_starts[min(w, len(plan.window_blocks))])
        if within > 0:
            ids = self.window(epoch, w)[:within]
            shards = np.searchsorted(self.dataset.starts, ids, side="right") - 1
            np.add.at(out, self.dataset.source_of_shard[shards], 1)
        return out


def micro_batch_positions(
    start: int, round_index: int, rank: int, world_size: int, batch: int
) -> int:
    """First stream position of `rank`'s micro-batch in round `round_index` (see the module docstring)."""
    return start + round_index * world_size * batch + rank * batch
