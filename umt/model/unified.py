"""`UnifiedMultimodalTransformer`: text tower + image tower + fusion transformer + heads.

Like every module of `umt/model/` but `__init__` and `training`, this one imports only torch,
transformers and its siblings (relative imports): an export carries it as remote code, which
transformers loads where UMT is not installed. The pretraining losses are given to the model by
`build_model`; DeepSpeed's copies of the logit scale are kept by `umt.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, check_fusion
from .fusion import FusionTransformer
from .towers import build_image_tower, build_text_tower


class TextFeatures(NamedTuple):
    tokens: torch.Tensor  # (B, T, Dt) last hidden states of the text tower
    mask: torch.Tensor  # (B, T) attention mask, 1 for real tokens
    embeds: torch.Tensor  # (B, E) projected, L2-normalised CLS


class ImageFeatures(NamedTuple):
    tokens: torch.Tensor  # (B, P, Dv) last hidden states of the image tower (CLS + patches)
    embeds: torch.Tensor  # (B, E) projected, L2-normalised CLS


class LogitScale(nn.Module):
    """Learnable temperature exp(log_scale), log_scale kept in [0, max_log] (CLIP's ln(100)), and
    with `bias_init` the learnable bias of the sigmoid loss (SigLIP: -10).

    The parameter itself is clamped after each optimizer step, by the trainer, which also keeps
    an optimizer's fp32 master copy in step (`umt.engine.clamp_logit_scale`, through `copies`),
    as open_clip and FLAVA clamp. A clamp inside `forward` would instead zero the gradient for
    good once Adam pushed the parameter past the bound: the scale could never come back down.
    Evaluation still clamps, for checkpoints written before this rule.

    Under bf16/fp16 the parameters are cast, and a bf16 log-scale moves in steps of 1.6-3% of
    the scale (init 14.25 instead of 14.29). So the forward then reads fp32 buffers (kept in fp32)
    holding the optimizer's fp32 master values, with the gradient still flowing to the parameters.
    """

    def __init__(self, init_log: float, max_log: float, bias_init: float | None = None):
        super().__init__()
        # Shape (1,), not (): DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.log_scale = nn.Parameter(torch.full((1,), float(init_log)))
        self.register_buffer("master", torch.full((1,), float(init_log)), persistent=False)
        self.bias = None
        if bias_init is not None:
            self.bias = nn.Parameter(torch.full((1,), float(bias_init)))
            self.register_buffer(
                "bias_master", torch.full((1,), float(bias_init)), persistent=False
            )
        self.master_synced = False  # the buffers hold the optimizer's fp32 values
        self.init_log, self.bias_init, self.max_log = float(init_log), bias_init, max_log

    def _fp32(self, param: nn.Parameter, master: torch.Tensor) -> torch.Tensor:
        if self.master_synced and param.dtype != torch.float32:
            return master + (param - param.detach()).float()  # the fp32 value, param's gradient
        return param

    def forward(self) -> torch.Tensor:
        log_scale = self._fp32(self.log_scale, self.master)
        if not self.training:
            log_scale = log_scale.clamp(0, self.max_log)
        return log_scale.exp()[0]

    def logit_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self._fp32(self.bias, self.bias_master)[0]

    def copies(self):
        """(parameter, its fp32 buffer, initial value, clamp bounds or None) of each value."""
        yield self.log_scale, self.master, self.init_log, (0.0, self.max_log)
        if self.bias is not None:
            yield self.bias, self.bias_master, self.bias_init, None


class MLMHead(nn.Module):
    """Fused width -> text width -> vocabulary, decoder tied to the text tower's word embeddings."""

    def __init__(self, fused_width: int, word_embeddings: nn.Embedding):
        super().__init__()
        text_width = word_embeddings.embedding_dim
        self.transform = nn.Sequential(
            nn.Linear(fused_width, text_width), nn.GELU(), nn.LayerNorm(text_width)
        )
        self.word_embeddings = [word_embeddings]  # a list: shared, not registered twice
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, V)
        return F.linear(self.transform(hidden), self.word_embeddings[0].weight, self.bias)


class UnifiedMultimodalTransformer(nn.Module):
    """Composes built towers and fusion; `forward` computes the pretraining losses of one batch
    through `objective` (`umt.objectives.pretraining_losses`, which `build_model` gives it;
    None in a model built without UMT's training code, e.g. an export loaded as remote code)."""

    def __init__(
        self,
        cfg: ModelConfig,
        text_tower: nn.Module,
        image_tower: nn.Module,
        fusion: FusionTransformer,
        objective: Callable | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.text_tower = text_tower
        self.image_tower = image_tower
        self.fusion = fusion
        self.objective = objective
        text_width = text_tower.config.hidden_size
        image_width = image_tower.config.hidden_size
        fused_width = fusion.ln_final.normalized_shape[0]
        # ITC from the fusion (multiway text-only / image-only passes) projects its width.
        self.itc_from_fusion = cfg.itc_from == "fusion"
        if self.itc_from_fusion:
            text_width = image_width = fused_width
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.image_proj = nn.Linear(image_width, cfg.embed_dim)
        self.logit_scale = LogitScale(
            cfg.logit_scale_init, cfg.logit_scale_max, cfg.logit_bias_init
        )
        self.itm_head = nn.Linear(fused_width, 2)
        word_embeddings = text_tower.get_input_embeddings()
        self.mlm_head = MLMHead(fused_width, word_embeddings) if cfg.mlm else None
        self.mask_token_id = cfg.text.mask_token_id
        self.vocab_size = word_embeddings.num_embeddings
        for head in (self.text_proj, self.image_proj, self.itm_head):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, objective: Callable | None = None
    ) -> UnifiedMultimodalTransformer:
        """Towers (from config, a recorded architecture or `from_pretrained`), fusion, heads."""
        _check_heads(cfg)
        text_tower = build_text_tower(cfg.text)
        image_tower = build_image_tower(cfg.image)
        fusion = FusionTransformer(
            cfg.fusion,
            text_tower.config.hidden_size,
            image_tower.config.hidden_size,
            modality_passes=cfg.itc_from == "fusion",
        )
        return cls(cfg, text_tower, image_tower, fusion, objective)

    # --- the parts, used by the objectives, evaluation and users --------------------------
    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        # A 4-D additive mask reaches the attention as it is (SDPA and eager alike); from a 2-D
        # one the HF tower first reads the mask back to the host to see whether it could be
        # dropped: a GPU sync per text pass.
        dtype = self.text_proj.weight.dtype
        blocked = 1.0 - attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, T), 1 at padding
        additive = blocked * torch.finfo(dtype).min
        tokens = self.text_tower(input_ids=input_ids, attention_mask=additive).last_hidden_state
        cls = tokens[:, 0]
        if self.itc_from_fusion:
            cls = self.fusion.encode_text_only(tokens, attention_mask)[:, 0]
        embeds = F.normalize(self.text_proj(cls), dim=-1)
        return TextFeatures(tokens, attention_mask, embeds)

    def embed_image(self, pixel_values: torch.Tensor) -> ImageFeatures:
        tokens = self.image_tower(pixel_values=pixel_values).last_hidden_state
        cls = tokens[:, 0]
        if self.itc_from_fusion:
            cls = self.fusion.encode_image_only(tokens)[:, 0]
        embeds = F.normalize(self.image_proj(cls), dim=-1)
        return ImageFeatures(tokens, embeds)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, E) normalised text embeddings."""
        return self.embed_text(input_ids, attention_mask).embeds

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, E) normalised image embeddings."""
        return self.embed_image(pixel_values).embeds

    def scale(self) -> torch.Tensor:
        """The current logit scale (exp of the learnable log-temperature, clamped)."""
        return self.logit_scale()

    def logit_bias(self) -> torch.Tensor | None:
        """The sigmoid loss's learnable bias (None unless `model.logit_bias_init` is set)."""
        return self.logit_scale.logit_bias()

    def itm_logits(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2) match logits of pairs (text i, image i) through the fusion transformer."""
        fused = self.fusion(text_tokens, text_mask, image_tokens)
        return self.itm_head(fused[:, 0])

    def score_pairs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """(B,) match probability of raw pairs: a convenience over `itm_logits`. Pair i is
        text i with image i, so both need the same count."""
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"score_pairs scores pairs (text i with image i): got {input_ids.shape[0]} texts "
                f"and {pixel_values.shape[0]} images; to score every text against every image, "
                "repeat them (e.g. images.repeat_interleave(n_texts, 0)) or compare "
                "encode_text/encode_image embeddings"
            )
        text = self.embed_text(input_ids, attention_mask)
        image = self.embed_image(pixel_values)
        return self.itm_logits(text.tokens, text.mask, image.tokens).softmax(-1)[:, 1]

    def mlm_logits(
        self,
        text_tokens: torch.Tensor,  # (B, T, Dt)
        text_mask: torch.Tensor,  # (B, T)
        image_tokens: torch.Tensor,  # (B, P, Dv)
        positions: torch.Tensor,  # (B, T) bool, the masked tokens to predict
    ) -> torch.Tensor:  # (N, V), N = positions.sum()
        if self.mlm_head is None:
            raise ValueError(
                "objectives.mlm_weight > 0 needs model.mlm: true (no MLM head was built)"
            )
        fused = self.fusion(text_tokens, text_mask, image_tokens)
        return self.mlm_head(fused[:, : text_tokens.shape[1]][positions])

    # --- training ----------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        seed: int = 0,
        objectives=None,  # umt.objectives.ObjectiveConfig; None: its defaults
        negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        **passes,
    ):
        """Pretraining losses of this rank's batch (collectives over the default process group),
        a `umt.objectives.PretrainOutput`.

        One call so that DeepSpeed's engine (ZeRO-3 parameter gathering) wraps every pass.
        `seed` makes hard-negative and MLM sampling reproducible (mix in the step). `passes`:
        with one contrastive batch per step, which pass this is (`umt.objectives.step`).
        """
        if self.objective is None:
            raise RuntimeError(
                "this model was built without its pretraining objective: build it with "
                "umt.model.build_model (pip install umt) to train it"
            )
        return self.objective(
            self,
            pixel_values,
            input_ids,
            attention_mask,
            image_ids,
            objectives,
            seed,
            negative_texts=negative_texts,
            **passes,
        )

    # --- bookkeeping -------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by part (tied weights counted once, in the text tower)."""
        parts = {
            "text_tower": self.text_tower,
            "image_tower": self.image_tower,
            "fusion": self.fusion,
        }
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        seen = {id(p) for m in parts.values() for p in m.parameters()}
        counts["heads"] = sum(p.numel() for p in self.parameters() if id(p) not in seen)
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on norms, biases, embeddings of modality type, the ViT's class
        token and position embeddings (timm's rule) and the logit scale."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = (
                p.ndim < 2
                or "modality_embed" in name
                or "logit_scale" in name
                or name.startswith("image_tower.embeddings.")
                and ("cls_token" in name or "position_embeddings" in name)
            )
            (no_decay if exempt else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def format_parameter_table(counts: dict[str, int]) -> str:
    """A small table of `num_parameters()` in millions."""
    lines = [f"{'part':<12} {'params':>14} {'M':>9}"]
    for name, n in counts.items():
        lines.append(f"{name:<12} {n:>14,} {n / 1e6:>9.2f}")
    return "\n".join(lines)


def _check_heads(cfg: ModelConfig) -> None:
    if cfg.fusion.hidden_size % cfg.fusion.num_heads:
        raise ValueError(
            f"model.fusion.hidden_size ({cfg.fusion.hidden_size}) must be divisible by "
            f"model.fusion.num_heads ({cfg.fusion.num_heads})"
        )
    if not 0 < cfg.logit_scale_init <= cfg.logit_scale_max or not math.isfinite(
        cfg.logit_scale_max
    ):
        raise ValueError("model.logit_scale_init must be in (0, model.logit_scale_max]")
    check_fusion(cfg)
