"""Streaming WebDataset loader: deterministic, resumable batches for any number of ranks and workers.

The stages, each a function below:

    resolve_sources   shard specs -> shards with sample counts (manifest.json / sizes.json)
    plan_epoch        permute shards from (seed, epoch), split them to ranks x workers
    read_tar_samples  one tar -> raw samples (image bytes, caption, meta), errors counted
    epoch_stream /    one worker's raw stream: its shards (epoch mode) or weighted draws with
    resampled_stream  replacement (resampled mode), through a seeded shuffle buffer
    decode_sample     raw sample -> (image_size, image_size, 3) uint8 + caption
    collate_batch     samples -> Batch (normalised pixels, one tokenizer call per batch)

Contracts (tested under torchrun with 2 ranks x 2 workers):

* Every worker of every rank yields exactly `batches_per_worker` batches per epoch, computed from
  the manifest counts, so every rank yields `batches_per_epoch` batches and no rank hangs in a
  collective waiting for another. Uneven shares are equalised by `on_uneven`:
  "pad" (default): the count is ceil(largest worker share / batch_size); a worker that runs out
  repeats its own stream from its start (a few samples seen twice per epoch, none missing);
  "drop": the count is floor(smallest worker share / batch_size); each worker stops there
  (a few samples unseen per epoch, none twice). A worker left short by corrupt samples also
  repeats its own stream, under both rules.
* Batch i of an epoch on a rank comes from logical worker i % K (torch's DataLoader returns
  IterableDataset worker outputs round-robin, in order). Each batch carries its worker and that
  worker's raw-stream position, so `state_dict()` knows exactly how far every worker got; a
  resumed loader rotates its workers so the next batch comes first and each worker discards its
  consumed raw samples before decode (cheap). The result: a run stopped after batch k and resumed
  yields exactly the batches k+1... of the uninterrupted run.
* Resuming with a different world size or worker count is refused (`LoaderStateError` names both
  topologies); start the next epoch fresh instead (`build_loader(..., epoch=E + 1)`).
* All randomness comes from `random.Random` seeded with strings of (seed, epoch, rank, worker,
  sample key): never from pid, time or `hash()`.

Iteration is infinite: the loader advances the epoch itself and records it in its state, since
the trainer counts steps. `one_epoch()` yields the rest of the current epoch (evaluation).
Resampled mode has no natural epoch: one is nominally the data's size, total_samples //
(world_size x workers x batch_size) batches per worker (at least 1), and each epoch reseeds the
draws; its state and resume work as in epoch mode.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import os
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.transforms import (
    ImageTransformConfig,
    load_tokenizer,
    normalize_pixels,
    stack_images,
    tokenize_batch,
    transform_image,
)
from umt.objectives.contrastive import key_ids

STATE_FORMAT_VERSION = 1
MANIFEST_FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class LoaderConfigError(ValueError):
    """A LoaderConfig field or a shard spec that cannot work; the message names it."""


class LoaderStateError(ValueError):
    """A saved loader state that does not fit this loader (other topology, data or seed)."""


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class LoaderConfig:
    """Everything the streaming loader needs; `umt.config` nests it under `data:`."""

    shards: str | list[str] = ""
    """Shard specs, comma-separated or a list. Each is `[name=]LOCATION[:WEIGHT]` where LOCATION is
    a shard folder (read through its manifest.json), a brace pattern such as
    `/d/cc3m/data-{000000..000099}.tar`, or one .tar. Several specs are one dataset in epoch mode;
    in resampled mode each is a source mixed by its WEIGHT (default 1), e.g.
    `coco=/d/coco:1,cc3m=/d/cc3m:4`."""
    batch_size: int = 32
    """Samples per batch on one rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    seed: int = 0
    """Seeds shard order, shuffle buffers, crops and caption choice."""
    resampled: bool = False
    """Draw shards with replacement (weighted per source) instead of one pass per epoch."""
    shuffle_buffer: int = 1000
    """Raw samples (encoded bytes, ~100 KB each for web images) held per worker for shuffling."""
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
    """Per-channel normalisation mean (HF ViT default)."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalisation std (HF ViT default)."""
    caption: str = "txt"
    """Training caption: "txt" (the sample's .txt, else its json "caption") or "random" (one of
    the json "captions", drawn from the sample's seed, so it changes per epoch)."""
    negatives: str | None = None
    """Json field of a sample's hard-negative captions (a string or a list, e.g. a column kept by
    `umt shard --save-additional-columns`): batches then carry one per sample, drawn by its seed,
    for ITM (NegCLIP-style). None: off."""
    on_uneven: str = "pad"
    """Equalise batch counts across ranks and workers: "pad" (repeat) or "drop" (tail unseen)."""
    persistent_workers: bool = True
    """Keep worker processes across epochs (the epoch reaches them through shared memory)."""
    pin_memory: bool = False
    """Pin batches for faster host-to-GPU copies."""
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
        for name in ("batch_size", "image_size", "max_text_len", "prefetch_factor"):
            if getattr(self, name) <= 0:
                raise LoaderConfigError(f"data.{name} must be > 0 (got {getattr(self, name)})")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise LoaderConfigError(f"data.{name} must be >= 0 (got {getattr(self, name)})")
        if self.on_uneven not in ("pad", "drop"):
            raise LoaderConfigError(
                f"data.on_uneven must be 'pad' or 'drop' (got {self.on_uneven!r})"
            )
        if self.caption not in ("txt", "random"):
            raise LoaderConfigError(
                f"data.caption must be 'txt' or 'random' (got {self.caption!r})"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise LoaderConfigError(
                f"data.crop_scale must satisfy 0 < lo <= hi <= 1 (got {self.crop_scale})"
            )

    @property
    def slots_per_rank(self) -> int:
        """Logical workers per rank: num_workers, or 1 when reading in the training process."""
        return max(1, self.num_workers)


# --------------------------------------------------------------------------------------------
# Shard specs -> sources with counts


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples, from the manifest (or counted)


@dataclass(frozen=True)
class Source:
    name: str
    shards: tuple[Shard, ...]
    weight: float

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class SourceSpec:
    name: str | None
    location: str
    weight: float | None


_NAME = re.compile(r"^([A-Za-z_][\w.-]*)=(.+)$")
_WEIGHT = re.compile(r"^(.+):(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def split_top_level_commas(text: str) -> list[str]:
    """Split on commas outside braces: `a-{0,1}.tar,b` -> [`a-{0,1}.tar`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_source_specs(shards: str | list[str]) -> list[SourceSpec]:
    """`[name=]LOCATION[:WEIGHT]` entries, from a comma-separated string or a list of them."""
    entries = split_top_level_commas(shards) if isinstance(shards, str) else list(shards)
    specs = []
    for entry in entries:
        name, rest = None, entry.strip()
        if m := _NAME.match(rest):
            name, rest = m.group(1), m.group(2)
        weight = None
        if (m := _WEIGHT.match(rest)) and not Path(rest).exists():
            rest, weight = m.group(1), float(m.group(2))
            if weight <= 0:
                raise LoaderConfigError(f"data.shards: weight must be > 0 in {entry!r}")
        specs.append(SourceSpec(name, rest, weight))
    return specs


def expand_braces(pattern: str) -> list[str]:
    """`x-{000..002}.tar` -> x-000.tar, x-001.tar, x-002.tar; `{a,b}` lists too; nested left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if r := _RANGE.match(body):
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def read_shard_counts(folder: Path) -> dict[str, int] | None:
    """{shard file name: samples} from `folder/manifest.json`, else `folder/sizes.json`, else None."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            version = data.get("format_version")
            if version != MANIFEST_FORMAT_VERSION:
                raise LoaderConfigError(
                    f"{manifest}: format_version {version!r} is not supported "
                    f"(this loader reads {MANIFEST_FORMAT_VERSION})"
                )
            return {s["name"]: int(s["count"]) for s in data["shards"]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise LoaderConfigError(f"{manifest} is not a shard manifest: {exc!r}") from exc
    sizes = folder / "sizes.json"
    if sizes.is_file():
        try:
            return {name: int(n) for name, n in json.loads(sizes.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise LoaderConfigError(f"{sizes} is not a {{name: count}} map: {exc!r}") from exc
    return None


def count_tar_samples(path: str) -> int:
    """Samples in a tar without a manifest: distinct keys among its members (headers only, seeks)."""
    keys = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    keys.add(split_member_name(info.name)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated tar counts what it holds; the reader reports it
    return len(keys)


def resolve_source(spec: SourceSpec, index: int) -> Source:
    """One spec -> its shards with sample counts. A folder needs a manifest; a pattern uses one if beside it.

    Shards named by a pattern without manifest.json or sizes.json beside them are counted by
    reading their tar headers (a seek per member: fine for hundreds of local shards, slow for
    many thousands; write a manifest with `umt shard` then).
    """
    location = os.path.expanduser(spec.location)
    if os.path.isdir(location):
        folder = Path(location)
        counts = read_shard_counts(folder)
        if counts is None:
            raise LoaderConfigError(
                f"data.shards: {folder} has no manifest.json or sizes.json; write one with "
                f"`umt shard`, or name the shards with a pattern like {folder}/data-{{000000..000009}}.tar"
            )
        paths = [str(folder / name) for name in counts]
        default_name = folder.name
    else:
        paths = expand_braces(location)
        default_name = Path(paths[0]).parent.name or f"source{index}"
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise LoaderConfigError(
            f"data.shards: {len(missing)} of {len(paths)} shards of {spec.location!r} do not exist "
            f"(first: {missing[0]})"
        )
    folder_counts: dict[Path, dict[str, int] | None] = {}
    shards = []
    for p in paths:
        folder = Path(p).parent
        if folder not in folder_counts:
            folder_counts[folder] = read_shard_counts(folder)
        known = folder_counts[folder] or {}
        count = known[Path(p).name] if Path(p).name in known else count_tar_samples(p)
        shards.append(Shard(p, count))
    return Source(spec.name or default_name, tuple(shards), spec.weight or 1.0)


def resolve_sources(shards: str | list[str], resampled: bool) -> tuple[Source, ...]:
    """All specs -> sources; weights only mean something in resampled mode."""
    specs = parse_source_specs(shards)
    if not specs:
        raise LoaderConfigError("data.shards is empty: give a shard folder or pattern")
    if not resampled and (weighted := [s for s in specs if s.weight is not None]):
        raise LoaderConfigError(
            f"data.shards: a weight (':{weighted[0].weight:g}' on {weighted[0].location!r}) only "
            "applies with resampled=True (--resampled); epoch mode reads every shard once"
        )
    sources = [resolve_source(spec, i) for i, spec in enumerate(specs)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):  # two folders named `train`: keep them apart
        sources = [replace(s, name=f"{s.name}{i}") for i, s in enumerate(sources)]
    return tuple(sources)


def sources_digest(sources: tuple[Source, ...]) -> str:
    """Short hash of shard names, counts and weights: a resumed state must see the same data."""
    listing = [
        (s.name, s.weight, [(Path(sh.path).name, sh.count) for sh in s.shards]) for s in sources
    ]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The epoch plan: which shards each (rank, worker) reads and how many batches it yields


@dataclass(frozen=True)
class EpochPlan:
    slot_shards: tuple[tuple[Shard, ...], ...]  # per slot = rank * K + worker; empty if resampled
    batches_per_worker: int


def permute_shards(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    """The epoch's shard order: one permutation from (seed, epoch), the same on every rank."""
    order = list(shards)
    random.Random(f"umt-shards/{seed}/{epoch}").shuffle(order)
    return order


def split_shards(permuted: list[Shard], num_slots: int, seed: int, epoch: int) -> list[list[Shard]]:
    """Disjoint, covering split of the permuted shards into `num_slots` balanced groups.

    Largest-first to the least-loaded slot (ties: permuted order, lowest slot), so the slot
    sizes, and hence batches per epoch, do not depend on the epoch; which rank/worker gets
    which group is then permuted from (seed, epoch) so a short shard does not always land on
    the same rank. Each group keeps the epoch's permuted order.
    """
    by_size = sorted(range(len(permuted)), key=lambda i: (-permuted[i].count, i))
    members: list[list[int]] = [[] for _ in range(num_slots)]
    least_loaded = [(0, slot) for slot in range(num_slots)]  # heap of (samples, slot)
    for i in by_size:
        total, slot = heapq.heappop(least_loaded)
        members[slot].append(i)
        heapq.heappush(least_loaded, (total + permuted[i].count, slot))
    random.Random(f"umt-slots/{seed}/{epoch}").shuffle(members)
    return [[permuted[i] for i in sorted(group)] for group in members]


def batches_per_worker_rule(slot_counts: list[int], batch_size: int, on_uneven: str) -> int:
    """pad: ceil(largest share / batch); drop: floor(smallest share / batch)."""
    if on_uneven == "pad":
        return math.ceil(max(slot_counts) / batch_size)
    return min(slot_counts) // batch_size


def plan_epoch(
    sources: tuple[Source, ...], cfg: LoaderConfig, world_size: int, epoch: int
) -> EpochPlan:
    """Split the epoch's permuted shards over world_size x workers and equalise batch counts."""
    slots = world_size * cfg.slots_per_rank
    total = sum(s.total_samples for s in sources)
    if cfg.resampled:
        return EpochPlan((), max(1, total // (slots * cfg.batch_size)))
    shards = [sh for s in sources for sh in s.shards]
    if len(shards) < slots:
        raise LoaderConfigError(
            f"epoch mode gives every worker its own shards, so it needs at least world_size x "
            f"num_workers = {world_size} x {cfg.slots_per_rank} = {slots} shards; "
            f"{cfg.shards!r} has {len(shards)}. Use resampled mode (data.resampled=true, "
            "`--resampled`), fewer workers, or reshard into more, smaller shards."
        )
    groups = split_shards(permute_shards(shards, cfg.seed, epoch), slots, cfg.seed, epoch)
    counts = [sum(sh.count for sh in g) for g in groups]
    per_worker = batches_per_worker_rule(counts, cfg.batch_size, cfg.on_uneven)
    if per_worker == 0:
        raise LoaderConfigError(
            f"data.on_uneven='drop' leaves no full batch: the smallest worker share is "
            f"{min(counts)} samples < batch_size {cfg.batch_size}; use a smaller batch, fewer "
            "workers, or on_uneven='pad'"
        )
    return EpochPlan(tuple(tuple(g) for g in groups), per_worker)


def batches_done_by_worker(batches_done: int, worker: int, num_workers: int) -> int:
    """Of the rank's first `batches_done` batches, how many came from `worker` (round-robin)."""
    return max(0, (batches_done - worker + num_workers - 1) // num_workers)


# --------------------------------------------------------------------------------------------
# Raw samples: reading tars, shuffling, mixing


@dataclass(frozen=True)
class RawSample:
    key: str
    image_key: str
    image: bytes  # still encoded
    text: str  # the sample's own caption (.txt, else json "caption")
    captions: tuple[str, ...]  # json "captions": all captions of the image
    occurrence: int = 0  # which pass over the worker's stream (pad repeats), or draw position
    meta: dict = field(default_factory=dict, compare=False)  # the parsed .json member


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/abc.0001.jpg` -> key `dir/abc`, extension `0001.jpg`."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def assemble_sample(key: str, members: dict[str, bytes], errors: Counter) -> RawSample | None:
    """Members of one key -> RawSample, or None with the reason counted."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        errors["missing_image"] += 1
        return None
    if "json" not in members:
        errors["missing_json"] += 1
        return None
    try:
        meta = json.loads(members["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        errors["bad_json"] += 1
        return None
    captions = meta.get("captions") or []
    captions = (
        tuple(c for c in captions if isinstance(c, str)) if isinstance(captions, list) else ()
    )
    text = members["txt"].decode("utf-8", "replace") if "txt" in members else None
    text = text or meta.get("caption") or (captions[0] if captions else None)
    if not isinstance(text, str) or not text:
        errors["missing_caption"] += 1
        return None
    image_key = str(meta.get("image_key", key))
    return RawSample(key, image_key, members[image_ext], text, captions or (text,), meta=meta)


def read_tar_samples(shard: Shard, errors: Counter) -> Iterator[RawSample]:
    """Stream one tar's samples; a truncated or unreadable tar ends its stream, counted, never raises."""
    seen = 0
    try:
        with tarfile.open(shard.path, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = split_member_name(info.name)
                if member_key != key:
                    if members:
                        seen += 1
                        if (sample := assemble_sample(key, members, errors)) is not None:
                            yield sample
                    key, members = member_key, {}
                members[ext] = tar.extractfile(info).read()
            if members:
                seen += 1
                if (sample := assemble_sample(key, members, errors)) is not None:
                    yield sample
    except FileNotFoundError:
        errors["missing_shard"] += 1
        return
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        errors["truncated_tar"] += 1  # the half-read sample is lost with it
        return
    if seen < shard.count:  # cut exactly at a header boundary reads as a clean end
        errors["truncated_tar"] += 1


def shuffle_samples(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir shuffle: fill `buffer_size`, then emit a random slot and refill it; drain shuffled."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def epoch_stream(
    shards: tuple[Shard, ...], cfg: LoaderConfig, epoch: int, slot: int, errors: Counter
) -> Iterator[RawSample]:
    """One worker's epoch: its shards through a shuffle seeded by (seed, epoch, slot), repeated from
    the start (same order) for as long as the caller pulls — the pad rule's repeats."""
    for occurrence in itertools.count():
        rng = random.Random(f"umt-shuffle/{cfg.seed}/{epoch}/{slot}")
        samples = (s for shard in shards for s in read_tar_samples(shard, errors))
        n = 0
        for sample in shuffle_samples(samples, cfg.shuffle_buffer, rng):
            n += 1
            yield replace(sample, occurrence=occurrence)
        if n == 0:
            raise RuntimeError(
                f"no readable sample in the {len(shards)} shards of worker slot {slot} "
                f"(first: {shards[0].path}); errors so far: {dict(errors)}"
            )


def draw_shards_forever(source: Source, rng: random.Random, errors: Counter) -> Iterator[RawSample]:
    """A source's samples from shards drawn uniformly with replacement; stops only on a dead source."""
    empty_in_a_row = 0
    while True:
        shard = rng.choice(source.shards)
        n = 0
        for sample in read_tar_samples(shard, errors):
            n += 1
            yield sample
        empty_in_a_row = 0 if n else empty_in_a_row + 1
        if empty_in_a_row >= max(8, 2 * len(source.shards)):
            raise RuntimeError(
                f"source {source.name!r}: {empty_in_a_row} shard draws in a row gave no readable "
                f"sample (last: {shard.path}); errors so far: {dict(errors)}"
            )


def resampled_stream(
    sources: tuple[Source, ...], cfg: LoaderConfig, epoch: int, slot: int, errors: Counter
) -> Iterator[RawSample]:
    """Per sample, pick a source with probability weight / sum(weights), take its next sample;
    shards drawn with replacement. Mixing per sample keeps the weights exact whatever the shard sizes."""
    base = f"umt-resampled/{cfg.seed}/{epoch}/{slot}"
    streams = [
        draw_shards_forever(src, random.Random(f"{base}/{src.name}"), errors) for src in sources
    ]
    weights = [src.weight for src in sources]
    pick = random.Random(f"{base}/mix")

    def mixed() -> Iterator[RawSample]:
        for draw in itertools.count():
            (stream,) = pick.choices(streams, weights)
            yield replace(next(stream), occurrence=draw)

    yield from shuffle_samples(mixed(), cfg.shuffle_buffer, random.Random(f"{base}/shuffle"))


# --------------------------------------------------------------------------------------------
# Decode, collate, Batch


@dataclass
class Batch:
    """One rank's batch. Pixels and tokens are empty (numel 0) when decode_images is False."""

    pixel_values: torch.Tensor  # (B, 3, H, W) uint8; `normalized_pixels` on the device
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    image_keys: list[str]  # samples sharing an image (COCO's 5 captions) share this
    keys: list[str]  # unique per sample
    captions: list[str]
    image_ids: torch.Tensor | None = None  # (B,) int64 hashes of image_keys (made in the worker)
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    epoch: int = 0
    index: int = 0  # batch index within the epoch on this rank
    worker: int = 0  # logical worker that made it
    stream_position: int = 0  # that worker's raw samples consumed after this batch
    # Samples skipped by that worker since its previous batch, per reason.
    errors: dict[str, int] = field(default_factory=dict)
    # With LoaderConfig.negatives: one hard-negative caption per sample ("" where it has none).
    negative_input_ids: torch.Tensor | None = None  # (B, T') int64
    negative_attention_mask: torch.Tensor | None = None  # (B, T') int64
    negative_valid: torch.Tensor | None = None  # (B,) bool: the sample had a negative

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def negative_texts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, mask, valid) as the model's `negative_texts` takes them; None without negatives."""
        if self.negative_input_ids is None:
            return None
        return self.negative_input_ids, self.negative_attention_mask, self.negative_valid

    def normalized_pixels(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, 3, H, W) `dtype` on `device`: copied there as uint8, normalised there."""
        pixels = self.pixel_values.to(device, non_blocking=True)
        return normalize_pixels(pixels, self.pixel_mean, self.pixel_std, dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device` (keys and bookkeeping unchanged)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map_tensors(lambda t: t.pin_memory())

    def _map_tensors(self, fn) -> Batch:
        names = ("pixel_values", "input_ids", "attention_mask", "image_ids", *_NEGATIVE_FIELDS)
        return replace(
            self, **{n: fn(getattr(self, n)) for n in names if getattr(self, n) is not None}
        )


_NEGATIVE_FIELDS = ("negative_input_ids", "negative_attention_mask", "negative_valid")


def sample_rng(seed: int, epoch: int, sample: RawSample) -> random.Random:
    """A sample's own randomness (crop, flip, caption): the same whichever rank or worker reads it."""
    return random.Random(f"umt-sample/{seed}/{epoch}/{sample.key}/{sample.occurrence}")


def choose_caption(sample: RawSample, policy: str, rng: random.Random) -> str:
    """Policy "txt": the sample's own caption; "random": one of its image's captions, by its seed."""
    if policy == "random" and len(sample.captions) > 1:
        return rng.choice(sample.captions)
    return sample.text


def choose_negative(sample: RawSample, field_name: str, rng: random.Random) -> str | None:
    """One of the sample's hard-negative captions (json `field_name`), by its seed; None if none."""
    value = sample.meta.get(field_name)
    items = value if isinstance(value, list) else [value]
    choices = [c.strip() for c in items if isinstance(c, str) and c.strip()]
    return rng.choice(choices) if choices else None


@dataclass
class DecodedSample:
    raw: RawSample
    caption: str
    pixels: np.ndarray | None  # (H, W, 3) uint8; None when not decoding
    negative: str | None = None  # with LoaderConfig.negatives


def decode_sample(
    sample: RawSample, cfg: LoaderConfig, epoch: int, errors: Counter
) -> DecodedSample | None:
    """Crop/resize/flip the image and pick the caption; None (counted) for an undecodable image."""
    rng = sample_rng(cfg.seed, epoch, sample)
    if not cfg.decode_images:
        return DecodedSample(sample, sample.text, None)
    transform = ImageTransformConfig(
        cfg.image_size, cfg.train, cfg.crop_scale, hflip=cfg.hflip, draft=cfg.jpeg_draft
    )
    try:
        pixels = transform_image(sample.image, transform, rng)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        errors["corrupt_image"] += 1
        return None
    caption = choose_caption(sample, cfg.caption, rng)
    negative = choose_negative(sample, cfg.negatives, rng) if cfg.negatives else None
    return DecodedSample(sample, caption, pixels, negative)


def collate_batch(samples: list[DecodedSample], cfg: LoaderConfig, tokenizer: Any) -> Batch:
    """Stack pixels, tokenise all captions in one call."""
    captions = [s.caption for s in samples]
    if samples[0].pixels is not None:
        pixels = stack_images([s.pixels for s in samples])
    else:
        pixels = torch.empty(0)
    if tokenizer is not None:
        input_ids, attention_mask = tokenize_batch(tokenizer, captions, cfg.max_text_len)
    else:
        input_ids = attention_mask = torch.empty(len(samples), 0, dtype=torch.long)
    negatives = {}
    if cfg.negatives and tokenizer is not None:
        texts = [s.negative or "" for s in samples]
        ids, mask = tokenize_batch(tokenizer, texts, cfg.max_text_len)
        valid = torch.tensor([s.negative is not None for s in samples])
        negatives = dict(negative_input_ids=ids, negative_attention_mask=mask, negative_valid=valid)
    return Batch(
        pixels,
        input_ids,
        attention_mask,
        image_keys=[s.raw.image_key for s in samples],
        keys=[s.raw.key for s in samples],
        captions=captions,
        image_ids=key_ids([s.raw.image_key for s in samples]),
        pixel_mean=cfg.mean,
        pixel_std=cfg.std,
        **negatives,
    )


# --------------------------------------------------------------------------------------------
# The per-worker dataset and the loader


def _set_up_worker(worker_id: int) -> None:
    # Workers are the parallelism: one thread each, or 2 cores x (K workers x N threads) thrash.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _as_is(batch: Batch) -> Batch:
    return batch  # batches come out of the workers whole


class RankStream(IterableDataset):
    """What one DataLoader worker runs: its share of the rank's epoch, from the shared position on.

    The position (epoch, batches done, per-worker raw positions) is read from a shared-memory
    tensor at the start of each epoch's iteration, because persistent workers hold a copy of
    this object made when they started and would otherwise replay the first epoch forever.
    """

    def __init__(self, sources: tuple[Source, ...], cfg: LoaderConfig, rank: int, world_size: int):
        self.sources, self.cfg, self.rank, self.world_size = sources, cfg, rank, world_size
        self.position = torch.zeros(2 + cfg.slots_per_rank, dtype=torch.long).share_memory_()
        # Loaded once here, not per worker: importing transformers takes seconds, and
        # non-persistent workers would pay it every epoch. Workers inherit it (fork) or unpickle it.
        wants_tokens = cfg.decode_images and cfg.tokenizer
        self.tokenizer = load_tokenizer(cfg.tokenizer) if wants_tokens else None

    def __iter__(self) -> Iterator[Batch]:
        cfg, num_workers = self.cfg, self.cfg.slots_per_rank
        info = get_worker_info()
        epoch, batches_done, *positions = (int(x) for x in self.position.tolist())
        worker = logical_worker(info.id if info is not None else 0, batches_done, num_workers)
        slot = self.rank * num_workers + worker
        plan = plan_epoch(self.sources, cfg, self.world_size, epoch)
        errors: Counter = Counter()
        stream = worker_raw_stream(self.sources, plan, cfg, epoch, slot, errors)
        position = positions[worker]
        for _ in itertools.islice(stream, position):  # resume: skip raw samples, no decode
            pass
        first = batches_done_by_worker(batches_done, worker, num_workers)
        for local_index in range(first, plan.batches_per_worker):
            samples, pulled = take_decoded(stream, cfg, epoch, errors)
            position += pulled
            batch = collate_batch(samples, cfg, self.tokenizer)
            batch.epoch, batch.index = epoch, local_index * num_workers + worker
            batch.worker, batch.stream_position, batch.errors = worker, position, dict(errors)
            errors.clear()
            yield batch


def logical_worker(physical: int, batches_done: int, num_workers: int) -> int:
    """The DataLoader asks physical worker 0 first; after a resume at batch k that must be k % K."""
    return (physical + batches_done) % num_workers


def worker_raw_stream(
    sources: tuple[Source, ...],
    plan: EpochPlan,
    cfg: LoaderConfig,
    epoch: int,
    slot: int,
    errors: Counter,
) -> Iterator[RawSample]:
    """The slot's raw samples for the epoch, in the order it decodes them (infinite)."""
    if cfg.resampled:
        return resampled_stream(sources, cfg, epoch, slot, errors)
    return epoch_stream(plan.slot_shards[slot], cfg, epoch, slot, errors)


def take_decoded(
    stream: Iterator[RawSample], cfg: LoaderConfig, epoch: int, errors: Counter
) -> tuple[list[DecodedSample], int]:
    """The next batch_size decodable samples and how many raw samples that took."""
    samples: list[DecodedSample] = []
    pulled = 0
    while len(samples) < cfg.batch_size:
        pulled += 1
        if (sample := decode_sample(next(stream), cfg, epoch, errors)) is not None:
            samples.append(sample)
    return samples, pulled


class StreamingLoader:
    """Infinite iterator of `Batch` for one rank; `state_dict()` after batch k resumes at k+1."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int, epoch: int = 0):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise LoaderConfigError(f"rank must be in [0, world_size={world_size}) (got {rank})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.sources = resolve_sources(cfg.shards, cfg.resampled)
        self.dataset = RankStream(self.sources, cfg, rank, world_size)
        self.epoch = epoch
        self.batches_in_epoch = 0
        self.batches_total = 0
        self.stream_positions = [0] * cfg.slots_per_rank
        self._errors: Counter = Counter()
        self._plan = plan_epoch(self.sources, cfg, world_size, epoch)  # fails early, clearly
        self._dataloader: DataLoader | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank (and every rank) yields in the current epoch."""
        if self._plan is None:
            self._plan = plan_epoch(self.sources, self.cfg, self.world_size, self.epoch)
        return self._plan.batches_per_worker * self.cfg.slots_per_rank

    @property
    def total_samples(self) -> int:
        return sum(s.total_samples for s in self.sources)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self.one_epoch()

    def one_epoch(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the loader is at the start of the next one."""
        if self.batches_in_epoch < self.batches_per_epoch:
            self.dataset.position.copy_(
                torch.tensor([self.epoch, self.batches_in_epoch, *self.stream_positions])
            )
            for batch in self._get_dataloader():
                if batch.index != self.batches_in_epoch or batch.epoch != self.epoch:
                    raise RuntimeError(
                        f"loader order broken: expected epoch {self.epoch} batch "
                        f"{self.batches_in_epoch}, got epoch {batch.epoch} batch {batch.index}"
                    )
                self._record(batch)
                yield batch
            if self.batches_in_epoch != self.batches_per_epoch:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {self.epoch} ended after {self.batches_in_epoch} of "
                    f"{self.batches_per_epoch} batches; a worker stopped early"
                )
        self._start_epoch(self.epoch + 1)

    def _record(self, batch: Batch) -> None:
        self.batches_in_epoch += 1
        self.batches_total += 1
        self.stream_positions[batch.worker] = batch.stream_position
        self._errors.update(batch.errors)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_in_epoch = epoch, 0
        self.stream_positions = [0] * self.cfg.slots_per_rank
        self._plan = None

    def _get_dataloader(self) -> DataLoader:
        if self._dataloader is None:
            workers = self.cfg.num_workers
            self._dataloader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=workers,
                collate_fn=_as_is,
                pin_memory=self.cfg.pin_memory,
                persistent_workers=self.cfg.persistent_workers and workers > 0,
                prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
                worker_init_fn=_set_up_worker if workers > 0 else None,
                # in_order stays at its default (True): the resume rule needs round-robin order,
                # and one_epoch() checks every batch's index to catch a change.
            )
        return self._dataloader

    def error_counts(self) -> dict[str, int]:
        """Skipped samples per reason, summed over this rank's workers, since this loader started."""
        return dict(self._errors)

    def skip_to(self, batch: int) -> None:
        """Position at batch `batch` counted from the start of the current epoch, assuming no corrupt
        image was skipped before it (exact when decode_images is False: `umt data order --start-batch`)."""
        while batch >= self.batches_per_epoch:
            batch -= self.batches_per_epoch
            self._start_epoch(self.epoch + 1)
        k = self.cfg.slots_per_rank
        self.batches_in_epoch = batch
        self.stream_positions = [
            batches_done_by_worker(batch, w, k) * self.cfg.batch_size for w in range(k)
        ]

    def state_dict(self) -> dict[str, Any]:
        """The consumed position, plain JSON: save it per rank."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "mode": "resampled" if self.cfg.resampled else "epoch",
            "seed": self.cfg.seed,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_in_epoch": self.batches_in_epoch * self.cfg.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "batches_total": self.batches_total,
            "stream_positions": list(self.stream_positions),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "on_uneven": self.cfg.on_uneven,
            "data_digest": sources_digest(self.sources),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch `state` was taken at. Call before iterating.

        Refused (LoaderStateError) when the topology, batch size, seed, mode or data differ: the
        split of shards to ranks and workers, and so the stream, depends on all of them.
        """
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise LoaderStateError(
                f"loader state format_version {state.get('format_version')!r} is not "
                f"{STATE_FORMAT_VERSION}"
            )
        if (state["world_size"], state["num_workers"]) != (self.world_size, self.cfg.num_workers):
            raise LoaderStateError(
                f"loader state was saved with world_size={state['world_size']}, "
                f"num_workers={state['num_workers']}, but this run has "
                f"world_size={self.world_size}, num_workers={self.cfg.num_workers}. Resuming "
                "mid-epoch needs the same topology (the shard split depends on it): keep it, or "
                f"start the next epoch fresh with build_loader(cfg, rank, world_size, "
                f"epoch={state['epoch'] + 1})"
            )
        if state["rank"] != self.rank:
            raise LoaderStateError(
                f"loader state of rank {state['rank']} loaded on rank {self.rank}: each rank "
                "saves and loads its own"
            )
        mine = self.state_dict()
        for key in ("mode", "seed", "batch_size", "on_uneven", "data_digest"):
            if state[key] != mine[key]:
                raise LoaderStateError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}; "
                    "the stream would differ, so it cannot resume where it stopped"
                )
        self._start_epoch(int(state["epoch"]))
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.batches_total = int(state["batches_total"])
        self.stream_positions = [int(p) for p in state["stream_positions"]]


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, epoch: int = 0) -> StreamingLoader:
    """The trainer's entry point: a StreamingLoader for this rank, starting at `epoch`."""
    return StreamingLoader(cfg, rank, world_size, epoch)


def iter_raw_samples(shards: str | list[str], errors: Counter | None = None) -> Iterator[RawSample]:
    """Every sample of the given shards in stored order, no shuffling (`umt data inspect`)."""
    errors = Counter() if errors is None else errors
    for source in resolve_sources(shards, resampled=True):  # True: accept `:weight` specs too
        for shard in source.shards:
            yield from read_tar_samples(shard, errors)


__all__ = [
    "Batch",
    "LoaderConfig",
    "LoaderConfigError",
    "LoaderStateError",
    "StreamingLoader",
    "build_loader",
]
