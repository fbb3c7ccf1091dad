"""Fusion transformer: pre-norm blocks over concat(text tokens, image tokens) + modality-type embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from umt.model.config import FusionConfig

TEXT, IMAGE = 0, 1  # modality-type ids


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and SDPA."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(
                f"fusion.hidden_size {width} is not divisible by num_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D); keep: (B, 1, 1, L) bool, True where a key may be attended to.
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class FusionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), keep))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class FusionTransformer(nn.Module):
    """Joint encoder of text and image tokens; position 0 (the text CLS) summarises the pair."""

    def __init__(self, cfg: FusionConfig, text_width: int, image_width: int):
        super().__init__()
        d = cfg.hidden_size
        self.text_in = nn.Linear(text_width, d) if text_width != d else nn.Identity()
        self.image_in = nn.Linear(image_width, d) if image_width != d else nn.Identity()
        # A direct parameter (not an nn.Embedding) so ZeRO-3 gathers it with this module's forward.
        self.modality_embed = nn.Parameter(torch.empty(2, d).normal_(std=0.02))
        self.blocks = nn.ModuleList(
            FusionBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(
        self,
        text_tokens: torch.Tensor,  # (B, T, Dt)
        text_mask: torch.Tensor,  # (B, T), 1 for real tokens, 0 for padding
        image_tokens: torch.Tensor,  # (B, P, Dv)
    ) -> torch.Tensor:  # (B, T + P, D)
        text = self.text_in(text_tokens) + self.modality_embed[TEXT]
        image = self.image_in(image_tokens) + self.modality_embed[IMAGE]
        x = torch.cat([text, image], dim=1)
        image_keep = text_mask.new_ones(image_tokens.shape[:2])
        keep = torch.cat([text_mask, image_keep], dim=1).bool()[:, None, None, :]
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
        return self.ln_final(x)
