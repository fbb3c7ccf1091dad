"""The unified multimodal transformer: towers, fusion, heads, presets and `build_model`.

Names are loaded when first used: `umt.model.config` (imported by every command's config) and
the Hugging Face config (imported while transformers' own auto classes load) stay light, while
the network pulls in torch and transformers, and `build_model` the objectives.
"""

from __future__ import annotations

import importlib

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

_LAZY = {
    "FusionTransformer": "umt.model.fusion",
    "build_image_tower": "umt.model.towers",
    "build_text_tower": "umt.model.towers",
    "ImageFeatures": "umt.model.unified",
    "TextFeatures": "umt.model.unified",
    "UnifiedMultimodalTransformer": "umt.model.unified",
    "format_parameter_table": "umt.model.unified",
    "build_model": "umt.model.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FusionConfig",
    "ImageTowerConfig",
    "ModelConfig",
    "TextTowerConfig",
    "list_presets",
    "model_config_from_dict",
    "model_config_to_dict",
    "preset_config",
    *_LAZY,
]
