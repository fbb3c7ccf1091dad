"""What training adds to the network of `unified.py`: its pretraining objective, and with
`model.compile` its compiled blocks. `build_model` builds the model that `umt train`, evaluation
and `umt.load` use; an export's remote code builds the same network without it (it needs neither
UMT's objectives nor DeepSpeed).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

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


def transformer_blocks(model: UnifiedMultimodalTransformer) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformer block: the text tower's and the image tower's layers,
    then the fusion's blocks. Each is one repeated structure that compiles as one graph."""
    blocks = []
    for part in ("text_tower", "image_tower", "fusion"):
        # A tower's layers are its first ModuleList (`encoder.layer` or `layers`, by version).
        name, layers = next(
            (name, m)
            for name, m in getattr(model, part).named_modules()
            if isinstance(m, nn.ModuleList)
        )
        blocks += [(f"{part}.{name}.{i}", block) for i, block in enumerate(layers)]
    return blocks


def compile_blocks(model: UnifiedMultimodalTransformer) -> list[str]:
    """Compile each transformer block's `forward` in place (torchtitan compiles per block): the
    blocks of a tower share their compiled code, the glue around them (embeddings, masks, the
    objectives' collectives and sampling) stays eager, and the state dict keeps its names (no
    `_orig_mod.`), so checkpoints load in eager and compiled runs alike. The names.

    `forward` and not the whole call (`nn.Module.compile`): hooks on a block then run outside
    its graph. ZeRO-3 gathers a block's parameters in such hooks, which are `torch.compiler`-
    disabled: inside the graph each would break it (and retrace it as parameters come and go).
    """
    blocks = transformer_blocks(model)
    for _, block in blocks:
        block.forward = torch.compile(block.forward)
    return [name for name, _ in blocks]
