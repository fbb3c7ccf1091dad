"""Image transforms (JPEG draft decode, random-resized / center crop, ViT normalisation) and batch tokenisation.

Pure functions of bytes, sizes and an explicit `random.Random`, so the loader can seed them per
sample and a test can call each one alone. No torchvision: crops are PIL boxes, tensors come
from numpy.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from data_pipeline.pixels import (
    Box,
    eval_crop_box,
    normalize_pixels,
    resized_crop,
    stack_images,
    to_rgb,
)

log = logging.getLogger("umt.data")


@dataclass(frozen=True)
class ImageTransformConfig:
    """How one encoded image becomes a (size, size, 3) uint8 array."""

    image_size: int = 224
    """Output side in pixels (square)."""
    train: bool = True
    """Random-resized crop (train) or resize shorter side + center crop (eval)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Train crop area as a fraction of the image area (ALBEF/BLIP use 0.5-1.0)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Train crop aspect ratio range (width / height)."""
    hflip: bool = False
    """Random horizontal flip in train mode. Off by default: captions say "left" and "right"."""
    draft: bool = True
    """Let the JPEG decoder downscale by 1/2, 1/4 or 1/8 when the crop is much larger than the output."""


def train_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Box:
    """Random-resized-crop box (Inception style): 10 tries at a random area and aspect, else center."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return (left, top, left + crop_w, top + crop_h)
    # Fallback: the largest center crop whose aspect lies within `ratio`.
    aspect = width / height
    if aspect < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def crop_box(width: int, height: int, cfg: ImageTransformConfig, rng: random.Random) -> Box:
    """The source region that becomes the output image."""
    if cfg.train:
        return train_crop_box(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
    return eval_crop_box(width, height)


def draft_scale(size: tuple[int, int], box: Box, out_size: int) -> int:
    """The JPEG decode scale 1/a (a in 1, 2, 4, 8) that keeps `box` at >= `out_size` pixels: PIL's
    `draft` rule for `draft_request` (a = the largest power of 2 <= min(W // want_w, H // want_h))."""
    want_w, want_h = draft_request(size, box, out_size)
    most = min(size[0] // want_w, size[1] // want_h)
    return next(a for a in (8, 4, 2, 1) if most >= a or a == 1)


def draft_request(size: tuple[int, int], box: Box, out_size: int) -> tuple[int, int]:
    """The smallest whole image whose `box` is still `out_size` pixels or more on each side."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    return (
        max(1, math.ceil(out_size * size[0] / crop_w)),
        max(1, math.ceil(out_size * size[1] / crop_h)),
    )


def scale_box(box: Box, scale: float) -> Box:
    """`box` in the same image decoded at 1/`scale`: pixel j of that decode is the source's
    [j * scale, (j + 1) * scale) (the DCT scaling's blocks; PIL's `draft` maps its box the same
    way). Not ceil(W / scale) / W: that stretches the box towards the right and bottom edges,
    by up to one decoded pixel."""
    return (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)


def draft_jpeg(image: Image.Image, box: Box, out_size: int) -> Box:
    """Ask PIL's JPEG decoder for the smallest 1/2^k scale that keeps `box` at >= `out_size`;
    rescale `box`. A no-op for formats other than JPEG."""
    if image.format != "JPEG":
        return box
    size = image.size
    drafted = image.draft("RGB", draft_request(size, box, out_size))
    if drafted is None:  # no scaling
        return box
    return scale_box(box, size[0] / drafted[1][2])  # drafted box: (0, 0, W / scale, H / scale)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a baseline or progressive JPEG that `decode_jpeg` can take; None for
    other data, or for a JPEG PIL should open (past PIL's decompression-bomb limit: PIL refuses
    it, where decoding it here could take gigabytes)."""
    if data[:3] != b"\xff\xd8\xff" or not simplejpeg_agrees_with_pil():
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL says what is wrong with it
    if colorspace not in ("YCbCr", "Gray"):
        return None  # CMYK, YCCK: PIL converts them to RGB its own way (1 level apart)
    if width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return None
    return width, height


@functools.cache
def simplejpeg_agrees_with_pil() -> bool:
    """Whether simplejpeg's libjpeg-turbo gives Pillow's pixels here, checked once per process
    on small JPEGs (4:2:0, 4:4:4, progressive, greyscale; full and 1/2 scale). Each wheel bundles
    its own build: where they differ, every JPEG goes through Pillow (slower, the same pixels as
    an export's processor), with one warning, rather than training and evaluation seeing other
    pixels than users do."""
    rng = np.random.default_rng(0)
    rgb = np.clip(np.linspace(0, 255, 37 * 29 * 3).reshape(29, 37, 3) + rng.normal(0, 20, (29, 37, 3)), 0, 255)  # fmt: skip
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    variants = [
        (image, {"quality": 90}),
        (image, {"quality": 95, "subsampling": 0}),
        (image, {"quality": 85, "progressive": True}),
        (image.convert("L"), {"quality": 90}),
    ]
    for probe, options in variants:
        buffer = io.BytesIO()
        probe.save(buffer, "JPEG", **options)
        data = buffer.getvalue()
        for scale in (1, 2):
            ours = decode_jpeg(data, probe.size, scale)
            pil = Image.open(io.BytesIO(data))
            pil.draft("RGB", (probe.size[0] // scale, probe.size[1] // scale))  # PIL: 1/scale
            if ours is None or not np.array_equal(ours, np.asarray(pil.convert("RGB"))):
                log.warning(
                    "simplejpeg %s decodes JPEGs differently from Pillow %s (their libjpeg-turbo "
                    "builds differ): decoding every image with Pillow instead",
                    simplejpeg.__version__, Image.__version__,
                )  # fmt: skip
                return False
    return True


def decode_jpeg(data: bytes, size: tuple[int, int], scale: int) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, decoded at 1/`scale` by libjpeg-turbo's scaled IDCT (simplejpeg):
    the pixels PIL's `draft` + decode give, straight into a numpy array (PIL's copy out costs a
    quarter of the decode). None where libjpeg-turbo reports any error, warnings included
    (a truncated file, stray bytes PIL would skip): PIL decides those."""
    try:
        return simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_width=math.ceil(size[0] / scale),
            min_height=math.ceil(size[1] / scale),
            strict=True,
        )
    except ValueError:
        return None


def transform_image(data: bytes, cfg: ImageTransformConfig, rng: random.Random) -> np.ndarray:
    """Encoded image bytes -> (image_size, image_size, 3) uint8 RGB array. Raises on a corrupt image.

    JPEGs decode through libjpeg-turbo into numpy (`decode_jpeg`), with `draft` at a reduced
    scale (1/2, 1/4, 1/8) where the crop allows, which skips most of the IDCT work; anything
    else, and any JPEG that decoder reports an error for, through PIL: the same pixels either way.
    """
    size = jpeg_size(data)
    image = None if size is not None else Image.open(io.BytesIO(data))
    box = crop_box(*(size or image.size), cfg, rng)
    pixels = None
    if size is not None:
        scale = draft_scale(size, box, cfg.image_size) if cfg.draft else 1
        pixels = decode_jpeg(data, size, scale)
        if pixels is not None:
            box = scale_box(box, scale)
        else:
            image = Image.open(io.BytesIO(data))
    if pixels is None:
        if cfg.draft:
            box = draft_jpeg(image, box, cfg.image_size)
        if image.mode not in ("RGB", "L"):
            # palette / alpha / CMYK / 16-bit / float: resample in 8-bit RGB, converted as the
            # sharder does (alpha over white, high bit depths scaled, not clipped)
            image = to_rgb(image)
    out = resized_crop(image if pixels is None else pixels, box, cfg.image_size)
    if cfg.train and cfg.hflip and rng.random() < 0.5:
        # flipped in (3, H, W) order, the layout `resized_crop` leaves its pixels in
        out = np.flip(out.transpose(2, 0, 1), axis=2).copy().transpose(1, 2, 0)
    return out


def normalize_images(
    images: list[np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """List of (H, W, 3) uint8 arrays -> (B, 3, H, W) normalised on `device` (moved as uint8)."""
    pixels = stack_images(images)
    return normalize_pixels(pixels if device is None else pixels.to(device), mean, std, dtype)


def load_tokenizer(name_or_dir: str):
    """A fast (Rust) tokenizer from a Hub name or a local folder; error names the argument if not fast."""
    from transformers import AutoTokenizer  # imported here: `umt data order` never needs it

    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name_or_dir!r} has no fast (Rust) implementation; "
            "the loader tokenises whole batches and needs one"
        )
    return tokenizer


def tokenize_batch(
    tokenizer, captions: list[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call for the whole batch: (input_ids, attention_mask), both (B, T) int64, padded to the longest."""
    out = tokenizer(
        captions,
        padding="longest",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return out["input_ids"].long(), out["attention_mask"].long()
