"""Asynchronous checkpoints (`checkpoint.async_save: true`): a save hands the state over and
training goes on; a thread copies it to host memory while the next forward and backward run
(they do not change parameters or optimizer state), then writes the files.

What DeepSpeed 0.19 offers does not fit: its decoupled engine (`checkpoint.writer.decoupled`)
hands live tensors to a writer process and waits at the next optimizer step for the whole
*write*, so training overlaps one forward and backward with the write at most, and it writes
`latest` itself; the DataStates engine is an outside package. What it does offer is the seam:
every file of `engine.save_checkpoint` goes through `engine.checkpoint_engine.save(state_dict,
path)`. Here that is `background_engine`, which records the state dict (its structure now, its
tensors' bytes later) and stages the file; UMT's own files (rank{R}.pt, umt_meta.json,
config.yaml) join the same checkpoint. The only wait training sees besides the save call itself:
the next optimizer step waits for the copy (`wait_copied`), not for the write.

The rules of a synchronous save still hold (`umt.checkpoint`): `latest` moves only when every
rank has written every file (the writer threads agree through an all-reduce on a gloo group of
their own, off the training thread's group); the next save waits for the previous one; a rank
killed during the write leaves `latest` on the previous checkpoint.

Memory: one checkpoint's worth of host memory per rank (its ZeRO shard of the optimizer state and
master weights, plus the model's weights on the rank that writes them), kept from one save to the
next (the same buffers are reused; pinned on GPUs, so the copy runs at full bandwidth).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.faults import TrainingFaults
from umt import distributed

log = logging.getLogger("umt.checkpoint")
IMMUTABLE = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


class HostCopies:
    """Copies of state dicts in host memory that torch.save writes exactly as it would the
    originals: views of one storage stay views of one copy (DeepSpeed's module weights are views
    of its flat buffers). `snapshot` builds the copy's structure at once and lists the storage
    copies; `fill` makes them. Buffers are kept and reused by the next save of the same sizes."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: dict[int, list[torch.UntypedStorage]] = {}
        self.in_use: list[torch.UntypedStorage] = []
        self.pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []  # (to, from)
        self._memo: dict = {}

    @property
    def bytes_held(self) -> int:
        return sum(s.nbytes() for s in self.in_use) + sum(
            s.nbytes() for kept in self.free.values() for s in kept
        )

    def recycle(self) -> None:
        """The previous save is written: its buffers may be reused."""
        for storage in self.in_use:
            self.free.setdefault(storage.nbytes(), []).append(storage)
        self.in_use, self._memo = [], {}

    def snapshot(self, obj: Any) -> Any:
        """The copy of `obj`: its tensors' bytes arrive with `fill()`. Storages shared with an
        earlier snapshot since `recycle()` are copied once."""
        return self._copy(obj)

    def fill(self) -> None:
        """Copy every storage listed since the last fill (on GPUs: queued on the current stream)."""
        for host, storage in self.pending:
            host.copy_(storage, non_blocking=self.pinned)
        self.pending = []

    def _copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # the same mapping type (OrderedDict, defaultdict...)
            for key, value in obj.items():
                out[key] = self._copy(value)
            return out
        if isinstance(obj, list):
            return [self._copy(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self._copy(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if obj is None or isinstance(obj, IMMUTABLE):
            return obj
        return copy.deepcopy(obj)  # small objects (a loss scaler, an enum): copied now

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        host = self._memo.get(key) if storage.nbytes() else None
        if host is None:
            host = self._buffer(storage.nbytes())
            self.pending.append((host, storage))
            self._memo[key] = host
        out = torch.empty(0, dtype=tensor.dtype)
        out.set_(host, tensor.storage_offset(), tensor.size(), tensor.stride())
        return out

    def _buffer(self, nbytes: int) -> torch.UntypedStorage:
        kept = self.free.get(nbytes)
        if kept:
            storage = kept.pop()
        elif self.pinned:
            storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
        else:
            storage = torch.UntypedStorage(nbytes)
        self.in_use.append(storage)
        return storage


@dataclass
class StagedSave:
    """One checkpoint handed to the writer: its files in order, then `publish` (rank 0's: move
    `latest`, prune) once every rank has written all of its files."""

    path: Path
    files: list[tuple[Path, Any]] = field(default_factory=list)  # (file, state or text())
    publish: Callable[[], None] = lambda: None
    ready: Any = None  # on GPUs: an event after the state's last change, before the copies


class AsyncCheckpointWriter:
    """A rank's background writer. On the training thread: `begin()` (waits for the previous
    save), `save`/`write_text` stage files, `finish` hands the checkpoint over, `wait_copied()`
    before the next optimizer step, `wait()`/`close()` at the end. Every rank makes one at
    start-up (its gloo group is a collective)."""

    def __init__(self, timeout_s: float, faults: TrainingFaults, device: torch.device):
        self.group = distributed.new_gloo_group(timeout_s)
        self.on_gpu = device.type == "cuda"
        self.device, self.faults = device, faults
        self.copies = HostCopies(pinned=self.on_gpu)
        self.jobs: queue.Queue = queue.Queue()
        self.copied = threading.Event()  # the handed-over state is in host memory
        self.done = threading.Event()  # ...and written, agreed and published (or failed)
        self.copied.set()
        self.done.set()
        self.staged: StagedSave | None = None
        self.error: str | None = None
        self.completed: Path | None = None  # the newest checkpoint this writer completed
        self.copy_wait_s = 0.0  # optimizer steps' waits for copies, in total
        self._thread = threading.Thread(target=self._run, name="umt-checkpoint", daemon=True)
        self._thread.start()

    # --- the training thread --------------------------------------------------------------------
    def attach(self, engine) -> None:
        """DeepSpeed's files of `engine.save_checkpoint` come here from now on."""
        engine.checkpoint_engine = background_engine(self, engine._config)

    def begin(self, path: Path) -> None:
        """Before a save: the previous one is complete (its failure raised here)."""
        self.wait()
        self.copies.recycle()
        self.staged = StagedSave(Path(path))

    def save(self, obj: Any, path: Path, zipfile: bool = True) -> None:
        self.staged.files.append((Path(path), (self.copies.snapshot(obj), zipfile)))

    def write_text(self, path: Path, text: Callable[[], str]) -> None:
        """`text()` (a YAML or JSON dump of state handed over) runs in the writer thread."""
        self.staged.files.append((Path(path), text))

    def finish(self, publish: Callable[[], None]) -> None:
        """Hand the staged checkpoint over; training may go on (to the next optimizer step)."""
        staged, self.staged = self.staged, None
        staged.publish = publish
        if self.on_gpu:
            staged.ready = torch.cuda.Event()
            staged.ready.record()
        self.copied.clear()
        self.done.clear()
        self.jobs.put(staged)

    def wait_copied(self) -> None:
        """Before an optimizer step changes the state: its copy is complete."""
        if not self.copied.is_set():
            started = time.perf_counter()
            self.copied.wait()
            self.copy_wait_s += time.perf_counter() - started

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            error, self.error = self.error, None
            from umt.checkpoint import CheckpointError

            raise CheckpointError(error)

    def close(self) -> None:
        """Wait for the last save, then end the thread."""
        try:
            self.wait()
        finally:
            self.jobs.put(None)

    # --- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.on_gpu:
            torch.cuda.set_device(self.device)
        while (staged := self.jobs.get()) is not None:
            started = time.perf_counter()
            failure = None
            try:
                self._copy(staged)
                self._write(staged)
            except Exception as exc:  # noqa: BLE001 - reported by wait() on the training thread
                failure = f"{type(exc).__name__}: {exc}"
            finally:
                self.copied.set()
            self._finish(staged, failure, time.perf_counter() - started)

    def _copy(self, staged: StagedSave) -> None:
        if not self.on_gpu:
            self.copies.fill()
            return
        stream = torch.cuda.Stream()
        stream.wait_event(staged.ready)  # after the state's last change on the training stream
        with torch.cuda.stream(stream):
            self.copies.fill()
        stream.synchronize()

    def _write(self, staged: StagedSave) -> None:
        from umt.checkpoint import write_text_atomic

        for written, (path, payload) in enumerate(staged.files, start=1):
            if callable(payload):
                write_text_atomic(path, payload())
            else:
                snapshot, zipfile = payload
                torch.save(snapshot, path, _use_new_zipfile_serialization=zipfile)
            if written == 1:  # UMT_FAULT_KILL_IN_CHECKPOINT_WRITE: training has gone on by now
                self.faults.kill_in_write(step_of(staged.path))

    def _finish(self, staged: StagedSave, failure: str | None, write_s: float) -> None:
        try:
            ok = torch.tensor([0 if failure else 1], dtype=torch.int32)
            everyone = bool(distributed.all_reduce(ok, "min", self.group).item())
            if everyone:
                staged.publish()
                self.completed = staged.path
                log.info(
                    "saved checkpoint %s (copied and written in the background in %.1f s)",
                    staged.path, write_s,
                )  # fmt: skip
            else:
                self.error = (
                    f"the background write of checkpoint {staged.path} failed "
                    f"({failure or 'on another rank'}); `latest` stays on the previous checkpoint"
                )
        except Exception as exc:  # noqa: BLE001 - a dead peer, a full disk: reported by wait()
            self.error = f"the background write of checkpoint {staged.path} failed: {exc}"
        finally:
            self.done.set()


def background_writer(cfg, engine, faults: TrainingFaults, device: torch.device):
    """With checkpoint.async_save, every rank's writer, attached to `engine` (a collective)."""
    if not cfg.checkpoint.async_save:
        return None
    writer = AsyncCheckpointWriter(cfg.train.collective_timeout_min * 60, faults, device)
    writer.attach(engine)
    return writer


def step_of(folder: Path) -> int:
    name = folder.name
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else -1


def background_engine(writer: AsyncCheckpointWriter, config_params):
    """DeepSpeed's torch checkpoint engine whose `save` copies and queues instead of writing
    (loading stays DeepSpeed's own). Made here, not at import: DeepSpeed is imported late."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class BackgroundCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            writer.save(state_dict, Path(path), zipfile=self.zipfile_serialization)

    engine = BackgroundCheckpointEngine(config_params)
    engine.name = "UMT background writer"
    return engine
