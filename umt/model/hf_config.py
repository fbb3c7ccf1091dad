"""`UMTConfig`: the `config.json` of an export, a transformers `PretrainedConfig` of model type
`umt` (kept apart from `umt.hf` so that `AutoConfig` does not import the model code)."""

from __future__ import annotations

from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "umt"


class UMTConfig(PretrainedConfig):
    """`umt_model`: the `model:` section of the training config (towers, fusion, heads);
    `image_processing` and `text_max_length`: how inputs were prepared in training."""

    model_type = MODEL_TYPE

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

    def model_config(self):
        """The typed `ModelConfig`; towers are built from it, never fetched from the Hub."""
        from umt.model.config import for_saved_weights, model_config_from_dict  # heavy package

        cfg = model_config_from_dict(self.umt_model)
        return for_saved_weights(cfg, self.name_or_path or "UMTConfig")
