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
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from umt import checkpoint
from umt.config import Config, save_config, to_dict, tokenizer_name
from umt.distributed import WorldInfo, discover_world
from umt.flops import StepShape, gpu_peak_flops, train_step_flops
from umt.logging import MetricsWriter, progress
from umt.model import build_model
from umt.objectives import key_ids, mix_seed

log = logging.getLogger("umt.train")


@dataclass(frozen=True)
class Faults:
    """Failure injection for tests of failure handling, read from the environment once.

    UMT_FAULT_KILL_AT_STEP=N: every rank SIGKILLs itself right after step N (no checkpoint).
    UMT_FAULT_NAN_AT_STEP=N: rank 0's loss is NaN on the first micro-batch tried for step N.
    """

    kill_at_step: int = -1
    nan_at_step: int = -1

    def nan_at(self, step: int, micro: int, skipped_run: int) -> bool:
        return step == self.nan_at_step and micro == 0 and skipped_run == 0

    @classmethod
    def from_env(cls) -> Faults:
        env = os.environ
        return cls(
            int(env.get("UMT_FAULT_KILL_AT_STEP", -1)), int(env.get("UMT_FAULT_NAN_AT_STEP", -1))
        )


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where it stopped and what is on disk."""


@dataclass
class TrainState:
    """What survives a restart besides DeepSpeed's own state and the loader position."""

    step: int = 0
    samples: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --- distributed set-up ----------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "127.0.0.1"


def export_world_env(world: WorldInfo) -> None:
    """Give torch.distributed the env:// variables whichever launcher started us."""
    env = os.environ
    if world.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif world.launcher == "slurm":
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000))
    env["RANK"], env["LOCAL_RANK"] = str(world.rank), str(world.local_rank)
    env["WORLD_SIZE"] = str(world.world_size)


def init_distributed() -> tuple[WorldInfo, torch.device]:
    """NCCL on GPUs, gloo on CPU; one process without a launcher is a world of one."""
    import deepspeed

    world = discover_world()
    export_world_env(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    else:
        device = torch.device("cpu")
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when its process group
        # starts: ~50 s on 2 cores, once per machine, for an op only inference calls. Training
        # collectives go through gloo either way.
        # (`deepspeed.comm.torch` as an attribute is the torch package: import the module by name.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
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
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                "torch_adam": t.torch_adam,
                "adam_w_mode": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": max(1, t.warmup_steps),
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


# --- data --------------------------------------------------------------------------------------


def build_train_data(cfg: Config, rank: int, world_size: int, epoch: int = 0):
    """The training stream for this rank: the streaming loader over shards, or synthetic batches."""
    d = cfg.data.train
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
        )
    from data_pipeline.loader import LoaderConfig, build_loader

    loader_cfg = LoaderConfig(
        shards=d.shards,
        batch_size=cfg.train.micro_batch_size,
        num_workers=d.num_workers,
        seed=cfg.train.seed,
        resampled=d.resampled,
        shuffle_buffer=d.shuffle_buffer,
        image_size=cfg.model.image.image_size,
        max_text_len=d.max_text_len,
        tokenizer=tokenizer_name(cfg),
        train=True,
        caption=d.caption,
        crop_scale=d.crop_scale,
        hflip=d.hflip,
        negatives=d.negatives,
    )
    return build_loader(loader_cfg, rank=rank, world_size=world_size, epoch=epoch)


# --- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Owns the engine, the data stream, the writer and the `TrainState`; `train()` runs the loop."""

    def __init__(self, cfg: Config, resume: str | None = None):
        import deepspeed

        self.cfg = cfg
        self.world, self.device = init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.output_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.out / "checkpoints")
        ref = checkpoint.resolve(resume, self.ckpt_root)
        if resume == "auto" and ref is None and self.rank == 0:
            log.info("--resume auto: no complete checkpoint in %s; starting fresh", self.ckpt_root)
        elastic = ref is not None and ref.world_size != self.world_size

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, log_table=self.rank == 0)
        ds_config = deepspeed_config(cfg, self.world_size, self.device, load_universal=elastic)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            (self.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.optimizer_groups(cfg.train.weight_decay),
            config=ds_config,
        )
        self.model_dtype = next(self.engine.module.parameters()).dtype
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))  # per-rank streams (dropout)
        self.data = build_train_data(cfg, self.rank, self.world_size)
        self.state = TrainState()
        if ref is not None:
            self.resume(ref, elastic)
        self.writer = MetricsWriter(
            self.out / "tensorboard" if self.rank == 0 and cfg.log.tensorboard else None
        )
        self.stop_signal: int | None = None
        self.faults = Faults.from_env()
        self.last_checkpoint: Path | None = ref.path if ref else None

    # --- state -------------------------------------------------------------------------------
    def resume(self, ref: checkpoint.CheckpointRef, elastic: bool) -> None:
        tag = checkpoint.convert_to_universal(ref) if elastic else ref.tag
        load_path, client_state = self.engine.load_checkpoint(str(ref.root), tag=tag)
        if load_path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load {ref.root / tag}")
        if elastic:
            # Loaded: later loads and saves of this engine are ordinary ZeRO checkpoints again.
            self.engine._config.load_universal_checkpoint = False
        self.state.load_state_dict(client_state["train_state"])
        # Per-rank files: the same rank on the same topology, else rank 0's (equal consumption).
        rank_file = ref.root / tag / f"rank{self.rank if not elastic else 0}.pt"
        rank_state = torch.load(rank_file, weights_only=False)
        if elastic:
            self._resume_data_on_new_topology(rank_state["data"], ref.world_size)
            seed_everything(self.cfg.train.seed + 1000 * (self.rank + 1) + self.state.step)
        else:
            self.data.load_state_dict(rank_state["data"])
            checkpoint.set_rng_state(rank_state["rng"])
        log.info(
            "resumed from %s at step %d (%d samples seen)%s",
            ref.path,
            self.state.step,
            self.state.samples,
            f", converted from {ref.world_size} to {self.world_size} ranks" if elastic else "",
        )

    def _resume_data_on_new_topology(self, saved: dict, saved_world: int) -> None:
        """The synthetic stream counts global samples and resumes anywhere; the shard loader's split
        depends on the topology, so it starts the next epoch (the rest of the epoch is skipped)."""
        if saved.get("kind") == "synthetic":
            self.data.load_state_dict(saved)
            return
        epoch = int(saved["epoch"]) + 1
        if self.rank == 0:
            log.warning(
                "world size changed (%d -> %d ranks): the loader cannot split the rest of epoch %d "
                "the same way, so it starts epoch %d (%d of %d batches of epoch %d were unseen)",
                saved_world, self.world_size, epoch - 1, epoch,
                int(saved["batches_per_epoch"]) - int(saved["batches_in_epoch"]),
                int(saved["batches_per_epoch"]), epoch - 1,
            )  # fmt: skip
        self.data = build_train_data(self.cfg, self.rank, self.world_size, epoch=epoch)

    def save_checkpoint(self) -> Path:
        path = checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.state.step,
            client_state={"train_state": self.state.state_dict(), "config": to_dict(self.cfg)},
            rank_state={"data": self.data.state_dict()},
            keep=self.cfg.checkpoint.keep,
            config=to_dict(self.cfg),
        )
        self.last_checkpoint = path
        log.info("saved checkpoint %s", path)
        return path

    # --- the step ----------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def forward(self, batch, seed: int):
        pixels = batch.pixel_values.to(self.device, dtype=self.model_dtype, non_blocking=True)
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        image_ids = key_ids(batch.image_keys, self.device)
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

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step: grad_accum micro-batches; a non-finite one on any rank is skipped on all."""
        t = self.cfg.train
        logs: dict[str, torch.Tensor] = {}
        data_wait, start, micro, skipped_run = 0.0, time.perf_counter(), 0, 0
        while micro < t.grad_accum:
            tic = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - tic
            seed = mix_seed(t.seed, self.state.step, micro, skipped_run)
            out = self.forward(batch, seed)
            if self.faults.nan_at(self.state.step + 1, micro, skipped_run) and self.rank == 0:
                out.loss = out.loss * float("nan")
            if self._any_rank(not torch.isfinite(out.loss).item()):
                skipped_run += 1
                self.state.nonfinite_total += 1
                log.warning("non-finite loss at step %d: micro-batch skipped", self.state.step + 1)
                if skipped_run >= t.max_nonfinite:
                    raise TrainingError(
                        f"{skipped_run} consecutive non-finite losses at step {self.state.step + 1}; "
                        f"last checkpoint: {self.last_checkpoint or 'none'}"
                    )
                continue
            self.engine.backward(out.loss)
            self.engine.step()
            for k, v in out.logs.items():
                logs[k] = logs.get(k, 0) + v.float() / t.grad_accum
            micro += 1
        self.state.step += 1
        self.state.samples += t.micro_batch_size * t.grad_accum * self.world_size
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        scalars = {k: v.item() for k, v in logs.items()}
        scalars |= {
            "lr": self.engine.get_lr()[0],
            "time/step_s": elapsed,
            "time/data_wait_fraction": data_wait / max(elapsed, 1e-9),
            "train/nonfinite_skipped": float(self.state.nonfinite_total),
        }
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        return scalars

    # --- logging -----------------------------------------------------------------------------
    def _reduce(self, scalars: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of every scalar (same keys on every rank)."""
        keys = sorted(scalars)
        t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def _system_scalars(self, window_steps: int, window_s: float) -> dict[str, float]:
        t = self.cfg.train
        per_rank = window_steps * t.micro_batch_size * t.grad_accum / max(window_s, 1e-9)
        out = {
            "throughput/samples_per_s": per_rank * self.world_size,
            "throughput/samples_per_s_per_rank": per_rank,
            "memory/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.device.type == "cuda":
            out["memory/allocated_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["memory/reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
            peak = gpu_peak_flops(torch.cuda.get_device_name(self.device))
            if peak:
                # At max_text_len: exact for synthetic batches, an upper bound for the loader's
                # (padded to the longest caption of each batch).
                o = self.cfg.objectives
                shape = StepShape(
                    t.micro_batch_size,
                    self.cfg.data.train.max_text_len,
                    self.world_size,
                    itm=o.itm_weight > 0,
                    data_negatives=o.itm_weight > 0 and bool(self.cfg.data.train.negatives),
                    mlm=o.mlm_weight > 0,
                )
                flops_per_sample = train_step_flops(self.cfg.model, shape) / t.micro_batch_size
                out["throughput/mfu"] = per_rank * flops_per_sample / peak
        for reason, count in self.data.error_counts().items():
            out[f"data/errors_{reason}"] = float(count)
        return out

    def evaluate(self) -> dict:
        """Retrieval on data.eval with the same code as `umt eval`; every rank takes part."""
        from data_pipeline.transforms import load_tokenizer
        from umt.evaluate import (
            EvalData,
            evaluate_retrieval,
            format_report,
            report_scalars,
            set_name,
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
        )
        report = evaluate_retrieval(
            self.engine.module, data, cfg.eval.itm_rerank_k, device=self.device
        )
        self.writer.scalars(report_scalars(report, set_name(cfg.data.eval.shards)), self.state.step)
        log.info("evaluation at step %d:\n%s", self.state.step, format_report(report))
        return report

    # --- the loop ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM: checkpoint at the next step."""

        def request(signum, _frame):
            self.stop_signal = signum

        signal.signal(signal.SIGUSR1, request)
        signal.signal(signal.SIGTERM, request)

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        batches = iter(self.data)
        bar = progress(cfg.train.steps, self.state.step, self.rank, "train")
        window_start, window_steps = time.perf_counter(), 0
        last: dict[str, float] = {}
        saved_at = self.state.step if self.last_checkpoint else -1
        while self.state.step < cfg.train.steps:
            scalars = self.train_step(batches)
            window_steps += 1
            bar.update(1)
            step = self.state.step
            if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                scalars |= self._system_scalars(window_steps, now - window_start)
                last = self._reduce(scalars)
                self.writer.scalars(last, step)
                bar.set_postfix(
                    loss=f"{last['loss/total']:.4f}",
                    sps=f"{last['throughput/samples_per_s']:.1f}",
                    refresh=False,
                )
                window_start, window_steps = now, 0
            if step == self.faults.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                self.evaluate()
            stop = self._any_rank(self.stop_signal is not None)
            every = cfg.checkpoint.every_steps
            if stop or (every and step % every == 0) or step == cfg.train.steps:
                self.save_checkpoint()
                saved_at = step
            if stop:
                log.warning(
                    "stopping at step %d after a signal; checkpoint %s", step, self.last_checkpoint
                )
                break
        bar.close()
        if saved_at != self.state.step:
            self.save_checkpoint()
        self.writer.close()
        return last
