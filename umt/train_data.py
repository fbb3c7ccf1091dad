"""The trainer's data: what it asks of a stream of batches (`TrainData`), and how the stream for
a rank is built from the config (the streaming loader over shards, or synthetic batches)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from umt.config import Config, tokenizer_name


class TrainBatch(Protocol):
    """One rank's micro-batch, as the loader's `Batch` and the synthetic stream's make it."""

    pixel_values: torch.Tensor  # (B, 3, H, W) uint8
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    image_ids: torch.Tensor  # (B,) int64 image keys (`data_pipeline.sample_ids.key_ids`)
    keys: list[str]  # the sample of each slot
    failures: list[dict]  # samples that could not be used, each with its record
    negative_texts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    pixel_mean: tuple[float, float, float]  # what normalises the pixels
    pixel_std: tuple[float, float, float]

    def normalized_pixels(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...


class TrainData(Protocol):
    """A rank's endless stream of micro-batches that resumes exactly from its state."""

    def __iter__(self) -> Iterator[TrainBatch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    # new_mixture: a state of other data starts a new phase of the stream instead of failing
    def load_state_dict(self, state: dict[str, Any], new_mixture: bool = False) -> None: ...
    def error_counts(self) -> dict[str, int]: ...  # samples skipped, by reason, since the start
    def io_counts(self) -> dict[str, int]: ...  # storage operations, by kind, since the start
    def sample_counts(self) -> dict[str, int]: ...  # samples per source of the whole stream so far
    def summary(self) -> dict[str, Any]: ...  # what a checkpoint records of the data


def build_train_data(
    cfg: Config, rank: int, world_size: int, epoch: int = 0, device=None
) -> TrainData:
    """The training stream for this rank: the streaming loader over shards, or synthetic batches.

    On a GPU (`device`), loader batches come in pinned memory (asynchronous copies) and a short
    synthetic cycle is kept on the device (no per-step host work in benchmarks). The data side
    is imported here, not at the top: `umt.train` is imported by processes that never load data.
    """
    d = cfg.data.train
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if d.synthetic:
        from data_pipeline.synthetic import SyntheticBatches

        return SyntheticBatches(
            cfg.train.micro_batch_size,
            cfg.model.image.image_size,
            d.max_text_len,
            cfg.model.text.vocab_size,
            cfg.train.seed,
            rank,
            world_size,
            distinct_batches=d.synthetic_distinct or 1 << 30,
            device=device if on_gpu else None,
        )
    from data_pipeline.loader import LoaderConfig, build_loader

    loader_cfg = LoaderConfig(
        shards=d.shards,
        batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        num_workers=d.num_workers,
        seed=cfg.train.seed,
        resampled=d.resampled,
        shuffle_window=d.shuffle_window,
        epoch_tail=d.epoch_tail,
        image_size=cfg.model.image.image_size,
        max_text_len=d.max_text_len,
        tokenizer=tokenizer_name(cfg),
        train=True,
        caption=d.caption,
        crop_scale=d.crop_scale,
        hflip=d.hflip,
        negatives=d.negatives,
        cache_dir=cfg.data.cache_dir,
        cache_limit_gb=cfg.data.cache_limit_gb,
        remote_read=cfg.data.remote_read,
        jpeg_draft=cfg.data.jpeg_draft,
        pin_memory=on_gpu,
    )
    return build_loader(loader_cfg, rank=rank, world_size=world_size, epoch=epoch)
