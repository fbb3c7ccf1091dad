"""Typed run configuration: dataclasses with defaults < preset < YAML < `a.b.c=value` overrides.

Each section checks itself beside its fields (`validate`), and `Config.validate` what ties
sections together; choices are `Literal` types, checked as the config is read. Every error is one
line naming the key and where it was set (the override, else the file), so a person can fix it.
The reading machinery is `umt.config_loading`; the model's and objectives' sections live with
the model and the objectives. (Dataclasses and not pydantic or tyro: the errors, docstring
reference and override syntax here are what users see, one line each, and a library would
bring its own multi-line formats and a dependency for no check we lack.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from umt.config_loading import (
    ConfigError,
    blame,
    deep_merge,
    from_dict,
    parse_override,
    reference_rows,
    set_path,
    to_dict,
)
from umt.model.config import ModelConfig, check_fusion, model_config_to_dict, preset_config
from umt.objectives.pretrain import ObjectiveConfig

__all__ = ["Config", "ConfigError", "from_dict", "load_config", "parse_override", "to_dict"]

OPTIMIZERS = ("auto", "adamw", "fused_adamw", "cpu_adam")  # train.optimizer


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataSplitConfig:
    """One data split (train or eval) for the streaming loader."""

    shards: str | list[str | dict] | None = None
    """A shard folder with its manifest.json or sizes.json (`umt data index` writes one beside
    other tools' tars), a subset folder, a brace pattern (`/d/data-{000000..000099}.tar`), or a
    mixture: a list (or comma-separated string) of sources, each a location or a mapping
    `{path, name, repeat}` / `{path, proportion}` / `{path, weight}` (resampled mode), short form
    `name=PATH:x2`, `PATH:30%`, `PATH:4`. Exact counts per epoch; keys are `name/key`."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_window: int = 10_000
    """Samples are shuffled within windows of consecutive shards (of each epoch's shard
    permutation) holding at least this many samples; wider mixes more and keeps more shards in use."""
    epoch_tail: Literal["carry", "drop"] = "carry"
    """An epoch's samples after its last full global batch: `carry` (the next epoch completes that
    batch: nothing lost, the order independent of batch size and ranks) or `drop`."""
    resampled: bool = False
    """Draw shards with replacement, sources by weight, instead of epochs (exact per-source counts
    come from repeat or proportion in epoch mode)."""
    max_text_len: int = 64
    """Captions are truncated to this many tokens."""
    caption: Literal["txt", "random"] = "txt"
    """Training caption: `txt` (the sample's .txt) or `random` (one of its json captions, per epoch)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Random-resized-crop area range (fraction of the image) for training; [1.0, 1.0]: whole image."""
    hflip: bool = False
    """Random horizontal flips in training; off because captions say "left" and "right"."""
    negatives: str | None = None
    """Json field with hard-negative captions per sample (e.g. kept by `umt shard
    --save-additional-columns`); ITM then also scores each image against one of them."""
    synthetic: bool = False
    """Deterministic in-memory random batches instead of shards (benchmarks, GPU smoke tests)."""
    synthetic_distinct: int = 0
    """With synthetic: cycle this many distinct batches per rank (1: one fixed batch; 0: endless)."""

    def validate(self, key: str) -> None:
        """`key`: data.train or data.eval."""
        check(self.num_workers >= 0, f"{key}.num_workers must be >= 0 (got {self.num_workers})")
        check(
            self.shuffle_window >= 1,
            f"{key}.shuffle_window must be >= 1 (got {self.shuffle_window})",
        )
        low, high = self.crop_scale
        check(
            0 < low <= high <= 1,
            f"{key}.crop_scale must be [low, high] with 0 < low <= high <= 1 "
            f"(got [{low:g}, {high:g}])",
        )
        check(self.max_text_len >= 2, f"{key}.max_text_len must be >= 2 (got {self.max_text_len})")


@dataclass
class DataConfig:
    train: DataSplitConfig = field(default_factory=DataSplitConfig)
    eval: DataSplitConfig = field(default_factory=lambda: DataSplitConfig(num_workers=1))
    tokenizer: str | None = None
    """Tokenizer name or folder; default: model.text.pretrained."""
    cache_dir: str | None = None
    """Node-local folder for copies of remote (s3://, http(s)://) shards, shared by the node's
    ranks and workers; default $TMPDIR (or /tmp)/umt-shard-cache-UID."""
    cache_limit_gb: float = 0.0
    """Least recently used shard copies not in use are removed above this size (0: 90% of the
    cache disk's free space at start)."""
    remote_read: Literal["cache", "range"] = "cache"
    """Remote shards: `cache` (whole-shard copies, fetched ahead) or `range` (a range request per
    sample, nothing on disk; needs the shards' index files)."""
    jpeg_draft: bool = True
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling) when its crop stays at least
    image_size there: a faster decode that differs from a full decode by a few grey levels on
    average (under 4.5/255 on sklearn's photos; docs/scaling.md). false: always decode in full.
    Training's loader only: evaluation decodes in full, as an export's processor is given images."""
    log_sample_keys: bool = False
    """Write, per rank and step, the keys of the samples trained on to OUTPUT_DIR/sample_keys/
    rank{R}.txt (`step key key ...`; kept exact across resumes: lines after the checkpoint resumed
    from are dropped)."""

    def validate(self) -> None:
        self.train.validate("data.train")
        self.eval.validate("data.eval")
        check(
            self.cache_limit_gb >= 0,
            f"data.cache_limit_gb must be >= 0 (got {self.cache_limit_gb})",
        )


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for (each is grad_accum micro-batches on every rank)."""
    micro_batch_size: int = 32
    """Samples per rank per micro-batch; the global batch is micro_batch_size * grad_accum * ranks."""
    grad_accum: int = 1
    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.01
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Gradient-norm clipping (always explicit; 0 turns it off)."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32`, `bf16` or `fp16`."""
    max_nonfinite: int = 5
    """Stop after this many consecutive micro-batches with a non-finite loss."""
    optimizer: str = "auto"
    """`auto`: torch's fused AdamW on GPUs, DeepSpeed's CPU Adam with zero.offload_optimizer: cpu,
    torch's AdamW on CPU-only runs; or one of `adamw`, `fused_adamw` (GPU), `cpu_adam` (with
    offload; DeepSpeed builds its op on first use)."""
    collective_timeout_min: float = 30.0
    """A collective that waits longer than this fails the run instead of hanging it."""
    hang_timeout_min: float | None = None
    """No optimizer step completed for this long: every rank writes its stacks to
    OUTPUT_DIR/hangs/ and the run exits (code 75; a Slurm job requeues). None: 100 median steps,
    at least 10 min, at most 80% of collective_timeout_min (the first step and evaluation are
    not timed)."""
    requeue_limit: int = 3
    """A Slurm job that a hang or a dead rank ended is requeued (and resumes) at most this many
    times; preemptions do not count."""
    cpu_threads: int = 0
    """Threads of torch's CPU operations per rank; 0: the CPUs this rank may use (affinity,
    Slurm's CPUs per task) shared with the other ranks of its launcher, minus its loader workers."""

    def validate(self) -> None:
        check(self.steps > 0, f"train.steps must be > 0 (got {self.steps})")
        check(
            self.micro_batch_size > 0,
            f"train.micro_batch_size must be > 0 (got {self.micro_batch_size})",
        )
        check(self.grad_accum > 0, f"train.grad_accum must be > 0 (got {self.grad_accum})")
        check(self.lr > 0, f"train.lr must be > 0 (got {self.lr})")
        check(
            0 <= self.min_lr_ratio <= 1,
            f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})",
        )
        check(0 <= self.warmup_steps, f"train.warmup_steps must be >= 0 (got {self.warmup_steps})")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (got {self.grad_clip})")
        check(self.max_nonfinite > 0, f"train.max_nonfinite must be > 0 (got {self.max_nonfinite})")
        check(
            self.optimizer in OPTIMIZERS,
            f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})",
        )
        check(self.cpu_threads >= 0, f"train.cpu_threads must be >= 0 (got {self.cpu_threads})")
        check(
            self.collective_timeout_min > 0,
            f"train.collective_timeout_min must be > 0 (got {self.collective_timeout_min})",
        )
        check(
            self.hang_timeout_min is None or self.hang_timeout_min > 0,
            f"train.hang_timeout_min must be > 0 or null (got {self.hang_timeout_min})",
        )
        check(
            self.requeue_limit >= 0, f"train.requeue_limit must be >= 0 (got {self.requeue_limit})"
        )


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage 0-3."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """`none` or `cpu`."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    communication_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Dtype of gradient reduction: None (the training dtype), `fp32` (exact sums over many ranks
    under bf16, twice the bytes of bf16), `bf16` or `fp16`."""

    def validate(self) -> None:
        check(
            self.offload_optimizer == "none" or self.stage >= 1,
            "zero.offload_optimizer: cpu needs zero.stage >= 1",
        )


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N steps (0: only at the end and on signals)."""
    keep: int = 3
    """Complete checkpoints kept (older ones deleted after a newer one is complete)."""
    dir: str | None = None
    """Default: OUTPUT_DIR/checkpoints."""
    async_save: bool = False
    """Copy the state to host memory and write the files in the background while training goes
    on (`latest` moves once every rank's files are written; the next save waits for the previous
    one). Costs one checkpoint's worth of host memory per rank."""
    conversion_timeout_min: float = 240.0
    """Resuming on another number of ranks: how long the other ranks wait while rank 0 converts
    the checkpoint to DeepSpeed's universal format (a gloo group of its own, so this does not
    loosen train.collective_timeout_min)."""

    def validate(self) -> None:
        check(
            self.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (got {self.every_steps})"
        )
        check(self.keep >= 1, f"checkpoint.keep must be >= 1 (got {self.keep})")
        check(
            self.conversion_timeout_min > 0,
            f"checkpoint.conversion_timeout_min must be > 0 (got {self.conversion_timeout_min})",
        )


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Run retrieval evaluation on data.eval every N steps (0: off)."""
    itm_rerank_k: int = 0
    """Re-rank the ITC top-k with the ITM head (0: ITC only)."""

    def validate(self) -> None:
        check(self.every_steps >= 0, f"eval.every_steps must be >= 0 (got {self.every_steps})")


@dataclass
class LogConfig:
    every_steps: int = 10
    """TensorBoard scalars and the progress line every N steps."""
    tensorboard: bool = True

    def validate(self) -> None:
        check(self.every_steps > 0, f"log.every_steps must be > 0 (got {self.every_steps})")


@dataclass
class Config:
    output_dir: str = "runs/umt"
    """Run folder: resolved config, DeepSpeed config, TensorBoard logs, checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Each section's own checks, then what ties sections together; ConfigError naming the
        key (the library's sections, model and objectives, raise ValueError)."""
        try:
            self.objectives.validate()
            check_fusion(self.model)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for section in (self.train, self.zero, self.checkpoint, self.log, self.eval, self.data):
            section.validate()
        t, z, o, d = self.train, self.zero, self.objectives, self.data.train
        check(
            t.optimizer != "cpu_adam" or z.offload_optimizer == "cpu",
            "train.optimizer: cpu_adam needs zero.offload_optimizer: cpu (it runs on the "
            "offloaded states)",
        )
        check(
            o.mlm_weight == 0 or self.model.mlm,
            "objectives.mlm_weight > 0 needs model.mlm: true (the MLM head)",
        )
        check(
            (o.itc_loss == "sigmoid") == (self.model.logit_bias_init is not None),
            "objectives.itc_loss: sigmoid goes with model.logit_bias_init (SigLIP: -10, and "
            "model.logit_scale_init: 2.302585, ln 10); softmax with none (the bias would never "
            "train)",
        )
        check(
            d.synthetic or d.shards is not None,
            "data.train.shards is required (a shard folder, brace pattern or list), or "
            "data.train.synthetic: true",
        )
        check(
            self.eval.every_steps == 0 or self.data.eval.shards is not None,
            "eval.every_steps > 0 needs data.eval.shards",
        )
        check(
            d.synthetic or tokenizer_name(self) is not None,
            "data.tokenizer is required when model.text.pretrained is not set",
        )


# --- loading ---------------------------------------------------------------------------------


def _apply_preset(raw: dict, source: str) -> dict:
    """Expand `model.preset` into the model section; explicit model keys win over the preset."""
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping{source}")
    name = model.get("preset")
    if name is None:
        return raw
    try:
        base = model_config_to_dict(preset_config(name))
    except ValueError as exc:
        raise ConfigError(f"{exc}{source}") from None
    return {**raw, "model": deep_merge(base, model)}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < model preset < YAML file < overrides; validated."""
    raw: dict = {}
    source = ""
    if path is not None:
        from umt.shipped import config_names, config_path

        path = config_path(path)  # a path, or the name of a shipped config
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist (shipped configs, by name: "
                f"{', '.join(config_names())})"
            )
        source = f" in {path}"
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    given: dict[str, str] = {}  # dotted key -> the override that set it
    for text in overrides:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
        given[".".join(keys)] = text
    try:
        raw = _apply_preset(raw, "")
        cfg = from_dict(Config, raw, "", "")
        cfg.validate()
    except ConfigError as exc:  # blame the override that set the key, else the file
        raise ConfigError(f"{exc}{blame(str(exc), given, source)}") from None
    return cfg


def tokenizer_name(cfg: Config) -> str | None:
    return cfg.data.tokenizer or cfg.model.text.pretrained


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_reference() -> str:
    """Markdown table of every key with its default and docstring (for the README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    return "\n".join(rows + reference_rows(Config, Config()))
