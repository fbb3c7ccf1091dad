"""A run remembers its config: paths made absolute when it starts (so `umt export`, `umt eval`
and a resume work from any working folder), and `umt train --resume RUN_DIR` (or `--resume auto`
with the run's output_dir) continues with the config saved in the run, overrides on top, refusing
changes that would make it another run (model shape, sample order)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from umt.config import Config, ConfigError, from_dict, parse_override, to_dict

SAVED = "config.yaml"  # in the run folder, written by rank 0 at every start
# Keys a resumed run may not change: the model's shape, and what fixes the sample order.
FIXED_PREFIXES = ("model.",)
FIXED_KEYS = (
    "train.seed", "data.train.shards", "data.train.shuffle_window", "data.train.resampled",
    "data.train.epoch_tail",
)  # fmt: skip
# Model keys that do not change the weights' shapes: initialisation (read once, at the start),
# regularisation and memory trade-offs may change on resume.
NOT_FIXED = (
    ".pretrained", ".dropout", ".activation_checkpointing", ".position_init", "logit_scale_init",
    "model.preset",
)  # fmt: skip


def _absolute(location: str) -> str:
    if "://" in location or os.path.isabs(location):
        return location
    return os.path.abspath(location)


def _absolute_shards(shards: Any) -> Any:
    if isinstance(shards, list):
        return [_absolute_shards(s) for s in shards]
    if isinstance(shards, str):  # a folder, a brace pattern or `path:weight`; comma lists too
        return ",".join(_absolute(part) for part in shards.split(",")) if shards else shards
    return shards


def _absolute_if_local(name: str | None) -> str | None:
    """A tokenizer or pretrained tower: a path when it exists here, else a Hub name kept as is."""
    if name is None or "://" in name or os.path.isabs(name) or not os.path.exists(name):
        return name
    return os.path.abspath(name)


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with every local path absolute (resolved against the working folder)."""
    d = cfg.data
    data = dataclasses.replace(
        d,
        train=dataclasses.replace(d.train, shards=_absolute_shards(d.train.shards)),
        eval=dataclasses.replace(d.eval, shards=_absolute_shards(d.eval.shards)),
        tokenizer=_absolute_if_local(d.tokenizer),
        cache_dir=_absolute(d.cache_dir) if d.cache_dir else None,
    )
    m = cfg.model
    model = dataclasses.replace(
        m,
        text=dataclasses.replace(m.text, pretrained=_absolute_if_local(m.text.pretrained)),
        image=dataclasses.replace(m.image, pretrained=_absolute_if_local(m.image.pretrained)),
    )
    checkpoint = dataclasses.replace(
        cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    )
    return dataclasses.replace(
        cfg, output_dir=_absolute(cfg.output_dir), data=data, model=model, checkpoint=checkpoint
    )


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_changes(saved: dict, cfg: Config) -> list[str]:
    """`key (old -> new)` for each fixed key that `cfg` changes from the saved run config."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    changed = []
    for key in sorted(set(old) | set(new)):
        fixed = key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS
        if not fixed or key.endswith(NOT_FIXED):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            a, b = list(a), list(b)
        if a != b:
            changed.append(f"{key} ({a!r} -> {b!r})")
    return changed


def saved_config(run_dir: Path) -> dict | None:
    path = run_dir / SAVED
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
        from_dict(Config, saved, "", f" in {path}")  # it must still be a valid config
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{path}: the run's saved config cannot be read ({exc})") from None
    return saved


def output_dir_of(overrides: list[str]) -> str | None:
    for text in reversed(overrides):
        keys, value = parse_override(text)
        if keys == ["output_dir"]:
            return str(value)
    return None


def resume_plan(
    resume: str, config: str | None, overrides: list[str]
) -> tuple[str | None, list[str], str, Path | None]:
    """(config file, overrides, resume, run folder whose saved config is the base, or None).

    `--resume RUN_DIR` (a folder holding config.yaml): the run's saved config (or --config, which
    check_resume compares with it), output_dir set to it, and `auto` within it. `--resume auto` without --config: the saved config of the output_dir
    the overrides name (or the default one), when there is one. Anything else: as given.
    """
    if resume not in (None, "", "none", "auto"):
        run = Path(resume)
        if not (run / SAVED).is_file():  # a checkpoint root or step folder
            return config, overrides, resume, None
        overrides = [*overrides, f"output_dir={run.resolve()}"]
        if config is not None:  # the given config, checked against the run's (check_resume)
            return config, overrides, "auto", None
        return str(run / SAVED), overrides, "auto", run
    if resume == "auto" and config is None:
        run = Path(output_dir_of(overrides) or Config().output_dir)
        if (run / SAVED).is_file():
            return str(run / SAVED), overrides, "auto", run
    return config, overrides, resume, None


def check_resume(cfg: Config, resume: str | None) -> None:
    """Resuming a run whose folder holds a saved config and a checkpoint: refuse a config that
    changes its model or its sample order (that is another run), naming the keys."""
    if resume in (None, "", "none"):
        return
    run = Path(cfg.output_dir)
    saved = saved_config(run)
    if saved is None:
        return
    from umt import checkpoint

    root = Path(cfg.checkpoint.dir or run / "checkpoints")
    if resume == "auto" and checkpoint.find_latest(root) is None:
        return  # nothing to resume: a fresh start
    # The saved paths as this working folder reads them (configs saved before paths were made
    # absolute held relative ones).
    saved = to_dict(absolute_paths(from_dict(Config, saved)))
    changes = run_changes(saved, cfg)
    if changes:
        raise ConfigError(
            f"--resume: this config would change the run in {run}: {'; '.join(changes)}; "
            "that makes another run: give it another output_dir"
        )
