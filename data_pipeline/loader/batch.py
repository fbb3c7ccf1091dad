"""Decode and batch: raw samples -> `Batch` (uint8 pixels, one tokenizer call per batch).

Each sample's randomness (crop, flip, caption and negative choice) is seeded by its stream
position, so it is the same whichever rank or worker reads it, and new every epoch.

A sample that cannot be read or decoded is counted by reason, recorded, and its slot filled
with another sample of the same micro-batch (the next one that decodes, cyclically): batch shapes
stay equal on every rank, and the filler shares its image key, so contrastive losses treat the
two as one image. Only when no sample of the micro-batch decodes are the rest of the round's
positions tried (rarely worth the cost otherwise); none there: `LoaderDataError`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from data_pipeline.loader.config import LoaderConfig
from data_pipeline.loader.reader import RawSample
from data_pipeline.sample_ids import key_ids
from data_pipeline.transforms import (
    ImageTransformConfig,
    normalize_pixels,
    stack_images,
    tokenize_batch,
    transform_image,
)


@dataclass
class Batch:
    """One rank's micro-batch. Pixels and tokens are empty (numel 0) when decode_images is False."""

    pixel_values: torch.Tensor  # (B, 3, H, W) uint8; `normalized_pixels` on the device
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    image_keys: list[str]  # samples sharing an image (COCO's 5 captions) share this
    keys: list[str]  # the sample of each slot (a filler repeats the key it copies)
    captions: list[str]
    image_ids: torch.Tensor | None = None  # (B,) int64 hashes of image_keys (made in the worker)
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    round: int = 0  # round of the loader this micro-batch belongs to (see `order`)
    position: int = 0  # stream position of its first slot
    epoch: int = 0  # epoch of its first slot
    # Samples of this micro-batch that could not be used, per reason, and each one's record.
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    io: dict[str, int] = field(
        default_factory=dict
    )  # storage counters since the worker's last batch
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


def sample_rng(seed: int, position: int) -> random.Random:
    """A sample's own randomness: from its stream position, the same on any rank or worker."""
    return random.Random(f"umt-sample/{seed}/{position}")


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


# Count of samples used without a hard-negative caption (LoaderConfig.negatives set, the sample's
# json lacks the field or holds no usable text); not a failure, so not in SAMPLE_ERRORS.
NO_NEGATIVE = "no_negative"


@dataclass
class DecodedSample:
    raw: RawSample
    caption: str
    pixels: np.ndarray | None  # (H, W, 3) uint8; None when not decoding
    negative: str | None = None  # with LoaderConfig.negatives


def decode_sample(
    sample: RawSample, cfg: LoaderConfig, position: int, errors: Counter
) -> DecodedSample | None:
    """Crop/resize/flip the image and pick the caption; None (counted) for an undecodable image."""
    rng = sample_rng(cfg.seed, position)
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
    if cfg.negatives and negative is None:
        errors[NO_NEGATIVE] += 1  # used all the same, with no hard negative: counted, logged
    return DecodedSample(sample, caption, pixels, negative)


def fill_slots(decoded: list[DecodedSample | None]) -> list[DecodedSample] | None:
    """Each empty slot takes the next decoded sample after it (cyclically); None if all are empty."""
    n = len(decoded)
    if not any(d is not None for d in decoded):
        return None
    return [
        next(decoded[(j + k) % n] for k in range(n) if decoded[(j + k) % n] is not None)
        for j in range(n)
    ]


def collate_batch(samples: list[DecodedSample], cfg: LoaderConfig, tokenizer: Any) -> Batch:
    """Stack pixels, tokenise all captions in one call, hash image keys."""
    captions = [s.caption for s in samples]
    if samples[0].pixels is not None:
        # in a DataLoader worker, made in shared memory: the main process maps it, no copy
        in_worker = torch.utils.data.get_worker_info() is not None
        pixels = stack_images([s.pixels for s in samples], shared=in_worker)
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
    image_keys = [s.raw.image_key for s in samples]
    return Batch(
        pixels,
        input_ids,
        attention_mask,
        image_keys=image_keys,
        keys=[s.raw.key for s in samples],
        captions=captions,
        image_ids=key_ids(image_keys),
        pixel_mean=cfg.mean,
        pixel_std=cfg.std,
        **negatives,
    )
