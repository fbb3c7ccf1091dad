"""Fusion transformer: pre-norm blocks over concat(text tokens, image tokens) + modality-type embeddings.

`single_stream` blocks (ViLT) give every token the same feed-forward network. `multiway` blocks
(VLMo's mixture of modality experts, BEiT-3's multiway transformer) share the attention and give
each modality a feed-forward expert of its own: the text tokens (a contiguous run at the start
of the sequence) through the text expert, the image tokens through the image expert, one matmul
per expert, no router. The top `vl_expert_layers` blocks send every token of a fused pass to a
vision-language expert. With multiway blocks the fusion also runs on one modality alone
(`encode_text_only` / `encode_image_only`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import FusionConfig

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


class FeedForward(nn.Module):
    """Pre-norm feed-forward: mlp(ln(x)), the expert of a multiway block."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln(x))


class MultiwayBlock(nn.Module):
    """x + attn(ln(x)) shared by every token, then x + expert(x) with the expert of each token's
    modality: `experts` among "text", "image", "vl" (the vision-language expert)."""

    def __init__(
        self, width: int, num_heads: int, mlp_ratio: float, dropout: float, experts: list[str]
    ):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.experts = nn.ModuleDict({name: FeedForward(width, mlp_ratio) for name in experts})
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor, routes: list[tuple[str, int]]
    ) -> torch.Tensor:
        # routes: (expert, tokens) runs along the sequence, e.g. [("text", T), ("image", P)].
        x = x + self.drop(self.attn(self.ln_attn(x), keep))
        parts = x.split([n for _, n in routes], dim=1)
        y = torch.cat([self.experts[name](part) for (name, _), part in zip(routes, parts)], dim=1)
        return x + self.drop(y)


class FusionTransformer(nn.Module):
    """Joint encoder of text and image tokens; position 0 (the text CLS) summarises the pair."""

    def __init__(
        self, cfg: FusionConfig, text_width: int, image_width: int, modality_passes: bool = False
    ):
        """`modality_passes`: multiway blocks also serve text-only and image-only passes, so the
        top (vision-language) blocks keep modality experts too."""
        super().__init__()
        d = cfg.hidden_size
        self.text_in = nn.Linear(text_width, d) if text_width != d else nn.Identity()
        self.image_in = nn.Linear(image_width, d) if image_width != d else nn.Identity()
        # A direct parameter (not an nn.Embedding) so ZeRO-3 gathers it with this module's forward.
        self.modality_embed = nn.Parameter(torch.empty(2, d).normal_(std=0.02))
        self.multiway = cfg.type == "multiway"
        self.first_vl = cfg.num_layers - (cfg.vl_expert_layers if self.multiway else 0)
        if self.multiway:
            self.blocks = nn.ModuleList(
                MultiwayBlock(
                    d,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    cfg.dropout,
                    (["vl"] + (["text", "image"] if modality_passes else []))
                    if i >= self.first_vl
                    else ["text", "image"],
                )
                for i in range(cfg.num_layers)
            )
        else:
            self.blocks = nn.ModuleList(
                FusionBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
                for _ in range(cfg.num_layers)
            )
        self.ln_final = nn.LayerNorm(d)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(
        self,
        text_tokens: torch.Tensor | None,  # (B, T, Dt); None: an image-only pass
        text_mask: torch.Tensor | None,  # (B, T), 1 for real tokens, 0 for padding
        image_tokens: torch.Tensor | None,  # (B, P, Dv); None: a text-only pass
    ) -> torch.Tensor:  # (B, T + P, D)
        # One entry point for the fused and the one-modality passes: ZeRO-3 gathers this
        # module's own parameters (modality_embed, the input projections) in `forward` only.
        parts, keeps, routes = [], [], []
        if text_tokens is not None:
            parts.append(self.text_in(text_tokens) + self.modality_embed[TEXT])
            keeps.append(text_mask.bool())
            routes.append(("text", text_tokens.shape[1]))
        if image_tokens is not None:
            parts.append(self.image_in(image_tokens) + self.modality_embed[IMAGE])
            keeps.append(
                torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=parts[-1].device)
            )
            routes.append(("image", image_tokens.shape[1]))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        keep = (torch.cat(keeps, dim=1) if len(keeps) > 1 else keeps[0])[:, None, None, :]
        top = [("vl", x.shape[1])] if len(parts) > 1 else routes  # the VL expert: fused passes
        return self._run(x, keep, routes, top)

    def encode_text_only(self, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D): the text alone through the multiway blocks (modality experts throughout)."""
        return self(text_tokens, text_mask, None)

    def encode_image_only(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D): the image tokens alone through the multiway blocks."""
        return self(None, None, image_tokens)

    def _run(self, x, keep, routes, top_routes) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            args = (x, keep)
            if self.multiway:
                args += (top_routes if i >= self.first_vl else routes,)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.ln_final(x)
