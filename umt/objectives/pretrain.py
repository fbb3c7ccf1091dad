"""The pretraining objective: ITC with gathered negatives, ITM on global hard negatives, optional MLM.

`pretraining_losses` reads top to bottom as the step does: embed -> ITC -> mine negatives ->
fetch them -> fuse -> ITM (-> MLM). It needs only the model's parts named below, so it knows
nothing of DeepSpeed, files or launchers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from umt.distributed import fetch, plan_fetches, rank
from umt.objectives.contrastive import contrastive_outputs
from umt.objectives.hard_negatives import HardNegatives
from umt.objectives.itm import ItmCounts, itm_loss
from umt.objectives.mlm import IGNORE, mask_tokens, mlm_loss
from umt.objectives.ring import Mining


@dataclass
class ObjectiveConfig:
    """Loss weights and objective options."""

    itc_weight: float = 1.0
    """Weight of the image-text contrastive loss."""
    itm_weight: float = 1.0
    """Weight of image-text matching on hard negatives (0 turns ITM and its fusion pass off)."""
    mlm_weight: float = 0.0
    """Weight of masked language modelling on the fused text (0: off; needs model.mlm)."""
    mlm_probability: float = 0.15
    """Fraction of text tokens chosen for MLM."""
    itm_class_balance: bool = False
    """Weigh ITM's positives as much as all its negatives together (each class's mean loss,
    averaged). Off: BLIP/ALBEF's plain mean over 1 positive : 2-3 negatives, whose "no match
    for everything" answer is a plateau small models sit on for hundreds of steps."""
    itm_mining_sharpness: float = 1.0
    """Hard negatives are drawn with weights exp(sharpness * ITC logit): 1 is BLIP/ALBEF's softmax;
    smaller values draw easier negatives (useful when training small models from scratch)."""
    itc_impl: Literal["gather", "ring"] = "gather"
    """`gather`: all-gather the embeddings and hold this rank's (b, W*b) logits (open_clip's
    ClipLoss). `ring`: pass embedding blocks around the ranks with an online log-sum-exp (Inf-CL):
    the same loss, gradients and ITM negatives in O(b * itc_tile) memory; for global batches
    whose logits no longer fit."""
    itc_tile: int = 4096
    """Columns scored at a time by `ring` (and by the negatives' draw): memory is O(b * tile)."""
    itc_loss: Literal["softmax", "sigmoid"] = "softmax"
    """`softmax`: InfoNCE over the global batch (CLIP). `sigmoid`: SigLIP's pairwise loss, every
    same-key pair a positive, computed by neighbour exchange (needs model.logit_bias_init)."""
    contrastive_batch: Literal["micro", "step"] = "micro"
    """What one contrastive batch is. `micro`: each micro-batch of every rank (micro_batch_size x
    ranks samples). `step`: every sample of an optimizer step (x train.grad_accum), at the memory
    of one micro-batch: embeddings first without a graph, ITC and ITM's negatives over all of
    them, then each micro-batch again with its cached gradient (GradCache); MLM stays per
    micro-batch."""

    def validate(self) -> None:
        """ValueError naming the key (the config's loader makes it a ConfigError)."""
        for name in ("itc_weight", "itm_weight", "mlm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"objectives.{name} must be >= 0")
        if not (self.itc_weight > 0 or self.itm_weight > 0 or self.mlm_weight > 0):
            raise ValueError("objectives: every weight is 0")
        sharpness = self.itm_mining_sharpness
        if not (math.isfinite(sharpness) and sharpness > 0):
            raise ValueError(
                f"objectives.itm_mining_sharpness must be finite and > 0 (got {sharpness})"
            )
        if self.itc_tile <= 0:
            raise ValueError(f"objectives.itc_tile must be > 0 (got {self.itc_tile})")
        if self.contrastive_batch == "step" and self.itc_weight == self.itm_weight == 0:
            raise ValueError(
                "objectives.contrastive_batch: step makes one batch of ITC and ITM over the "
                "step, and objectives.itc_weight and objectives.itm_weight are both 0"
            )
        if not 0 < self.mlm_probability < 1:
            raise ValueError(
                f"objectives.mlm_probability must be in (0, 1) (got {self.mlm_probability})"
            )


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # () weighted sum, the one to backpropagate
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for TensorBoard
    # One contrastive batch per step: the loss without ITM and MLM, backpropagated instead when
    # those are not finite (a micro-batch cannot be skipped once the step's ITC is computed).
    itc_only: torch.Tensor | None = None


class PretrainableModel(Protocol):
    """What the objective needs of a model (`UnifiedMultimodalTransformer` provides it)."""

    mask_token_id: int
    vocab_size: int

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor): ...
    def embed_image(self, pixel_values: torch.Tensor): ...
    def scale(self) -> torch.Tensor: ...
    def logit_bias(self) -> torch.Tensor | None: ...
    def itm_logits(self, text_tokens, text_mask, image_tokens) -> torch.Tensor: ...
    def mlm_logits(self, text_tokens, text_mask, image_tokens, positions) -> torch.Tensor: ...


def mix_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from `seed` and e.g. (step, rank): distinct streams, no global RNG involved."""
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of (B, T, ...) to `length` with zeros."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad)


def configured_contrastive(
    cfg: ObjectiveConfig,
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    image_ids: torch.Tensor | None,
    group: dist.ProcessGroup | None,
    seed: int,
    bias: torch.Tensor | None,
    positions: torch.Tensor | None = None,
    metrics: bool = True,
):
    """`contrastive_outputs` as objectives.* set it up, mining ITM's negatives when ITM is on.
    The negatives' noise is a hash of global positions: one seed for every rank. `metrics`: the
    accuracies too (the steps that log them)."""
    mining = Mining(mix_seed(seed, 0x1F), cfg.itm_mining_sharpness) if cfg.itm_weight > 0 else None
    return contrastive_outputs(
        image, text, scale, image_ids, group, impl=cfg.itc_impl, tile=cfg.itc_tile,
        mining=mining, loss=cfg.itc_loss, logit_bias=bias, positions=positions, metrics=metrics,
    )  # fmt: skip


def pretraining_losses(
    model: PretrainableModel,
    pixel_values: torch.Tensor,  # (b, 3, H, W)
    input_ids: torch.Tensor,  # (b, T)
    attention_mask: torch.Tensor,  # (b, T)
    image_ids: torch.Tensor | None,  # (b,) int64 image keys (`key_ids`); None: all distinct
    cfg: ObjectiveConfig | None,  # None: the defaults
    seed: int,
    group: dist.ProcessGroup | None = None,
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    metrics: bool = True,
) -> PretrainOutput:
    """All objectives of one micro-batch on this rank's rows; collectives run over `group`.

    `negative_texts` = (input_ids (b, T'), attention_mask, valid (b,) bool): a hard-negative
    caption per image from the data (NegCLIP-style), scored by ITM as a fourth group of pairs
    beside the mined ones. `metrics`: the ITC accuracies too (the trainer asks on log steps).
    """
    cfg = cfg or ObjectiveConfig()
    text = model.embed_text(input_ids, attention_mask)
    image = model.embed_image(pixel_values)
    itc = configured_contrastive(
        cfg, image.embeds, text.embeds, model.scale(), image_ids, group, seed, model.logit_bias(),
        metrics=metrics,
    )  # fmt: skip
    loss = cfg.itc_weight * itc.loss
    logs = itc_logs(itc.loss, itc.accuracy_i2t, itc.accuracy_t2i, model.scale(), model.logit_bias())
    if cfg.itm_weight > 0:
        b = input_ids.shape[0]
        negatives = itc.negatives
        # One plan exchange for both sets of rows; it also agrees on the padded text length,
        # which must be equal on every rank before token rows can travel between them.
        (text_plan, image_plan), length = plan_fetches(
            [negatives.text_index, negatives.image_index], b, group, text.tokens.shape[1]
        )
        text_tokens, text_mask = _pad_to(text.tokens, length), _pad_to(text.mask, length)
        negative_text = Fetched(
            fetch(text_tokens, text_plan, group), fetch(text_mask, text_plan, group)
        )
        negative_image = fetch(image.tokens, image_plan, group)
        itm_loss_, itm_out = matching(
            model, text, image, negative_text, negative_image, negatives, negative_texts, cfg
        )
        loss = loss + cfg.itm_weight * itm_loss_
        logs |= itm_out
    if cfg.mlm_weight > 0:
        mlm = masked_language_modelling(
            model, input_ids, attention_mask, image.tokens, cfg, mix_seed(seed, rank(group))
        )
        loss = loss + cfg.mlm_weight * mlm
        logs["loss/mlm"] = mlm.detach()
    logs["loss/total"] = loss.detach()
    return PretrainOutput(loss, logs)


def itc_logs(loss, accuracy_i2t, accuracy_t2i, scale, bias) -> dict[str, torch.Tensor]:
    logs = {"loss/itc": loss.detach(), "logit_scale": scale.detach()}
    if accuracy_i2t is not None:  # computed on the steps that log them
        logs |= {"itc/accuracy_i2t": accuracy_i2t, "itc/accuracy_t2i": accuracy_t2i}
    if bias is not None:
        logs["logit_bias"] = bias.detach()
    return logs


class Fetched(NamedTuple):
    """Token rows of negative texts, wherever they came from: (m, T, D) and their mask (m, T)."""

    tokens: torch.Tensor
    mask: torch.Tensor


def matching(
    model: PretrainableModel,
    text,  # this micro-batch's TextFeatures: tokens (b, T, D), mask (b, T)
    image,  # its ImageFeatures: tokens (b, P, D)
    negative_text: Fetched,  # the mined negative text of each image (b, T', D)
    negative_image_tokens: torch.Tensor,  # the mined negative image of each text (b, P, D)
    negatives: HardNegatives,  # their validity
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cfg: ObjectiveConfig,
    over: ItmCounts | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ITM's loss and logs: one fusion pass over (text, image), (negative text, image),
    (text, negative image) [, (the data's negative text, image)]."""
    length = max(text.tokens.shape[1], negative_text.tokens.shape[1])
    texts = [_pad_to(text.tokens, length), _pad_to(negative_text.tokens, length)]
    masks = [_pad_to(text.mask, length), _pad_to(negative_text.mask, length)]
    texts.append(texts[0])
    masks.append(masks[0])
    images = [image.tokens, image.tokens, negative_image_tokens]
    valid = [negatives.text_valid, negatives.image_valid]
    if negative_texts is not None:
        ids, mask, data_valid = negative_texts
        data_text = model.embed_text(ids, mask)
        length = max(length, data_text.tokens.shape[1])
        texts = [_pad_to(t, length) for t in texts] + [_pad_to(data_text.tokens, length)]
        masks = [_pad_to(m, length) for m in masks] + [_pad_to(data_text.mask, length)]
        images.append(image.tokens)
        valid.append(data_valid.to(negatives.text_valid.device))
    logits = model.itm_logits(torch.cat(texts), torch.cat(masks), torch.cat(images))
    itm = itm_loss(logits, *valid, class_balance=cfg.itm_class_balance, over=over)
    logs = {
        "loss/itm": itm.loss.detach(),
        "itm/accuracy": itm.accuracy,
        "itm/accuracy_negatives": itm.accuracy_negatives,
    }
    if negative_texts is not None:
        logs["itm/accuracy_data_negatives"] = itm.accuracy_per_group[-1]
    return itm.loss, logs


def masked_language_modelling(
    model: PretrainableModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    cfg: ObjectiveConfig,
    seed: int,
) -> torch.Tensor:
    """MLM's loss: masked tokens (a generator of their own, seeded per step, micro-batch and
    rank) predicted from the fusion of the masked text with the image."""
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    masked_ids, labels = mask_tokens(
        input_ids,
        attention_mask,
        model.mask_token_id,
        model.vocab_size,
        generator,
        cfg.mlm_probability,
    )
    masked = model.embed_text(masked_ids, attention_mask)
    positions = labels != IGNORE  # (b, T) bool
    logits = model.mlm_logits(masked.tokens, masked.mask, image_tokens, positions)
    return mlm_loss(logits, labels[positions])
