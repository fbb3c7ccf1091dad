"""Deterministic in-memory random batches: for benchmarks, GPU smoke tests and topology tests.

Sample s of the global stream is a pure function of (seed, s); rank r's batch i holds samples
[(i*W + r)*b, (i*W + r + 1)*b). So the global batch (W*b samples) is the same for any split
into ranks, and the stream resumes exactly from `state_dict()`, also on another world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SyntheticBatch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    image_keys: list[str]
    keys: list[str]
    negative_texts: None = None  # the loader's Batch has them with data.train.negatives


class SyntheticBatches:
    """An endless, resumable stream of random batches; `distinct_batches=1` repeats one global batch."""

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
    ):
        self.batch_size, self.image_size, self.seq_len = batch_size, image_size, seq_len
        self.vocab_size, self.seed = vocab_size, seed
        self.rank, self.world_size = rank, world_size
        self.distinct_batches = distinct_batches
        self.next_index = 0

    def sample(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_000_007 + sample_id)
        pixels = torch.randn(3, self.image_size, self.image_size, generator=g)
        ids = torch.randint(5, self.vocab_size, (self.seq_len,), generator=g)
        length = int(torch.randint(max(2, self.seq_len // 2), self.seq_len + 1, (1,), generator=g))
        return pixels, ids, length

    def make(self, index: int) -> SyntheticBatch:
        index %= self.distinct_batches
        first = (index * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        pixels = torch.stack([s[0] for s in samples])
        lengths = torch.tensor([s[2] for s in samples])
        mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
        ids = torch.stack([s[1] for s in samples]) * mask
        keys = [f"s{first + j}" for j in range(self.batch_size)]
        return SyntheticBatch(pixels, ids, mask, keys, keys)

    def __iter__(self) -> Iterator[SyntheticBatch]:
        while True:
            batch = self.make(self.next_index)
            self.next_index += 1
            yield batch

    def error_counts(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {
            "kind": "synthetic",
            "next_index": self.next_index,
            "samples_consumed": self.next_index * self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        global_batch = self.batch_size * self.world_size
        if state["samples_consumed"] % global_batch:
            raise ValueError(
                f"synthetic stream: {state['samples_consumed']} samples consumed is not a multiple "
                f"of the global batch {global_batch}; resume with the same global batch size"
            )
        self.next_index = state["samples_consumed"] // global_batch
