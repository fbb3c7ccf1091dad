"""Pixels as every part of UMT prepares them: 8-bit RGB (alpha over white, high bit depths
scaled, not clipped), the evaluation crop (the central square), the resized crop (bicubic with
antialiasing) and the normalisation (x / 255 - mean) / std.

The sharder and the loader (`data_pipeline`), `umt.load`'s processor and the image processor
an export carries (`hf_processing.py`) all call these, so an image becomes the same tensor in
each. Only PIL, numpy and torch: an export carries this file as remote code. It lives on the data
side (the lowest floor); `umt/model/pixels.py` is a symbolic link to it, so that the model's
package, which an export copies whole, holds it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported where used: the sharder converts pixels without torch
    import torch

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def eval_pixels(
    images: list[Image.Image],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """(B, 3, image_size, image_size) float32: each image converted to 8-bit RGB, its central
    square resized (bicubic) to `image_size`, normalised: what evaluation feeds the model."""
    arrays = [
        resized_crop(to_rgb(image), eval_crop_box(*image.size), image_size) for image in images
    ]
    return normalize_pixels(stack_images(arrays), mean, std)


def resized_crop(image: Image.Image | np.ndarray, box: Box, size: int) -> np.ndarray:
    """(size, size, 3) uint8: `box` of an RGB or greyscale image (or an (H, W, 3) uint8 array),
    rounded to whole pixels, cropped, then resized with PIL's bicubic filter widened by the
    downscale factor (antialiased), as torchvision's resized crop does.

    The resize is torch's uint8 kernel (SIMD on x86), 4-5x faster than PIL's own on one core:
    on photos, 99.9% of values equal PIL's crop-then-resize to within 1 grey level. Only the
    crop's pixels are sampled: PIL's `resize(box=...)` also reads pixels outside the box at its
    edges.
    """
    import torch
    import torch.nn.functional as F

    array = isinstance(image, np.ndarray)
    width, height = (image.shape[1], image.shape[0]) if array else image.size
    # Each edge to its nearest whole pixel (halves to even), so no edge moves by more than half a
    # pixel: the central square of 500x333 becomes 333 high and 332 wide, centred. Against PIL's
    # resize of the exact fractional box, on sklearn's photos (train and eval crops, 64-224 px),
    # this is the closest of the roundings tried: mean |diff| 0.09 grey levels at full decode and
    # 2.66 at the draft scales, where keeping the side whole and rounding the corner gave 0.19
    # and 4.45 (the half-pixel shift), and rounding halves up 0.19 and 2.77.
    left = min(max(round(box[0]), 0), width - 1)
    top = min(max(round(box[1]), 0), height - 1)
    right = min(max(round(box[2]), left + 1), width)
    bottom = min(max(round(box[3]), top + 1), height)
    if array:
        pixels = _writable(image)[top:bottom, left:right]  # a view
    else:
        crop = image.crop((left, top, right, bottom))
        if crop.mode != "RGB":
            crop = crop.convert("RGB")
        pixels = np.array(crop, dtype=np.uint8)  # writable: torch shares it, warning-free
    if pixels.shape[:2] == (size, size):
        return pixels
    # (1, 3, h, w) channels-last view of the HWC array: the memory layout the fast kernel takes
    nchw = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(nchw, size=(size, size), mode="bicubic", antialias=True)
    # An (H, W, 3) view of the (3, H, W) result: `stack_images` copies it into the batch as it
    # lies, where a transposing copy here would cost as much as the resize.
    return out[0].permute(1, 2, 0).numpy()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparent parts become white rather than whatever colour they hid, and
    more than 8 bits per channel are scaled down, not clipped (`to_8bit`)."""
    if image.mode == "RGB":
        return image
    image = to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """A greyscale image of 16 or 32 bits (I;16*, I) or of floats (F) as 8-bit "L".

    PIL's own convert clips these (a mid-grey 16-bit PNG turns white, a float image in [0, 1]
    black). Scaled instead: 16-bit values (and 32-bit ones within 0..65535) by 255/65535; floats
    within [0, 1] by 255, within [0, 255] as they are; any other range maps its minimum to 0
    and its maximum to 255. Other modes pass through.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image).astype(np.float64)
    if values.size == 0:
        return image.convert("L")
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("pixel values are not finite (NaN or infinity)")
    if image.mode != "F" and low >= 0 and high <= 65535:
        scaled = values * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif image.mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def eval_crop_box(width: int, height: int) -> Box:
    """Central square of side min(width, height): resize-shorter-side then center-crop in one box."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def stack_images(images: list[np.ndarray], shared: bool = False) -> torch.Tensor:
    """List of (H, W, 3) uint8 arrays -> (B, 3, H, W) uint8, contiguous: what batches carry (a
    quarter of float32's bytes through worker queues and host-to-device copies).

    One copy per image, straight into the batch (a transposing one unless the array is a view
    of a (3, H, W) array, as `resized_crop` returns). `shared`: the batch is made in shared
    memory, so a DataLoader worker hands it to the main process without copying it there.
    """
    import torch

    planes = [torch.from_numpy(_writable(image)).permute(2, 0, 1) for image in images]
    out = torch.empty((len(planes), *planes[0].shape), dtype=torch.uint8)
    if shared:
        out.share_memory_()
    return torch.stack(planes, out=out)


def _writable(array: np.ndarray) -> np.ndarray:
    """An array torch can share: writable (np.asarray of a PIL image is not; torch warns) and
    without negative strides (a flipped view, which torch refuses)."""
    if array.flags.writeable and min(array.strides, default=0) >= 0:
        return array
    return np.array(array)


def normalize_pixels(
    pixels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> `dtype` (default float32), (x / 255 - mean) / std, on the pixels'
    own device (the GPU in training). Computed in float32 whatever `dtype`, then cast once."""
    import torch

    batch = pixels.to(torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    # One fused multiply-add: x * (1 / 255 std) - mean / std.
    return batch.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t).to(dtype or torch.float32)
