"""What a run carries between steps and restarts (`TrainState`), when something is due
(`Cadence`), and the micro-batches of the optimizer step in progress (`StepProgress`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from umt.data_wait import DataWaiter
from umt.train_data import TrainBatch


@dataclass
class TrainState:
    """What survives a restart besides DeepSpeed's own state and the loader position."""

    step: int = 0
    samples: int = 0
    nonfinite_total: int = 0
    run_id: str = ""  # made at a fresh start, kept by every resume: whose checkpoints are whose

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Cadence:
    """Every `every` steps (0: never) and, with `last`, at that step too."""

    every: int
    last: int | None = None

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.last


@dataclass
class StepProgress:
    """The micro-batches of one optimizer step so far: what the step returns and records."""

    start: float = field(default_factory=time.perf_counter)
    micro: int = 0  # micro-batches trained on
    skipped_run: int = 0  # consecutive non-finite micro-batches
    stop: bool = False  # a stop signal reached some rank
    data_wait_s: float = 0.0
    text_len: int = 0  # padded text tokens per sample, summed over micro-batches
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    def next_batch(self, batches: DataWaiter, stop_requested) -> TrainBatch:
        tic = time.perf_counter()
        batch = batches.next(stop_requested)
        self.data_wait_s += time.perf_counter() - tic
        self.failures += batch.failures
        return batch

    def add(self, batch: TrainBatch, logs: dict[str, torch.Tensor], grad_accum: int) -> None:
        """A micro-batch trained on: its logs averaged into the step's (on the device)."""
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0) + v.detach().float() / grad_accum
        self.text_len += batch.input_ids.shape[1]
        self.keys += batch.keys
        self.micro += 1
