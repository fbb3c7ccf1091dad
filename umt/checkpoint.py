"""Checkpoints: save (ZeRO shards + client state + per-rank RNG), find the newest complete one, resume
(also on another world size through DeepSpeed's universal checkpoint), prune.

Layout of `CKPT_ROOT/`:
    step{N}/                 DeepSpeed's files (model states, ZeRO optimizer shards)
    step{N}/umt_meta.json    step, world size, ZeRO stage, run id, resolved config (rank 0; read
                             before the engine exists and by `umt export`)
    step{N}/config.yaml      the same config as YAML: what `--resume step{N}` starts from
    step{N}/rank{R}.pt       per-rank RNG states and loader state (DeepSpeed keeps no RNG and writes
                             client_state from rank 0 only)
    step{N}_universal/       created on demand when resuming on a different world size
    latest                   the newest complete tag, written last, atomically
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from umt import distributed

if TYPE_CHECKING:
    from umt.async_checkpoint import AsyncCheckpointWriter

log = logging.getLogger("umt.checkpoint")
LATEST = "latest"
META = "umt_meta.json"
RUN_CONFIG = "config.yaml"  # a run's config: in its folder (each start) and in each step folder
TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the path and the reason."""


# --- loading without running code --------------------------------------------------------------
#
# A checkpoint is a file someone may hand you. torch.load(weights_only=False) unpickles whatever
# the file names, os.system included; DeepSpeed loads its files that way. Every load of a
# checkpoint file goes through `load_file`, or runs inside `weights_only_loads()`, which makes
# DeepSpeed's own torch.load calls weights-only too: tensors, containers, numbers and strings,
# plus the few DeepSpeed and numpy types its files really hold (listed below). Anything else
# is refused with one line naming the file.


def _allowed_globals() -> list:
    import codecs

    from umt.logs import quiet_deepspeed

    quiet_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, codecs.encode]
    # numpy arrays and dtypes: the RNG state of numpy in UMT's per-rank files
    allowed += [np.ndarray, np.dtype, np._core.multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32")]
    return allowed


def load_file(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """torch.load of a checkpoint file that runs no code (see above)."""
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, **{**kwargs, "weights_only": True})
        except pickle.UnpicklingError as exc:
            found = re.search(
                r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+)", str(exc)
            )
            reason = found.group(1) if found else str(exc).strip().splitlines()[-1][:200]
            raise CheckpointError(
                f"{path}: refused to load: it holds more than tensors and DeepSpeed's checkpoint "
                f"types, and loading it could run code ({reason})"
            ) from None


_TORCH_LOAD = torch.load


@contextmanager
def weights_only_loads():
    """Within: every `torch.load` (DeepSpeed's included) is `load_file`."""
    torch.load = lambda f, *args, **kwargs: load_file(f, *args[:1], **kwargs)
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


@dataclass(frozen=True)
class CheckpointRef:
    root: Path
    tag: str
    step: int
    world_size: int
    zero_stage: int

    @property
    def path(self) -> Path:
        return self.root / self.tag


def tag_for(step: int) -> str:
    return f"step{step}"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine,
    root: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    keep: int,
    run_id: str,
    config: dict | None = None,
    meta: dict | None = None,
    background: AsyncCheckpointWriter | None = None,
) -> Path:
    """Save on every rank; `latest` is written by rank 0 only after every rank's files are on disk.

    `run_id` names the run (kept across its resumes): a step folder of another run is never
    written over, and pruning deletes only this run's checkpoints. With a `background` writer
    (installed as `engine`'s checkpoint engine) the state is handed over and this returns; the
    writer moves `latest` once every rank's files are written."""
    rank, world = distributed.rank(), distributed.world_size()
    tag = tag_for(step)
    if background is not None:
        background.begin(root / tag)  # the previous save is complete (or its failure raises)
    root.mkdir(parents=True, exist_ok=True)
    owner = run_of(root / tag)
    if owner not in (None, run_id):  # every rank sees the same file: all refuse together
        raise CheckpointError(
            f"{root / tag} holds a checkpoint of another run ({owner}); not writing over it"
        )
    # DeepSpeed's universal conversion requires this entry to exist in the client state.
    client_state = {**client_state, "universal_checkpoint_info": {}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    path = root / tag
    files = {path / f"rank{rank}.pt": {**rank_state, "rng": rng_state()}}
    texts = {}
    if rank == 0:
        meta = {
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "run_id": run_id,
            "config": config or {},  # read by `umt export` without DeepSpeed
            **(meta or {}),
        }
        # Dumped when written (YAML of a config takes ~0.1 s: not on the training thread).
        if config:  # the config this step was trained with, for a person and for a resume
            texts[path / RUN_CONFIG] = functools.partial(yaml.safe_dump, config, sort_keys=False)
        texts[path / META] = functools.partial(json.dumps, meta)  # last: the folder is complete
    if background is not None:
        for file, state in files.items():
            background.save(state, file)
        for file, text in texts.items():
            background.write_text(file, text)
        background.finish(lambda: publish(root, tag, keep, run_id) if rank == 0 else None)
        return path
    for file, state in files.items():
        torch.save(state, file)
    for file, text in texts.items():
        write_text_atomic(file, text())
    distributed.barrier()  # every rank's shards and state files are written
    if rank == 0:
        publish(root, tag, keep, run_id)
    distributed.barrier()
    return path


def publish(root: Path, tag: str, keep: int, run_id: str) -> None:
    """Rank 0, once every rank's files of `tag` are written: `latest` names it, older go."""
    write_text_atomic(root / LATEST, tag)
    prune(root, keep, run_id)


def run_of(step_dir: Path) -> str | None:
    """The run id recorded in a step folder's meta (None: no meta, or one from before run ids)."""
    try:
        return json.loads((step_dir / META).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def prune(root: Path, keep: int, run_id: str) -> None:
    """Delete this run's complete checkpoints older than its newest `keep` (and their universal
    copies). Another run's checkpoints (or ones without a run id) are never deleted."""
    latest = find_latest(root)
    if latest is None:
        return
    steps = sorted(
        int(m.group(1))
        for p in root.iterdir()
        if (m := TAG.match(p.name)) and int(m.group(1)) <= latest.step and run_of(p) == run_id
    )
    for step in steps[:-keep]:
        for name in (tag_for(step), tag_for(step) + "_universal"):
            shutil.rmtree(root / name, ignore_errors=True)


def read_ref(root: Path, tag: str) -> CheckpointRef:
    path = root / tag
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete UMT checkpoint (no {META})")
    meta = json.loads(meta_path.read_text())
    return CheckpointRef(
        root, tag, int(meta["step"]), int(meta["world_size"]), int(meta["zero_stage"])
    )


def read_meta(ref: CheckpointRef) -> dict:
    return json.loads((ref.path / META).read_text())


def find_latest(root: Path) -> CheckpointRef | None:
    """The checkpoint named by `root/latest`, or None. Folders newer than `latest` are incomplete."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return read_ref(root, tag)


def resolve(resume: str | None, default_root: Path, flag: str = "--resume") -> CheckpointRef | None:
    """`--resume`: None/'none' -> fresh; 'auto' -> newest complete or None; a path -> that one or an error.

    A path may be a run folder (its checkpoint root's `latest`), a checkpoint root (its
    `latest`) or one `step{N}` folder; anything else is refused naming what the folder is.
    """
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return find_latest(default_root)
    return locate(Path(resume), flag)


def run_checkpoint_root(run_dir: Path) -> Path:
    """Where a run folder's checkpoints are: its saved config's checkpoint.dir, else checkpoints/."""
    try:
        saved = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
        named = (saved.get("checkpoint") or {}).get("dir")
    except (OSError, ValueError, AttributeError):
        named = None
    return Path(named) if named else run_dir / "checkpoints"


def is_run_folder(path: Path) -> bool:
    if (path / META).is_file():  # a step folder (it carries its config.yaml too)
        return False
    return (path / RUN_CONFIG).is_file() or (path / "checkpoints" / LATEST).is_file()


def locate(
    path: Path, flag: str, wanted: str = "a run, checkpoint or step folder"
) -> CheckpointRef:
    """The checkpoint a user means by `path`: a run folder, a checkpoint root or a step folder.
    Anything else is a CheckpointError saying what `path` is instead (`wanted`: what the flag takes)."""
    if (path / LATEST).is_file():
        ref = find_latest(path)
        assert ref is not None
        return ref
    if (path / META).is_file():
        return read_ref(path.parent, path.name)
    if is_run_folder(path):
        root = run_checkpoint_root(path)
        ref = find_latest(root)
        if ref is None:
            raise CheckpointError(
                f"{flag} {path}: a run folder with no complete checkpoint yet (none in {root})"
            )
        return ref
    raise CheckpointError(f"{flag} {path}: {describe_folder(path, wanted)}")


def describe_folder(path: Path, wanted: str = "a run, checkpoint or step folder") -> str:
    """Why `path` is not `wanted` (a run, checkpoint or step folder...), in a few words."""
    if not path.exists():
        return "no such file or folder"
    if not path.is_dir():
        return f"a file, not {wanted}"
    names = {p.name for p in path.iterdir()}
    if not names:
        return f"the folder is empty: not {wanted}"
    if "umt_export.json" in names:
        return (
            "an export (umt export): exports are evaluated and loaded (umt eval --model, "
            "umt.load), not resumed or exported again"
        )
    if "manifest.json" in names or "sizes.json" in names or any(n.endswith(".tar") for n in names):
        return "a shard folder, not a run: give the run's output_dir (or its checkpoints/)"
    steps = sorted(n for n in names if TAG.match(n))
    if steps:
        return (
            f"step folders ({', '.join(steps[:3])}{'...' if len(steps) > 3 else ''}) but no "
            f"`{LATEST}` and no {META}: no complete checkpoint (a run killed while saving?)"
        )
    return (
        f"not {wanted} (no umt_export.json, {RUN_CONFIG}, {LATEST} or {META} in it)"
        if "export" in wanted
        else f"not {wanted} (no {RUN_CONFIG}, {LATEST} or {META} in it)"
    )


def universal_tag(ref: CheckpointRef) -> str:
    return ref.tag + "_universal"


def convert_to_universal(ref: CheckpointRef, timeout_s: float = 4 * 3600) -> str:
    """Convert `ref` with `deepspeed.checkpoint.ds_to_universal` on rank 0; returns the tag.

    The other ranks wait up to `timeout_s` on a group of their own (a large ZeRO-3 checkpoint
    from many ranks can take longer than the collective timeout of training), and a failure on
    rank 0 reaches every rank as a CheckpointError instead of a hang.
    """
    out = ref.root / universal_tag(ref)

    def convert() -> float:
        if (out / META).is_file():
            return 0.0
        started = time.perf_counter()
        tmp = ref.root / (universal_tag(ref) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "converting %s (saved by %d ranks) to a universal checkpoint; the other ranks wait up "
            "to %.0f min (checkpoint.conversion_timeout_min)",
            ref.path, ref.world_size, timeout_s / 60,
        )  # fmt: skip
        cmd = [
            sys.executable,
            "-m",
            "umt.convert_universal",  # DeepSpeed's converter, its loads weights-only
            "--input_folder",
            str(ref.path),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            log.error("universal conversion of %s failed:\n%s", ref.path, proc.stderr[-4000:])
            raise CheckpointError(f"universal conversion of {ref.path} failed: {last[0]}")
        for f in ref.path.glob("rank*.pt"):
            shutil.copy2(f, tmp / f.name)
        shutil.copy2(ref.path / META, tmp / META)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        (ref.root / "latest_universal").unlink(missing_ok=True)  # written by the converter; unused
        seconds = time.perf_counter() - started
        log.info("converted %s in %.1f s", ref.path, seconds)
        return seconds

    _, error = distributed.run_on_rank0(convert, timeout_s)
    if error is not None:
        raise CheckpointError(f"rank 0 could not convert {ref.path}: {error}")
    return universal_tag(ref)
