"""Near duplicates: an exact Hamming range search over perceptual hashes, a colour check, and
the deterministic grouping that keeps the first of each group.

Search: multi-index hashing (Norouzi et al., 2012). The 64-bit codes are cut into 3 chunks of
21-22 bits; two codes within Hamming distance r differ in some chunk by at most r // 3 bits
(pigeonhole), so probing each chunk's buckets at every pattern of up to r // 3 flipped bits and
checking the whole code finds every pair within r and nothing else: exact, deterministic, and its
cost grows with the pairs and buckets probed, not with the square of the images (254 probes per
chunk at the default r = 8). Buckets are a counting sort of each chunk's values.

A pair of images is a near duplicate when the whole of one (view 0) is within r of any view of
the other (the whole, or a 95% or 90% crop), and their colour histograms are within an L1
distance (grey hashes cannot tell a red circle from a blue one of the same brightness).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np

CHUNKS = ((0, 22), (22, 43), (43, 64))  # bit ranges of a code
QUERY_BLOCK = 1 << 16  # queries probed at once (bounds the candidate arrays)
TABLE_FROM = 1 << 20  # entries from which buckets are a table over every chunk value


def flip_patterns(width: int, flips: int) -> np.ndarray:
    """Every mask of at most `flips` set bits among `width`, as uint64 (0 first)."""
    masks = [0]
    for k in range(1, flips + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


@dataclass
class ChunkBuckets:
    """Entries sorted by one chunk's value, and where each value's run starts: a table over
    every value (a counting sort) for many entries, a binary search over the sorted values for
    few (the table's 2**22 slots would cost more than the search)."""

    shift: int
    mask: np.uint64
    order: np.ndarray  # (E,) entry indices sorted by chunk value
    sorted_keys: np.ndarray  # (E,) their chunk values
    starts: np.ndarray | None  # (2**width + 1,) first sorted slot of each value, or None

    @classmethod
    def build(cls, entries: np.ndarray, lo: int, hi: int) -> ChunkBuckets:
        mask = np.uint64((1 << (hi - lo)) - 1)
        keys = ((entries >> np.uint64(lo)) & mask).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        starts = None
        if len(entries) >= TABLE_FROM:
            counts = np.bincount(keys, minlength=1 << (hi - lo))
            starts = np.concatenate([[0], np.cumsum(counts)])
        return cls(lo, mask, order, keys[order], starts)

    def probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, entry indices) of every entry whose chunk equals each key."""
        keys = keys.astype(np.int64)
        if self.starts is not None:
            begin, end = self.starts[keys], self.starts[keys + 1]
        else:
            begin = np.searchsorted(self.sorted_keys, keys, side="left")
            end = np.searchsorted(self.sorted_keys, keys, side="right")
        counts = end - begin
        hit = np.flatnonzero(counts)
        if hit.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        counts = counts[hit]
        queries = np.repeat(hit, counts)
        firsts = np.repeat(begin[hit] - np.cumsum(counts) + counts, counts)
        slots = firsts + np.arange(counts.sum())
        return queries, self.order[slots]


def hamming_pairs(
    queries: np.ndarray, entries: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, entry index, distance) of every query-entry pair within `radius` bits,
    each once, sorted by query then entry."""
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    entries = np.ascontiguousarray(entries, dtype=np.uint64)
    found_q, found_e = [], []
    flips = radius // len(CHUNKS)
    for lo, hi in CHUNKS:
        buckets = ChunkBuckets.build(entries, lo, hi)
        patterns = flip_patterns(hi - lo, flips)
        for start in range(0, len(queries), QUERY_BLOCK):
            block = queries[start : start + QUERY_BLOCK]
            keys = (block >> np.uint64(lo)) & buckets.mask
            for pattern in patterns:
                q, e = buckets.probe(keys ^ pattern)
                close = np.bitwise_count(block[q] ^ entries[e]) <= radius
                found_q.append(q[close] + start)
                found_e.append(e[close])
    if not found_q:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.uint8),)
    pair_q, pair_e = np.concatenate(found_q), np.concatenate(found_e)
    # A pair close in several chunks was found once per chunk: keep one.
    keyed = np.unique(pair_q * np.int64(len(entries)) + pair_e)
    pair_q, pair_e = keyed // len(entries), keyed % len(entries)
    return pair_q, pair_e, np.bitwise_count(queries[pair_q] ^ entries[pair_e])


def least_per_pair(
    a: np.ndarray, b: np.ndarray, d: np.ndarray, n_b: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a, b) found with distances d, several times some: each once, with its least
    distance, sorted by a then b (b < n_b)."""
    keyed = a * np.int64(n_b) + b
    order = np.lexsort((d, keyed))  # by pair, least distance first
    keyed, d = keyed[order], d[order]
    first = np.concatenate([[True], keyed[1:] != keyed[:-1]]) if keyed.size else keyed.astype(bool)
    keyed, d = keyed[first], d[first]
    return keyed // n_b, keyed % n_b, d


def view_pairs(
    query_codes: np.ndarray, entry_codes: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (n, VIEWS) x images (m, VIEWS): (query image, entry image, distance) where the
    query's view 0 is within `radius` of any view of the entry image, the least distance of each
    pair kept."""
    views = entry_codes.shape[1]
    q, e, d = hamming_pairs(query_codes[:, 0], entry_codes.reshape(-1), radius)
    return least_per_pair(q, e // views, d, len(entry_codes))


def color_distance(hist_a: np.ndarray, hist_b: np.ndarray) -> np.ndarray:
    """L1 distance between rows of colour histograms (0: the same colours, 2: none in common)."""
    return np.abs(hist_a - hist_b).sum(axis=1)


@dataclass
class NearPairs:
    """Near-duplicate pairs (sample indices a, b), with their evidence."""

    a: np.ndarray
    b: np.ndarray
    hamming: np.ndarray
    color: np.ndarray


def colour_checked(
    a: np.ndarray,
    b: np.ndarray,
    d: np.ndarray,
    hists_a: np.ndarray,
    hists_b: np.ndarray,
    max_color: float,
) -> NearPairs:
    color = color_distance(hists_a[a], hists_b[b])
    agree = color <= max_color
    return NearPairs(a[agree], b[agree], d[agree], color[agree])


def near_pairs(codes: np.ndarray, hists: np.ndarray, radius: int, max_color: float) -> NearPairs:
    """Near-duplicate pairs (a < b) among images (codes (n, VIEWS), histograms (n, 64)), either
    direction of the view match counted, the least distance kept, colours checked."""
    q, e, d = view_pairs(codes, codes, radius)
    other = q != e
    q, e, d = q[other], e[other], d[other]
    a, b, d = least_per_pair(np.minimum(q, e), np.maximum(q, e), d, len(codes))
    return colour_checked(a, b, d, hists, hists, max_color)


def cross_pairs(
    codes: np.ndarray,
    hists: np.ndarray,
    other_codes: np.ndarray,
    other_hists: np.ndarray,
    radius: int,
    max_color: float,
) -> NearPairs:
    """Near-duplicate pairs between two sets (a: index in the first, b: in the other): either
    image's whole within `radius` of a view of the other, colours checked."""
    q1, e1, d1 = view_pairs(codes, other_codes, radius)
    q2, e2, d2 = view_pairs(other_codes, codes, radius)
    a, b, d = np.concatenate([q1, e2]), np.concatenate([e1, q2]), np.concatenate([d1, d2])
    a, b, d = least_per_pair(a, b, d, len(other_codes))
    return colour_checked(a, b, d, hists, other_hists, max_color)


def same_features(codes: np.ndarray, hists: np.ndarray) -> np.ndarray:
    """(n,) for each image, the first image with exactly its features (every hash and the
    colours): such copies are grouped before the search, whose pairs would otherwise grow with
    the square of a much-repeated image (a placeholder, a logo)."""
    n = len(codes)
    rows = np.concatenate(
        [
            codes.view(np.uint8).reshape(n, -1),
            np.ascontiguousarray(hists).view(np.uint8).reshape(n, -1),
        ],
        axis=1,
    )
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def first_of_groups(pairs: NearPairs, n: int) -> Iterator[tuple[int, int, int]]:
    """(removed, kept, pair index): samples are taken in index order; one not yet removed is kept
    and removes every later sample it pairs with that is not yet removed. Deterministic, and a
    chain a~b~c with a far from c does not remove c through b (b, removed, keeps no one)."""
    if pairs.a.size == 0:
        return
    order = np.lexsort((pairs.b, pairs.a))  # pairs by their first sample
    a, b = pairs.a[order], pairs.b[order]
    bounds = np.searchsorted(a, np.arange(n + 1))
    removed = np.zeros(n, dtype=bool)
    for first in np.unique(a).tolist():
        if removed[first]:
            continue
        for slot in range(bounds[first], bounds[first + 1]):
            later = int(b[slot])
            if not removed[later]:
                removed[later] = True
                yield later, first, int(order[slot])
