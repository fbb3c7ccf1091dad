"""What `umt data curate` is asked to do (`CurateOptions`), checked before any shard is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEDUP_MODES = ("exact", "near")
# Defaults of the near-duplicate rule, chosen on the planted cases of
# tests/data_pipeline/curate_cases.py (see the README's precision and recall table).
NEAR_HAMMING = 8
NEAR_COLOR = 0.2


class CurateError(ValueError):
    """An option, input or output that cannot work; the message names it (one line)."""


@dataclass
class CurateOptions:
    sources: list[str]
    """Shard specs to curate (folders with a manifest, brace patterns, subsets), as the loader takes."""
    out: str
    """The subset folder: subset.json, removed.jsonl, table/ (hashes and scores)."""
    dedup: tuple[str, ...] = ()
    """`exact` (identical decoded pixels) and/or `near` (perceptual hash + colour check)."""
    near_hamming: int = NEAR_HAMMING
    """Near duplicates: most differing bits of the 64-bit perceptual hashes (image vs. any of
    the other's views)."""
    near_color: float = NEAR_COLOR
    """Near duplicates: largest L1 distance of their colour histograms (0 to 2)."""
    decontaminate: list[str] = field(default_factory=list)
    """Evaluation shard specs: training samples whose image is a near duplicate of one of theirs
    are removed."""
    decontaminate_captions: bool = False
    """Also remove training samples whose caption equals an evaluation caption (case and
    spacing ignored)."""
    model: str | None = None
    """Image-text scorer: a UMT export folder, or `open_clip:ARCH:CHECKPOINT`."""
    min_similarity: float | None = None
    """Remove pairs whose image-caption cosine similarity is below this (-1 to 1)."""
    keep_top: float | None = None
    """Keep this fraction (0 to 1] of the pairs still kept, by similarity (DataComp's filter)."""
    min_caption_words: int | None = None
    max_caption_words: int | None = None
    table: str | None = None
    """Folder of per-shard Parquet tables (hashes, scores) to read and add to; default OUT/table.
    Another subset's table makes a re-run with other thresholds recompute nothing."""
    materialize: str | None = None
    """Also write the kept samples as shards here (the sharder's writer)."""
    workers: int = 1
    """Processes hashing and scoring shards on this node."""
    part_index: int = 0
    """This rank's part of the shards (torchrun / srun ranks split them)."""
    num_parts: int = 1
    score_batch: int = 32
    """Pairs per scorer call."""
    device: str = "auto"
    """Where the scorer runs: `cpu`, `cuda` (this rank's GPU: LOCAL_RANK or SLURM_LOCALID), or
    `auto` (cuda when a GPU is visible)."""
    cache_dir: str | None = None
    """Node-local folder for copies of s3:// and http(s):// shards."""
    overwrite: bool = False
    """Start OUT over, whatever it holds (its table is kept: it is keyed by content)."""
    progress: bool = False

    def rules(self) -> dict:
        """The options that decide what is kept (recorded in subset.json and the run identity)."""
        return {
            "dedup": sorted(self.dedup),
            "near_hamming": self.near_hamming if "near" in self.dedup else None,
            "near_color": self.near_color if "near" in self.dedup else None,
            "decontaminate": list(self.decontaminate),
            "decontaminate_captions": self.decontaminate_captions,
            "model": self.model,
            "min_similarity": self.min_similarity,
            "keep_top": self.keep_top,
            "min_caption_words": self.min_caption_words,
            "max_caption_words": self.max_caption_words,
        }

    def as_dict(self) -> dict:
        return asdict(self)


def validate_options(o: CurateOptions) -> None:
    """Raise CurateError naming the first flag out of range."""
    if not o.sources:
        raise CurateError("give the shards to curate (a folder, brace pattern or subset)")
    unknown = [m for m in o.dedup if m not in DEDUP_MODES]
    if unknown:
        raise CurateError(f"--dedup takes exact and/or near (got {unknown[0]!r})")
    if not 0 <= o.near_hamming <= 32:
        raise CurateError(f"--near-hamming must be in [0, 32] bits (got {o.near_hamming})")
    if not 0 <= o.near_color <= 2:
        raise CurateError(f"--near-color must be in [0, 2] (got {o.near_color})")
    if o.min_similarity is not None and not -1 <= o.min_similarity <= 1:
        raise CurateError(f"--min-similarity must be in [-1, 1] (got {o.min_similarity})")
    if o.keep_top is not None and not 0 < o.keep_top <= 1:
        raise CurateError(f"--keep-top must be in (0, 1] (got {o.keep_top})")
    if (o.min_similarity is not None or o.keep_top is not None) and not o.model:
        raise CurateError("--min-similarity and --keep-top need --model (a scorer)")
    for name in ("min_caption_words", "max_caption_words"):
        value = getattr(o, name)
        if value is not None and value < 0:
            raise CurateError(f"--{name.replace('_', '-')} must be >= 0 (got {value})")
    lo, hi = o.min_caption_words, o.max_caption_words
    if lo is not None and hi is not None and lo > hi:
        raise CurateError(f"--min-caption-words {lo} is above --max-caption-words {hi}")
    if o.decontaminate_captions and not o.decontaminate:
        raise CurateError("--decontaminate-captions needs --decontaminate EVAL_SHARDS")
    if o.device not in ("auto", "cpu", "cuda"):
        raise CurateError(f"--device must be auto, cpu or cuda (got {o.device!r})")
    if o.workers < 1 or o.score_batch < 1:
        raise CurateError("--workers and --score-batch must be >= 1")
    if not 0 <= o.part_index < o.num_parts:
        raise CurateError(f"rank {o.part_index} is not in [0, {o.num_parts})")
    if o.overwrite and o.num_parts > 1:  # each rank would clear what the others wrote
        raise CurateError(
            "--overwrite starts the subset over: run it with one rank (or remove --out first)"
        )
