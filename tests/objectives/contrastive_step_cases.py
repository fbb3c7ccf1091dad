"""The global batch, models and objective variants of the contrastive-batch tests, shared by the
torchrun script and the one-process references."""

from __future__ import annotations

import torch
import torch.distributed as dist

from data_pipeline.sample_ids import key_ids
from umt.model import build_model, preset_config
from umt.objectives import ObjectiveConfig

N = 16  # samples in the step's global batch
VARIANTS = {
    "gather_softmax": ObjectiveConfig(itc_impl="gather", contrastive_batch="step"),
    "ring_softmax": ObjectiveConfig(itc_impl="ring", itc_tile=3, contrastive_batch="step"),
    "ring_sigmoid": ObjectiveConfig(
        itc_impl="ring", itc_loss="sigmoid", itc_tile=5, contrastive_batch="step"
    ),
}


def step_model(objectives: ObjectiveConfig, dropout: float = 0.0):
    """The tiny preset in float64, training mode; a sigmoid loss gets SigLIP's bias."""
    cfg = preset_config("tiny")
    cfg.text.vocab_size = 200
    cfg.text.dropout = cfg.image.dropout = cfg.fusion.dropout = dropout
    if objectives.itc_loss == "sigmoid":
        cfg.logit_bias_init, cfg.logit_scale_init = -2.0, 2.302585
    torch.manual_seed(0)
    return build_model(cfg, log_table=False).double().train()


def global_step_batch():
    """(pixels, raw uint8 pixels, ids, mask, image ids) of the N samples, by step position.
    Image keys: triplets of consecutive positions share one (so they span micro-batches and
    ranks), and every seventh sample shows image "x"."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8)
    pixels = raw.double() / 255 * 2 - 1
    ids = torch.randint(5, 200, (N, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(N, 9, dtype=torch.long)
    for i in range(N):  # varied lengths, padded at the end
        mask[i, 9 - (i % 4) :] = 0
    keys = ["x" if p % 7 == 6 else f"k{p // 3}" for p in range(N)]
    return pixels, raw, ids, mask, key_ids(keys)


def averaged(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t
