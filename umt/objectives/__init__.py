"""Objectives as pure functions of tensors and a process group: ITC, hard-negative ITM, MLM."""

from umt.objectives.contrastive import (
    ContrastiveOutput,
    contrastive_loss,
    contrastive_outputs,
    key_ids,
    positive_mask,
)
from umt.objectives.hard_negatives import HardNegatives, sample_hard_negatives
from umt.objectives.itm import ItmOutput, itm_loss
from umt.objectives.mlm import mask_tokens, mlm_loss
from umt.objectives.pretrain import ObjectiveConfig, PretrainOutput, mix_seed, pretraining_losses
from umt.objectives.ring import Mining, ring_contrastive

__all__ = [
    "ContrastiveOutput",
    "HardNegatives",
    "ItmOutput",
    "Mining",
    "ObjectiveConfig",
    "PretrainOutput",
    "contrastive_loss",
    "contrastive_outputs",
    "itm_loss",
    "key_ids",
    "mask_tokens",
    "mix_seed",
    "mlm_loss",
    "positive_mask",
    "pretraining_losses",
    "ring_contrastive",
    "sample_hard_negatives",
]
