"""One contrastive batch per optimizer step (`objectives.contrastive_batch: step`): the math.

With grad_accum A micro-batches of b samples on each of W ranks, every one of the A * b * W
samples of the step is one ITC batch and one pool of ITM hard negatives, at the memory of one
micro-batch (GradCache, Gao et al. 2021, with the ring, hard negatives and exact resume):

1. each micro-batch through the towers without a graph: only the ITC embeddings are kept
   (the driver, `umt.cached_step`, records the RNG state before each);
2. `step_contrastive`: ITC over the step's embeddings (gather or ring, softmax or sigmoid), its
   gradient with respect to them, to the logit scale and bias, and ITM's negatives drawn from
   the whole step by the hashed rule (a sample's global row and column are its position in the
   step's global batch, so one big micro-batch draws the same ones);
3. `cached_micro_losses`, per micro-batch: the towers again with a graph (same RNG, same dropout),
   the cached gradient pushed back through them by a surrogate (embeddings . gradient), and
   ITM over this micro-batch's pairs: a negative that lives in another micro-batch or on another
   rank is re-encoded from its raw input (token ids, pixels, fetched from its owner), so ITM's
   gradient reaches the towers as it would in one big micro-batch. MLM stays per micro-batch.

The surrogates are backpropagated without DeepSpeed's division by A (`scale_wrt_gas=False`):
ITC's cached gradient already is the step's, ITM divides by the rank's pair count over the step
(`ItmCounts`), and MLM divides itself by A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from umt.distributed import fetch, plan_fetches
from umt.objectives.hard_negatives import HardNegatives
from umt.objectives.itm import ItmCounts
from umt.objectives.pretrain import (
    Fetched,
    ObjectiveConfig,
    PretrainableModel,
    PretrainOutput,
    _pad_to,
    configured_contrastive,
    itc_logs,
    masked_language_modelling,
    matching,
    mix_seed,
    pretraining_losses,
)


@dataclass(frozen=True)
class StepLayout:
    """Where the samples of one optimizer step are. The loader deals micro-batches round by
    round (`data_pipeline.loader.order`): micro-batch m of rank r holds positions
    m * W * b + r * b + i (i < b) of the step's global batch."""

    world: int
    rank: int
    micro_batches: int  # A
    micro_batch: int  # b

    def positions(self, micro: int, device=None) -> torch.Tensor:
        """(b,) step positions of this rank's micro-batch `micro`."""
        w, r, b = self.world, self.rank, self.micro_batch
        return torch.arange(b, device=device) + micro * w * b + r * b

    def all_positions(self, device=None) -> torch.Tensor:
        """(A * b,) step positions of this rank's rows, micro-batch after micro-batch."""
        return torch.cat([self.positions(m, device) for m in range(self.micro_batches)])

    def rank_major(self, positions: torch.Tensor) -> torch.Tensor:
        """Step positions as indices into the rank-ordered concatenation of every rank's A * b
        rows (micro-batch after micro-batch): what `plan_fetches` takes."""
        w, b, a = self.world, self.micro_batch, self.micro_batches
        micro, within = positions // (w * b), positions % (w * b)
        owner, i = within // b, within % b
        return owner * (a * b) + micro * b + i


class StepInputs(NamedTuple):
    """This rank's raw inputs of the step, micro-batch after micro-batch (A * b rows), from which
    ITM's negatives are re-encoded wherever they are needed."""

    input_ids: torch.Tensor  # (A * b, T) padded to the step's longest
    attention_mask: torch.Tensor  # (A * b, T)
    pixels: torch.Tensor  # (A * b, 3, H, W) uint8 (a quarter of float32's bytes)
    normalize: Callable[[torch.Tensor], torch.Tensor]  # uint8 pixels -> the model's input


class ContrastiveEmbeddings(NamedTuple):
    """What ITC needs of a micro-batch (pass 1)."""

    text: torch.Tensor  # (B, E)
    image: torch.Tensor  # (B, E)
    scale: torch.Tensor  # () the logit scale
    bias: torch.Tensor | None  # () the sigmoid loss's bias


def contrastive_embeddings(
    model: PretrainableModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> ContrastiveEmbeddings:
    """Pass 1 (call it under no_grad): the texts first, as pass 3 embeds them (the same RNG)."""
    text = model.embed_text(input_ids, attention_mask)
    image = model.embed_image(pixel_values)
    return ContrastiveEmbeddings(text.embeds, image.embeds, model.scale(), model.logit_bias())


class StepCache(NamedTuple):
    """Pass 2's results, for the micro-batches of pass 3."""

    text_grad: torch.Tensor  # (A * b, E) d(ITC) / d(text embeddings), this rank's rows
    image_grad: torch.Tensor  # (A * b, E)
    scale_grad: torch.Tensor  # () d(ITC) / d(logit scale)
    bias_grad: torch.Tensor | None  # () d(ITC) / d(logit bias), sigmoid loss only
    negatives: HardNegatives | None  # (A * b,) step positions of each row's negatives
    itm_over: ItmCounts | None  # the rank's ITM pairs over the whole step
    loss: torch.Tensor  # () this rank's ITC loss over its A * b rows (detached)
    logs: dict[str, torch.Tensor]


def step_contrastive(
    text_embeds: torch.Tensor,  # (A * b, E) pass 1's, no graph
    image_embeds: torch.Tensor,  # (A * b, E)
    scale: torch.Tensor,  # () the logit scale pass 1 read (inside the model's forward)
    bias: torch.Tensor | None,  # () the sigmoid loss's bias, or None
    image_ids: torch.Tensor,  # (A * b,) int64 image keys
    layout: StepLayout,
    cfg: ObjectiveConfig,
    seed: int,
    data_negatives_valid: torch.Tensor | None = None,  # (A * b,) bool, with data negatives
    group: dist.ProcessGroup | None = None,
    metrics: bool = True,  # the accuracies too (a step that logs them)
) -> StepCache:
    """Pass 2: ITC over every sample of the step, its gradients, and ITM's negatives."""
    text = text_embeds.detach().requires_grad_(True)
    image = image_embeds.detach().requires_grad_(True)
    scale = scale.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    positions = layout.all_positions(text.device)
    itc = configured_contrastive(
        cfg, image, text, scale, image_ids, group, seed, bias, positions, metrics
    )
    leaves = [text, image, scale] + ([bias] if bias is not None else [])
    # Every rank runs this backward: the gather's (or the ring's) collectives are in it.
    grads = torch.autograd.grad(itc.loss, leaves)
    itm_over = None
    if itc.negatives is not None:
        valid = [itc.negatives.text_valid, itc.negatives.image_valid]
        if data_negatives_valid is not None:
            valid.append(data_negatives_valid.to(text.device))
        itm_over = ItmCounts(float(text.shape[0]), sum(v.float().sum() for v in valid))
    logs = itc_logs(itc.loss, itc.accuracy_i2t, itc.accuracy_t2i, scale, bias)
    return StepCache(
        grads[0],
        grads[1],
        grads[2],
        grads[3] if bias is not None else None,
        itc.negatives,
        itm_over,
        itc.loss.detach(),
        logs,
    )


def cached_micro_losses(
    model: PretrainableModel,
    pixel_values: torch.Tensor,  # (b, 3, H, W) this micro-batch's
    input_ids: torch.Tensor,  # (b, T)
    attention_mask: torch.Tensor,  # (b, T)
    micro: int,
    layout: StepLayout,
    cache: StepCache,
    inputs: StepInputs,
    cfg: ObjectiveConfig,
    seed: int,  # this micro-batch's (MLM's masks)
    group: dist.ProcessGroup | None = None,
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> PretrainOutput:
    """Pass 3 for micro-batch `micro`: the loss to backpropagate without dividing by A, and its
    logs (ITM's are this micro-batch's share of the step's: they add up over micro-batches)."""
    text = model.embed_text(input_ids, attention_mask)  # first, as in pass 1: the same dropout
    image = model.embed_image(pixel_values)
    rows = slice(micro * layout.micro_batch, (micro + 1) * layout.micro_batch)
    surrogate = (text.embeds * cache.text_grad[rows].to(text.embeds.dtype)).sum() + (
        image.embeds * cache.image_grad[rows].to(image.embeds.dtype)
    ).sum()
    if micro == 0:  # the scale's (and bias') gradient, once per step
        surrogate = surrogate + model.scale() * cache.scale_grad
        if cache.bias_grad is not None:
            surrogate = surrogate + model.logit_bias() * cache.bias_grad
    loss = itc_only = cfg.itc_weight * surrogate
    logs: dict[str, torch.Tensor] = {}
    if cfg.itm_weight > 0:
        negatives = HardNegatives(*(t[rows] for t in cache.negatives))
        negative_text, negative_image = reencoded_negatives(model, negatives, layout, inputs, group)
        itm, logs = matching(
            model, text, image, negative_text, negative_image, negatives, negative_texts, cfg,
            over=cache.itm_over,
        )  # fmt: skip
        loss = loss + cfg.itm_weight * itm
    if cfg.mlm_weight > 0:
        mlm = masked_language_modelling(
            model, input_ids, attention_mask, image.tokens, cfg, mix_seed(seed, layout.rank)
        )
        loss = loss + cfg.mlm_weight * mlm / layout.micro_batches
        logs["loss/mlm"] = mlm.detach()
    return PretrainOutput(loss, logs, itc_only)


class CachedMicroBatch(NamedTuple):
    """What the model's forward needs for pass 3 of micro-batch `micro`."""

    micro: int
    layout: StepLayout
    cache: StepCache
    inputs: StepInputs


def reencoded_negatives(
    model: PretrainableModel,
    negatives: HardNegatives,  # (b,) step positions
    layout: StepLayout,
    inputs: StepInputs,
    group: dist.ProcessGroup | None = None,
) -> tuple[Fetched, torch.Tensor]:
    """The negative texts' and images' tower outputs, with a graph: their raw inputs fetched
    from the ranks that hold them (one plan exchange, which also agrees on the token length),
    then encoded here. Every rank calls it together."""
    a_b = layout.micro_batches * layout.micro_batch
    (text_plan, image_plan), length = plan_fetches(
        [layout.rank_major(negatives.text_index), layout.rank_major(negatives.image_index)],
        a_b,
        group,
        inputs.input_ids.shape[1],
    )
    ids = fetch(_pad_to(inputs.input_ids, length), text_plan, group)
    mask = fetch(_pad_to(inputs.attention_mask, length), text_plan, group)
    pixels = fetch(inputs.pixels, image_plan, group)
    text = model.embed_text(ids, mask)
    image = model.embed_image(inputs.normalize(pixels))
    return Fetched(text.tokens, text.mask), image.tokens


def pretraining_objective(
    model: PretrainableModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None,
    cfg: ObjectiveConfig | None,
    seed: int,
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    embeddings_only: bool = False,
    cached: CachedMicroBatch | None = None,
    metrics: bool = True,
) -> PretrainOutput | ContrastiveEmbeddings:
    """The model's training forward (`umt.model.build_model` gives it to the model): the losses
    of one micro-batch, or with one contrastive batch per step, pass 1 (`embeddings_only`) or
    pass 3 (`cached`) of one of its micro-batches. `metrics`: the ITC accuracies too (the
    trainer asks on the steps it logs)."""
    if embeddings_only:
        return contrastive_embeddings(model, pixel_values, input_ids, attention_mask)
    cfg = cfg or ObjectiveConfig()
    if cached is not None:
        return cached_micro_losses(
            model, pixel_values, input_ids, attention_mask, cached.micro, cached.layout,
            cached.cache, cached.inputs, cfg, seed, negative_texts=negative_texts,
        )  # fmt: skip
    return pretraining_losses(
        model, pixel_values, input_ids, attention_mask, image_ids, cfg, seed,
        negative_texts=negative_texts, metrics=metrics,
    )  # fmt: skip
