"""The sharder: plans, writes and resumes WebDataset shards, their manifest and error report.

How a run goes (`shard_dataset`):
1. read every row (`sources.read_source`), fingerprint rows + output-affecting options, and
   refuse an output folder that holds another run's shards;
2. plan shards up front: the seeded shuffle of the rows, cut into slices of at most `maxcount`
   samples. A sample's key is fixed by the plan (planned shard, slot), never by timing;
3. workers write whole planned shards: `{name}.tmp`, fsync, rename, then a done-record in
   `.umt-shard/done/{name}.json` with count, bytes, sha256 and the failures of its rows;
4. a shard that reaches `maxsize` closes early; its remaining rows roll over, in plan order, into
   overflow shards numbered after the planned ones (they depend only on processed bytes, which
   are deterministic);
5. manifest.json, sizes.json and errors.jsonl are rebuilt from the done-records, so a run killed
   at any moment and started again with the same arguments ends byte-identical to one that never
   stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline import shard_output, storage
from data_pipeline.loader.tar_index import INDEX_SUFFIX, TarIndex, index_location, write_index
from data_pipeline.sources import Row, SourceSpec, is_url, read_source

FORMAT_VERSION = 1
CREATED_BY = "umt shard"
STATE_DIR = ".umt-shard"  # run.json (fingerprint) and done/{shard}.json records
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
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so that shards are byte-reproducible
RETRY_HTTP_CODES = (408, 425, 429, 500, 502, 503, 504)
FAILPOINT_ENV = "UMT_SHARD_FAILPOINT"  # test hook: "{shard}:{samples}" or "{shard}:renamed"
_PROGRESS_EVERY = 16  # rows between progress messages from a worker
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
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
    retries: int = 2  # extra attempts after a timeout, connection error or HTTP 408/429/5xx
    max_download_bytes: int = 50 * 1024 * 1024
    # How the run goes, not what it writes (left out of the fingerprint and manifest args):
    workers: int = 1  # processes, each writing whole shards
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
_RUN_ONLY_FIELDS = (
    "workers", "download_threads", "num_parts", "part_index", "overwrite", "staging",
)  # fmt: skip


@dataclass
class ShardSummary:
    """What a run (or a merge) wrote; `line()` is the one-line report."""

    out: Path | str  # a folder, or the s3:// URL the run published to
    rows: int
    written: int
    failed: int
    failures: dict[str, int]
    samples: int
    shards: int
    resumed_shards: int = 0
    dropped_captions: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.failures.items())
        failed = f"{self.failed} failed" + (f" ({reasons})" if reasons else "")
        resumed = f", {self.resumed_shards} already done" if self.resumed_shards else ""
        return (
            f"{self.rows} rows: {self.written} written, {failed}; "
            f"{self.samples} samples in {self.shards} shards{resumed} -> {self.out}"
        )


class WorkItem(NamedTuple):
    """One row's place in the plan: its samples get keys (key_shard, first_slot + j)."""

    row: int  # index into the input's row list
    key_shard: int
    first_slot: int
    samples: int  # 0 for rows already known to fail (no usable caption, reader problem)


class ShardTask(NamedTuple):
    index: int
    name: str
    items: list[WorkItem]


@dataclass(frozen=True)
class KeyLayout:
    """Zero-padded digits of sample keys, fixed by the plan: `{shard}{slot}` without dots."""

    shard_digits: int
    slot_digits: int

    def key(self, shard: int, slot: int) -> str:
        return f"{shard:0{self.shard_digits}d}{slot:0{self.slot_digits}d}"


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


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


# --- plan ---------------------------------------------------------------------------------------


def clean_captions(captions: Iterable[str]) -> list[str]:
    """Captions stripped of surrounding whitespace; empty ones dropped."""
    return [text.strip() for text in captions if text.strip()]


def sample_count(row: Row, per: str) -> int:
    if row.problem is not None:
        return 0
    captions = clean_captions(row.captions)
    if not captions:
        return 0
    return len(captions) if per == "caption" else 1


def plan_shards(rows: list[Row], options: ShardOptions) -> list[list[WorkItem]]:
    """Rows (shuffled by `seed`) cut into shards of at most `maxcount` samples.

    A row is never split across shards; one row with more captions than `maxcount` fills a shard
    on its own. Rows that will fail anyway take no slot but still belong to a shard, so their
    failure is recorded by whoever writes that shard.
    """
    order = list(range(len(rows)))
    if options.seed is not None:
        random.Random(options.seed).shuffle(order)
    shards: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    used = 0
    for position in order:
        n = sample_count(rows[position], options.per)
        if current and n and used + n > options.maxcount:
            shards.append(current)
            current, used = [], 0
        current.append(WorkItem(position, len(shards), used, n))
        used += n
    if current:
        shards.append(current)
    return shards


def key_layout(plan: list[list[WorkItem]], maxcount: int) -> KeyLayout:
    most_slots = max([maxcount] + [item.first_slot + item.samples for s in plan for item in s])
    return KeyLayout(max(6, len(str(len(plan) - 1))), len(str(most_slots - 1)))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def cut_overflow(items: list[WorkItem], maxcount: int) -> list[list[WorkItem]]:
    """Rolled-over rows (keeping their keys) cut into shards of at most `maxcount` samples."""
    shards: list[list[WorkItem]] = []
    used = maxcount + 1
    for item in items:
        if used + item.samples > maxcount and item.samples:
            shards.append([])
            used = 0
        if not shards:
            shards.append([])
        shards[-1].append(item)
        used += item.samples
    return shards


# --- images -------------------------------------------------------------------------------------


def prepare_image(data: bytes, options: ShardOptions) -> StoredImage:
    """Check, resize and encode one image; raise `SampleError` with the reason it is unusable."""
    try:
        with warnings.catch_warnings():
            # Our own --max-pixels check below reports bombs; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:  # its message holds a memory address: not stable
        raise SampleError("corrupt_image", "not an image in a format PIL can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise SampleError("corrupt_image", f"not a readable image: {exc}") from exc
    with image:
        try:
            return convert_image(image, data, options)
        except SampleError:
            raise
        except Exception as exc:  # malformed files make PIL raise many unrelated types
            message = f"cannot process the image ({type(exc).__name__}: {exc})"
            raise SampleError("corrupt_image", message) from exc


def convert_image(image: Image.Image, data: bytes, options: ShardOptions) -> StoredImage:
    raw_w, raw_h = image.size
    if raw_w * raw_h > options.max_pixels:
        raise SampleError(
            "decompression_bomb",
            f"{raw_w}x{raw_h} = {raw_w * raw_h} pixels is over --max-pixels {options.max_pixels}",
        )
    orientation = exif_orientation(image)
    width, height = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    check_geometry(width, height, options)
    target = output_size(width, height, options)
    source_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format or "")
    copy_bytes = (
        options.skip_reencode
        and source_ext == options.image_format
        and target == (width, height)
        and orientation == 1
        and image.mode in ("RGB", "L")
    )
    scaled = scaled_size(width, height, options)
    if not copy_bytes and image.format == "JPEG" and scaled[0] * 2 <= width:
        # DCT-domain downscaling while decoding: several times faster than decoding at full size.
        request = (scaled[1], scaled[0]) if orientation in (5, 6, 7, 8) else scaled
        image.draft("RGB", request)
    load_pixels(image)
    if copy_bytes:
        return StoredImage(data, source_ext, width, height, width, height)
    pixels = to_rgb(image)
    if orientation != 1:
        pixels = pixels.transpose(_ORIENTATION_TRANSPOSE[orientation])
    pixels = resize_image(pixels, options)
    encoded = encode_image(pixels, options)
    return StoredImage(encoded, options.image_format, *pixels.size, width, height)


def exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not lose the image: ignore its orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def check_geometry(width: int, height: int, options: ShardOptions) -> None:
    if min(width, height) < max(options.min_size, 1):
        raise SampleError("too_small", f"{width}x{height} is below --min-size {options.min_size}")
    ratio = max(width, height) / min(width, height)
    if options.max_aspect_ratio is not None and ratio > options.max_aspect_ratio:
        raise SampleError(
            "bad_aspect_ratio",
            f"{width}x{height} has aspect ratio {ratio:.2f} > --max-aspect-ratio "
            f"{options.max_aspect_ratio}",
        )


def load_pixels(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise SampleError("decompression_bomb", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise SampleError("corrupt_image", f"cannot decode the image: {exc}") from exc


def scaled_size(width: int, height: int, options: ShardOptions) -> tuple[int, int]:
    """Size the image is resized to before any crop or padding."""
    size = options.image_size
    if options.resize == "none":
        return width, height
    short_side = options.resize in ("keep_ratio", "center_crop")
    scale = size / (min(width, height) if short_side else max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_size(width: int, height: int, options: ShardOptions) -> tuple[int, int]:
    if options.resize in ("center_crop", "border"):
        return options.image_size, options.image_size
    return scaled_size(width, height, options)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparent parts become white rather than whatever colour they hid."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize_image(image: Image.Image, options: ShardOptions) -> Image.Image:
    if options.resize == "none":
        return image
    width, height = image.size
    size = options.image_size
    if options.resize == "center_crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        return image.resize((size, size), resample_filter(side, size, options), box=box)
    scaled = scaled_size(width, height, options)
    if scaled != image.size:
        image = image.resize(scaled, resample_filter(width, scaled[0], options))
    if options.resize == "keep_ratio":
        return image
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - scaled[0]) // 2, (size - scaled[1]) // 2))
    return canvas


def resample_filter(source: int, target: int, options: ShardOptions) -> Image.Resampling:
    if target > source:
        return Image.Resampling.BICUBIC
    return RESAMPLE_FILTERS[options.resample]


def encode_image(image: Image.Image, options: ShardOptions) -> bytes:
    buffer = io.BytesIO()
    pil_format = IMAGE_FORMATS[options.image_format]
    if pil_format == "PNG":
        image.save(buffer, pil_format)
    else:
        image.save(buffer, pil_format, quality=options.quality)
    return buffer.getvalue()


# --- reading image bytes ------------------------------------------------------------------------


def fetch_image(image: str | bytes, options: ShardOptions) -> bytes:
    """The encoded image of a row: its bytes, a local file, or a download."""
    if isinstance(image, bytes):
        return image
    if is_url(image):
        return download(image, options)
    try:
        return Path(image).read_bytes()
    except FileNotFoundError as exc:
        raise SampleError("missing_file", f"{image}: no such file") from exc
    except OSError as exc:
        raise SampleError("unreadable_file", f"{image}: {exc.strerror or exc}") from exc


def download(url: str, options: ShardOptions) -> bytes:
    """GET `url` with a timeout, a size limit and retries on transient failures."""
    error = SampleError("download_error", f"{url}: not attempted")
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** (attempt - 1), 5.0))  # back off before a retry
        try:
            return download_once(url, options)
        except urllib.error.HTTPError as exc:
            error = SampleError(f"http_{exc.code}", f"{url}: HTTP {exc.code} {exc.reason}")
            if exc.code not in RETRY_HTTP_CODES:
                break
        except TimeoutError as exc:
            error = SampleError("timeout", f"{url}: no answer within {options.timeout_s} s ({exc})")
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                error = SampleError("timeout", f"{url}: no answer within {options.timeout_s} s")
            else:
                error = SampleError("download_error", f"{url}: {exc.reason}")
        except (HTTPException, OSError) as exc:
            error = SampleError("download_error", f"{url}: {type(exc).__name__}: {exc}")
    raise error


def download_once(url: str, options: ShardOptions) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "umt-shard/1"})
    limit = options.max_download_bytes
    with urllib.request.urlopen(request, timeout=options.timeout_s) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise SampleError("too_large", f"{url}: {declared} bytes > {limit} allowed")
        data = response.read(limit + 1)
    if len(data) > limit:
        raise SampleError("too_large", f"{url}: more than {limit} bytes")
    return data


def fetch_in_order(
    images: list[str | bytes], options: ShardOptions
) -> Iterator[bytes | SampleError]:
    """Bytes (or the error) of each image, in order, loaded by a bounded pool of threads.

    At most `2 * download_threads` loads are in flight, so memory stays bounded however large the
    shard; leaving early cancels what has not started.
    """

    def load(image: str | bytes) -> bytes | SampleError:
        try:
            return fetch_image(image, options)
        except SampleError as exc:
            return exc

    window = 2 * options.download_threads
    pool = ThreadPoolExecutor(options.download_threads, thread_name_prefix="umt-fetch")
    try:
        pending: deque = deque()
        upcoming = iter(images)
        for image in upcoming:
            pending.append(pool.submit(load, image))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- writing one shard --------------------------------------------------------------------------


@dataclass
class ShardJob:
    """Everything a worker needs to write one shard (pickled to the worker process)."""

    task: ShardTask
    rows: dict[int, Row]  # only this shard's rows
    out: Path
    options: ShardOptions
    layout: KeyLayout
    publish: str | None = None  # an s3:// output: each finished shard is published there


@dataclass
class ShardRecord:
    """The done-record of a shard, also the source of its manifest entry and errors."""

    name: str
    index: int
    count: int = 0  # samples
    bytes: int = 0
    sha256: str = ""
    rows: int = 0  # rows finished here (written + failed); rolled-over rows are not counted
    written: int = 0
    dropped_captions: int = 0
    failures: list[dict] = field(default_factory=list)
    overflow: list[WorkItem] = field(default_factory=list)  # rows rolled over (maxsize)


class TarMembers:
    """Appends files to a tar with fixed metadata, so equal content gives equal bytes."""

    def __init__(self, fileobj: io.BufferedWriter) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    @property
    def offset(self) -> int:
        return self.tar.offset

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def tar_size_after(offset: int, extra: int) -> int:
    """Size of the finished tar if `extra` member bytes are added at `offset`: two 512-byte end
    blocks, then padding to tarfile's 10240-byte records."""
    return -(-(offset + extra + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def member_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


def sample_members(
    row: Row, item: WorkItem, captions: list[str], stored: StoredImage, job: ShardJob
) -> list[tuple[str, bytes]]:
    """The tar members of every sample of one row: image, caption, metadata, per key."""
    per_caption = job.options.per == "caption"
    members: list[tuple[str, bytes]] = []
    for j, caption in enumerate(captions if per_caption else captions[:1]):
        key = job.layout.key(item.key_shard, item.first_slot + j)
        meta: dict[str, Any] = {
            "key": key,
            "image_key": row.image_key,
            "caption": caption,
            "captions": [caption] if per_caption else captions,
            "source": {"file": row.file, "row": row.index},
            "width": stored.width,
            "height": stored.height,
            "original_width": stored.original_width,
            "original_height": stored.original_height,
        }
        if per_caption:
            meta["caption_index"] = j
        meta.update(row.extra)
        members += [
            (f"{key}.{stored.ext}", stored.data),
            (f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
        ]
    return members


def failure_record(row: Row, error: SampleError, shard: str) -> dict:
    record: dict[str, Any] = {
        "source": {"file": row.file, "row": row.index},
        "reason": error.reason,
        "message": str(error),
        "shard": shard,
    }
    if isinstance(row.image, str) and row.image:
        record["image"] = row.image
    return record


def row_captions(row: Row) -> list[str]:
    if row.problem is not None:
        raise SampleError(row.problem.reason, row.problem.message)
    captions = clean_captions(row.captions)
    if not captions:
        what = "no captions" if not row.captions else "only empty or whitespace captions"
        raise SampleError("empty_caption", f"the image has {what}")
    return captions


def write_shard(job: ShardJob, report: Callable[[int, int], None]) -> ShardRecord:
    """Write one planned shard atomically and its done-record; `report(rows, failed)` as it goes."""
    task, options = job.task, job.options
    record = ShardRecord(task.name, task.index)
    final, temporary = job.out / task.name, job.out / f"{task.name}.tmp"
    # Rows planned with no samples fail on their captions before anything is fetched.
    fetchable = [item for item in task.items if item.samples]
    loaded = fetch_in_order([job.rows[item.row].image for item in fetchable], options)
    failpoint = os.environ.get(FAILPOINT_ENV, "")
    pending_report = [0, 0]
    index_entries: list[list] = []  # [key, offset, length] of each sample, for random access
    with open(temporary, "wb") as handle:
        tar = TarMembers(handle)
        for position, item in enumerate(task.items):
            row = job.rows[item.row]
            try:
                captions = row_captions(row)
                data = next(loaded)
                if isinstance(data, SampleError):
                    raise data
                stored = prepare_image(data, options)
            except SampleError as exc:
                record.failures.append(failure_record(row, exc, task.name))
                record.rows += 1
                pending_report = flush_report(report, pending_report, 1, 1)
                continue
            members = sample_members(row, item, captions, stored, job)
            size_after = tar_size_after(tar.offset, member_bytes(members))
            if options.maxsize and record.count and size_after > options.maxsize:
                record.overflow = list(task.items[position:])
                break
            for i in range(0, len(members), 3):  # each sample: image, caption, metadata
                index_entries.append([members[i][0].rsplit(".", 1)[0], tar.offset, 0])
                for name, data_bytes in members[i : i + 3]:
                    tar.add(name, data_bytes)
                index_entries[-1][2] = tar.offset - index_entries[-1][1]
            record.count += len(members) // 3
            record.rows += 1
            record.written += 1
            record.dropped_captions += len(row.captions) - len(captions)
            pending_report = flush_report(report, pending_report, 1, 0)
            trigger_failpoint(failpoint, f"{task.name}:{record.count}")
        loaded.close()
        tar.close()
        handle.flush()
        os.fsync(handle.fileno())
    report(*pending_report)
    if record.count == 0:
        temporary.unlink()  # a shard whose every row failed is not written
    else:
        os.replace(temporary, final)
        trigger_failpoint(failpoint, f"{task.name}:renamed")
        record.bytes = final.stat().st_size
        record.sha256 = file_sha256(final)
        keys, offsets, lengths = zip(*index_entries)
        index = TarIndex(task.name, record.bytes, keys, offsets, lengths)
        write_index(index, str(index_location(str(final))))
    write_json_atomic(done_path(job.out, task.name), record_to_json(record))
    if job.publish:  # tar, index, then the done-record: a record in the store means both are there
        if record.count:
            shard_output.publish(job.out, job.publish, task.name, keep_local=False)
            trigger_failpoint(failpoint, f"{task.name}:published")
            index_name = Path(index_location(task.name)).name
            shard_output.publish(job.out, job.publish, index_name, keep_local=False)
        done = done_path(job.out, task.name).relative_to(job.out)
        shard_output.publish(job.out, job.publish, str(done))
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def flush_report(
    report: Callable[[int, int], None], pending: list[int], rows: int, failed: int
) -> list[int]:
    pending = [pending[0] + rows, pending[1] + failed]
    if pending[0] >= _PROGRESS_EVERY:
        report(*pending)
        return [0, 0]
    return pending


def trigger_failpoint(failpoint: str, here: str) -> None:
    """Test hook: SIGKILL the whole process group (the run and its workers) at a set point."""
    if failpoint and failpoint == here:
        os.killpg(os.getpgrp(), signal.SIGKILL)


# --- done-records and state files ---------------------------------------------------------------


def done_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / "done" / f"{name}.json"


def record_to_json(record: ShardRecord) -> dict:
    data = asdict(record)
    data["overflow"] = [list(item) for item in record.overflow]
    return data


def load_done_record(out: Path, name: str, publish: str | None = None) -> ShardRecord | None:
    """The record of a finished shard, or None if the shard must be (re)written. The shard must
    be there with its size: in `out`, or in the store for a published run."""
    path = done_path(out, name)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data["overflow"] = [WorkItem(*item) for item in data["overflow"]]
    record = ShardRecord(**data)
    if record.count:
        if publish:
            size = shard_output.remote_size(publish, name)
        else:
            size = (out / name).stat().st_size if (out / name).is_file() else None
        if size != record.bytes:
            return None
    return record


def write_json_atomic(path: Path, data: Any, lines: bool = False) -> None:
    """Write JSON (or JSON Lines for a list with lines=True) under a temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in data)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- running shards in parallel -----------------------------------------------------------------

_progress_queue: Any = None  # set in each worker process by _init_worker


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent


def _report_to_parent(rows: int, failed: int) -> None:
    if rows or failed:
        _progress_queue.put((rows, failed))


def _write_shard_in_worker(job: ShardJob) -> ShardRecord:
    return write_shard(job, _report_to_parent)


class Progress:
    """A tqdm bar over rows with the failure count beside it (silent when disabled)."""

    def __init__(self, total: int, done: int, failed: int, enabled: bool) -> None:
        self.failed = failed
        self.bar = tqdm(
            total=total, initial=done, unit="row", disable=not enabled, dynamic_ncols=True
        )
        self.bar.set_postfix(failed=failed, refresh=False)

    def update(self, rows: int, failed: int) -> None:
        self.failed += failed
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def run_tasks(
    tasks: list[ShardTask],
    rows: list[Row],
    out: Path,
    options: ShardOptions,
    layout: KeyLayout,
    progress: Progress,
    publish: str | None = None,
) -> tuple[list[ShardRecord], int]:
    """Records of all tasks in task order, writing those not done yet; and how many were done."""
    records: dict[int, ShardRecord] = {}
    jobs: list[ShardJob] = []
    for task in tasks:
        record = load_done_record(out, task.name, publish)
        if record is not None:
            records[task.index] = record
            progress.update(record.rows, len(record.failures))
            continue
        job_rows = {item.row: rows[item.row] for item in task.items}
        jobs.append(ShardJob(task, job_rows, out, options, layout, publish))
    resumed = len(records)
    if options.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            records[job.task.index] = write_shard(job, progress.update)
    else:
        for record in write_in_processes(jobs, options.workers, progress):
            records[record.index] = record
    return [records[task.index] for task in tasks], resumed


def write_in_processes(
    jobs: list[ShardJob], workers: int, progress: Progress
) -> Iterator[ShardRecord]:
    # spawn, not fork: the parent may hold threads (tqdm's monitor, the caller's), and a forked
    # child inheriting a held lock hangs.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress_queue,),
    )
    try:
        pending = {pool.submit(_write_shard_in_worker, job) for job in jobs}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain_progress(progress_queue, progress)
            for future in finished:
                yield future.result()
        drain_progress(progress_queue, progress)
    except BaseException:
        # Ctrl-C or a failed shard: stop at once rather than finish every queued shard. A shard
        # cut short is only a temporary file, rewritten by the next run.
        stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def drain_progress(progress_queue: Any, progress: Progress) -> None:
    while True:
        try:
            rows, failed = progress_queue.get_nowait()
        except queue.Empty:
            return
        progress.update(rows, failed)


# --- the output folder --------------------------------------------------------------------------


def run_identity(
    rows: list[Row], source_format: str, input_path: Path, options: ShardOptions
) -> dict:
    """What makes two runs the same: the rows read and every option that changes the output."""
    digest = hashlib.sha256()
    for row in rows:
        image = row.image if isinstance(row.image, bytes) else row.image.encode("utf-8", "replace")
        fields_ = [row.file, str(row.index), row.image_key, *row.captions, *row.extra]
        digest.update(json.dumps(fields_, ensure_ascii=True).encode() + b"\0")
        digest.update(hashlib.sha256(image).digest())
        digest.update((row.problem.reason if row.problem else "").encode() + b"\n")
    args = {k: v for k, v in asdict(options).items() if k not in _RUN_ONLY_FIELDS}
    args = json.loads(json.dumps(args))  # as run.json reads back (tuples become lists)
    return {
        "input": {
            "path": str(input_path),
            "format": source_format,
            "rows": len(rows),
            "rows_sha256": digest.hexdigest(),
        },
        "args": args,
    }


def prepare_output(
    out: Path, identity: dict, options: ShardOptions, publish: str | None = None
) -> None:
    """Create `out`, or check that it holds this same run; refuse anything else. For a published
    run, `out` is the staging folder and the store's state decides (pulled into it first)."""
    run_file = out / STATE_DIR / "run.json"
    if options.overwrite:
        clear_output(out, options.prefix)
        if publish:
            shard_output.clear(publish, options.prefix)
    if publish:
        shard_output.pull_state(publish, out)
    if run_file.is_file():
        existing = json.loads(run_file.read_text(encoding="utf-8"))
        differences = identity_differences(existing, identity)
        if differences:
            raise OtherRunError(publish or out, differences)
        return
    foreign = (
        shard_output.foreign_outputs(publish, options.prefix)
        if publish
        else out.is_dir()
        and (any(out.glob(f"{options.prefix}-*.tar")) or any(out.glob("manifest*.json")))
    )
    if foreign:
        raise ShardError(
            f"{publish or out} already holds shards or a manifest that this command did not make "
            f"(no {STATE_DIR}/run.json); pass --overwrite to replace them, or choose another --out"
        )
    write_json_atomic(run_file, identity)
    if publish:
        shard_output.publish(out, publish, f"{STATE_DIR}/run.json")


def identity_differences(old: dict, new: dict) -> list[str]:
    differences = []
    old_input, new_input = old.get("input", {}), new["input"]
    if old_input.get("rows_sha256") != new_input["rows_sha256"]:
        differences.append(
            f"input differs: {old_input.get('path')} had {old_input.get('rows')} rows, "
            f"{new_input['path']} has {new_input['rows']} rows with other content"
        )
    for name, value in new["args"].items():
        before = old.get("args", {}).get(name)
        if before != value:
            differences.append(f"--{name.replace('_', '-')} was {before}, now {value}")
    return differences


def clear_output(out: Path, prefix: str) -> None:
    """Delete what a run writes in `out` (shards, temporaries, manifests, state), nothing else."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    patterns = (
        f"{prefix}-*.tar",
        f"{prefix}-*.tar.tmp",
        f"{prefix}-*{INDEX_SUFFIX}",
        "manifest*.json",
        "sizes.json",
        "errors*.jsonl",
    )
    for pattern in patterns:
        for path in out.glob(pattern):
            path.unlink()


# --- manifest, sizes, errors --------------------------------------------------------------------


def part_suffix(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


@dataclass
class Tally:
    """What finished shards add up to: their manifest entries and row counts."""

    shards: list[dict] = field(default_factory=list)  # {"name", "count", "bytes", "sha256"}
    rows: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> rows
    dropped_captions: int = 0

    def add_records(self, records: Iterable[ShardRecord]) -> None:
        for r in records:
            if r.count:
                self.shards.append(
                    {"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256}
                )
            self.rows += r.rows
            self.failures.update(failure["reason"] for failure in r.failures)
            self.dropped_captions += r.dropped_captions


def build_manifest(identity: dict, prefix: str, tally: Tally) -> dict:
    """The manifest: shards sorted by name, totals that add up, failure counts by reason."""
    failed = sum(tally.failures.values())
    shards = sorted(tally.shards, key=lambda shard: shard["name"])
    return {
        "format_version": FORMAT_VERSION,
        "created_by": CREATED_BY,
        "prefix": prefix,
        "shards": shards,
        "total_samples": sum(shard["count"] for shard in shards),
        "rows": tally.rows,
        "written": tally.rows - failed,
        "failed": failed,
        "failures": dict(sorted(tally.failures.items())),
        "dropped_captions": tally.dropped_captions,
        "per_mode": identity["args"]["per"],
        "image_format": identity["args"]["image_format"],
        "input": identity["input"],
        "args": identity["args"],
    }


def write_outputs(
    out: Path, manifest: dict, errors: list[dict], suffix: str | None, publish: str | None = None
) -> None:
    """manifest.json, sizes.json and errors.jsonl (or a part's manifest-{suffix}.json and errors);
    published in that order, the manifest last, for an s3:// output."""
    if suffix is None:
        names = ["errors.jsonl", "sizes.json", "manifest.json"]  # last: its presence means complete
        write_json_atomic(out / names[0], errors, lines=True)
        sizes = {shard["name"]: shard["count"] for shard in manifest["shards"]}
        write_json_atomic(out / names[1], sizes)
        write_json_atomic(out / names[2], manifest)
    else:
        names = [f"errors-{suffix}.jsonl", f"manifest-{suffix}.json"]
        write_json_atomic(out / names[0], errors, lines=True)
        write_json_atomic(out / names[1], manifest)
    for name in names if publish else ():
        shard_output.publish(out, publish, name)


def summary_from_manifest(out: Path | str, manifest: dict, resumed: int = 0) -> ShardSummary:
    return ShardSummary(
        out=out,
        rows=manifest["rows"],
        written=manifest["written"],
        failed=manifest["failed"],
        failures=dict(manifest["failures"]),
        samples=manifest["total_samples"],
        shards=len(manifest["shards"]),
        resumed_shards=resumed,
        dropped_captions=manifest["dropped_captions"],
    )


# --- the whole run ------------------------------------------------------------------------------


def shard_dataset(
    input_path: str | Path,
    out: str | Path,
    options: ShardOptions | None = None,
    progress: bool = False,
) -> ShardSummary:
    """Shard `input_path` into `out` (resuming a previous run of the same arguments)."""
    options = options or ShardOptions()
    validate_options(options)
    publish = str(out).rstrip("/") if storage.is_remote(str(out)) else None
    if publish and storage.scheme(publish) != "s3":
        raise ShardError(f"--out {out}: shards can be written to local folders and s3:// only")
    part = f"#part{options.part_index}-of-{options.num_parts}" if options.num_parts > 1 else ""
    staging = options.staging or (
        shard_output.default_staging(publish + part) if publish else None
    )  # a staging folder per part: tasks of a job array may share a node
    input_path, out = Path(input_path), Path(staging or out)
    spec = SourceSpec(
        path=input_path,
        format=options.format_in,
        image_col=options.image_col,
        caption_col=options.caption_col,
        image_root=Path(options.image_root) if options.image_root else None,
        split=options.split,
        extra_cols=tuple(options.save_additional_columns),
    )
    source = read_source(spec)
    identity = run_identity(source.rows, source.format, input_path, options)
    prepare_output(out, identity, options, publish)
    plan = plan_shards(source.rows, options)
    layout = key_layout(plan, options.maxcount)
    parts, part = options.num_parts, options.part_index
    tasks = [
        ShardTask(index, shard_name(options.prefix, index), items)
        for index, items in enumerate(plan)
        if index % parts == part
    ]
    total_rows = sum(len(task.items) for task in tasks)
    bar = Progress(total_rows, 0, 0, progress)
    try:
        records, resumed = run_all(
            tasks, source.rows, out, options, layout, bar, len(plan), publish
        )
    finally:
        bar.close()
    tally = Tally()
    tally.add_records(records)
    manifest = build_manifest(identity, options.prefix, tally)
    errors = [f for record in sorted(records, key=lambda r: r.name) for f in record.failures]
    suffix = None
    if parts > 1:
        suffix = part_suffix(part, parts)
        manifest["part"] = {"index": part, "count": parts}
    write_outputs(out, manifest, errors, suffix, publish)
    return summary_from_manifest(publish or out, manifest, resumed)


def run_all(
    tasks: list[ShardTask],
    rows: list[Row],
    out: Path,
    options: ShardOptions,
    layout: KeyLayout,
    progress: Progress,
    planned: int,
    publish: str | None = None,
) -> tuple[list[ShardRecord], int]:
    """Planned shards, then rounds of overflow shards until no row rolls over.

    Overflow shards of part i of p are numbered planned + i, planned + i + p, ... so parts
    never collide, and a single part numbers them contiguously.
    """
    all_records: list[ShardRecord] = []
    resumed_total = 0
    next_overflow = 0
    while tasks:
        records, resumed = run_tasks(tasks, rows, out, options, layout, progress, publish)
        all_records += records
        resumed_total += resumed
        rolled = [item for record in records for item in record.overflow]
        tasks = []
        for items in cut_overflow(rolled, options.maxcount):
            index = planned + options.part_index + options.num_parts * next_overflow
            tasks.append(ShardTask(index, shard_name(options.prefix, index), items))
            next_overflow += 1
    return all_records, resumed_total


def merge_parts(inputs: list[str | Path], out: str | Path) -> ShardSummary:
    """Join the part manifests of a sliced run (folders or manifest files, local or s3://) into
    `out` (a folder, or an s3:// prefix where the parts were published)."""
    publish = str(out).rstrip("/") if storage.is_remote(str(out)) else None
    local_out = shard_output.default_staging(publish) if publish else Path(out)
    manifests = find_part_manifests([str(p) for p in inputs])
    first = manifests[0][1]
    count = first["part"]["count"]
    by_index: dict[int, tuple[str, dict]] = {}
    for path, manifest in manifests:
        if manifest["input"] != first["input"] or manifest["args"] != first["args"]:
            raise ShardError(f"{path} belongs to another run than {manifests[0][0]}: cannot merge")
        if manifest["part"]["count"] != count:
            raise ShardError(f"{path} is one of {manifest['part']['count']} parts, not {count}")
        index = manifest["part"]["index"]
        if index in by_index:
            raise ShardError(f"part {index} is given twice: {by_index[index][0]} and {path}")
        by_index[index] = (path, manifest)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ShardError(f"parts {missing} of {count} are missing (not finished, or not given)")
    tally, errors = Tally(), []
    for index in range(count):
        path, manifest = by_index[index]
        tally.shards += part_shards(path, manifest, publish or str(local_out))
        tally.rows += manifest["rows"]
        tally.failures.update(manifest["failures"])
        tally.dropped_captions += manifest["dropped_captions"]
        errors_file = storage.join(
            storage.parent(path), f"errors-{part_suffix(index, count)}.jsonl"
        )
        errors += [json.loads(line) for line in storage.read_text(errors_file).splitlines()]
    local_out.mkdir(parents=True, exist_ok=True)
    identity = {"input": first["input"], "args": first["args"]}
    merged = build_manifest(identity, first["prefix"], tally)
    errors.sort(key=lambda failure: failure["shard"])  # stable: keeps each shard's row order
    write_outputs(local_out, merged, errors, None, publish)
    return summary_from_manifest(publish or local_out, merged)


def find_part_manifests(inputs: list[str]) -> list[tuple[str, dict]]:
    paths: list[str] = []
    for item in inputs:
        if storage.is_remote(item) and not item.endswith(".json"):
            names = storage.list_names(item)
            paths += [storage.join(item.rstrip("/"), n) for n in names if _PART_MANIFEST.match(n)]
        elif storage.is_remote(item) or os.path.isfile(item):
            paths.append(item)
        elif os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).glob("manifest-part-*-of-*.json"))
        else:
            raise ShardError(f"{item} does not exist")
    if not paths:
        raise ShardError(
            f"no part manifests (manifest-part-*-of-*.json) in {', '.join(map(str, inputs))}"
        )
    manifests = []
    for path in paths:
        manifest = json.loads(storage.read_text(path))
        if manifest.get("format_version") != FORMAT_VERSION or "part" not in manifest:
            raise ShardError(
                f"{path} is not a part manifest of umt shard (format {FORMAT_VERSION})"
            )
        manifests.append((path, manifest))
    return manifests


_PART_MANIFEST = re.compile(r"^manifest-part-\d+-of-\d+\.json$")


def part_shards(path: str, manifest: dict, out: str) -> list[dict]:
    """A part's shard entries, named relative to `out`; each file must exist with its size."""
    shards = []
    folder = storage.parent(path)
    for shard in manifest["shards"]:
        location = storage.join(folder, shard["name"])
        try:
            size = storage.size(location)
        except (storage.StorageError, OSError):
            size = None
        if size != shard["bytes"]:
            raise ShardError(f"{location} is missing or not the size its manifest says")
        if storage.is_remote(out) or storage.is_remote(folder):
            if folder.rstrip("/") != out.rstrip("/"):
                raise ShardError(f"{location}: parts in a store are merged where they are ({out})")
            name = shard["name"]
        else:
            same_folder = Path(folder).resolve() == Path(out).resolve()
            name = shard["name"] if same_folder else os.path.relpath(location, out)
        shards.append({**shard, "name": name})
    return shards
