"""The training loop: where model, objectives, data and DeepSpeed meet.

`Trainer.train_step` reads top to bottom as a step happens: the next micro-batch, the forward
(the model's objectives: embed, ITC, mine negatives, fuse, ITM, MLM), a non-finite loss skipped
on every rank, backward, the optimizer step; after the last micro-batch, the logit scale's
clamp. `train()` runs steps; when to log, save and evaluate is each a `Cadence`. The rest lives
in modules of its own: DeepSpeed (`umt.engine`), the data stream (`umt.train_data`), what a log
step reports (`umt.metrics`), the test hooks (`data_pipeline.faults`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time
import uuid
import warnings
from pathlib import Path

import torch

from data_pipeline.faults import TrainingFaults
from data_pipeline.loader.config import LoaderDataError
from data_pipeline.transforms import normalize_pixels
from umt import checkpoint, collective_tracker, distributed, step_log, versions
from umt import watchdog as phase
from umt.async_checkpoint import background_writer
from umt.cached_step import ContrastiveStep, MicroBatchInputs
from umt.config import Config, save_config, to_dict
from umt.data_wait import DataWaiter, DataWaitInterrupted
from umt.distributed import any_rank
from umt.engine import (
    build_engine,
    clamp_logit_scale,
    deepspeed_config,
    init_distributed,
    seed_everything,
    start_logit_scale,
    warmup_steps,
)
from umt.logs import progress
from umt.metrics import MetricsWriter, StepResult, StepScalars, Window
from umt.model import build_model
from umt.objectives import mix_seed
from umt.objectives.step import StepLayout
from umt.run_config import keep_global_batch, set_aside_run
from umt.step_log import StepLog
from umt.stragglers import StragglerMonitor
from umt.threads import choose_threads
from umt.train_data import TrainBatch, TrainData, build_train_data
from umt.train_state import Cadence, StepProgress, TrainState
from umt.watchdog import HangWatchdog

log = logging.getLogger("umt.train")
SAME_INTERRUPT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C, delivered twice


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where it stopped and what is on disk.

    `requeue`: the run was asked to stop (a signal) and its last checkpoint is where to go on."""

    def __init__(self, message: str, requeue: bool = False):
        super().__init__(message)
        self.requeue = requeue


class Trainer:
    """Owns the engine, the data stream, the writer and the `TrainState`; `train()` runs the loop."""

    def __init__(
        self, cfg: Config, resume: str | None = None, restart: bool = False, new_mixture=False
    ):
        collective_tracker.install()  # before the process group and DeepSpeed's backend start
        self.new_mixture = new_mixture  # a checkpoint of another data mixture starts a new phase
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
        self.use_cpu_threads()

        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, log_table=self.rank == 0)
        ds_config = deepspeed_config(cfg, self.world_size, self.device, load_universal=elastic)
        if self.rank == 0:
            self.write_run_files(ds_config, resuming=ref is not None)
        self.engine = build_engine(model, cfg, ds_config)
        if self.rank == 0:
            log.info(
                "optimizer %s (train.optimizer=%s), collective timeout %g min",
                type(self.engine.basic_optimizer).__name__,
                cfg.train.optimizer,
                cfg.train.collective_timeout_min,
            )
        self.model_dtype = next(self.engine.module.parameters()).dtype
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))  # per-rank streams (dropout)
        self.data: TrainData = build_train_data(cfg, self.rank, self.world_size, device=self.device)
        self.state = TrainState(run_id=uuid.uuid4().hex[:12] if ref is None else "")
        if ref is not None:
            self.resume(ref, elastic)
        # Every rank uses rank 0's id (a fresh run's ids differ per rank).
        self.state.run_id = distributed.broadcast_object(self.state.run_id)
        # The exact fp32 logit scale into DeepSpeed's master and the copy a bf16 forward reads.
        scale = self.engine.module.logit_scale
        clamp_logit_scale(scale) if ref is not None else start_logit_scale(scale)
        if self.rank == 0:  # before any rank appends: the files describe the steps trained
            step_log.truncate_after(self.out, self.state.step)
        distributed.barrier()
        self.step_log = StepLog(self.out, self.rank, cfg.data.log_sample_keys)
        self.writer = MetricsWriter(
            self.out / "tensorboard" if self.rank == 0 and cfg.log.tensorboard else None
        )
        self.scalars = StepScalars(cfg, self.engine, self.data, self.world_size, self.device)
        self.layout = StepLayout(
            self.world_size, self.rank, cfg.train.grad_accum, cfg.train.micro_batch_size
        )
        self.accumulate = self.micro_batches
        if cfg.objectives.contrastive_batch == "step":
            if cfg.train.grad_accum == 1:
                if self.rank == 0:
                    log.info(
                        "objectives.contrastive_batch: step with train.grad_accum 1 is the same "
                        "as micro: each step is one micro-batch"
                    )
            else:
                self.accumulate = self.one_contrastive_batch
        self.log_cadence = Cadence(cfg.log.every_steps, cfg.train.steps)
        self.save_cadence = Cadence(cfg.checkpoint.every_steps, cfg.train.steps)
        self.eval_cadence = Cadence(cfg.eval.every_steps)
        self.stop_signal: int | None = None
        self.faults = TrainingFaults.from_env(rank=self.rank)
        self.stragglers = StragglerMonitor(self.rank, self.world_size)
        # before_exit: TensorBoard's buffered scalars of the steps before a hang
        self.watchdog = HangWatchdog.for_run(cfg, self.rank, self.world_size, self.writer.flush)
        self.background = background_writer(cfg, self.engine, self.faults, self.device)
        self.sync_debug = os.environ.get("UMT_SYNC_DEBUG") == "1" and self.device.type == "cuda"
        self.last_checkpoint: Path | None = ref.path if ref else None

    def use_cpu_threads(self) -> None:
        workers = 0 if self.cfg.data.train.synthetic else self.cfg.data.train.num_workers
        threads = choose_threads(self.cfg.train.cpu_threads, workers)
        torch.set_num_threads(threads.count)
        if self.rank == 0:
            log.info("%s", threads.describe())

    def write_run_files(self, ds_config: dict, resuming: bool) -> None:
        """The run folder's config, versions and DeepSpeed config (rank 0, at every start)."""
        t = self.cfg.train
        if t.warmup_steps > t.steps:
            log.info(
                "train.warmup_steps %d > train.steps %d: warming up over the %d steps",
                t.warmup_steps, t.steps, warmup_steps(t),
            )  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        versions.record(self.out, resuming=resuming)
        (self.out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

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
        self.state.load_state_dict(client_state["train_state"])
        if not self.state.run_id:  # a checkpoint from before run ids: this resume starts one
            self.state.run_id = uuid.uuid4().hex[:12]
        # Per-rank files: the same rank on the same topology, else rank 0's. The loader state
        # is one stream position, the same on every rank, so it resumes any topology exactly.
        rank_file = ref.root / tag / f"rank{self.rank if not elastic else 0}.pt"
        rank_state = checkpoint.load_file(rank_file)
        self.data.load_state_dict(rank_state["data"], new_mixture=self.new_mixture)
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
        self.watchdog.enter(phase.CHECKPOINT)
        started = time.perf_counter()
        path = checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.state.step,
            client_state={"train_state": self.state.state_dict(), "config": to_dict(self.cfg)},
            rank_state={"data": self.data.state_dict()},
            keep=self.cfg.checkpoint.keep,
            run_id=self.state.run_id,
            config=to_dict(self.cfg),
            meta={"samples": self.state.samples, "data": self.data.summary()},
            background=self.background,
        )
        blocked_s = time.perf_counter() - started
        if self.background is None:
            self.last_checkpoint = path
            log.info("saved checkpoint %s (training blocked %.2f s)", path, blocked_s)
        else:  # the previous save is complete by now (this one waited for it)
            self.last_checkpoint = self.background.completed or self.last_checkpoint
            log.info("checkpoint %s to the background (training blocked %.2f s)", path, blocked_s)
        return path

    def finish_checkpoints(self) -> None:
        """Wait for a checkpoint still being written in the background."""
        if self.background is not None:
            self.watchdog.enter(phase.CHECKPOINT)
            self.background.close()
            self.last_checkpoint = self.background.completed or self.last_checkpoint

    # --- the step ----------------------------------------------------------------------------
    def logs_next_step(self) -> bool:
        """Whether the step about to run is logged: only then are its ITC accuracies computed."""
        return self.log_cadence.due(self.state.step + 1)

    def forward(self, batch: TrainBatch, seed: int):
        self.watchdog.enter(phase.FORWARD)
        self.faults.hang_in(self.state.step + 1)
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
            metrics=self.logs_next_step(),
        )

    def train_step(self, batches: DataWaiter) -> StepResult:
        """One optimizer step: grad_accum micro-batches; a non-finite one on any rank is skipped
        on all (and another drawn).

        Host-device syncs: the ITM fetch plan's one read inside the forward, and one read of a
        fused all-reduce of (non-finite loss anywhere, stop signal anywhere) per micro-batch.
        Log values stay on the device (`StepResult.logs`).
        """
        t = self.cfg.train
        step = StepProgress()
        waited_before = collective_tracker.STATE.waited_s
        self.faults.slow_down()  # UMT_FAULT_SLOW_RANK (tests)
        with self._sync_counter() as syncs:
            self.accumulate(batches, step)  # grad_accum micro-batches: forward, backward, step
            clamp_logit_scale(self.engine.module.logit_scale)  # the optimizer moved it
        self.state.step += 1
        self.state.samples += t.micro_batch_size * t.grad_accum * self.world_size
        self.step_log.record(self.state.step, step.keys, step.failures)
        elapsed = time.perf_counter() - step.start
        return StepResult(
            step.logs, step.stop, step.data_wait_s, elapsed, step.text_len / t.grad_accum, syncs[0],
            waited_s=collective_tracker.STATE.waited_s - waited_before,
        )  # fmt: skip

    def micro_batches(self, batches: DataWaiter, step: StepProgress) -> None:
        """`contrastive_batch: micro`: each micro-batch is its own contrastive batch."""
        t = self.cfg.train
        while step.micro < t.grad_accum:
            self.watchdog.enter(phase.DATA_WAIT)
            batch = step.next_batch(batches, self.stop_requested)
            out = self.forward(batch, self.seed(step.micro, step.skipped_run))
            if self.skipped_as_nonfinite(out.loss, step):
                continue
            self.watchdog.enter(phase.BACKWARD)
            self.engine.backward(out.loss)
            self.optimizer_step()
            step.add(batch, out.logs, t.grad_accum)

    def one_contrastive_batch(self, batches: DataWaiter, step: StepProgress) -> None:
        """`contrastive_batch: step`: every sample of the step is one contrastive batch
        (`umt.cached_step`): pass 1 embeds each micro-batch without a graph, pass 2 computes ITC
        and ITM's negatives over all of them, pass 3 backpropagates each micro-batch in turn.
        A step whose ITC is not finite on some rank is skipped whole (and another drawn)."""
        accum = self.cfg.train.grad_accum
        while True:
            self.watchdog.enter(phase.DATA_WAIT)
            drawn = [step.next_batch(batches, self.stop_requested) for _ in range(accum)]
            self.watchdog.enter(phase.FORWARD)
            first = drawn[0]
            normalize = functools.partial(
                normalize_pixels, mean=first.pixel_mean, std=first.pixel_std, dtype=self.model_dtype
            )
            contrastive = ContrastiveStep(self.engine, self.layout, self.cfg.objectives, normalize)
            for batch in drawn:
                contrastive.embed(self.model_inputs(batch))
            cache = contrastive.contrast(self.seed(0, step.skipped_run), self.logs_next_step())
            if not self.skipped_as_nonfinite(cache.loss, step):
                break
        means: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(drawn):
            self.watchdog.enter(phase.FORWARD)
            out = contrastive.micro_losses(micro, self.seed(micro, step.skipped_run))
            loss = out.loss
            nonfinite, stop = any_rank([~torch.isfinite(loss.detach()), self.stop_requested()])
            step.stop = step.stop or stop
            if nonfinite:  # the step's ITC is in: keep it, leave this micro-batch's ITM and MLM
                self.state.nonfinite_total += 1
                log.warning(
                    "non-finite ITM or MLM at step %d, micro-batch %d: left out of the step",
                    self.state.step + 1, micro,
                )  # fmt: skip
                loss = out.itc_only
            # Not divided by grad_accum: the cached gradient is the step's already.
            self.watchdog.enter(phase.BACKWARD)
            self.engine.backward(loss, scale_wrt_gas=False)
            self.optimizer_step()
            step.add(batch, {}, accum)
            for k, v in out.logs.items():  # ITM's loss: shares that add up; the rest: means
                share = 1 if k == "loss/itm" else 1 / accum
                means[k] = means.get(k, 0) + v.detach().float() * share
        o = self.cfg.objectives
        step.logs = cache.logs | means
        total = o.itc_weight * cache.loss
        for key, weight in (("loss/itm", o.itm_weight), ("loss/mlm", o.mlm_weight)):
            if key in step.logs:
                total = total + weight * step.logs[key]
        step.logs["loss/total"] = total.detach().float()

    def optimizer_step(self) -> None:
        """`engine.step()`, once a checkpoint handed over before it is copied to host memory."""
        self.watchdog.enter(phase.OPTIMIZER)
        if self.background is not None:
            self.background.wait_copied()
        self.engine.step()

    def model_inputs(self, batch: TrainBatch) -> MicroBatchInputs:
        """A micro-batch on the device (pixels as uint8, normalised by each pass)."""
        self.faults.hang_in(self.state.step + 1)
        negative_texts = batch.negative_texts
        if negative_texts is not None:
            negative_texts = tuple(t.to(self.device, non_blocking=True) for t in negative_texts)
        return MicroBatchInputs(
            batch.pixel_values.to(self.device, non_blocking=True),
            batch.input_ids.to(self.device, non_blocking=True),
            batch.attention_mask.to(self.device, non_blocking=True),
            batch.image_ids.to(self.device, non_blocking=True),
            negative_texts,
        )

    def seed(self, micro: int, skipped_run: int) -> int:
        """The seed of a micro-batch's sampling (negatives' noise, MLM masks), from the step."""
        return mix_seed(self.cfg.train.seed, self.state.step, micro, skipped_run)

    def skipped_as_nonfinite(self, loss: torch.Tensor, step: StepProgress) -> bool:
        """One all-reduce of (non-finite loss here, stop signal here): a micro-batch whose loss is
        not finite on some rank is skipped on every rank, and too many in a row end the run."""
        if self.faults.nan_at(self.state.step + 1, step.micro, step.skipped_run) and self.rank == 0:
            loss = loss * float("nan")
        nonfinite, stop = any_rank([~torch.isfinite(loss.detach()), self.stop_requested()])
        step.stop = step.stop or stop
        if not nonfinite:
            return False
        step.skipped_run += 1
        self.state.nonfinite_total += 1
        log.warning("non-finite loss at step %d: micro-batch skipped", self.state.step + 1)
        if step.skipped_run >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"{step.skipped_run} consecutive non-finite losses at step {self.state.step + 1}; "
                f"last checkpoint: {self.last_checkpoint or 'none'}"
            )
        return True

    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    @contextlib.contextmanager
    def _sync_counter(self):
        """With UMT_SYNC_DEBUG=1 on a GPU: count CUDA calls that synchronise the host (torch's
        sync debug mode warns on each); yields a one-element list filled at exit (-1: off)."""
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

    # --- around the steps ----------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Retrieval on data.eval with the same code as `umt eval`; every rank takes part."""
        from umt.evaluate import evaluate_run_step  # the evaluation's imports: only when it runs

        self.watchdog.enter(phase.EVAL)
        with self.watchdog.paused():  # not timed: it can take long and is not an optimizer step
            return evaluate_run_step(
                self.engine.module, self.cfg, self.state.step, self.state.samples, self.writer
            )

    def install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's warning before the time limit), SIGTERM and a first SIGINT (Ctrl-C):
        checkpoint at the end of the step, then stop. A second SIGINT aborts without saving
        (KeyboardInterrupt: one line, no traceback; the unfinished step folder stays invisible)."""

        self.faults.slow_start()  # UMT_FAULT_SLOW_START (tests)
        owner = os.getpid()
        first_interrupt = [0.0]

        def request(signum, _frame):
            if os.getpid() != owner:  # a forked loader worker before its own set-up: not ours
                return
            self.watchdog.signal_handled()  # this rank's main thread is not stuck
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
        self.watchdog.watch_signals()  # and a rank too stuck to run `request` exits

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
        # Every rank has its signal handlers by now (install_signal_handlers comes first): the
        # line below, which tells a person (and the tests) that Ctrl-C saves, holds for all ranks.
        distributed.barrier()
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
        self.watchdog.start()
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
            self.watchdog.stop()  # one that is reporting a hang ends the process here
            bar.close()  # before any message: a bar left open would prefix it
            batches.close()
            self.writer.close()  # the scalars up to a failure are on disk too

    def _train(self, batches: DataWaiter, bar) -> dict[str, float]:
        window, last = Window(), {}
        saved_at = self.state.step if self.last_checkpoint else -1
        while self.state.step < self.cfg.train.steps:
            result = self.train_step(batches)
            self.watchdog.step_done(self.state.step, result.elapsed_s)
            window.add(result)
            bar.update(1)
            step = self.state.step
            if self.log_cadence.due(step):
                self.watchdog.enter(phase.LOGGING)
                last = self.scalars(result, window, self.state.nonfinite_total)
                last |= self.stragglers(window)
                self.writer.scalars(last, step)
                bar.set_postfix(
                    loss=f"{last['loss/total']:.4f}",
                    sps=f"{last['throughput/samples_per_s']:.1f}",
                    refresh=False,
                )
                window = Window()
            self.faults.kill_after(step)
            paused = time.perf_counter()
            if result.stop or self.save_cadence.due(step):
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
            if self.eval_cadence.due(step):
                self.evaluate()
            window.excluded_s += time.perf_counter() - paused
        if saved_at != self.state.step:
            self.save_checkpoint()
        self.finish_checkpoints()
        return last

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
