"""Tests of data_pipeline/transforms.py: crop boxes, JPEG draft decode, modes, flip, normalisation, tokenisation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import transforms
from data_pipeline.pixels import resized_crop, stack_images
from data_pipeline.transforms import (
    ImageTransformConfig,
    draft_jpeg,
    eval_crop_box,
    load_tokenizer,
    normalize_images,
    tokenize_batch,
    train_crop_box,
    transform_image,
)


def smooth_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A gradient with a bright left edge, so resampling error is small and a flip is visible."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(255 - x, (height, width, 1)), y + 0 * x, (x + y) / 2], 2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_train_crop_box_stays_inside_with_area_and_aspect_in_range():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = train_crop_box(640, 480, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480
        area = (right - left) * (bottom - top) / (640 * 480)
        assert 0.49 <= area <= 1.01
        assert 3 / 4 - 0.02 <= (right - left) / (bottom - top) <= 4 / 3 + 0.02


def test_train_crop_box_falls_back_to_a_center_crop_for_extreme_aspect():
    box = train_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert box[3] - box[1] == 10 and box[2] - box[0] == round(10 * 4 / 3)
    assert box[0] == pytest.approx((1000 - box[2] + box[0]) / 2)


def test_eval_crop_box_is_the_central_square():
    assert eval_crop_box(640, 480) == (80, 0, 560, 480)
    assert eval_crop_box(300, 400) == (0, 50, 300, 350)


def test_draft_decodes_a_large_jpeg_at_reduced_size_and_rescales_the_box():
    image = Image.open(io.BytesIO(encode(smooth_image(640, 480), "JPEG")))
    box = draft_jpeg(image, eval_crop_box(640, 480), out_size=64)
    assert image.size == (160, 120)  # 1/4 scale still covers 64 px of the 480 px crop
    assert box == pytest.approx((20, 0, 140, 120))


def test_draft_output_is_close_to_full_decode():
    data = encode(smooth_image(640, 480), "JPEG", quality=95)
    rng = random.Random
    fast = transform_image(data, ImageTransformConfig(64, train=False), rng(0))
    full = transform_image(data, ImageTransformConfig(64, train=False, draft=False), rng(0))
    assert fast.shape == full.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 4.0


def test_draft_decode_of_real_photos_stays_within_a_few_grey_levels_of_a_full_decode():
    """sklearn's two photos (640x427) as JPEG q90, eval and train crops to 64, 96 and 160 px
    (1/4, 1/4 and 1/2 scale decodes): mean |draft - full| <= 4.5 of 255, 99th percentile <= 36,
    max <= 100 (measured at q85, q90 and q95: 1.8-4.3, 16-33 and 53-95, the max at sharp edges;
    part of it is the crop box rounded to whole pixels of the smaller decode); same shape and
    dtype.
    At 224 px no 1/2 scale keeps the crop large enough: the output is the full decode's."""
    from sklearn.datasets import load_sample_images

    for photo in load_sample_images().images:
        data = encode(Image.fromarray(photo), "JPEG", quality=90)
        for size, train in [(64, False), (96, True), (160, False), (160, True), (224, True)]:
            seeds = range(4 if train else 1)
            draft_cfg = ImageTransformConfig(size, train)
            draft = [transform_image(data, draft_cfg, random.Random(s)) for s in seeds]
            full_cfg = ImageTransformConfig(size, train, draft=False)
            full = [transform_image(data, full_cfg, random.Random(s)) for s in seeds]
            assert {(a.shape, a.dtype) for a in draft + full} == {
                ((size, size, 3), np.dtype(np.uint8))
            }
            diff = np.abs(np.stack(draft).astype(float) - np.stack(full).astype(float))
            if size == 224:
                assert diff.max() == 0
                continue
            assert diff.mean() <= 4.5 and np.percentile(diff, 99) <= 36 and diff.max() <= 100


def test_a_box_maps_to_a_reduced_decode_as_pils_draft_maps_it():
    """Pixel j of a 1/s decode is the source's [j * s, (j + 1) * s): a box scales by 1/s (PIL's
    `draft` says so too), not by ceil(W / s) / W, which stretched it towards the right and bottom
    edges by up to one decoded pixel."""
    image = Image.open(io.BytesIO(encode(smooth_image(427, 301), "JPEG")))
    box = (13.0, 7.0, 413.0, 297.0)
    assert draft_jpeg(image, box, 100) == (6.5, 3.5, 206.5, 148.5)  # at 1/2: 214x151 pixels
    assert image.size == (214, 151)
    assert transforms.scale_box(box, 2) == (6.5, 3.5, 206.5, 148.5)


def test_where_simplejpeg_decodes_otherwise_than_pillow_every_jpeg_goes_through_pillow(
    monkeypatch, caplog
):
    """Each wheel bundles its own libjpeg-turbo: where simplejpeg's gives other pixels than
    Pillow's (another build), training would see other pixels than an export's users. Checked
    once per process on small JPEGs; then every image goes through Pillow, with one warning."""
    import simplejpeg

    data = encode(smooth_image(64, 48), "JPEG", quality=90)
    cfg = ImageTransformConfig(32, False)
    real_decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: real_decode(*a, **k) ^ 1)
    transforms.simplejpeg_agrees_with_pil.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="umt.data"):
            got = transform_image(data, cfg, random.Random(0))
        assert "decodes JPEGs differently from Pillow" in caplog.text
        assert transforms.jpeg_size(data) is None  # no JPEG takes the libjpeg-turbo path
        pil_path(monkeypatch)
        assert np.array_equal(got, transform_image(data, cfg, random.Random(0)))
    finally:
        transforms.simplejpeg_agrees_with_pil.cache_clear()
    monkeypatch.undo()
    assert transforms.simplejpeg_agrees_with_pil()  # the wheels installed here agree


def pil_path(monkeypatch):
    """transform_image as it runs without the libjpeg-turbo path: every image through PIL."""
    monkeypatch.setattr(transforms, "jpeg_size", lambda data: None)


@pytest.mark.parametrize(
    ("mode", "save"),
    [
        ("RGB", {"quality": 90}),  # 4:2:0
        ("RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
        ("RGB", {"quality": 85, "progressive": True}),
        ("L", {"quality": 90}),
    ],
)
def test_jpegs_decode_through_libjpeg_turbo_to_the_pixels_pil_gives(mode, save, monkeypatch):
    """sklearn's photos, every draft scale (1, 1/2, 1/4, 1/8), eval and train crops, flips:
    the same arrays, to the bit, as PIL's draft and decode."""
    from sklearn.datasets import load_sample_images

    configs = [ImageTransformConfig(s, False) for s in (16, 32, 64, 160, 224)]
    configs += [ImageTransformConfig(s, True, hflip=True) for s in (48, 96, 224)]
    configs.append(ImageTransformConfig(96, False, draft=False))
    photos = [encode(Image.fromarray(p).convert(mode), "JPEG", **save) for p in load_sample_images().images]  # fmt: skip
    scales = {transforms.draft_scale((640, 427), transforms.crop_box(640, 427, c, random.Random(0)), c.image_size) for c in configs}  # fmt: skip
    assert scales == {1, 2, 4, 8}
    assert {transforms.jpeg_size(d) for d in photos} == {(640, 427)}  # all take the fast path

    def outputs():
        return [transform_image(d, c, random.Random(s)) for d in photos for c in configs for s in range(3)]  # fmt: skip

    fast = outputs()
    pil_path(monkeypatch)
    assert all(np.array_equal(a, b) for a, b in zip(fast, outputs(), strict=True))


def test_jpegs_libjpeg_turbo_reports_an_error_for_go_through_pil(monkeypatch):
    """CMYK (converted as PIL converts it), stray bytes before a marker (PIL skips them), a
    truncated file (PIL refuses it, as before) and one past PIL's decompression-bomb limit."""
    photo = smooth_image(64, 48)
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=95)
    plain = encode(photo, "JPEG", quality=95)
    sos = plain.index(b"\xff\xda")
    stray = plain[:sos] + b"\x00\x00" + plain[sos:]
    cfg = ImageTransformConfig(32, train=False)
    assert transforms.jpeg_size(cmyk) is None
    assert transforms.jpeg_size(stray) is None or transforms.decode_jpeg(stray, (64, 48), 1) is None
    fast = [transform_image(d, cfg, random.Random(0)) for d in (cmyk, stray)]
    assert transforms.decode_jpeg(plain[:-100], (64, 48), 1) is None
    with pytest.raises(OSError, match="truncated"):
        transform_image(plain[:-100], cfg, random.Random(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL: 2x the limit is a bomb
    assert transforms.jpeg_size(plain) is None
    with pytest.raises(Image.DecompressionBombError):
        transform_image(plain, cfg, random.Random(0))
    monkeypatch.undo()
    pil_path(monkeypatch)
    for data, out in zip((cmyk, stray), fast, strict=True):
        assert np.array_equal(out, transform_image(data, cfg, random.Random(0)))


def test_resized_crop_is_pils_crop_then_bicubic_resize_to_within_a_grey_level():
    """torch's uint8 antialiased bicubic against PIL's `crop(box).resize(size, BICUBIC)` (what
    torchvision's resized crop does) on sklearn's two photos, 40 random boxes each, down- and
    upscaling: 99.9% of values within 1 grey level, mean under 0.05, none over 12 (measured:
    mean 0.012, 99.9th percentile 1, max 8)."""
    from sklearn.datasets import load_sample_images

    rng, diffs = random.Random(0), []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        width, height = image.size
        for _ in range(40):
            w, h = rng.randint(20, width), rng.randint(20, height)
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            box, size = (left, top, left + w, top + h), rng.choice([16, 64, 224, 384])
            ours = resized_crop(image, box, size)
            pil = np.asarray(image.crop(box).resize((size, size), Image.Resampling.BICUBIC))
            assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
            diffs.append(np.abs(ours.astype(int) - pil.astype(int)).ravel())
    diff = np.concatenate(diffs)
    assert diff.mean() < 0.05 and np.percentile(diff, 99.9) <= 1 and diff.max() <= 12


def test_resized_crop_rounds_the_box_to_whole_pixels_inside_the_image():
    image = smooth_image(40, 30)
    inside = resized_crop(image, (10.4, 5.6, 30.4, 25.5), 20)  # rounds to (10, 6, 30, 26): 20x20
    assert np.array_equal(inside, np.asarray(image)[6:26, 10:30])
    clipped = resized_crop(image, (-3.0, -2.0, 50.0, 40.0), 8)  # the whole image
    assert np.array_equal(clipped, resized_crop(image, (0, 0, 40, 30), 8))
    assert resized_crop(image, (5.0, 5.0, 5.2, 5.1), 4).shape == (4, 4, 3)  # at least 1 pixel
    grey = resized_crop(image.convert("L"), (0, 0, 40, 30), 8)
    assert grey.shape == (8, 8, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_flipped_views_are_taken_like_any_array():
    """A flipped view (negative strides), which torch refuses to share, is copied first."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    flipped = np.fliplr(pixels)
    assert torch.equal(stack_images([flipped]), stack_images([flipped.copy()]))
    assert np.array_equal(
        resized_crop(flipped, (0, 0, 5, 6), 4), resized_crop(flipped.copy(), (0, 0, 5, 6), 4)
    )


def test_stack_images_copies_views_and_arrays_alike_and_can_make_the_batch_in_shared_memory():
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    view = np.ascontiguousarray(plain.transpose(2, 0, 1)).transpose(1, 2, 0)  # as resized_crop
    frozen = plain.copy()
    frozen.flags.writeable = False  # as np.asarray of a PIL image
    batch = stack_images([plain, view, frozen])
    want = torch.from_numpy(np.stack([plain] * 3)).permute(0, 3, 1, 2)
    assert batch.is_contiguous() and batch.dtype == torch.uint8 and torch.equal(batch, want)
    assert not batch.is_shared() and stack_images([plain], shared=True).is_shared()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "WEBP")]
)
def test_other_modes_and_formats_become_rgb(mode, fmt):
    data = encode(smooth_image(40, 30, mode), fmt)
    out = transform_image(data, ImageTransformConfig(16, train=True), random.Random(1))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_flip_is_off_by_default_and_random_when_on():
    data = encode(smooth_image(32, 32), "PNG")
    eval_like = ImageTransformConfig(32, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    outs = [transform_image(data, eval_like, random.Random(s)) for s in range(8)]
    assert all(o[:, 0].mean() > o[:, -1].mean() for o in outs)  # bright left edge kept
    flipping = ImageTransformConfig(32, True, (1.0, 1.0), (1.0, 1.0), hflip=True)
    flips = [transform_image(data, flipping, random.Random(s)) for s in range(8)]
    assert {bool(o[:, 0].mean() < o[:, -1].mean()) for o in flips} == {True, False}
    flipped = next(f for f, o in zip(flips, outs) if not np.array_equal(f, o))
    assert np.array_equal(flipped, outs[0][:, ::-1])  # a mirror of the same crop


def test_corrupt_bytes_raise():
    with pytest.raises(Exception):  # noqa: B017 - PIL raises several types; the loader counts any
        transform_image(b"\xff\xd8 not a jpeg", ImageTransformConfig(16), random.Random(0))


def test_normalize_maps_0_255_to_minus_1_1_in_nchw():
    images = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    out = normalize_images(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert out[0].eq(-1).all() and out[1].eq(1).all()


def test_tokenize_batch_pads_to_longest_and_truncates(minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    ids, mask = tokenize_batch(tokenizer, ["a dog", "a dog on a red sofa next to a window"], 6)
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == mask.dtype == torch.long
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0] and mask[1].all()
    short_ids, _ = tokenize_batch(tokenizer, ["a dog", "a cat"], 64)
    assert short_ids.shape == (2, 4)  # [CLS] a dog [SEP]
