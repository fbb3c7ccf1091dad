"""An export's preprocessing for `AutoImageProcessor` and `AutoProcessor`: `UMTImageProcessor`
(`preprocessor_config.json`) and `UMTProcessor` (`processor_config.json`, with the tokenizer).

They give the tensors `umt.load`'s processor gives, through the same functions (`eval_pixels`,
`tokenize`), and an export carries this file as remote code, like the model's.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .pixels import eval_pixels


def tokenize(tokenizer, text: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask`, (B, T) int64, padded to the longest text, cut at
    `max_length` tokens: as the loader tokenises captions in training."""
    enc = tokenizer(
        text,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class UMTImageProcessor(BaseImageProcessor):
    """PIL images -> `pixel_values` (B, 3, S, S) float32 as evaluation prepares them: 8-bit RGB,
    the central square resized (bicubic) to `image_size`, normalised by `image_mean`/`image_std`."""

    model_input_names = ["pixel_values"]
    _auto_class = "AutoImageProcessor"  # `save_pretrained` writes this code beside its config

    def __init__(
        self,
        image_size: int = 224,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixels = eval_pixels(images, self.image_size, tuple(self.image_mean), tuple(self.image_std))
        return BatchFeature({"pixel_values": pixels})


class UMTProcessor(ProcessorMixin):
    """Images and texts -> `pixel_values`, `input_ids`, `attention_mask`, as in evaluation."""

    _auto_class = "AutoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, text_max_length: int = 64, **kwargs):
        self.text_max_length = text_max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        out = {}
        if images is not None:
            out |= self.image_processor(images)
        if text is not None:
            out |= tokenize(self.tokenizer, [text] if isinstance(text, str) else text,
                            self.text_max_length)  # fmt: skip
        return BatchFeature(out)
