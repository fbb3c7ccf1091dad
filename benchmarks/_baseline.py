"""The straightforward design the benchmarks measure UMT against, and the switches of its ablations.

Baseline ("the common way", BLIP/ALBEF style), on the same model weights:
- eager attention everywhere: explicit softmax(QKᵀ/√d)V in both towers (HF `eager`) and in the
  fusion blocks, with separate Q, K and V projections;
- ITM negatives by all-gathering (with grad) every rank's full text token sequences, masks and
  image token sequences, then indexing the hard negatives locally;
- three separate fusion passes (positives, negative texts, negative images), each re-projecting
  the same positive tokens, instead of one stacked pass.
Same ITC, same negatives (same sampler and seed), same MLM, so the losses agree with UMT's
to float rounding: the benchmarks print the difference as a check that the work is the same.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from umt.distributed import all_reduce, fetch_rows, gather_no_grad, gather_with_grad, rank
from umt.model.fusion import SelfAttention
from umt.objectives import ObjectiveConfig, PretrainOutput, mix_seed
from umt.objectives.contrastive import contrastive_outputs
from umt.objectives.hard_negatives import sample_hard_negatives
from umt.objectives.itm import itm_loss
from umt.objectives.pretrain import masked_language_modelling


class AblationAttention(nn.Module):
    """`SelfAttention` with switches: fused or separate QKV projections, SDPA or eager softmax."""

    def __init__(self, src: SelfAttention, fused_qkv: bool, sdpa: bool):
        super().__init__()
        self.num_heads, self.fused_qkv, self.sdpa = src.num_heads, fused_qkv, sdpa
        width = src.out.in_features
        self.out = copy.deepcopy(src.out)
        if fused_qkv:
            self.qkv = copy.deepcopy(src.qkv)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
            with torch.no_grad():
                for i, proj in enumerate((self.q, self.k, self.v)):
                    proj.weight.copy_(src.qkv.weight[i * width : (i + 1) * width])
                    proj.bias.copy_(src.qkv.bias[i * width : (i + 1) * width])

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        if self.fused_qkv:
            q, k, v = self.qkv(x).view(b, n, 3, h, d // h).unbind(2)
        else:
            q, k, v = (p(x).view(b, n, h, d // h) for p in (self.q, self.k, self.v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)  # (B, H, L, L)
            y = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def configure(model: nn.Module, *, sdpa: bool = True, fused_qkv: bool = True) -> nn.Module:
    """A deep copy of `model` (same weights) with the chosen attention implementation."""
    model = copy.deepcopy(model)
    if not sdpa:
        model.text_tower.set_attn_implementation("eager")
        model.image_tower.set_attn_implementation("eager")
    if not (sdpa and fused_qkv):
        for block in model.fusion.blocks:
            block.attn = AblationAttention(block.attn, fused_qkv, sdpa)
    return model


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[1]
    return x if extra == 0 else F.pad(x, [0, 0] * (x.dim() - 2) + [0, extra])


def reference_losses(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None,
    cfg: ObjectiveConfig,
    seed: int,
    *,
    all_gather: bool = True,
    stacked: bool = False,
    group=None,
) -> PretrainOutput:
    """`umt.objectives.pretraining_losses` done the common way (see the module docstring).

    `all_gather=False` fetches negatives like UMT; `stacked=True` runs one fusion pass like UMT:
    each switch alone is one of the ablations of `benchmarks/train_step.py`.
    """
    text = model.embed_text(input_ids, attention_mask)
    image = model.embed_image(pixel_values)
    itc = contrastive_outputs(image.embeds, text.embeds, model.scale(), image_ids, group)
    loss = cfg.itc_weight * itc.loss
    logs = {"loss/itc": itc.loss.detach()}
    if cfg.itm_weight > 0:
        b = input_ids.shape[0]
        positions = torch.arange(b, device=pixel_values.device) + rank(group) * b
        negatives = sample_hard_negatives(  # UMT's draw: noise hashed from global positions
            itc.logits_i2t, itc.logits_t2i, itc.positives, mix_seed(seed, 0x1F), positions
        )
        length = int(all_reduce(torch.tensor([text.tokens.shape[1]]), "max", group))
        text_tokens, text_mask = _pad_to(text.tokens, length), _pad_to(text.mask, length)
        if all_gather:  # every rank's whole sequences: W*b*(T+P)*D floats, and their gradients
            all_text = gather_with_grad(text_tokens, group)
            all_mask = gather_no_grad(text_mask, group)
            all_image = gather_with_grad(image.tokens, group)
            neg_text_tokens = all_text[negatives.text_index]
            neg_text_mask = all_mask[negatives.text_index]
            neg_image_tokens = all_image[negatives.image_index]
        else:
            neg_text_tokens = fetch_rows(text_tokens, negatives.text_index, group)
            neg_text_mask = fetch_rows(text_mask, negatives.text_index, group)
            neg_image_tokens = fetch_rows(image.tokens, negatives.image_index, group)
        pairs = [
            (text_tokens, text_mask, image.tokens),
            (neg_text_tokens, neg_text_mask, image.tokens),
            (text_tokens, text_mask, neg_image_tokens),
        ]
        if stacked:
            logits = model.itm_logits(*(torch.cat(parts) for parts in zip(*pairs)))
        else:
            logits = torch.cat([model.itm_logits(*pair) for pair in pairs])
        itm = itm_loss(logits, negatives.text_valid, negatives.image_valid)
        loss = loss + cfg.itm_weight * itm.loss
        logs["loss/itm"] = itm.loss.detach()
    if cfg.mlm_weight > 0:  # as UMT does it: the ablations are about ITM
        mlm = masked_language_modelling(
            model, input_ids, attention_mask, image.tokens, cfg, mix_seed(seed, rank(group))
        )
        loss = loss + cfg.mlm_weight * mlm
        logs["loss/mlm"] = mlm.detach()
    logs["loss/total"] = loss.detach()
    return PretrainOutput(loss, logs)
