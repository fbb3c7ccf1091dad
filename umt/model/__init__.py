"""The unified multimodal transformer: towers, fusion, heads, presets and `build_model`."""

from __future__ import annotations

import logging

from umt.model.config import (
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    TextTowerConfig,
    list_presets,
    model_config_from_dict,
    model_config_to_dict,
    preset_config,
)
from umt.model.fusion import FusionTransformer
from umt.model.towers import build_image_tower, build_text_tower
from umt.model.unified import (
    ImageFeatures,
    TextFeatures,
    UnifiedMultimodalTransformer,
    _check_heads,
    format_parameter_table,
)

log = logging.getLogger("umt.model")


def build_model(cfg: ModelConfig | str, log_table: bool = True) -> UnifiedMultimodalTransformer:
    """Build towers (from config or `from_pretrained`), fusion and heads; log a parameter table."""
    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    _check_heads(cfg)
    text_tower = build_text_tower(cfg.text)
    image_tower = build_image_tower(cfg.image)
    fusion = FusionTransformer(
        cfg.fusion,
        text_tower.config.hidden_size,
        image_tower.config.hidden_size,
        modality_passes=cfg.itc_from == "fusion",
    )
    model = UnifiedMultimodalTransformer(cfg, text_tower, image_tower, fusion)
    if log_table:
        name = cfg.preset or "custom"
        log.info("model %s:\n%s", name, format_parameter_table(model.num_parameters()))
    return model


__all__ = [
    "FusionConfig",
    "FusionTransformer",
    "ImageFeatures",
    "ImageTowerConfig",
    "ModelConfig",
    "TextFeatures",
    "TextTowerConfig",
    "UnifiedMultimodalTransformer",
    "build_image_tower",
    "build_model",
    "build_text_tower",
    "format_parameter_table",
    "list_presets",
    "model_config_from_dict",
    "model_config_to_dict",
    "preset_config",
]
