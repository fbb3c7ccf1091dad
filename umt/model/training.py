"""What training adds to the network of `unified.py`: its pretraining objective. `build_model`
builds the model that `umt train`, evaluation and `umt.load` use; an export's remote code builds
the same network without it (it needs neither UMT's objectives nor DeepSpeed).
"""

from __future__ import annotations

import logging

from umt.model.config import ModelConfig, preset_config
from umt.model.unified import UnifiedMultimodalTransformer, format_parameter_table
from umt.objectives.step import pretraining_objective

log = logging.getLogger("umt.model")


def build_model(cfg: ModelConfig | str, log_table: bool = True) -> UnifiedMultimodalTransformer:
    """Build towers (from config or `from_pretrained`), fusion and heads, with the pretraining
    objective; log a parameter table."""
    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    model = UnifiedMultimodalTransformer.from_config(cfg, pretraining_objective)
    if log_table:
        name = cfg.preset or "custom"
        log.info("model %s:\n%s", name, format_parameter_table(model.num_parameters()))
    return model
