"""Masked language modelling on the fused text positions (BERT's 15%, 80/10/10 recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def mask_tokens(
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels with IGNORE where not predicted).

    The first token ([CLS]) and the last real token ([SEP]) of each row are never masked, so no
    tokenizer-specific special ids are needed. Of the chosen tokens 80% become [MASK], 10% a random
    token, 10% stay.
    """
    device = input_ids.device
    real = attention_mask.bool().clone()
    real[:, 0] = False
    last = attention_mask.long().sum(dim=1) - 1
    real[torch.arange(len(last), device=device), last.clamp_min(0)] = False

    def rand() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    chosen = (rand() < probability) & real
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = rand()
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(
        vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype
    )
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 at least over predicted positions; 0 (with a graph) when none
    was masked."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
