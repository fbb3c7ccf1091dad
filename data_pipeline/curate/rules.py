"""The global step: every sample's table row in, one decision per sample out.

Rules apply in this order, each to the samples the earlier ones kept, and a removed sample
carries the reason of the first rule that removed it with its evidence:

    unreadable            the loader could not use it (the reader's or decoder's reason)
    too_few_words / too_many_words      --min/--max-caption-words
    eval_duplicate        its image is a near duplicate of an evaluation image (--decontaminate)
    eval_caption          its caption is an evaluation caption (--decontaminate-captions)
    exact_duplicate       the same decoded pixels as an earlier kept sample (--dedup exact)
    near_duplicate        a near duplicate of an earlier kept sample (--dedup near)
    low_similarity        image-caption similarity below --min-similarity
    below_top_fraction    not in the --keep-top fraction by similarity

"Earlier" is the order of the shards as given and of samples in them: the first of each group
is kept, and each removed duplicate names it (`kept_key`), so groups can be read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.curate.features import hash_codes, histograms
from data_pipeline.curate.near import cross_pairs, first_of_groups, near_pairs, same_features
from data_pipeline.curate.options import CurateOptions

REASONS = (
    "unreadable", "too_few_words", "too_many_words", "eval_duplicate", "eval_caption",
    "exact_duplicate", "near_duplicate", "low_similarity", "below_top_fraction",
)  # fmt: skip


@dataclass
class Samples:
    """Every sample of a list of shards, in order, as their tables hold them."""

    shards: list[str]  # source shard paths
    shard: np.ndarray  # (n,) index into `shards`
    position: np.ndarray  # (n,) tar position
    key: list
    caption: list
    words: np.ndarray  # (n,) -1 where unreadable
    error: list
    pixel_sha: list
    codes: np.ndarray  # (n, VIEWS) uint64
    hists: np.ndarray  # (n, 64)
    score: np.ndarray  # (n,) NaN where not scored

    def __len__(self) -> int:
        return len(self.position)

    @property
    def readable(self) -> np.ndarray:
        return np.array([e is None for e in self.error], dtype=bool)

    def ref(self, i: int) -> dict:
        """How evidence names a sample."""
        return {"key": self.key[i], "shard": self.shards[self.shard[i]], "position": int(self.position[i])}  # fmt: skip


def load_samples(records: list[dict], table_dir: Path) -> Samples:
    """The samples of shards (done-records in order) from their tables."""
    columns: dict[str, list] = {
        name: [] for name in ("key", "caption", "error", "pixel_sha", "phash", "color")
    }
    shard, position, words, score = [], [], [], []
    for index, record in enumerate(records):
        table = pq.read_table(table_dir / record["hashes"]).to_pydict()
        n = len(table["position"])
        shard.append(np.full(n, index, dtype=np.int64))
        position.append(np.array(table["position"], dtype=np.int64))
        words.append(np.array([-1 if w is None else w for w in table["words"]], dtype=np.int64))
        for name, values in columns.items():
            values += table[name]
        if record.get("scores"):
            scores = pq.read_table(table_dir / record["scores"]).to_pydict()
            score.append(np.array(scores["score"], dtype=np.float64))
        else:
            score.append(np.full(n, np.nan))

    def joined(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return Samples(
        shards=[r["path"] for r in records],
        shard=joined(shard, np.int64),
        position=joined(position, np.int64),
        key=columns["key"],
        caption=columns["caption"],
        words=joined(words, np.int64),
        error=columns["error"],
        pixel_sha=columns["pixel_sha"],
        codes=hash_codes(columns["phash"]),
        hists=histograms(columns["color"]),
        score=joined(score, np.float64),
    )


@dataclass
class Decisions:
    reason: list  # (n,) None: kept
    evidence: list  # (n,) dict or None

    @property
    def kept(self) -> np.ndarray:
        return np.array([r is None for r in self.reason], dtype=bool)

    def remove(self, i: int, reason: str, evidence: dict) -> None:
        self.reason[i], self.evidence[i] = reason, evidence


def normalise_caption(text: str) -> str:
    return " ".join(text.lower().split())


def decide(train: Samples, evals: Samples | None, options: CurateOptions) -> Decisions:
    """Apply the rules in order (module docstring)."""
    decisions = Decisions([None] * len(train), [None] * len(train))
    for i, error in enumerate(train.error):
        if error is not None:
            decisions.remove(i, "unreadable", {"error": error})
    caption_words(train, decisions, options)
    if evals is not None:
        decontaminate(train, evals, decisions, options)
    if "exact" in options.dedup:
        exact_duplicates(train, decisions)
    if "near" in options.dedup:
        near_duplicates(train, decisions, options)
    if options.min_similarity is not None or options.keep_top is not None:
        similarity(train, decisions, options)
    return decisions


def caption_words(s: Samples, d: Decisions, o: CurateOptions) -> None:
    for i in np.flatnonzero(d.kept).tolist():
        words = int(s.words[i])
        if o.min_caption_words is not None and words < o.min_caption_words:
            d.remove(i, "too_few_words", {"words": words, "min": o.min_caption_words})
        elif o.max_caption_words is not None and words > o.max_caption_words:
            d.remove(i, "too_many_words", {"words": words, "max": o.max_caption_words})


def decontaminate(s: Samples, evals: Samples, d: Decisions, o: CurateOptions) -> None:
    alive = np.flatnonzero(d.kept)
    usable = np.flatnonzero(evals.readable)
    pairs = cross_pairs(
        s.codes[alive], s.hists[alive], evals.codes[usable], evals.hists[usable],
        o.near_hamming, o.near_color,
    )  # fmt: skip
    # Each training sample names its closest evaluation image (fewest bits, then colour, then order).
    order = np.lexsort((pairs.b, pairs.color, pairs.hamming, pairs.a))
    seen = set()
    for p in order.tolist():
        a = int(pairs.a[p])
        if a in seen:
            continue
        seen.add(a)
        evidence = {"eval": evals.ref(int(usable[pairs.b[p]]))}
        evidence |= {"hamming": int(pairs.hamming[p]), "color_l1": round(float(pairs.color[p]), 4)}
        d.remove(int(alive[a]), "eval_duplicate", evidence)
    if not o.decontaminate_captions:
        return
    captions: dict[str, int] = {}
    for i in usable.tolist():
        captions.setdefault(normalise_caption(evals.caption[i]), i)
    for i in np.flatnonzero(d.kept).tolist():
        match = captions.get(normalise_caption(s.caption[i]))
        if match is not None:
            d.remove(i, "eval_caption", {"eval": evals.ref(match)})


def exact_duplicates(s: Samples, d: Decisions) -> None:
    first: dict[str, int] = {}
    for i in np.flatnonzero(d.kept).tolist():
        sha = s.pixel_sha[i]
        if sha in first:
            d.remove(i, "exact_duplicate", {"kept": s.ref(first[sha]), "pixel_sha": sha})
        else:
            first[sha] = i


def near_duplicates(s: Samples, d: Decisions, o: CurateOptions) -> None:
    """Images with identical features count as one in the search (their first stands for them);
    the first of each group keeps, as if every image had been searched."""
    alive = np.flatnonzero(d.kept)
    leader = same_features(s.codes[alive], s.hists[alive])  # (n,) index into alive
    reps = np.unique(leader)  # ascending: in sample order
    slot = np.searchsorted(reps, leader)  # each sample's representative among reps
    pairs = near_pairs(s.codes[alive[reps]], s.hists[alive[reps]], o.near_hamming, o.near_color)
    claimed = {removed: (kept, p) for removed, kept, p in first_of_groups(pairs, len(reps))}
    for i, rep in enumerate(slot.tolist()):
        if rep in claimed:
            kept, p = claimed[rep]
            distance, color = int(pairs.hamming[p]), round(float(pairs.color[p]), 4)
            first = alive[reps[kept]]
        elif leader[i] != i:  # the same features as an earlier kept image
            distance, color, first = 0, 0.0, alive[leader[i]]
        else:
            continue
        evidence = {"kept": s.ref(int(first)), "hamming": distance, "color_l1": color}
        d.remove(int(alive[i]), "near_duplicate", evidence)


def similarity(s: Samples, d: Decisions, o: CurateOptions) -> None:
    if o.min_similarity is not None:
        for i in np.flatnonzero(d.kept).tolist():
            if not s.score[i] >= o.min_similarity:  # NaN (never scored) fails too
                d.remove(i, "low_similarity", {"score": round(float(s.score[i]), 6), "min": o.min_similarity})  # fmt: skip
    if o.keep_top is None:
        return
    alive = np.flatnonzero(d.kept)
    if alive.size == 0:
        return
    keep = math.ceil(o.keep_top * len(alive) - 1e-9)  # 1e-9: 0.3 x 10 is 3, not 4
    # Highest scores first, ties in sample order; NaN sorts last.
    order = alive[np.lexsort((alive, -np.nan_to_num(s.score[alive], nan=-np.inf)))]
    cutoff = round(float(s.score[order[keep - 1]]), 6)
    for i in order[keep:].tolist():
        evidence = {"score": round(float(s.score[i]), 6), "cutoff": cutoff}
        d.remove(i, "below_top_fraction", evidence | {"keep_top": o.keep_top})
