"""Pixels right: high bit depths and floats scaled, not clipped; --max-pixels honoured."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shard import SampleError, ShardOptions, prepare_image
from data_pipeline.transforms import ImageTransformConfig, transform_image
from tests.data_pipeline.test_shard import huge_png

LOSSLESS = ShardOptions(resize="none", image_format="png")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def stored_pixel(data: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(prepare_image(data, LOSSLESS).data)).getpixel((3, 3))


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    mid_grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert mid_grey.mode == "I;16"
    assert stored_pixel(encoded(mid_grey, "PNG")) == (128, 128, 128)  # PIL's convert: white
    ramp = Image.fromarray(np.array([[0, 257 * 10, 65535] * 4] * 12, np.uint16))
    stored = Image.open(io.BytesIO(prepare_image(encoded(ramp, "PNG"), LOSSLESS).data))
    assert [stored.getpixel((x, 0))[0] for x in range(3)] == [0, 10, 255]


def test_float_images_are_scaled_by_their_range() -> None:
    unit = Image.fromarray(np.full((8, 8), 0.5, np.float32))  # [0, 1]: PIL's convert gives 0
    assert stored_pixel(encoded(unit, "TIFF")) == (128, 128, 128)
    bytes_range = Image.fromarray(np.full((8, 8), 200.0, np.float32))
    assert stored_pixel(encoded(bytes_range, "TIFF")) == (200, 200, 200)
    wide = np.zeros((8, 8), np.float32)
    wide[:, 4:] = 1000.0  # any other range: min -> 0, max -> 255
    stored = Image.open(
        io.BytesIO(prepare_image(encoded(Image.fromarray(wide), "TIFF"), LOSSLESS).data)
    )
    assert (stored.getpixel((0, 0)), stored.getpixel((7, 0))) == ((0, 0, 0), (255, 255, 255))
    nan = np.full((8, 8), np.nan, np.float32)
    with pytest.raises(SampleError) as caught:
        prepare_image(encoded(Image.fromarray(nan), "TIFF"), LOSSLESS)
    assert caught.value.reason == "corrupt_image" and "not finite" in str(caught.value)


def test_the_loader_converts_high_bit_depths_as_the_sharder_does() -> None:
    mid_grey = encoded(Image.fromarray(np.full((16, 16), 32768, np.uint16)), "PNG")
    cfg = ImageTransformConfig(image_size=8, train=False)
    pixels = transform_image(mid_grey, cfg, random.Random(0))
    assert pixels.shape == (8, 8, 3) and set(np.unique(pixels)) == {128}


def test_max_pixels_above_pils_own_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """13,500 x 13,500 = 182 M pixels is over twice PIL's default limit (89 M), where PIL refuses
    the file itself; with --max-pixels 200 M it must pass that check (and fail --min-size here,
    which is checked from the header, so the test decodes nothing)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    bomb = huge_png(13_500, 13_500)
    with pytest.raises(SampleError) as default:
        prepare_image(bomb, ShardOptions())
    assert default.value.reason == "decompression_bomb"
    allowed = ShardOptions(max_pixels=200_000_000, min_size=20_000)
    with pytest.raises(SampleError) as caught:
        prepare_image(bomb, allowed)
    assert caught.value.reason == "too_small"
    with pytest.raises(SampleError) as lower:  # and a limit below PIL's is ours too
        prepare_image(huge_png(2_000, 2_000), ShardOptions(max_pixels=1_000_000))
    assert lower.value.reason == "decompression_bomb" and "--max-pixels 1000000" in str(lower.value)
