"""Image preparation: decode within limits, orient, convert to 8-bit RGB, resize, encode."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_pipeline.pixels import to_rgb
from data_pipeline.shard.options import IMAGE_FORMATS, RESAMPLE_FILTERS, SampleError, ShardOptions

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


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def prepare_image(data: bytes, options: ShardOptions) -> StoredImage:
    """Check, resize and encode one image; raise `SampleError` with the reason it is unusable."""
    try:
        with warnings.catch_warnings():
            # Our own --max-pixels check below reports bombs; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # PIL refuses images over twice its own limit before our check can run: make its
            # limit ours, so that a --max-pixels above PIL's default is honoured.
            Image.MAX_IMAGE_PIXELS = options.max_pixels
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL's own check
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{size.group(1)} pixels" if size else "its size"
        raise SampleError(
            "decompression_bomb", f"{pixels} is over --max-pixels {options.max_pixels}"
        ) from exc
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
    if options.no_upscale:
        scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_size(width: int, height: int, options: ShardOptions) -> tuple[int, int]:
    if options.resize == "center_crop" and options.no_upscale:
        side = min(options.image_size, width, height)
        return side, side
    if options.resize in ("center_crop", "border"):
        return options.image_size, options.image_size
    return scaled_size(width, height, options)


def resize_image(image: Image.Image, options: ShardOptions) -> Image.Image:
    if options.resize == "none":
        return image
    width, height = image.size
    size = options.image_size
    if options.resize == "center_crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        out = output_size(width, height, options)[0]
        return image.resize((out, out), resample_filter(side, out, options), box=box)
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
