"""What a training run reports: each step's result, the window a log line averages over, the
scalars of a log step (losses, system figures, data counters, all ranks together) and the
TensorBoard writer."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline.loader.batch import NO_NEGATIVE
from data_pipeline.loader.reader import SAMPLE_ERRORS
from data_pipeline.storage import IO_COUNTERS
from umt import distributed
from umt.config import Config
from umt.flops import StepShape, gpu_peak_flops, train_step_flops


@dataclass
class StepResult:
    """One optimizer step as the loop sees it. `logs` stay on the device: read only on log steps."""

    logs: dict[str, torch.Tensor]
    stop: bool  # a stop signal reached some rank: checkpoint now
    data_wait_s: float
    elapsed_s: float
    text_len: float  # mean padded text length fed (for MFU)
    host_syncs: int = -1  # with UMT_SYNC_DEBUG on a GPU: synchronising CUDA calls in the step
    waited_s: float = 0.0  # inside collectives (waiting for the other ranks, mostly)


@dataclass
class Window:
    """What the throughput and MFU of a log line are averaged over."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    excluded_s: float = 0.0  # evaluation and checkpoint time inside the window
    data_wait_s: float = 0.0
    step_s: float = 0.0  # the steps' own time (no evaluation, checkpoint or logging)
    waited_s: float = 0.0  # of which inside collectives
    text_len: float = 0.0
    host_syncs: list[int] = field(default_factory=list)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.data_wait_s += result.data_wait_s
        self.step_s += result.elapsed_s
        self.waited_s += result.waited_s
        self.text_len += result.text_len
        if result.host_syncs >= 0:
            self.host_syncs.append(result.host_syncs)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.excluded_s, 1e-9)


class StepScalars:
    """The scalars of a log step: the step's logs and the window's system figures averaged over
    ranks, the data counters (skipped samples, storage) summed over ranks. One all-reduce of a
    vector whose keys are the same on every rank, one host read, on log steps only."""

    def __init__(self, cfg: Config, engine, data, world_size: int, device: torch.device):
        self.cfg, self.engine, self.data = cfg, engine, data
        self.world_size, self.device = world_size, device

    def __call__(
        self, result: StepResult, window: Window, nonfinite_total: int
    ) -> dict[str, float]:
        logs = dict(result.logs)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32)
        host = self.system(window) | {
            "lr": self.engine.get_lr()[0],
            "time/step_s": result.elapsed_s,
            "train/nonfinite_skipped": float(nonfinite_total),
        }
        counters = self.data_counters()
        keys = sorted(logs) + sorted(host)
        values = torch.stack(
            [logs[k].to(self.device, torch.float64).reshape(()) for k in sorted(logs)]
            + [torch.tensor(float(host[k]), dtype=torch.float64, device=self.device) for k in sorted(host)]
            + [torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in counters.values()]
        )  # fmt: skip
        total = distributed.all_reduce(values).tolist()
        out = {k: v / self.world_size for k, v in zip(keys, total)}
        return out | {k: v for k, v in zip(counters, total[len(keys) :]) if v}

    def data_counters(self) -> dict[str, int]:
        """This rank's counts since its loader started, under names every rank has (a key only
        some ranks had would break the all-reduce): skipped samples by reason, storage; and the
        samples each source gave the run (`data/samples/<source>`, over every mixture phase)."""
        errors, io = self.data.error_counts(), self.data.io_counts()
        negatives = {}
        if self.cfg.data.train.negatives:  # the same on every rank
            negatives = {"data/samples_without_negative": errors.get(NO_NEGATIVE, 0)}
        # The stream's counts, the same on every rank: rank 0's alone, so that the sum is them.
        mine = distributed.rank() == 0
        sources = {f"data/samples/{n}": c * mine for n, c in self.data.sample_counts().items()}
        return (
            {f"data/errors_{r}": errors.get(r, 0) for r in SAMPLE_ERRORS}
            | {f"data/storage_{n}": io.get(n, 0) for n in IO_COUNTERS}
            | negatives
            | sources
        )

    def system(self, window: Window) -> dict[str, float]:
        t = self.cfg.train
        seconds = window.seconds()  # evaluation and checkpoint time left out
        per_rank = window.steps * t.micro_batch_size * t.grad_accum / seconds
        out = {
            "throughput/samples_per_s": per_rank * self.world_size,
            "throughput/samples_per_s_per_rank": per_rank,
            "time/data_wait_fraction": window.data_wait_s / seconds,
            "memory/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if window.host_syncs:
            out["debug/host_syncs_per_step"] = sum(window.host_syncs) / len(window.host_syncs)
        if self.device.type == "cuda":
            out["memory/allocated_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["memory/reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
            peak = gpu_peak_flops(torch.cuda.get_device_name(self.device))
            if peak:
                out["throughput/mfu"] = per_rank * self.flops_per_sample(window) / peak
        return out

    def flops_per_sample(self, window: Window) -> float:
        """Model FLOPs of one training sample at the text length actually fed in the window
        (batches are padded to their longest caption, not to max_text_len)."""
        t, o = self.cfg.train, self.cfg.objectives
        shape = StepShape(
            t.micro_batch_size,
            max(1, round(window.text_len / max(window.steps, 1))),
            self.world_size,
            itm=o.itm_weight > 0,
            data_negatives=o.itm_weight > 0 and bool(self.cfg.data.train.negatives),
            mlm=o.mlm_weight > 0,
        )
        return train_step_flops(self.cfg.model, shape) / t.micro_batch_size


class MetricsWriter:
    """TensorBoard scalars from rank 0 (other ranks write nothing)."""

    def __init__(self, log_dir: Path | None):
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
