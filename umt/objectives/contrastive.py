"""Image-text contrastive loss (symmetric InfoNCE) with negatives gathered from every rank.

Each rank scores its own rows against the columns of the whole global batch ("local loss").
Samples that share an image key (COCO's five captions of one image) are positives of each other:
the target of a row is spread uniformly over its positives (ALBEF/BLIP), never a negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# How samples are identified belongs to the data side, the floor below (the one data_pipeline
# module the objectives use).
from data_pipeline.sample_ids import key_ids
from umt.distributed import gather_no_grad, gather_with_grad, rank
from umt.objectives.hard_negatives import HardNegatives, sample_hard_negatives
from umt.objectives.ring import Mining, ring_contrastive


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor  # () this rank's loss: mean of the i2t and t2i terms over its rows
    logits_i2t: torch.Tensor | None  # (b, W*b) local images against every text (gather only)
    logits_t2i: torch.Tensor | None  # (b, W*b) local texts against every image (gather only)
    positives: torch.Tensor | None  # (b, W*b) bool, True where the column shares the row's key
    accuracy_i2t: torch.Tensor  # () fraction of local rows whose top column is a positive
    accuracy_t2i: torch.Tensor
    negatives: HardNegatives | None = None  # with `mining`: ITM's hard negatives


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Similarities, softmax and cross-entropy in float32 at least, even under bf16.
    return torch.promote_types(dtype, torch.float32)


def positive_mask(
    local_ids: torch.Tensor,
    global_ids: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """(b, n) bool: column j is a positive of local row i (same image key, or the same sample:
    global position `rows[i] == cols[j]`)."""
    return (local_ids[:, None] == global_ids[None, :]) | (rows[:, None] == cols[None, :])


def _soft_target_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _top1_is_positive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    return positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()


def contrastive_outputs(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_keys: Sequence[str] | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    impl: str = "gather",
    tile: int = 4096,
    mining: Mining | None = None,
    loss: str = "softmax",
    logit_bias: torch.Tensor | float | None = None,
    positions: torch.Tensor | None = None,
) -> ContrastiveOutput:
    """ITC loss of this rank's rows, its accuracies and (with `mining`) ITM's hard negatives.

    `image_embeds`, `text_embeds`: (b, D) L2-normalised; pair i is (image i, text i). Every rank
    must pass the same b. `image_keys`: (b,) strings or int64 ids (`key_ids`): samples sharing
    one are positives of each other; None means all pairs distinct.
    `positions`: (b,) the rows' positions in the global batch (default rank * b + i), which the
    negatives' noise is hashed from and the negatives are returned as.
    `impl`: `gather` all-gathers the embeddings and holds the (b, W*b) logits (returned);
    `ring` passes embedding blocks around the ranks in O(b * tile) memory (`umt.objectives.ring`).
    Both give the same loss, gradients and negatives. `loss`: `softmax` (InfoNCE) or `sigmoid`
    (SigLIP's pairwise loss with `logit_bias`, every same-key pair a positive), which is always
    computed by neighbour exchange (the ring), never with an all-gather.
    """
    dtype = _loss_dtype(image_embeds.dtype)
    image_embeds, text_embeds = image_embeds.to(dtype), text_embeds.to(dtype)
    b = image_embeds.shape[0]
    device = image_embeds.device
    default_positions = positions is None
    if default_positions:
        positions = torch.arange(b, device=device) + rank(group) * b
    if image_keys is None:  # every sample its own image: its position is its key
        local_ids = positions
    elif isinstance(image_keys, torch.Tensor):
        local_ids = image_keys.to(device=device, dtype=torch.long)
    else:
        local_ids = key_ids(image_keys, device)
    if impl == "ring" or loss == "sigmoid":
        bias = 0.0 if logit_bias is None else logit_bias
        out = ring_contrastive(
            image_embeds, text_embeds, logit_scale, local_ids, group, tile, mining, loss, bias,
            positions,
        )  # fmt: skip
        negatives = HardNegatives(*out.negatives) if out.negatives is not None else None
        return ContrastiveOutput(
            out.loss, None, None, None, out.accuracy_i2t, out.accuracy_t2i, negatives
        )
    if impl != "gather":
        raise ValueError(f"objectives.itc_impl must be gather or ring (got {impl!r})")
    all_images = gather_with_grad(image_embeds, group)  # (W*b, D)
    all_texts = gather_with_grad(text_embeds, group)
    global_ids = gather_no_grad(local_ids, group)
    # Default positions are the global row numbers: known here, not sent.
    n_cols = all_texts.shape[0]
    cols = (
        torch.arange(n_cols, device=device)
        if default_positions
        else gather_no_grad(positions, group)
    )
    positives = positive_mask(local_ids, global_ids, positions, cols)

    scale = torch.as_tensor(logit_scale, device=device).to(dtype)
    logits_i2t = scale * image_embeds @ all_texts.T
    logits_t2i = scale * text_embeds @ all_images.T
    loss = (_soft_target_ce(logits_i2t, positives) + _soft_target_ce(logits_t2i, positives)) / 2
    with torch.no_grad():
        acc_i2t = _top1_is_positive(logits_i2t, positives)
        acc_t2i = _top1_is_positive(logits_t2i, positives)
    negatives = None
    if mining is not None:
        negatives = sample_hard_negatives(
            logits_i2t * mining.sharpness,
            logits_t2i * mining.sharpness,
            positives,
            mining.seed,
            positions,
            cols,
            tile,
        )
    return ContrastiveOutput(loss, logits_i2t, logits_t2i, positives, acc_i2t, acc_t2i, negatives)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_keys: Sequence[str] | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's scalar ITC loss, gathering negatives over `group` (default: the world) if initialised."""
    return contrastive_outputs(image_embeds, text_embeds, logit_scale, image_keys, group).loss
