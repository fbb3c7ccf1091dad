"""A run remembers its config: paths made absolute when it starts (so `umt export`, `umt eval`
and a resume work from any working folder), and `umt train --resume RUN_DIR` (or `--resume auto`
with the run's output_dir) continues with the config saved in the run, overrides on top, refusing
changes that would make it another run (model shape, sample order). A changed data mixture is the
one such change a resume takes when asked (`--new-mixture`: a new phase of the stream from the
checkpoint on); every resume that changes the config adds a line to OUTPUT_DIR/config_history.jsonl
(config.yaml is the latest config only)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from umt.config import Config, ConfigError, from_dict, parse_override, to_dict

log = logging.getLogger("umt.train")
SAVED = "config.yaml"  # in the run folder, written by rank 0 at every start
HISTORY = "config_history.jsonl"  # in the run folder: what each resume changed
SHARDS = "data.train.shards"
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
    """Each location of a shards spec made absolute, read with the loader's own parser: names
    (`i2d=dir`), mix suffixes (`:x2`, `:30%`), mappings and brace patterns (`{a,b}`) stay."""
    from data_pipeline.loader.specs import map_locations  # the data side, only when needed

    return map_locations(shards, _absolute)


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
    # A tower built from `pretrained` has the shape of that folder, written into the config when
    # it is built (its sizes and `architecture`): a config given to resume does not hold it yet.
    from_folder = tuple(
        f"model.{tower}." for tower in ("text", "image")
        if old.get(f"model.{tower}.pretrained") and new.get(f"model.{tower}.pretrained")
    )  # fmt: skip
    changed = []
    for key in sorted(set(old) | set(new)):
        fixed = key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS
        if not fixed or key.endswith(NOT_FIXED) or key.startswith(from_folder):
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

    `--resume PATH`: a run folder, its checkpoint root or one `step{N}` folder (anything else is a
    CheckpointError saying what PATH is). The run's saved config is the base (or --config, which
    check_resume compares with it), output_dir is the run's, and a run folder or checkpoint root
    resumes its newest checkpoint (`auto`), a step folder that step. `auto` (the default) and
    `none` without --config: the saved config of the output_dir the overrides name (or the
    default one), when there is one.
    """
    if resume not in (None, "", "none", "auto"):
        from umt import checkpoint

        given = Path(resume)
        root = checkpoint.run_checkpoint_root(given)
        if checkpoint.is_run_folder(given) and checkpoint.find_latest(root) is None:
            # A run that has saved nothing yet: it starts (again) with its saved config.
            overrides = [*overrides, f"output_dir={given.resolve()}"]
            if config is not None or not (given / SAVED).is_file():
                return config, overrides, "auto", None
            return str(given / SAVED), overrides, "auto", given
        ref = checkpoint.locate(given, "--resume")
        run = run_folder_of(given, ref)
        step_folder = (given / checkpoint.META).is_file()
        branch = output_dir_of(overrides)
        if branch is None:  # going on within its run: from the run's newest checkpoint only
            newest = checkpoint.find_latest(ref.root)
            if newest is not None and newest.step > ref.step:
                raise checkpoint.CheckpointError(
                    f"--resume {resume}: not the newest checkpoint of its run ({newest.tag} is); "
                    f"going on from it would write over later steps of that run: add "
                    f"output_dir=NEW_FOLDER to branch off from {ref.tag}"
                )
            if run is None:
                raise checkpoint.CheckpointError(
                    f"--resume {resume}: the run folder of this checkpoint (with its {SAVED}) is "
                    "not beside it: add output_dir=FOLDER for the run that goes on from it"
                )
            overrides = [*overrides, f"output_dir={run.resolve()}"]
            if ref.root.resolve() != (run / "checkpoints").resolve():
                overrides.append(f"checkpoint.dir={ref.root.resolve()}")
        # The base config: the one the step was trained with, else its run's.
        # A checkpoint folder copied without its run's config.yaml: each step carries its own.
        step_config = ref.path / SAVED
        ordered = [step_config] if step_folder else []
        ordered += ([run / SAVED] if run is not None else []) + [step_config]
        base = next((c for c in ordered if c.is_file()), None)
        # Within its run: the newest checkpoint. Branching off into another output_dir: exactly
        # this checkpoint.
        resume = "auto" if branch is None else str(ref.path.resolve())
        if config is not None or base is None:  # the given config, checked by check_resume
            return config, overrides, resume, None
        return str(base), overrides, resume, run
    if resume in ("auto", "none") and config is None:  # (`none` is then refused by check_resume)
        run = Path(output_dir_of(overrides) or Config().output_dir).resolve()
        if (run / SAVED).is_file():
            return str(run / SAVED), overrides, resume, run
    return config, overrides, resume, None


def run_folder_of(path: Path, ref) -> Path | None:
    """The run folder (holding config.yaml) that a run, checkpoint or step folder belongs to."""
    from umt import checkpoint

    saved_out = (checkpoint.read_meta(ref).get("config") or {}).get("output_dir")
    candidates = [path, ref.root.parent] + ([Path(saved_out)] if saved_out else [])
    return next((c for c in candidates if checkpoint.is_run_folder(c)), None)


def check_resume(
    cfg: Config, resume: str | None, restart: bool = False, new_mixture: bool = False
) -> None:
    """A run folder is resumed or refused, never silently started over: `--resume none` on a
    folder holding a checkpoint is refused, and so is a config that changes the run's model or
    its sample order (that is another run), naming the keys; a changed data mixture is taken with
    `new_mixture` (the loader starts a new phase at the checkpoint's position). `--restart` is the
    way to start over."""
    if restart:
        return
    from umt import checkpoint

    run = Path(cfg.output_dir)
    root = Path(cfg.checkpoint.dir or run / "checkpoints")
    found = checkpoint.find_latest(root) if (root / checkpoint.LATEST).is_file() else None
    again = (
        "give it another output_dir, or --restart to start over in it (the old run is moved "
        "aside into it, nothing is deleted)"
    )
    if resume in (None, "", "none"):
        if found is not None:
            raise ConfigError(
                f"output_dir {run} holds a run (newest checkpoint {found.tag}): umt train resumes "
                f"it without --resume none; to start another run, {again}"
            )
        return
    saved = saved_config(run)
    if saved is None or (resume == "auto" and found is None):
        return  # nothing to compare with, or nothing to resume: a fresh start
    # The saved paths as this working folder reads them (configs saved before paths were made
    # absolute held relative ones).
    saved = to_dict(absolute_paths(from_dict(Config, saved)))
    changes = run_changes(saved, cfg)
    mixture = [c for c in changes if c.startswith(SHARDS + " ")]
    if mixture:
        changes.remove(mixture[0])
        if not new_mixture:
            old, new = flatten(saved).get(SHARDS), cfg.data.train.shards
            changes.append(
                f"{SHARDS}: {mixture_change(old, new)} (`umt train --resume {run} --new-mixture` "
                "goes on with the new mixture from the checkpoint, as a new phase of the stream)"
            )
    if changes:
        raise ConfigError(
            f"this config would change the run in {run}: {'; '.join(changes)}; that makes "
            f"another run: {again}"
        )


def mixture_change(old: Any, new: Any) -> str:
    """What a new data.train.shards changes, by source (sources named as the loader names them)."""
    from data_pipeline.loader.config import LoaderConfigError
    from data_pipeline.loader.dataset import describe_change

    try:
        return describe_change(old, new)
    except LoaderConfigError as exc:
        return f"{old!r} -> {new!r} ({exc})"


def record_config_change(cfg: Config, resume: str | None, new_mixture: bool) -> None:
    """On a resume, append to OUTPUT_DIR/config_history.jsonl one line of what the config changes
    from the run's saved one (every key, old and new), the checkpoint it goes on from and the
    time; rank 0, before the run's config.yaml is written over."""
    from umt import checkpoint

    run = Path(cfg.output_dir)
    saved = saved_config(run) if resume not in (None, "", "none") else None
    ref = checkpoint.resolve(resume, Path(cfg.checkpoint.dir or run / "checkpoints"))
    if saved is None or ref is None:
        return
    old = flatten(to_dict(absolute_paths(from_dict(Config, saved))))
    new = flatten(to_dict(cfg))
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)}  # fmt: skip
    if not changed:
        return
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from": str(ref.path),
        "step": ref.step,
        "changed": changed,
    }
    if SHARDS in changed:
        line["new_mixture"] = new_mixture
    with open(run / HISTORY, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def set_aside_run(out: Path, ckpt_root: Path) -> Path:
    """`umt train --restart`: move the previous run's files out of the way, deleting nothing.

    Everything in `out` but its `slurm/` folder (job scripts, and the log a job is writing) and
    earlier set-aside runs goes to `out/replaced-<UTC time>/`; a checkpoint folder outside `out`
    becomes `<it>.replaced-<UTC time>` beside itself. Returns the folder the run went to."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = out / f"replaced-{stamp}"
    keep = {"slurm", aside.name}
    if out.is_dir():
        entries = [
            p for p in out.iterdir() if p.name not in keep and not p.name.startswith("replaced-")
        ]
        if entries:
            aside.mkdir()
            for entry in entries:
                os.replace(entry, aside / entry.name)
    if ckpt_root.exists() and not ckpt_root.is_relative_to(out):
        os.replace(ckpt_root, ckpt_root.with_name(f"{ckpt_root.name}.replaced-{stamp}"))
    return aside


def keep_global_batch(cfg: Config, ref, world_size: int, rank: int) -> Config:
    """Resuming on another number of ranks: the same global batch, by train.grad_accum, when the
    saved run's global batch splits evenly into this world's micro-batches. The sample order then
    goes on exactly as before (a global step takes the next global batch of samples)."""
    from umt import checkpoint

    saved = (checkpoint.read_meta(ref).get("config") or {}).get("train") or {}
    t = cfg.train
    micro, accum = saved.get("micro_batch_size", t.micro_batch_size), saved.get("grad_accum", 1)
    before = micro * accum * ref.world_size
    now = t.micro_batch_size * t.grad_accum * world_size
    if before == now:
        return cfg
    unchanged = (t.micro_batch_size, t.grad_accum) == (micro, accum)  # no override of either
    if unchanged and before % (t.micro_batch_size * world_size) == 0:
        grad_accum = before // (t.micro_batch_size * world_size)
        if rank == 0:
            log.warning(
                "resuming a %d-rank run on %d rank(s): train.grad_accum %d -> %d keeps the global "
                "batch at %d samples per step",
                ref.world_size, world_size, t.grad_accum, grad_accum, before,
            )  # fmt: skip
        return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=grad_accum))
    if rank == 0:
        log.warning(
            "resuming a %d-rank run on %d rank(s): the global batch changes from %d to %d samples "
            "per step (%d ranks x train.micro_batch_size %d x train.grad_accum %d); the samples "
            "go on in the same order",
            ref.world_size, world_size, before, now, world_size, t.micro_batch_size, t.grad_accum,
        )  # fmt: skip
    return cfg
