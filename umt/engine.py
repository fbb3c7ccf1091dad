"""Everything DeepSpeed, on the training side: the process group, the JSON config made from the
typed config, the engine, and the fp32 master copies of the logit scale (the model knows nothing
of DeepSpeed: it names its scale's copies, and this module keeps DeepSpeed's in step with them)."""

from __future__ import annotations

import importlib
import random

import numpy as np
import torch
from torch import nn

from umt import distributed
from umt.config import Config, ConfigError
from umt.distributed import WorldInfo
from umt.logs import quiet_deepspeed
from umt.model.training import compile_blocks, transformer_blocks

# --- the process group --------------------------------------------------------------------------


def init_distributed(timeout_s: float) -> tuple[WorldInfo, torch.device]:
    """This rank's GPU and process group (NCCL on GPUs, gloo on CPU), then DeepSpeed's comm on top."""
    quiet_deepspeed()
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


# --- the JSON config --------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


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
        # Read by the engine's one load only: after it, saves are ordinary ZeRO checkpoints.
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if z.communication_dtype is not None:
        config["communication_data_type"] = z.communication_dtype
    return config


def build_engine(model: nn.Module, cfg: Config, ds_config: dict):
    """The DeepSpeed engine of `model`, with its optimizer and schedule; with `model.compile`,
    its transformer blocks compiled."""
    import deepspeed

    if cfg.model.compile and cfg.zero.stage == 3:
        # ZeRO-3 gathers each block's parameters at once, in the hooks around its compiled
        # forward, and hooks none of its submodules: their hooks would break its graph.
        from deepspeed.utils import set_z3_leaf_module

        for _, block in transformer_blocks(model):
            set_z3_leaf_module(block, True)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.optimizer_groups(cfg.train.weight_decay),
        config=ds_config,
    )
    if cfg.model.compile:
        compile_blocks(model)
    return engine


# --- fp32 masters of the logit scale --------------------------------------------------------------
#
# The model's `LogitScale` names its parameters, the fp32 buffers a bf16 forward reads, their
# initial values and bounds (`copies()`). After DeepSpeed's set-up and after each optimizer step,
# the functions below clamp every copy an optimizer step may have moved and, under bf16/fp16,
# copy DeepSpeed's fp32 masters into those buffers.


@torch.no_grad()
def start_logit_scale(scale: nn.Module) -> None:
    """After DeepSpeed's set-up of a fresh run. Under bf16/fp16 DeepSpeed built its fp32
    masters from the parameters it had already cast (14.25, not 14.29): put the exact
    initial values there. Every rank calls it."""
    for param, master, init, _ in scale.copies():
        if param.dtype != torch.float32:
            _set_fp32_master(param, torch.full((1,), init, device=master.device))
    clamp_logit_scale(scale)


@torch.no_grad()
def clamp_logit_scale(scale: nn.Module) -> None:
    """Clamp every copy of the scale that an optimizer step may have moved: DeepSpeed's fp32
    master (ZeRO 1-2: this rank's fragment; ZeRO-3: this rank's partition) and the module's
    own copy, which the next forward reads; in place, with no host sync. Under bf16/fp16,
    then copy the full fp32 masters into the buffers (one collective of one value each).
    Every rank calls it, after each optimizer step (and after set-up and a resume)."""
    for param, master, _, bounds in scale.copies():
        if bounds is not None:
            _clamp_everywhere(param, *bounds)
        if param.dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(param)
            master.copy_(full.reshape(1).float() if full is not None else param.float())
            scale.master_synced = True


def _clamp_everywhere(param: nn.Parameter, low: float, high: float) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(low, high))
        param.ds_tensor.clamp_(low, high)
        return
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1-2 and DeepSpeed's bf16 optimizer
    if mapping is not None and mapping.get_hp_fragment() is not None:
        mapping.get_hp_fragment().clamp_(low, high)
    param.clamp_(low, high)


def _set_fp32_master(param: nn.Parameter, exact: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3
        # DeepSpeed's safe_set_full_fp32_param fails for a parameter with fewer elements than
        # ranks: set this rank's slice of the padded value itself.
        import torch.distributed as dist
        from deepspeed.utils import safe_set_local_fp32_param

        size = param.ds_tensor.numel()
        padded = torch.zeros(size * dist.get_world_size(param.ds_process_group))
        padded[: exact.numel()] = exact.cpu()
        mine = padded.narrow(0, size * dist.get_rank(param.ds_process_group), size)
        safe_set_local_fp32_param(param, mine.to(exact.device))
        param.ds_tensor.copy_(mine)
    else:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, exact)
