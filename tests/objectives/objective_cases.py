"""Deterministic inputs shared by the multi-rank script and the single-process references."""

from __future__ import annotations

import torch

from umt.model import build_model, preset_config

GLOBAL_BATCH = 6
KEYS_DISTINCT = None
# "a" appears on both ranks (rows 0 and 4), "c" twice on rank 0: cross-rank and local positives.
KEYS_SHARED = ["a", "c", "c", "b", "a", "d"]


def tiny_model(dtype: torch.dtype = torch.float64, multiway: bool = False):
    """The tiny preset; `multiway`: modality experts, a vision-language expert in the top block
    and ITC from the fusion's text-only / image-only passes."""
    cfg = preset_config("tiny")
    cfg.text.vocab_size = 200
    if multiway:
        cfg.fusion.type, cfg.fusion.vl_expert_layers, cfg.itc_from = "multiway", 1, "fusion"
    torch.manual_seed(0)
    return build_model(cfg, log_table=False).to(dtype)


def global_batch(dtype: torch.dtype = torch.float64, n: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n, 3, 32, 32, generator=g).to(dtype)
    ids = torch.randint(5, 200, (n, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(n, 9, dtype=torch.long)
    for i in range(n):  # varied lengths, padded at the end
        mask[i, 9 - (i % 4) :] = 0
    return pixels, ids, mask


def itc_loss_and_grads(model, pixels, ids, mask, keys, group=None):
    from umt.objectives import contrastive_loss

    model.zero_grad(set_to_none=True)
    loss = contrastive_loss(
        model.encode_image(pixels), model.encode_text(ids, mask), model.scale(), keys, group
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads
