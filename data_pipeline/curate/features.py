"""Per-image features the global step decides on, and the per-shard table that holds them.

From the fully decoded RGB pixels (decoding is also what tells a readable sample from one that
is not, as the loader would find it):

* `pixel_sha`: sha256 of the pixels and size: exact duplicates, whatever their encoding.
* `phash`: 19 perceptual hashes of 64 bits (pHash: the 8x8 lowest frequencies of the DCT of a
  32x32 grey thumbnail, each bit "above the median"), of the whole image (view 0) and of its
  95% and 90% crops at 3x3 anchor positions. A crop of up to 10% of the border has a view of its
  original aligned within 2.5% of the side, so their hashes stay within a few bits; JPEG
  re-encodes and resizes barely move view 0.
* `color`: a 4x4x4 RGB histogram (soft bins, uint16 of mass x 65535). Grey hashes are blind to
  hue: two scenes alike in layout and brightness but not in colour differ here.

Everything comes from one 64x64 area-averaged thumbnail, views by precomputed resampling
matrices, so hashing costs about one full decode.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from data_pipeline.shard.images import to_rgb

FEATURES_VERSION = 1  # in the table's file name: a change of any definition here bumps it
THUMB = 64  # thumbnail side (pixels) every feature but pixel_sha is computed from
DCT_SIDE, LOW = 32, 8  # pHash: a 32x32 grey image, its 8x8 lowest DCT frequencies
VIEW_SCALES = (1.0, 0.95, 0.9)
ANCHORS = 3  # per axis, for each scale below 1
HIST_BINS = 4  # per channel


def view_boxes() -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) as fractions of the image: the whole, then the crops, row by row."""
    boxes = []
    for scale in VIEW_SCALES:
        if scale == 1.0:
            boxes.append((0.0, 0.0, 1.0, 1.0))
            continue
        for y in np.linspace(0, 1 - scale, ANCHORS):
            for x in np.linspace(0, 1 - scale, ANCHORS):
                boxes.append((float(x), float(y), float(x + scale), float(y + scale)))
    return boxes


VIEWS = len(view_boxes())  # 19


def area_matrix(lo: float, hi: float) -> np.ndarray:
    """(DCT_SIDE, THUMB): each output pixel the area-weighted mean of the thumbnail pixels of its
    span of [lo, hi) (fractions of the side): a box-filtered resample of a crop."""
    edges = np.linspace(lo * THUMB, hi * THUMB, DCT_SIDE + 1)
    cells = np.arange(THUMB)
    left = np.maximum(edges[:-1, None], cells[None, :])
    right = np.minimum(edges[1:, None], cells[None, :] + 1)
    weights = np.clip(right - left, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _view_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row matrices of the distinct vertical spans (U, LOW, THUMB), each view's span (V,),
    column matrices transposed (V, THUMB, LOW)): a view's low frequencies are
    rows[span] @ grey @ cols; views share 7 vertical spans, computed once per image."""
    n = np.arange(DCT_SIDE)
    dct = 2 * np.cos(np.pi * np.outer(np.arange(LOW), 2 * n + 1) / (2 * DCT_SIDE))  # DCT-II rows
    spans = sorted({(y0, y1) for _, y0, _, y1 in view_boxes()})
    rows = np.stack([dct @ area_matrix(y0, y1) for y0, y1 in spans])
    span = np.array([spans.index((y0, y1)) for _, y0, _, y1 in view_boxes()])
    cols = np.stack([(dct @ area_matrix(x0, x1)).T for x0, _, x1, _ in view_boxes()])
    return rows, span, cols


ROWS, VIEW_SPAN, COLS_T = _view_matrices()
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L"


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> loaded RGB image, converted as the sharder and loader do (alpha over
    white, 16-bit scaled); raises on anything PIL cannot decode."""
    image = Image.open(io.BytesIO(data))
    image.load()
    rgb = to_rgb(image)
    return rgb if rgb.mode == "RGB" else rgb.convert("RGB")


def pixel_sha(rgb: Image.Image) -> str:
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:32]


def perceptual_hashes(thumbs: np.ndarray) -> list[bytes]:
    """(n, THUMB, THUMB, 3) uint8 thumbnails -> per image VIEWS x 8 bytes of 64-bit pHashes.
    Batched: the numpy calls are few whatever n (per image, their overhead was most of the cost)."""
    grey = thumbs.astype(np.float64) @ LUMA  # (n, THUMB, THUMB)
    # Stacked products: numpy loops over the images and views itself; one (THUMB, V * LOW)
    # product would go to a threaded BLAS, 100x slower on 2 shared cores at this size.
    by_span = np.matmul(ROWS[None], grey[:, None])  # (n, U, LOW, THUMB)
    low = np.matmul(by_span[:, VIEW_SPAN], COLS_T[None])  # (n, V, LOW, LOW)
    low = low.reshape(-1, LOW * LOW)
    half = LOW * LOW // 2
    middle = np.partition(low, (half - 1, half), axis=1)[:, half - 1 : half + 1]
    bits = low > middle.mean(axis=1, keepdims=True)  # above the median
    packed = np.packbits(bits, axis=1).reshape(len(thumbs), VIEWS * 8)
    return [row.tobytes() for row in packed]


def _soft_bin_table() -> np.ndarray:
    """(256, HIST_BINS): each 8-bit value's weights, linear between the two nearest bin centres,
    so a colour near a bin edge does not jump from one bin to the next."""
    x = np.arange(256) / 255 * (HIST_BINS - 1)
    lo = np.clip(np.floor(x), 0, HIST_BINS - 2).astype(np.int64)
    table = np.zeros((256, HIST_BINS))
    table[np.arange(256), lo] = 1 - (x - lo)
    table[np.arange(256), lo + 1] += x - lo
    return table


SOFT_BINS = _soft_bin_table()
HIST_SIDE = 16  # the histogram counts a 16x16 area-averaged image


def color_histograms(smalls: np.ndarray) -> list[bytes]:
    """(n, HIST_SIDE, HIST_SIDE, 3) uint8 -> per image 64 uint16: RGB mass in 4x4x4 soft bins
    (x 65535), in red, green, blue order."""
    weights = SOFT_BINS[smalls.reshape(len(smalls), -1, 3)]  # (n, P, 3, B)
    red_green = weights[:, :, 0, :, None] * weights[:, :, 1, None, :]  # (n, P, B, B)
    hist = np.matmul(
        red_green.reshape(*red_green.shape[:2], -1).transpose(0, 2, 1), weights[:, :, 2]
    )
    hist = hist.reshape(len(smalls), -1)
    hist = np.round(hist / hist.sum(axis=1, keepdims=True) * 65535).astype("<u2")
    return [row.tobytes() for row in hist]


def thumbnails(rgb: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(THUMB x THUMB, HIST_SIDE x HIST_SIDE) area averages of the image as uint8 arrays: an
    integer-factor box reduction first (fast in PIL), then box resamples."""
    factor = max(1, min(rgb.width, rgb.height) // THUMB)
    reduced = rgb.reduce(factor) if factor > 1 else rgb
    thumb = reduced.resize((THUMB, THUMB), Image.Resampling.BOX)
    small = thumb.resize((HIST_SIDE, HIST_SIDE), Image.Resampling.BOX)
    return np.asarray(thumb), np.asarray(small)


class FeatureBatch:
    """Per-image columns now (size, pixel_sha), the thumbnail-based ones (phash, color) for
    many images at once: `add` a decoded image's row, `finish` fills the pending rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.thumbs: list[np.ndarray] = []
        self.smalls: list[np.ndarray] = []

    def add(self, row: dict, rgb: Image.Image) -> None:
        row.update(width=rgb.width, height=rgb.height, pixel_sha=pixel_sha(rgb))
        thumb, small = thumbnails(rgb)
        self.rows.append(row)
        self.thumbs.append(thumb)
        self.smalls.append(small)

    def finish(self) -> None:
        if not self.rows:
            return
        codes = perceptual_hashes(np.stack(self.thumbs))
        colors = color_histograms(np.stack(self.smalls))
        for row, code, color in zip(self.rows, codes, colors):
            row.update(phash=code, color=color)
        self.__init__()


def image_features(rgb: Image.Image) -> dict:
    """The feature columns of one decoded image."""
    batch, row = FeatureBatch(), {}
    batch.add(row, rgb)
    batch.finish()
    return row


def hash_codes(column: list[bytes | None]) -> np.ndarray:
    """phash column -> (n, VIEWS) uint64 codes (rows of unreadable samples are zeros)."""
    out = np.zeros((len(column), VIEWS), dtype=np.uint64)
    for i, value in enumerate(column):
        if value is not None:
            out[i] = np.frombuffer(value, dtype="<u8")
    return out


def histograms(column: list[bytes | None]) -> np.ndarray:
    """color column -> (n, 64) float mass per bin, summing to ~1."""
    out = np.zeros((len(column), HIST_BINS**3))
    for i, value in enumerate(column):
        if value is not None:
            out[i] = np.frombuffer(value, dtype="<u2") / 65535
    return out
