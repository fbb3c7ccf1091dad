"""`LoaderConfig` (everything the loader needs; `umt.config` nests its user-facing part under
`data:`) and the loader's errors."""

from __future__ import annotations

from dataclasses import dataclass

TAILS = ("carry", "drop")
CAPTIONS = ("txt", "random")


class LoaderConfigError(ValueError):
    """A LoaderConfig field or a shard spec that cannot work; the message names it."""


class LoaderStateError(ValueError):
    """A saved loader state that does not fit this loader (other data, seed or order)."""


class LoaderDataError(RuntimeError):
    """The data cannot make a batch (every sample of a global batch undecodable); names the shards."""


@dataclass
class LoaderConfig:
    """What the streaming loader needs."""

    shards: str | list[str] = ""
    """Shard specs, comma-separated or a list. Each is `[name=]LOCATION[:WEIGHT]` where LOCATION is
    a shard folder (read through its manifest.json), a brace pattern such as
    `/d/cc3m/data-{000000..000099}.tar`, or one .tar. Several specs are one dataset in epoch mode;
    in resampled mode each is a source mixed by its WEIGHT (default 1), e.g.
    `coco=/d/coco:1,cc3m=/d/cc3m:4`."""
    batch_size: int = 32
    """Samples per micro-batch on one rank (b)."""
    grad_accum: int = 1
    """Micro-batches per rank per optimizer step (A): the global batch is b x A x ranks. Only the
    `drop` tail rule and `umt data order --global` need it."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    seed: int = 0
    """Seeds the order (shard permutation, window shuffles, resampled draws), crops and captions."""
    resampled: bool = False
    """Draw shards with replacement (weighted per source) instead of one pass over the data per epoch."""
    shuffle_window: int = 10_000
    """Samples are shuffled within windows of consecutive shards (of the epoch's shard permutation)
    holding at least this many samples: wider mixes more, and keeps more shards in use at once."""
    epoch_tail: str = "carry"
    """The samples of an epoch after its last full global batch: `carry` (they open the next
    global batch, which the next epoch completes: nothing lost, the order is independent of the
    batch size) or `drop` (unseen that epoch; every epoch starts on a step boundary)."""
    image_size: int = 224
    """Output image side in pixels."""
    max_text_len: int = 64
    """Tokens per caption, [CLS] and [SEP] included; batches are padded to their longest caption."""
    tokenizer: str | None = "bert-base-uncased"
    """Fast tokenizer: Hub name or local folder. None: no tokenisation (inspection)."""
    train: bool = True
    """Random-resized crop (train) or resize + center crop (eval)."""
    hflip: bool = False
    """Random horizontal flip in train mode; off because captions say "left" and "right"."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Train crop area range as a fraction of the image."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalisation mean (HF ViT default), applied on the device."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalisation std (HF ViT default)."""
    caption: str = "txt"
    """Training caption: "txt" (the sample's .txt, else its json "caption") or "random" (one of
    the json "captions", drawn from the sample's seed, so it changes per epoch)."""
    negatives: str | None = None
    """Json field of a sample's hard-negative captions (a string or a list, e.g. a column kept by
    `umt shard --save-additional-columns`): batches then carry one per sample, drawn by its seed,
    for ITM (NegCLIP-style). None: off."""
    cache_dir: str | None = None
    """Node-local folder for copies of remote (s3://, http(s)://) shards, shared by the node's
    ranks and workers; default $TMPDIR (or /tmp)/umt-shard-cache-UID."""
    cache_limit_gb: float = 0.0
    """Least recently used copies not in use are removed above this size; 0: 90% of the cache
    disk's free space at start."""
    remote_read: str = "cache"
    """Remote shards: `cache` (whole-shard copies in the node cache, fetched ahead) or `range`
    (one range request per sample, nothing on disk; needs the shards' index files)."""
    prefetch_rounds: int = 2
    """With `cache`: shards are fetched ahead for the rest of the current shuffle window, the
    next one, and N rounds more."""
    pin_memory: bool = False
    """Pin batches for asynchronous host-to-GPU copies."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    jpeg_draft: bool = True
    """Decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop is that much larger than image_size."""
    decode_images: bool = True
    """False: batches hold keys and captions only, no pixels or tokens (`umt data order`)."""

    def validate(self) -> None:
        """Raise LoaderConfigError naming the first field that cannot work."""
        if not self.shards:
            raise LoaderConfigError("data.shards is empty: give a shard folder or pattern")
        for name in ("batch_size", "grad_accum", "image_size", "max_text_len", "prefetch_factor"):
            if getattr(self, name) <= 0:
                raise LoaderConfigError(f"data.{name} must be > 0 (got {getattr(self, name)})")
        if self.num_workers < 0:
            raise LoaderConfigError(f"data.num_workers must be >= 0 (got {self.num_workers})")
        if self.shuffle_window < 1:
            raise LoaderConfigError(f"data.shuffle_window must be >= 1 (got {self.shuffle_window})")
        if self.epoch_tail not in TAILS:
            raise LoaderConfigError(
                f"data.epoch_tail must be carry or drop (got {self.epoch_tail!r})"
            )
        if self.remote_read not in ("cache", "range"):
            raise LoaderConfigError(
                f"data.remote_read must be cache or range (got {self.remote_read!r})"
            )
        if self.cache_limit_gb < 0 or self.prefetch_rounds < 0:
            raise LoaderConfigError("data.cache_limit_gb and data.prefetch_rounds must be >= 0")
        if self.caption not in CAPTIONS:
            raise LoaderConfigError(
                f"data.caption must be 'txt' or 'random' (got {self.caption!r})"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise LoaderConfigError(
                f"data.crop_scale must satisfy 0 < lo <= hi <= 1 (got {list(self.crop_scale)})"
            )

    @property
    def slots_per_rank(self) -> int:
        """Logical workers per rank: num_workers, or 1 when reading in the training process."""
        return max(1, self.num_workers)
