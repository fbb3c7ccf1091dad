"""Typed run configuration: dataclasses with defaults < preset < YAML < `a.b.c=value` overrides.

Validated once at start-up; every error names the key (and the file) so a person can fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from umt.model.config import ModelConfig, check_fusion, model_config_to_dict, preset_config
from umt.objectives.pretrain import ObjectiveConfig


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


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
    epoch_tail: str = "carry"
    """An epoch's samples after its last full global batch: `carry` (the next epoch completes that
    batch: nothing lost, the order independent of batch size and ranks) or `drop`."""
    resampled: bool = False
    """Draw shards with replacement, sources by weight, instead of epochs (exact per-source counts
    come from repeat or proportion in epoch mode)."""
    max_text_len: int = 64
    """Captions are truncated to this many tokens."""
    caption: str = "txt"
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
    remote_read: str = "cache"
    """Remote shards: `cache` (whole-shard copies, fetched ahead) or `range` (a range request per
    sample, nothing on disk; needs the shards' index files)."""
    log_sample_keys: bool = False
    """Write, per rank and step, the keys of the samples trained on to OUTPUT_DIR/sample_keys/
    rank{R}.txt (`step key key ...`; kept exact across resumes: lines after the checkpoint resumed
    from are dropped)."""


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
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32`, `bf16` or `fp16`."""
    max_nonfinite: int = 5
    """Stop after this many consecutive micro-batches with a non-finite loss."""
    optimizer: str = "auto"
    """`auto`: torch's fused AdamW on GPUs, DeepSpeed's CPU Adam with zero.offload_optimizer: cpu,
    torch's AdamW on CPU-only runs; or one of `adamw`, `fused_adamw` (GPU), `cpu_adam` (with
    offload; DeepSpeed builds its op on first use)."""
    collective_timeout_min: float = 30.0
    """A collective that waits longer than this fails the run instead of hanging it."""
    cpu_threads: int = 0
    """Threads of torch's CPU operations per rank; 0: the CPUs this rank may use (affinity,
    Slurm's CPUs per task) shared with the other ranks of its launcher, minus its loader workers."""


@dataclass
class ZeroConfig:
    stage: int = 2
    """ZeRO stage 0-3."""
    offload_optimizer: str = "none"
    """`none` or `cpu`."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    communication_dtype: str | None = None
    """Dtype of gradient reduction: None (the training dtype), `fp32` (exact sums over many ranks
    under bf16, twice the bytes of bf16), `bf16` or `fp16`."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N steps (0: only at the end and on signals)."""
    keep: int = 3
    """Complete checkpoints kept (older ones deleted after a newer one is complete)."""
    dir: str | None = None
    """Default: OUTPUT_DIR/checkpoints."""
    conversion_timeout_min: float = 240.0
    """Resuming on another number of ranks: how long the other ranks wait while rank 0 converts
    the checkpoint to DeepSpeed's universal format (a gloo group of its own, so this does not
    loosen train.collective_timeout_min)."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Run retrieval evaluation on data.eval every N steps (0: off)."""
    itm_rerank_k: int = 0
    """Re-rank the ITC top-k with the ITM head (0: ITC only)."""


@dataclass
class LogConfig:
    every_steps: int = 10
    """TensorBoard scalars and the progress line every N steps."""
    tensorboard: bool = True


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


# --- building dataclasses from plain dicts, with errors that name the key -------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; convert where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"{key} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]} "
            f"(got {value!r}){source}"
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}){source}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list (got {value!r}){source}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(
                f"{key} must be a list of {len(items)} values (got {value!r}){source}"
            )
        return tuple(
            _coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, items))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r}){source}")
        return from_dict(tp, value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}){source}")


def from_dict(cls: type, data: dict, prefix: str = "", source: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full}{source}{hint}")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# --- loading ---------------------------------------------------------------------------------


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: 3, 1e-4, true, [1, 2], text)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    d[path[-1]] = value


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
    return {**raw, "model": _deep_merge(base, model)}


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
        _set_path(raw, keys, value)
        given[".".join(keys)] = text
    try:
        raw = _apply_preset(raw, "")
        cfg = from_dict(Config, raw, "", "")
        validate(cfg, "")
    except ConfigError as exc:  # blame the override that set the key, else the file
        raise ConfigError(f"{exc}{blame(str(exc), given, source)}") from None
    return cfg


def blame(message: str, given: dict[str, str], source: str) -> str:
    """ " (override 'k=v')" when `message` names a key an override set (or a section of it),
    else `source` (" in FILE", or "" without one)."""

    def names(key: str) -> bool:
        return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message) is not None

    latest_first = list(given.items())[::-1]
    for key, text in latest_first:  # the key itself first, then a section it is in
        if names(key):
            return f" (override {text!r})"
    for key, text in latest_first:
        parts = key.split(".")
        if any(names(".".join(parts[:n])) for n in range(len(parts) - 1, 0, -1)):
            return f" (override {text!r})"
    return source


def _require(ok: bool, message: str, source: str) -> None:
    if not ok:
        raise ConfigError(message + source)


def validate(cfg: Config, source: str = "") -> None:
    """Range and consistency checks, each naming its key."""
    t = cfg.train
    _require(t.steps > 0, f"train.steps must be > 0 (got {t.steps})", source)
    _require(
        t.micro_batch_size > 0,
        f"train.micro_batch_size must be > 0 (got {t.micro_batch_size})",
        source,
    )
    _require(t.grad_accum > 0, f"train.grad_accum must be > 0 (got {t.grad_accum})", source)
    _require(t.lr > 0, f"train.lr must be > 0 (got {t.lr})", source)
    _require(
        0 <= t.min_lr_ratio <= 1,
        f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})",
        source,
    )
    _require(0 <= t.warmup_steps, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})", source)
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (got {t.grad_clip})", source)
    _require(
        t.max_nonfinite > 0, f"train.max_nonfinite must be > 0 (got {t.max_nonfinite})", source
    )
    _require(
        t.precision in ("auto", "fp32", "bf16", "fp16"),
        f"train.precision must be auto, fp32, bf16 or fp16 (got {t.precision!r})",
        source,
    )
    optimizers = ("auto", "adamw", "fused_adamw", "cpu_adam")
    _require(
        t.optimizer in optimizers,
        f"train.optimizer must be one of {', '.join(optimizers)} (got {t.optimizer!r})",
        source,
    )
    _require(t.cpu_threads >= 0, f"train.cpu_threads must be >= 0 (got {t.cpu_threads})", source)
    _require(
        t.collective_timeout_min > 0,
        f"train.collective_timeout_min must be > 0 (got {t.collective_timeout_min})",
        source,
    )
    z = cfg.zero
    _require(z.stage in (0, 1, 2, 3), f"zero.stage must be 0, 1, 2 or 3 (got {z.stage})", source)
    _require(
        t.optimizer != "cpu_adam" or z.offload_optimizer == "cpu",
        "train.optimizer: cpu_adam needs zero.offload_optimizer: cpu (it runs on the offloaded states)",
        source,
    )
    _require(
        z.communication_dtype in (None, "fp32", "bf16", "fp16"),
        f"zero.communication_dtype must be fp32, bf16, fp16 or null (got {z.communication_dtype!r})",
        source,
    )
    _require(
        z.offload_optimizer in ("none", "cpu"),
        f"zero.offload_optimizer must be none or cpu (got {z.offload_optimizer!r})",
        source,
    )
    _require(
        z.offload_optimizer == "none" or z.stage >= 1,
        "zero.offload_optimizer: cpu needs zero.stage >= 1",
        source,
    )
    c = cfg.checkpoint
    _require(
        c.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (got {c.every_steps})", source
    )
    _require(c.keep >= 1, f"checkpoint.keep must be >= 1 (got {c.keep})", source)
    _require(
        c.conversion_timeout_min > 0,
        f"checkpoint.conversion_timeout_min must be > 0 (got {c.conversion_timeout_min})",
        source,
    )
    _require(
        cfg.log.every_steps > 0, f"log.every_steps must be > 0 (got {cfg.log.every_steps})", source
    )
    _require(
        cfg.eval.every_steps >= 0,
        f"eval.every_steps must be >= 0 (got {cfg.eval.every_steps})",
        source,
    )
    o = cfg.objectives
    for name in ("itc_weight", "itm_weight", "mlm_weight"):
        _require(getattr(o, name) >= 0, f"objectives.{name} must be >= 0", source)
    _require(
        o.itc_weight > 0 or o.itm_weight > 0 or o.mlm_weight > 0,
        "objectives: every weight is 0",
        source,
    )
    _require(
        o.mlm_weight == 0 or cfg.model.mlm,
        "objectives.mlm_weight > 0 needs model.mlm: true (the MLM head)",
        source,
    )
    _require(
        math.isfinite(o.itm_mining_sharpness) and o.itm_mining_sharpness > 0,
        f"objectives.itm_mining_sharpness must be finite and > 0 (got {o.itm_mining_sharpness})",
        source,
    )
    _require(
        o.itc_impl in ("gather", "ring"),
        f"objectives.itc_impl must be gather or ring (got {o.itc_impl!r})",
        source,
    )
    _require(o.itc_tile > 0, f"objectives.itc_tile must be > 0 (got {o.itc_tile})", source)
    _require(
        o.itc_loss in ("softmax", "sigmoid"),
        f"objectives.itc_loss must be softmax or sigmoid (got {o.itc_loss!r})",
        source,
    )
    _require(
        (o.itc_loss == "sigmoid") == (cfg.model.logit_bias_init is not None),
        "objectives.itc_loss: sigmoid goes with model.logit_bias_init (SigLIP: -10, and "
        "model.logit_scale_init: 2.302585, ln 10); softmax with none (the bias would never train)",
        source,
    )
    _require(
        o.contrastive_batch == "micro" or o.itc_weight > 0 or o.itm_weight > 0,
        "objectives.contrastive_batch: step makes one batch of ITC and ITM over the step, and "
        "objectives.itc_weight and objectives.itm_weight are both 0",
        source,
    )
    _require(
        0 < o.mlm_probability < 1,
        f"objectives.mlm_probability must be in (0, 1) (got {o.mlm_probability})",
        source,
    )
    try:
        check_fusion(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{exc}{source}") from None
    d = cfg.data.train
    _require(
        d.synthetic or d.shards is not None,
        "data.train.shards is required (a shard folder, brace pattern or list), or data.train.synthetic: true",
        source,
    )
    _require(
        d.num_workers >= 0, f"data.train.num_workers must be >= 0 (got {d.num_workers})", source
    )
    _require(
        cfg.data.remote_read in ("cache", "range"),
        f"data.remote_read must be cache or range (got {cfg.data.remote_read!r})",
        source,
    )
    _require(
        cfg.data.cache_limit_gb >= 0,
        f"data.cache_limit_gb must be >= 0 (got {cfg.data.cache_limit_gb})",
        source,
    )
    _require(
        d.shuffle_window >= 1,
        f"data.train.shuffle_window must be >= 1 (got {d.shuffle_window})",
        source,
    )
    _require(
        d.epoch_tail in ("carry", "drop"),
        f"data.train.epoch_tail must be carry or drop (got {d.epoch_tail!r})",
        source,
    )
    for split in ("train", "eval"):
        ds = getattr(cfg.data, split)
        low, high = ds.crop_scale
        _require(
            0 < low <= high <= 1,
            f"data.{split}.crop_scale must be [low, high] with 0 < low <= high <= 1 "
            f"(got [{low:g}, {high:g}])",
            source,
        )
        _require(
            ds.caption in ("txt", "random"),
            f"data.{split}.caption must be txt or random (got {ds.caption!r})",
            source,
        )
        _require(
            ds.max_text_len >= 2,
            f"data.{split}.max_text_len must be >= 2 (got {ds.max_text_len})",
            source,
        )
    _require(
        cfg.eval.every_steps == 0 or cfg.data.eval.shards is not None,
        "eval.every_steps > 0 needs data.eval.shards",
        source,
    )
    _require(
        d.synthetic or tokenizer_name(cfg) is not None,
        "data.tokenizer is required when model.text.pretrained is not set",
        source,
    )


def tokenizer_name(cfg: Config) -> str | None:
    return cfg.data.tokenizer or cfg.model.text.pretrained


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_reference() -> str:
    """Markdown table of every key with its default and docstring (for the README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(type(value), value, key + ".")
            else:
                rows.append(f"| `{key}` | `{value!r}` | {docs.get(f.name, '')} |")

    walk(Config, Config(), "")
    return "\n".join(rows)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after a field) of a dataclass."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
