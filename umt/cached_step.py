"""Driving one contrastive batch per optimizer step (`objectives.contrastive_batch: step`).

The math is `umt.objectives.step`; this module runs its three passes through whatever calls the
model (the DeepSpeed engine in training, the module itself in tests) and keeps what they share:
each micro-batch's inputs, its RNG state before pass 1 (replayed in pass 3, so dropout masks
and pass 3's embeddings equal pass 1's bit for bit), and the step's embeddings. What it holds
grows with the step's samples only by their embeddings, ids and uint8 pixels; the towers'
activations are those of one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from umt.objectives import ObjectiveConfig, PretrainOutput
from umt.objectives.step import (
    CachedMicroBatch,
    StepCache,
    StepInputs,
    StepLayout,
    step_contrastive,
)


@dataclass
class MicroBatchInputs:
    """One micro-batch as the model takes it, on the device."""

    pixels: torch.Tensor  # (b, 3, H, W) uint8: normalised when a pass needs them (a quarter of
    # float32's bytes held per sample of the step; negatives are re-encoded from these too)
    input_ids: torch.Tensor  # (b, T)
    attention_mask: torch.Tensor  # (b, T)
    image_ids: torch.Tensor  # (b,) int64 image keys
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _rng_state(device: torch.device) -> tuple:
    return (
        torch.get_rng_state(),
        torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ContrastiveStep:
    """The three passes of one optimizer step. `model(**kwargs)` calls the model's forward (the
    engine under DeepSpeed, so ZeRO-3 gathers parameters for every pass); every rank runs each
    pass together (they hold collectives)."""

    def __init__(
        self,
        model: Callable,
        layout: StepLayout,
        cfg: ObjectiveConfig,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        group: dist.ProcessGroup | None = None,
    ):
        self.model, self.layout, self.cfg = model, layout, cfg
        self.normalize, self.group = normalize, group
        self.micro_batches: list[MicroBatchInputs] = []
        self.rng: list[tuple] = []
        self.embeddings: list = []
        self.cache: StepCache | None = None
        self.inputs: StepInputs | None = None

    def embed(self, batch: MicroBatchInputs) -> None:
        """Pass 1 for the next micro-batch: its ITC embeddings, without a graph."""
        device = batch.pixels.device
        self.rng.append(_rng_state(device))
        with torch.no_grad():
            out = self.model(
                pixel_values=self.normalize(batch.pixels),
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                embeddings_only=True,
            )
        self.micro_batches.append(batch)
        self.embeddings.append(out)

    def contrast(self, seed: int, metrics: bool = True) -> StepCache:
        """Pass 2: ITC, its gradients and ITM's negatives over every sample of the step (and with
        `metrics`, its accuracies)."""
        batches, embeddings = self.micro_batches, self.embeddings
        data_valid = None
        if batches[0].negative_texts is not None:
            data_valid = torch.cat([b.negative_texts[2] for b in batches])
        self.cache = step_contrastive(
            torch.cat([e.text for e in embeddings]),
            torch.cat([e.image for e in embeddings]),
            embeddings[0].scale,
            embeddings[0].bias,
            torch.cat([b.image_ids for b in batches]),
            self.layout,
            self.cfg,
            seed,
            data_valid,
            self.group,
            metrics,
        )
        length = max(b.input_ids.shape[1] for b in batches)
        self.inputs = StepInputs(
            torch.cat([_pad_columns(b.input_ids, length) for b in batches]),
            torch.cat([_pad_columns(b.attention_mask, length) for b in batches]),
            torch.cat([b.pixels for b in batches]),
            self.normalize,
        )
        return self.cache

    def micro_losses(self, micro: int, seed: int) -> PretrainOutput:
        """Pass 3 for micro-batch `micro`, under the RNG state pass 1 had for it."""
        batch = self.micro_batches[micro]
        _set_rng_state(self.rng[micro], batch.pixels.device)
        return self.model(
            pixel_values=self.normalize(batch.pixels),
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            seed=seed,
            objectives=self.cfg,
            negative_texts=batch.negative_texts,
            cached=CachedMicroBatch(micro, self.layout, self.cache, self.inputs),
        )


def _pad_columns(x: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]))
