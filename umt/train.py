"""The training loop: build, step, log, checkpoint. Where model, objectives, loader and DeepSpeed meet.

`Trainer.train_step` reads top to bottom: next batch -> forward (embed, ITC, mine, fuse, ITM,
MLM inside the model's objective) -> skip if non-finite anywhere -> backward -> step.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import resource
import signal
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader.batch import NO_NEGATIVE
from data_pipeline.loader.config import LoaderDataError
from data_pipeline.loader.reader import SAMPLE_ERRORS
from data_pipeline.storage import IO_COUNTERS
from umt import checkpoint, distributed, step_log, versions
from umt.config import Config, ConfigError, save_config, to_dict, tokenizer_name
from umt.data_wait import DataWaiter, DataWaitInterrupted
from umt.distributed import WorldInfo, any_rank
from umt.flops import StepShape, gpu_peak_flops, train_step_flops
from umt.logging import MetricsWriter, progress, quiet_deepspeed
from umt.model import build_model
from umt.objectives import mix_seed
from umt.run_config import keep_global_batch, set_aside_run
from umt.step_log import StepLog
from umt.threads import choose_threads

log = logging.getLogger("umt.train")
SAME_INTERRUPT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C, delivered twice


@dataclass(frozen=True)
class Faults:
    """Failure injection for tests of failure handling, read from the environment once.

    UMT_FAULT_KILL_AT_STEP=N: every rank SIGKILLs itself right after step N (no checkpoint).
    UMT_FAULT_NAN_AT_STEP=N: rank 0's loss is NaN on the first micro-batch tried for step N.
    UMT_FAULT_DATA_STALL=N:S: rank 0's first batch of step N takes S more seconds to come.
    """

    kill_at_step: int = -1
    nan_at_step: int = -1
    stall_at_step: int = -1
    stall_s: float = 0.0

    def nan_at(self, step: int, micro: int, skipped_run: int) -> bool:
        return step == self.nan_at_step and micro == 0 and skipped_run == 0

    @classmethod
    def from_env(cls) -> Faults:
        env = os.environ
        stall_step, _, stall_s = env.get("UMT_FAULT_DATA_STALL", "-1:0").partition(":")
        return cls(
            int(env.get("UMT_FAULT_KILL_AT_STEP", -1)),
            int(env.get("UMT_FAULT_NAN_AT_STEP", -1)),
            int(stall_step),
            float(stall_s or 0),
        )


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where it stopped and what is on disk.

    `requeue`: the run was asked to stop (a signal) and its last checkpoint is where to go on."""

    def __init__(self, message: str, requeue: bool = False):
        super().__init__(message)
        self.requeue = requeue


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


# --- distributed set-up ----------------------------------------------------------------------


def init_distributed(timeout_s: float) -> tuple[WorldInfo, torch.device]:
    """This rank's GPU and process group (NCCL on GPUs, gloo on CPU), then DeepSpeed's comm on top."""
    import deepspeed

    world, device = distributed.init_distributed(timeout_s, always=True)
    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when its process group
        # starts: ~50 s on 2 cores, once per machine, for an op only inference calls. Training
        # collectives go through gloo either way.
        # (`deepspeed.comm.torch` as an attribute is the torch package: import the module by name.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # The torch group exists already, so DeepSpeed wraps it (and its timeout) instead of making one.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- DeepSpeed configuration -----------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


OPTIMIZERS = ("auto", "adamw", "fused_adamw", "cpu_adam")


def resolve_optimizer(name: str, device: torch.device, offload: str) -> str:
    """`train.optimizer`, with `auto` made concrete for the device.

    auto: torch's fused AdamW on GPUs (one kernel for all parameters, no op to build);
    DeepSpeed's vectorised CPU Adam when ZeRO offloads the optimizer to the CPU (torch's AdamW
    would run there ~5x slower); torch's AdamW on a CPU-only run.
    """
    if name == "auto":
        if offload == "cpu":
            return "cpu_adam"
        return "fused_adamw" if device.type == "cuda" else "adamw"
    if name == "fused_adamw" and device.type != "cuda":
        raise ConfigError("train.optimizer: fused_adamw needs a CUDA device; use adamw or auto")
    return name


def optimizer_config(t, optimizer: str) -> dict:
    """DeepSpeed's `optimizer` block: which class DeepSpeed builds follows from `torch_adam`
    (torch's AdamW; `fused` is handed to it) and ZeRO offload (DeepSpeedCPUAdam)."""
    params = {
        "lr": t.lr,
        "betas": list(t.betas),
        "eps": t.eps,
        "weight_decay": t.weight_decay,
        "adam_w_mode": True,
        "torch_adam": optimizer in ("adamw", "fused_adamw"),
    }
    if optimizer == "fused_adamw":
        params["fused"] = True
    return {"type": "AdamW", "params": params}


def warmup_steps(t) -> int:
    """train.warmup_steps, at least 1 and at most train.steps (DeepSpeed warns on every start
    and resume when the warmup is longer than the run)."""
    return min(max(1, t.warmup_steps), t.steps)


def deepspeed_config(
    cfg: Config, world_size: int, device: torch.device, load_universal: bool
) -> dict:
    """The DeepSpeed JSON config, built from the typed config (written next to the logs)."""
    t, z = cfg.train, cfg.zero
    precision = resolve_precision(t.precision, device)
    zero: dict = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm and device.type == "cuda",
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.stage == 3:
        zero.pop("allgather_bucket_size")
        zero["stage3_prefetch_bucket_size"] = z.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = z.stage3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    optimizer = resolve_optimizer(t.optimizer, device, z.offload_optimizer)
    config = {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": optimizer_config(t, optimizer),
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": warmup_steps(t),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if z.communication_dtype is not None:
        config["communication_data_type"] = z.communication_dtype
    return config


# --- data --------------------------------------------------------------------------------------


def build_train_data(cfg: Config, rank: int, world_size: int, epoch: int = 0, device=None):
    """The training stream for this rank: the streaming loader over shards, or synthetic batches.

    On a GPU (`device`), loader batches come in pinned memory (asynchronous copies) and a short
    synthetic cycle is kept on the device (no per-step host work in benchmarks).
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
        pin_memory=on_gpu,
    )
    return build_loader(loader_cfg, rank=rank, world_size=world_size, epoch=epoch)


def data_summary(data) -> dict | None:
    """What a checkpoint says of its training data (for the model card of an export): the
    dataset digest (shard names and counts), samples per epoch and the sources."""
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        return {"synthetic": True}
    return {
        "digest": dataset.digest(),
        "samples": dataset.total_samples,
        "shards": len(dataset.shards),
        "sources": [
            {
                "name": s.name,
                "samples": s.total_samples,
                "shards": len(s.shards),
                "weight": s.weight,
            }
            for s in dataset.sources
        ],
    }


# --- the trainer -------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One optimizer step as the loop sees it. `logs` stay on the device: read only on log steps."""

    logs: dict[str, torch.Tensor]
    stop: bool  # a stop signal reached some rank: checkpoint now
    data_wait_s: float
    elapsed_s: float
    text_len: float  # mean padded text length fed (for MFU)
    host_syncs: int = -1  # with UMT_SYNC_DEBUG on a GPU: synchronising CUDA calls in the step


@dataclass
class Window:
    """What the throughput and MFU of a log line are averaged over."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    excluded_s: float = 0.0  # evaluation and checkpoint time inside the window
    data_wait_s: float = 0.0
    text_len: float = 0.0
    host_syncs: list[int] = field(default_factory=list)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.data_wait_s += result.data_wait_s
        self.text_len += result.text_len
        if result.host_syncs >= 0:
            self.host_syncs.append(result.host_syncs)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.excluded_s, 1e-9)


class Trainer:
    """Owns the engine, the data stream, the writer and the `TrainState`; `train()` runs the loop."""

    def __init__(self, cfg: Config, resume: str | None = None, restart: bool = False):
        quiet_deepspeed()
        import deepspeed

        self.world, self.device = init_distributed(cfg.train.collective_timeout_min * 60)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.out = Path(cfg.output_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.out / "checkpoints")
        if restart:
            if self.rank == 0:  # before anything is written; nothing of the old run is deleted
                moved = set_aside_run(self.out, self.ckpt_root)
                log.warning("--restart: the previous run in %s is now in %s", self.out, moved)
            distributed.barrier()
        ref = checkpoint.resolve(resume, self.ckpt_root)
        if resume == "auto" and ref is None and self.rank == 0:
            log.info("no complete checkpoint in %s: starting fresh", self.ckpt_root)
        elastic = ref is not None and ref.world_size != self.world_size
        if elastic:
            cfg = keep_global_batch(cfg, ref, self.world_size, self.rank)
        self.cfg = cfg
        self.threads = choose_threads(cfg.train.cpu_threads, cfg.data.train.num_workers)
        torch.set_num_threads(self.threads.count)
        if self.rank == 0:
            log.info("%s", self.threads.describe())

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, log_table=self.rank == 0)
        ds_config = deepspeed_config(cfg, self.world_size, self.device, load_universal=elastic)
        if self.rank == 0:
            if cfg.train.warmup_steps > cfg.train.steps:
                log.info(
                    "train.warmup_steps %d > train.steps %d: warming up over the %d steps",
                    cfg.train.warmup_steps,
                    cfg.train.steps,
                    warmup_steps(cfg.train),
                )
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            versions.record(self.out, resuming=ref is not None)
            (self.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.optimizer_groups(cfg.train.weight_decay),
            config=ds_config,
        )
        if self.rank == 0:
            log.info(
                "optimizer %s (train.optimizer=%s), collective timeout %g min",
                type(self.engine.basic_optimizer).__name__,
                cfg.train.optimizer,
                cfg.train.collective_timeout_min,
            )
        self.model_dtype = next(self.engine.module.parameters()).dtype
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))  # per-rank streams (dropout)
        self.data = build_train_data(cfg, self.rank, self.world_size, device=self.device)
        self.state = TrainState(run_id=uuid.uuid4().hex[:12] if ref is None else "")
        if ref is not None:
            self.resume(ref, elastic)
        # Every rank uses rank 0's id (a fresh run's ids differ per rank).
        self.state.run_id = distributed.broadcast_object(self.state.run_id)
        # The exact fp32 logit scale into DeepSpeed's master and the copy a bf16 forward reads.
        scale = self.engine.module.logit_scale
        scale.after_step() if ref is not None else scale.start_()
        if self.rank == 0:  # before any rank appends: the files describe the steps trained
            step_log.truncate_after(self.out, self.state.step)
        distributed.barrier()
        self.step_log = StepLog(self.out, self.rank, cfg.data.log_sample_keys)
        self.writer = MetricsWriter(
            self.out / "tensorboard" if self.rank == 0 and cfg.log.tensorboard else None
        )
        self.stop_signal: int | None = None
        self.faults = Faults.from_env()
        self.sync_debug = os.environ.get("UMT_SYNC_DEBUG") == "1" and self.device.type == "cuda"
        self.last_checkpoint: Path | None = ref.path if ref else None

    # --- state -------------------------------------------------------------------------------
    def resume(self, ref: checkpoint.CheckpointRef, elastic: bool) -> None:
        tag = (
            checkpoint.convert_to_universal(ref, self.cfg.checkpoint.conversion_timeout_min * 60)
            if elastic
            else ref.tag
        )
        with checkpoint.weights_only_loads():  # a checkpoint handed over must not run code
            load_path, client_state = self.engine.load_checkpoint(str(ref.root), tag=tag)
        if load_path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load {ref.root / tag}")
        if elastic:
            # Loaded: later loads and saves of this engine are ordinary ZeRO checkpoints again.
            self.engine._config.load_universal_checkpoint = False
        self.state.load_state_dict(client_state["train_state"])
        if not self.state.run_id:  # a checkpoint from before run ids: this resume starts one
            self.state.run_id = uuid.uuid4().hex[:12]
        # Per-rank files: the same rank on the same topology, else rank 0's. The loader state
        # is one stream position, the same on every rank, so it resumes any topology exactly.
        rank_file = ref.root / tag / f"rank{self.rank if not elastic else 0}.pt"
        rank_state = checkpoint.load_file(rank_file)
        self.data.load_state_dict(rank_state["data"])
        if elastic:  # other ranks: the saved RNG streams do not map to them
            seed_everything(self.cfg.train.seed + 1000 * (self.rank + 1) + self.state.step)
        else:
            checkpoint.set_rng_state(rank_state["rng"])
        log.info(
            "resumed from %s at step %d (%d samples seen)%s",
            ref.path,
            self.state.step,
            self.state.samples,
            f", converted from {ref.world_size} to {self.world_size} ranks" if elastic else "",
        )

    def save_checkpoint(self) -> Path:
        path = checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.state.step,
            client_state={"train_state": self.state.state_dict(), "config": to_dict(self.cfg)},
            rank_state={"data": self.data.state_dict()},
            keep=self.cfg.checkpoint.keep,
            run_id=self.state.run_id,
            config=to_dict(self.cfg),
            meta={"samples": self.state.samples, "data": data_summary(self.data)},
        )
        self.last_checkpoint = path
        log.info("saved checkpoint %s", path)
        return path

    # --- the step ----------------------------------------------------------------------------
    def forward(self, batch, seed: int):
        # uint8 pixels travel (a quarter of float32's bytes) and are normalised on the device;
        # image keys were hashed to int64 ids in the loader workers.
        pixels = batch.normalized_pixels(self.device, self.model_dtype)
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        image_ids = batch.image_ids.to(self.device, non_blocking=True)
        negative_texts = batch.negative_texts
        if negative_texts is not None:
            negative_texts = tuple(t.to(self.device, non_blocking=True) for t in negative_texts)
        return self.engine(
            pixels,
            ids,
            mask,
            image_ids,
            seed=seed,
            objectives=self.cfg.objectives,
            negative_texts=negative_texts,
        )

    def train_step(self, batches) -> StepResult:
        """One optimizer step: grad_accum micro-batches; a non-finite one on any rank is skipped on all.

        Host-device syncs: the ITM fetch plan's one read inside the forward, and one read of a
        fused all-reduce of (non-finite loss anywhere, stop signal anywhere) per micro-batch.
        Log values stay on the device (`StepResult.logs`).
        """
        t = self.cfg.train
        logs: dict[str, torch.Tensor] = {}
        data_wait, start, micro, skipped_run = 0.0, time.perf_counter(), 0, 0
        stop, text_len = False, 0
        trained_keys: list[str] = []
        failures: list[dict] = []
        with self._sync_counter() as syncs:
            while micro < t.grad_accum:
                tic = time.perf_counter()
                batch = batches.next(lambda: self.stop_signal is not None)
                data_wait += time.perf_counter() - tic
                failures += getattr(batch, "failures", [])
                seed = mix_seed(t.seed, self.state.step, micro, skipped_run)
                out = self.forward(batch, seed)
                if self.faults.nan_at(self.state.step + 1, micro, skipped_run) and self.rank == 0:
                    out.loss = out.loss * float("nan")
                nonfinite, stop_now = any_rank(
                    [~torch.isfinite(out.loss.detach()), self.stop_signal is not None]
                )
                stop = stop or stop_now
                if nonfinite:
                    skipped_run += 1
                    self.state.nonfinite_total += 1
                    log.warning(
                        "non-finite loss at step %d: micro-batch skipped", self.state.step + 1
                    )
                    if skipped_run >= t.max_nonfinite:
                        raise TrainingError(
                            f"{skipped_run} consecutive non-finite losses at step "
                            f"{self.state.step + 1}; last checkpoint: {self.last_checkpoint or 'none'}"
                        )
                    continue
                self.engine.backward(out.loss)
                self.engine.step()
                self.engine.module.logit_scale.after_step()  # after the optimizer moved it
                for k, v in out.logs.items():
                    logs[k] = logs.get(k, 0) + v.detach().float() / t.grad_accum
                text_len += batch.input_ids.shape[1]
                trained_keys += batch.keys
                micro += 1
        self.state.step += 1
        self.state.samples += t.micro_batch_size * t.grad_accum * self.world_size
        self.step_log.record(self.state.step, trained_keys, failures)
        return StepResult(
            logs, stop, data_wait, time.perf_counter() - start, text_len / t.grad_accum, syncs[0]
        )

    def _sync_counter(self):
        """With UMT_SYNC_DEBUG=1 on a GPU: count CUDA calls that synchronise the host (torch's
        sync debug mode warns on each); yields a one-element list filled at exit (-1: off)."""
        import contextlib

        @contextlib.contextmanager
        def counting():
            box = [-1]
            if not self.sync_debug:
                yield box
                return
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield box
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            box[0] = sum("synchroniz" in str(w.message) for w in caught)

        return counting()

    # --- logging -----------------------------------------------------------------------------
    def log_scalars(self, result: StepResult, window: Window) -> dict[str, float]:
        """The step's logs and the window's system figures, averaged over ranks, and the data
        counters (skipped samples, storage), summed over ranks: one all-reduce of a vector whose
        keys are the same on every rank, one host read (log steps only)."""
        logs = dict(result.logs)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32)
        host = self._system_scalars(window) | {
            "lr": self.engine.get_lr()[0],
            "time/step_s": result.elapsed_s,
            "train/nonfinite_skipped": float(self.state.nonfinite_total),
        }
        counters = self._data_counters()
        keys = sorted(logs) + sorted(host)
        values = torch.stack(
            [logs[k].to(self.device, torch.float64).reshape(()) for k in sorted(logs)]
            + [torch.tensor(float(host[k]), dtype=torch.float64, device=self.device) for k in sorted(host)]
            + [torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in counters.values()]
        )  # fmt: skip
        total = distributed.all_reduce(values).tolist()
        out = {k: v / self.world_size for k, v in zip(keys, total)}
        return out | {k: v for k, v in zip(counters, total[len(keys) :]) if v}

    def _data_counters(self) -> dict[str, int]:
        """This rank's counts since its loader started, under names every rank has (a key only
        some ranks had would break the all-reduce): skipped samples by reason, storage."""
        errors = self.data.error_counts()
        io = getattr(self.data, "io_counts", dict)()
        negatives = {}
        if self.cfg.data.train.negatives:  # the same on every rank
            negatives = {"data/samples_without_negative": errors.get(NO_NEGATIVE, 0)}
        return (
            {f"data/errors_{r}": errors.get(r, 0) for r in SAMPLE_ERRORS}
            | {f"data/storage_{n}": io.get(n, 0) for n in IO_COUNTERS}
            | negatives
        )

    def _system_scalars(self, window: Window) -> dict[str, float]:
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

    def evaluate(self) -> dict:
        """Retrieval on data.eval with the same code as `umt eval`; every rank takes part."""
        from data_pipeline.transforms import load_tokenizer
        from umt.evaluate import (
            EvalData,
            evaluate_retrieval,
            format_report,
            report_scalars,
            set_name,
            write_eval_record,
        )

        cfg = self.cfg
        if getattr(self, "_eval_tokenizer", None) is None:
            self._eval_tokenizer = load_tokenizer(tokenizer_name(cfg))
        data = EvalData(
            cfg.data.eval.shards,
            self._eval_tokenizer,
            cfg.model.image.image_size,
            cfg.data.eval.max_text_len,
            cfg.train.micro_batch_size,
            cache_dir=cfg.data.cache_dir,
        )
        report = evaluate_retrieval(
            self.engine.module, data, cfg.eval.itm_rerank_k, device=self.device
        )
        self.writer.scalars(report_scalars(report, set_name(cfg.data.eval.shards)), self.state.step)
        log.info("evaluation at step %d:\n%s", self.state.step, format_report(report))
        if self.rank == 0:  # read by `umt export` for the model card
            write_eval_record(
                self.out, self.state.step, self.state.samples, cfg.data.eval.shards, report
            )
        return report

    # --- the loop ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's warning before the time limit), SIGTERM and a first SIGINT (Ctrl-C):
        checkpoint at the end of the step, then stop. A second SIGINT aborts without saving
        (KeyboardInterrupt: one line, no traceback; the unfinished step folder stays invisible)."""

        owner = os.getpid()
        first_interrupt = [0.0]

        def request(signum, _frame):
            if os.getpid() != owner:  # a forked loader worker before its own set-up: not ours
                return
            if signum == signal.SIGINT:
                # One Ctrl-C can arrive twice: from the terminal or `scancel --signal=INT` (every
                # process of a Slurm step), and again from a launcher that passes it on.
                if time.monotonic() - first_interrupt[0] < SAME_INTERRUPT_S:
                    return
                if self.stop_signal == signal.SIGINT:
                    raise KeyboardInterrupt
                first_interrupt[0] = time.monotonic()
                if self.rank == 0:
                    log.warning(
                        "Ctrl-C: finishing the step in progress, then saving a checkpoint and "
                        "stopping (press Ctrl-C again to stop now without saving)"
                    )
            self.stop_signal = signum

        signal.signal(signal.SIGUSR1, request)
        signal.signal(signal.SIGTERM, request)
        signal.signal(signal.SIGINT, request)

    def _stall(self) -> None:
        """UMT_FAULT_DATA_STALL: rank 0's first batch of the step takes longer (tests)."""
        f = self.faults
        if self.rank == 0 and self.state.step + 1 == f.stall_at_step and not self._stalled:
            self._stalled = True
            log.warning("fault: data stall of %g s before step %d", f.stall_s, f.stall_at_step)
            time.sleep(f.stall_s)

    def train(self) -> dict[str, float]:
        self._stalled = False
        t = self.cfg.train
        first, started = self.state.step, time.perf_counter()
        if self.rank == 0:
            log.info(
                "training steps %d-%d of %s: %d samples per step (%d ranks x %d x %d accumulated); "
                "Ctrl-C or SIGTERM saves a checkpoint and stops",
                first + 1,
                t.steps,
                self.out,
                self.world_size * t.micro_batch_size * t.grad_accum,
                self.world_size,
                t.micro_batch_size,
                t.grad_accum,
            )
        batches = DataWaiter(self.data, before_fetch=self._stall)
        bar = progress(self.cfg.train.steps, self.state.step, self.rank, "train")
        try:
            last = self._train(batches, bar)
            bar.close()
            if self.rank == 0:
                log.info("%s", self.summary(first, time.perf_counter() - started, last))
            return last
        except DataWaitInterrupted as exc:
            batches.abandon()  # its thread is stuck in the loader: do not wait for it
            name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
            raise TrainingError(
                f"stopped by {name} while waiting for data for step {self.state.step + 1} "
                f"({exc}); that step is not saved; last checkpoint: {self.last_checkpoint or 'none'}",
                requeue=True,
            ) from None
        except LoaderDataError as exc:
            raise TrainingError(
                f"data at step {self.state.step + 1}: {exc}; last checkpoint: "
                f"{self.last_checkpoint or 'none'}"
            ) from None
        finally:
            bar.close()  # before any message: a bar left open would prefix it
            batches.close()

    def summary(self, first: int, seconds: float, last: dict[str, float]) -> str:
        """What this run did and what to do next, for the end of the log."""
        t = self.cfg.train
        steps = self.state.step - first
        samples = steps * self.world_size * t.micro_batch_size * t.grad_accum
        losses = ", ".join(
            f"{k.removeprefix('loss/')} {v:.4f}" for k, v in last.items() if k.startswith("loss/")
        )
        stopped = "" if self.state.step >= t.steps else f" (stopped early, of {t.steps})"
        minutes, secs = divmod(round(seconds), 60)
        lines = [
            f"done: steps {first + 1}-{self.state.step}{stopped}, {samples} samples in "
            f"{minutes}m{secs:02d}s ({samples / max(seconds, 1e-9):.1f} samples/s)"
            + (f"; last losses: {losses}" if losses else ""),
            f"  checkpoint: {self.last_checkpoint}",
        ]
        if self.last_checkpoint is not None:
            lines.append(f"  export:     umt export {self.ckpt_root} {self.out / 'export'}")
            if self.cfg.data.eval.shards is not None:
                lines.append(
                    f"  evaluate:   umt eval --model {self.ckpt_root} --shards "
                    f"{self.cfg.data.eval.shards}"
                )
        if self.state.step < t.steps:
            ranks = f" --nproc-per-node {self.world_size}" if self.world_size > 1 else ""
            lines.append(f"  go on:      umt train --resume {self.out}{ranks}")
        return "\n".join(lines)

    def _train(self, batches: DataWaiter, bar) -> dict[str, float]:
        cfg = self.cfg
        window = Window()
        last: dict[str, float] = {}
        saved_at = self.state.step if self.last_checkpoint else -1
        while self.state.step < cfg.train.steps:
            result = self.train_step(batches)
            window.add(result)
            bar.update(1)
            step = self.state.step
            if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
                last = self.log_scalars(result, window)
                self.writer.scalars(last, step)
                bar.set_postfix(
                    loss=f"{last['loss/total']:.4f}",
                    sps=f"{last['throughput/samples_per_s']:.1f}",
                    refresh=False,
                )
                window = Window()
            if step == self.faults.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            paused = time.perf_counter()
            every = cfg.checkpoint.every_steps
            if result.stop or (every and step % every == 0) or step == cfg.train.steps:
                self.save_checkpoint()
                saved_at = step
            if result.stop:
                if self.rank == 0:
                    log.warning(
                        "stopping at step %d after a signal; checkpoint %s",
                        step,
                        self.last_checkpoint,
                    )
                break
            # After the checkpoint: an evaluation that fails must not cost the steps before it.
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                self.evaluate()
            window.excluded_s += time.perf_counter() - paused
        if saved_at != self.state.step:
            self.save_checkpoint()
        self.writer.close()
        return last
