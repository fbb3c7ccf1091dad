"""Deterministic in-memory random batches: for benchmarks, GPU smoke tests and topology tests.

Sample s of the global stream is a pure function of (seed, s); rank r's batch i holds samples
[(i*W + r)*b, (i*W + r + 1)*b). So the global batch (W*b samples) is the same for any split
into ranks, and the stream resumes exactly from `state_dict()`, also on another world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from data_pipeline.transforms import normalize_pixels

MEAN = STD = (0.5, 0.5, 0.5)


@dataclass
class SyntheticBatch:
    pixel_values: torch.Tensor  # (B, 3, H, W) uint8, like the loader's
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    image_keys: list[str]
    keys: list[str]
    image_ids: torch.Tensor  # (B,) int64: every sample its own image
    negative_texts: None = None  # the loader's Batch has them with data.train.negatives
    failures: tuple = ()  # no sample is ever unusable
    pixel_mean: tuple[float, float, float] = MEAN
    pixel_std: tuple[float, float, float] = STD

    def normalized_pixels(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return normalize_pixels(self.pixel_values.to(device, non_blocking=True), MEAN, STD, dtype)


class SyntheticBatches:
    """An endless, resumable stream of random batches; `distinct_batches=1` repeats one global batch.

    With `device` and at most `CACHE_LIMIT` distinct batches, each is built once and kept on the
    device, so a GPU benchmark measures the step, not the host building its input.
    """

    CACHE_LIMIT = 64

    def __init__(
        self,
        batch_size: int,
        image_size: int,
        seq_len: int,
        vocab_size: int,
        seed: int,
        rank: int,
        world_size: int,
        distinct_batches: int = 1 << 30,
        device: torch.device | None = None,
    ):
        self.batch_size, self.image_size, self.seq_len = batch_size, image_size, seq_len
        self.vocab_size, self.seed = vocab_size, seed
        self.rank, self.world_size = rank, world_size
        self.distinct_batches = distinct_batches
        self.device = device
        self._cache: dict[int, SyntheticBatch] | None = (
            {} if device is not None and distinct_batches <= self.CACHE_LIMIT else None
        )
        self.next_index = 0

    def sample(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_000_007 + sample_id)
        pixels = torch.randint(0, 256, (3, self.image_size, self.image_size), generator=g)
        ids = torch.randint(5, self.vocab_size, (self.seq_len,), generator=g)
        length = int(torch.randint(max(2, self.seq_len // 2), self.seq_len + 1, (1,), generator=g))
        return pixels.to(torch.uint8), ids, length

    def make(self, index: int) -> SyntheticBatch:
        index %= self.distinct_batches
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        first = (index * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        pixels = torch.stack([s[0] for s in samples])
        lengths = torch.tensor([s[2] for s in samples])
        mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
        ids = torch.stack([s[1] for s in samples]) * mask
        keys = [f"s{first + j}" for j in range(self.batch_size)]
        image_ids = torch.arange(first, first + self.batch_size, dtype=torch.long)
        batch = SyntheticBatch(pixels, ids, mask, keys, keys, image_ids)
        if self._cache is not None:
            device = self.device
            batch = SyntheticBatch(
                pixels.to(device), ids.to(device), mask.to(device), keys, keys, image_ids.to(device)
            )
            self._cache[index] = batch
        return batch

    def __iter__(self) -> Iterator[SyntheticBatch]:
        while True:
            batch = self.make(self.next_index)
            self.next_index += 1
            yield batch

    def error_counts(self) -> dict[str, int]:
        return {}

    def io_counts(self) -> dict[str, int]:
        return {}  # nothing is read

    def sample_counts(self) -> dict[str, int]:
        return {}  # no sources

    def summary(self) -> dict:
        return {"synthetic": True}

    def state_dict(self) -> dict:
        return {
            "kind": "synthetic",
            "next_index": self.next_index,
            "samples_consumed": self.next_index * self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict, new_mixture: bool = False) -> None:
        global_batch = self.batch_size * self.world_size
        if state["samples_consumed"] % global_batch:
            raise ValueError(
                f"synthetic stream: {state['samples_consumed']} samples consumed is not a multiple "
                f"of the global batch {global_batch}; resume with the same global batch size"
            )
        self.next_index = state["samples_consumed"] // global_batch
