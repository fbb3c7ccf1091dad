"""The Hugging Face face of a UMT model: `UMTModel` (a `PreTrainedModel`) over `UMTConfig`.

An export folder (`umt export`) is a `save_pretrained` folder: `config.json`, `model.safetensors`,
the tokenizer and processor files, and this module with the modules it imports (relative
imports only), named in config.json's `auto_map` as the Hub's custom models do. So
`AutoModel.from_pretrained(dir, trust_remote_code=True)` loads it where UMT is not installed,
and after `import umt` (which registers the `umt` model type) `AutoModel.from_pretrained(dir)`,
`device_map=` loading through accelerate and `push_to_hub` work as for any model of the Hub.
The network itself is `UnifiedMultimodalTransformer`, held as `UMTModel.umt` (without the
pretraining objective: train it through `umt.model.build_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .hf_config import UMTConfig
from .unified import UnifiedMultimodalTransformer


@dataclass
class UMTOutput(ModelOutput):
    """Embeddings and contrastive logits of a batch (as `CLIPModel` returns them)."""

    logits_per_image: torch.Tensor | None = None  # (I, T) scaled cosine similarities
    logits_per_text: torch.Tensor | None = None  # (T, I)
    text_embeds: torch.Tensor | None = None  # (T, E) L2-normalised
    image_embeds: torch.Tensor | None = None  # (I, E) L2-normalised


class UMTModel(PreTrainedModel):
    """A UMT model for inference and fine-tuning in the transformers ecosystem."""

    config_class = UMTConfig
    base_model_prefix = "umt"
    main_input_name = "pixel_values"
    # Blocks that `device_map="auto"` must keep whole on one device.
    _no_split_modules = ["BertLayer", "ViTLayer", "FusionBlock", "BertEmbeddings", "ViTEmbeddings"]
    _supports_sdpa = True
    _auto_class = "AutoModel"  # `save_pretrained` writes this code beside the weights

    def __init__(self, config: UMTConfig):
        super().__init__(config)
        self.umt = UnifiedMultimodalTransformer.from_config(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The towers initialise themselves (they are `PreTrainedModel`s); weights of an export
        are loaded over this."""

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(T, E) normalised text embeddings."""
        return self.umt.encode_text(input_ids, attention_mask)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, E) normalised image embeddings."""
        return self.umt.encode_image(pixel_values)

    def score_pairs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """(B,) ITM match probability of text i with image i, through the fusion transformer."""
        return self.umt.score_pairs(input_ids, attention_mask, pixel_values)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> UMTOutput:
        text = image = per_image = per_text = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            text = self.get_text_features(input_ids, attention_mask)
        if pixel_values is not None:
            image = self.get_image_features(pixel_values)
        if text is not None and image is not None:
            per_image = self.umt.scale() * image @ text.T
            per_text = per_image.T
        return UMTOutput(per_image, per_text, text, image)
