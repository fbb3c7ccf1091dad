"""Mixtures in numbers: how many samples each source gives an epoch, which of them, and in which
positions of the epoch (`order` builds the epoch from these).

Counts. A source of n samples with repeat r gives x = r n samples per epoch on average, with
proportion p of sources totalling N samples x = p N (proportions normalised to sum to exactly 1);
x is an exact rational (the decimal the config wrote). Epoch e takes floor(x (e+1)) - floor(x e)
of them: exact, the same on any topology, and over E epochs within one sample of E x. They are
floor(r) whole passes over the source and a part of one more: the next samples of one fixed
cycle through the source (its shards permuted once from the seed), starting where the previous
epoch's part ended. So the parts of consecutive epochs are disjoint until the cycle is done: x0.5
alternates the same two halves, x0.25 sees every sample once in four epochs, and no sample comes
more often in an epoch than ceil(r) times.

Interleave. The epoch's positions are dealt to its sources by a fixed pattern: the source list is
split in two halves (the first ceil(k/2) sources and the rest), the first half taking
F(p) = floor(p a / n + 1/2) of the first p positions (a of the node's n samples are the first
half's), position p going to it when F(p + 1) > F(p) and becoming its F(p)-th position; each half
is dealt to its own halves the same way, down to single sources. Every position's source is a
few integer operations, computed alone, without the epoch. Each rounding is off by at most 1/2, so
source l's count among the first p positions is off from p c_l / N by at most d/2, d its depth in
the tree, <= ceil(log2 k); any G consecutive positions then hold G c_l / N +- less than d of its
samples (`interleave_bound`): the floor or ceiling of its share for two sources, less than 2
samples off it for three or four, less than 3 for up to eight.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from data_pipeline.loader.dataset import Dataset
from data_pipeline.loader.specs import exact


def interleave_bound(sources: int) -> int:
    """Any run of G positions of an epoch holds G c / N +- less than this many of a source's
    samples (c of the epoch's N positions are the source's)."""
    return math.ceil(math.log2(sources)) if sources > 1 else 1


def epoch_shares(dataset: Dataset) -> list[Fraction]:
    """Each source's samples per epoch on average (x above), exactly."""
    sources = dataset.sources
    if any(s.proportion is not None for s in sources):
        given = [exact(s.proportion) for s in sources]
        total = dataset.total_samples
        return [p / sum(given) * total for p in given]
    return [
        (exact(s.repeat) if s.repeat is not None else Fraction(1)) * s.total_samples
        for s in sources
    ]


def epoch_counts(shares: list[Fraction], epoch: int) -> np.ndarray:
    """(sources,) samples each source gives epoch `epoch`."""
    return np.array([_floor(x * (epoch + 1)) - _floor(x * epoch) for x in shares], dtype=np.int64)


def counts_before(shares: list[Fraction], first: int, epoch: int) -> np.ndarray:
    """(sources,) samples of epochs [first, epoch), in one step."""
    return np.array([_floor(x * epoch) - _floor(x * first) for x in shares], dtype=np.int64)


def rotating_part(share: Fraction, samples: int, epoch: int) -> tuple[int, int, int]:
    """(whole passes, first position in the source's cycle, count) of a source's epoch: its
    whole passes, then `count` samples of its cycle from `first` on (wrapping around)."""
    passes = _floor(share / samples)
    part = share - passes * samples  # samples per epoch beyond the whole passes, in [0, n)
    first = _floor(part * epoch)
    return passes, first % samples, _floor(part * (epoch + 1)) - first


def _floor(x: Fraction) -> int:
    return x.numerator // x.denominator


def _first_half(lo: int, hi: int) -> int:
    return (lo + hi + 1) // 2


def _taken(positions: np.ndarray, part: int, whole: int) -> np.ndarray:
    """floor(p part / whole + 1/2) for each p: how many of the first p positions are the part's.
    int64 while 2 whole^2 fits, Python integers beyond (epochs of billions of samples)."""
    if whole == 0:
        return np.zeros_like(positions)
    if 2 * whole * whole + whole >= 2**63:
        exact_p = positions.astype(object)
        return np.array((2 * exact_p * part + whole) // (2 * whole), dtype=np.int64)
    return (2 * positions * part + whole) // (2 * whole)


def interleave(counts: np.ndarray, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, index among that source's positions) of epoch positions [start, start + count),
    for an epoch whose sources give `counts` samples. Each source's indices come in order."""
    source = np.empty(count, dtype=np.int64)
    index = np.empty(count, dtype=np.int64)
    sums = np.concatenate([[0], np.cumsum(counts)])

    def deal(lo: int, hi: int, positions: np.ndarray, where: np.ndarray) -> None:
        if hi - lo == 1:
            source[where], index[where] = lo, positions
            return
        mid = _first_half(lo, hi)
        part, whole = int(sums[mid] - sums[lo]), int(sums[hi] - sums[lo])
        before = _taken(positions, part, whole)
        first = _taken(positions + 1, part, whole) > before
        deal(lo, mid, before[first], where[first])
        deal(mid, hi, (positions - before)[~first], where[~first])

    deal(0, len(counts), np.arange(start, start + count, dtype=np.int64), np.arange(count))
    return source, index


def prefix_counts(counts: np.ndarray, position: int) -> np.ndarray:
    """(sources,) how many of an epoch's first `position` positions are each source's."""
    out = np.zeros(len(counts), dtype=np.int64)
    sums = np.concatenate([[0], np.cumsum(counts)]).tolist()

    def deal(lo: int, hi: int, taken: int) -> None:
        if hi - lo == 1:
            out[lo] = taken
            return
        mid = _first_half(lo, hi)
        part, whole = sums[mid] - sums[lo], sums[hi] - sums[lo]
        first = (2 * taken * part + whole) // (2 * whole) if whole else 0
        deal(lo, mid, first)
        deal(mid, hi, taken - first)

    deal(0, len(counts), position)
    return out
