"""Options of `umt shard`, their checks, and the errors a run or a row can end with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

RESIZE_MODES = ("none", "keep_ratio", "center_crop", "border")


IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


PER_MODES = ("image", "caption")


# Downscaling filters. "area" (box) averages the source pixels under each output pixel, like
# OpenCV's INTER_AREA that img2dataset uses; it is 2-3x faster than bicubic in Pillow.
# Upscaling always uses bicubic: a box filter would only replicate pixels.
RESAMPLE_FILTERS = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ShardError(Exception):
    """A run that cannot start or finish; the message says what to change."""


class OtherRunError(ShardError):
    """The output folder holds shards of a run with other input or options (`differences`)."""

    def __init__(self, out: Path | str, differences: list[str]):
        self.out, self.differences = out, differences
        super().__init__(
            f"{out} already holds shards of a different run ({'; '.join(differences)}); "
            "pass --overwrite to start over, or choose another --out"
        )


class SampleError(Exception):
    """One row rejected: `reason` is a short stable code, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ShardOptions:
    """Every option of `umt shard`; all but the last group decide the bytes that are written."""

    format_in: str | None = None  # csv|tsv|jsonl|parquet|coco|karpathy|folder; None: detect
    image_col: str | None = None  # table column with the image path/URL (bytes in Parquet)
    caption_col: str | None = None  # table column with the caption (or a list of captions)
    image_root: str | None = None  # relative image paths resolve here (default: input's folder)
    split: str = "train"  # Karpathy split; restval counts as train
    per: str = "image"  # "image": one sample per image; "caption": one per caption
    save_additional_columns: tuple[str, ...] = ()  # table columns copied into each sample's json
    resize: str = "keep_ratio"  # none|keep_ratio (short side)|center_crop|border (long side, pad)
    image_size: int = 256  # pixels
    no_upscale: bool = False  # an image smaller than --image-size keeps its size (not enlarged)
    resample: str = "area"  # downscaling filter: area|bilinear|bicubic|lanczos
    image_format: str = "jpg"  # jpg|png|webp
    quality: int = 95  # jpg/webp encoder quality
    skip_reencode: bool = False  # copy the input bytes when already in the target format and size
    min_size: int = 0  # reject images whose short side is below this (pixels, original)
    max_aspect_ratio: float | None = None  # reject images longer than this ratio (long/short)
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # decompression-bomb guard (w*h)
    maxcount: int = 10_000  # samples per shard
    maxsize: int | None = None  # bytes per shard; a full shard closes early and rows roll over
    seed: int | None = None  # deterministic pre-shuffle of rows; None keeps input order
    prefix: str = "data"  # shards are {prefix}-{NNNNNN}.tar
    timeout_s: float = 10.0  # per network operation of a download
    download_deadline_s: float = 60.0  # a whole download, however slowly its bytes come
    retries: int = 2  # extra attempts after a timeout, connection error or HTTP 408/429/5xx
    max_download_bytes: int = 50 * 1024 * 1024
    # How the run goes, not what it writes (left out of the fingerprint and manifest args):
    workers: int = 1  # processes (this one and workers - 1 started), each writing whole shards
    download_threads: int = 16  # concurrent downloads per worker
    num_parts: int = 1  # slices of the plan, e.g. a Slurm job array
    part_index: int = 0
    overwrite: bool = False
    staging: str | None = None  # with --out s3://...: local folder shards are written in first


# Fields every sample's json has; --save-additional-columns adds others beside them.
RESERVED_JSON_FIELDS = (
    "key", "image_key", "caption", "captions", "caption_index", "source",
    "width", "height", "original_width", "original_height",
)  # fmt: skip


RUN_ONLY_FIELDS = (
    "workers", "download_threads", "num_parts", "part_index", "overwrite", "staging",
)  # fmt: skip


def validate_options(options: ShardOptions) -> None:
    """Raise `ShardError` for the first option out of range, naming the flag and the value."""
    o = options
    prefix_ok = bool(o.prefix) and not set(o.prefix) & set("./\\")
    problems = [
        (o.per not in PER_MODES, f"--per must be one of {', '.join(PER_MODES)} (got {o.per!r})"),
        (
            o.resize not in RESIZE_MODES,
            f"--resize must be one of {', '.join(RESIZE_MODES)} (got {o.resize!r})",
        ),
        (
            o.resample not in RESAMPLE_FILTERS,
            f"--resample must be one of {', '.join(RESAMPLE_FILTERS)} (got {o.resample!r})",
        ),
        (
            o.image_format not in IMAGE_FORMATS,
            f"--format must be one of {', '.join(IMAGE_FORMATS)} (got {o.image_format!r})",
        ),
        (o.image_size <= 0, f"--image-size must be > 0 (got {o.image_size})"),
        (not 1 <= o.quality <= 100, f"--quality must be in 1..100 (got {o.quality})"),
        (o.maxcount <= 0, f"--maxcount must be > 0 (got {o.maxcount})"),
        (o.maxsize is not None and o.maxsize <= 0, f"--maxsize must be > 0 (got {o.maxsize})"),
        (
            o.max_aspect_ratio is not None and o.max_aspect_ratio < 1,
            f"--max-aspect-ratio must be >= 1 (got {o.max_aspect_ratio})",
        ),
        (o.max_pixels <= 0, f"--max-pixels must be > 0 (got {o.max_pixels})"),
        (o.workers <= 0, f"--workers must be > 0 (got {o.workers})"),
        (o.download_threads <= 0, f"--download-threads must be > 0 (got {o.download_threads})"),
        (o.retries < 0, f"--retries must be >= 0 (got {o.retries})"),
        (o.timeout_s <= 0, f"--timeout must be > 0 (got {o.timeout_s})"),
        (
            o.download_deadline_s <= 0,
            f"--download-deadline must be > 0 (got {o.download_deadline_s})",
        ),
        (o.num_parts <= 0, f"--num-parts must be > 0 (got {o.num_parts})"),
        (
            not 0 <= o.part_index < o.num_parts,
            f"--part-index must be in 0..{o.num_parts - 1} (got {o.part_index})",
        ),
        (not prefix_ok, f"--prefix must be non-empty, without dots or slashes (got {o.prefix!r})"),
        (
            bool(reserved := set(o.save_additional_columns) & set(RESERVED_JSON_FIELDS)),
            f"--save-additional-columns cannot replace the sample json's own fields "
            f"({', '.join(sorted(reserved)) if reserved else ''}); rename those columns",
        ),
        (
            o.overwrite and o.num_parts > 1,
            "--overwrite cannot be combined with --num-parts > 1 (parts would delete each "
            "other's shards); empty the folder first",
        ),
    ]
    for failed, message in problems:
        if failed:
            raise ShardError(message)
