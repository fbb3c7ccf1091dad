"""`UMTConfig`: the `config.json` of an export, a transformers `PretrainedConfig` of model type
`umt` (apart from `hf_model.py`, so that `AutoConfig` does not import the model code)."""

from __future__ import annotations

from transformers.configuration_utils import PretrainedConfig

from .config import ModelConfig, for_saved_weights, model_config_from_dict

MODEL_TYPE = "umt"


class UMTConfig(PretrainedConfig):
    """`umt_model`: the `model:` section of the training config (towers, fusion, heads);
    `image_processing` and `text_max_length`: how inputs were prepared in training."""

    model_type = MODEL_TYPE
    # Saved with its code, as the Hub's custom models are: `save_pretrained` writes this file
    # (and what it imports) beside config.json, and `auto_map` into it.
    _auto_class = "AutoConfig"

    def __init__(
        self,
        umt_model: dict | None = None,
        image_processing: dict | None = None,
        text_max_length: int = 64,
        **kwargs,
    ):
        self.umt_model = umt_model or {}
        self.image_processing = image_processing or {}
        self.text_max_length = text_max_length
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The typed `ModelConfig`; towers are built from it, never fetched from the Hub."""
        cfg = model_config_from_dict(self.umt_model)
        return for_saved_weights(cfg, self.name_or_path or "UMTConfig")
