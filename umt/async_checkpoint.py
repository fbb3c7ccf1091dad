"""Asynchronous checkpoints (`checkpoint.async_save: true`): training waits only while the state
is copied to host memory; a thread writes the files while the next steps run.

What DeepSpeed 0.19 offers does not fit: its decoupled engine (`checkpoint.writer.decoupled`)
hands live tensors to a writer process and waits for it at the next optimizer step, so training
overlaps one forward and backward with the write at most, and it writes `latest` itself; the
DataStates engine is an outside package. What it does offer is the seam: every file of
`engine.save_checkpoint` goes through `engine.checkpoint_engine.save(state_dict, path)`. Here
that is `background_engine`, which snapshots the state dict into host buffers and queues
the file; UMT's own files (rank{R}.pt, umt_meta.json, config.yaml) go through the same queue.

The rules of a synchronous save still hold (`umt.checkpoint`): `latest` moves only when every
rank has written every file (the writer threads agree through an all-reduce on a gloo group of
their own, off the training thread's group); the next save waits for the previous one; a rank
killed during the write leaves `latest` on the previous checkpoint.

Memory: one checkpoint's worth of host memory per rank (its ZeRO shard of the optimizer state and
master weights, plus the model's weights on the rank that writes them), kept from one save to the
next (the same buffers are reused, pinned on GPUs so the copy runs at full bandwidth).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_pipeline.faults import TrainingFaults
from umt import distributed

log = logging.getLogger("umt.checkpoint")
IMMUTABLE = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


class HostCopies:
    """Copies of a state dict in host memory that torch.save writes exactly as it would the
    original: views of one storage stay views of one copy (DeepSpeed's module weights are views
    of its flat buffers). Buffers are kept and reused by the next save of the same sizes."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: dict[int, list[torch.UntypedStorage]] = {}
        self.in_use: list[torch.UntypedStorage] = []

    @property
    def bytes_held(self) -> int:
        return sum(s.nbytes() for s in self.in_use) + sum(
            s.nbytes() for kept in self.free.values() for s in kept
        )

    def recycle(self) -> None:
        """The previous save is written: its buffers may be reused."""
        for storage in self.in_use:
            self.free.setdefault(storage.nbytes(), []).append(storage)
        self.in_use = []

    def snapshot(self, obj: Any) -> Any:
        return self._copy(obj, {})

    def _copy(self, obj: Any, memo: dict) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, memo)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # the same mapping type (OrderedDict, defaultdict...)
            for key, value in obj.items():
                out[key] = self._copy(value, memo)
            return out
        if isinstance(obj, list):
            return [self._copy(v, memo) for v in obj]
        if isinstance(obj, tuple):
            items = [self._copy(v, memo) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if obj is None or isinstance(obj, IMMUTABLE):
            return obj
        return copy.deepcopy(obj)  # small objects (a loss scaler, an enum)

    def _tensor(self, tensor: torch.Tensor, memo: dict) -> torch.Tensor:
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        host = memo.get(key) if storage.nbytes() else None
        if host is None:
            host = self._buffer(storage.nbytes())
            host.copy_(storage, non_blocking=self.pinned)
            memo[key] = host
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


class AsyncCheckpointWriter:
    """A rank's background writer: `save`/`write_text` queue files (copied now, written later),
    `finish` queues the end of one checkpoint, `wait` returns once it is complete everywhere (and
    raises if it failed). Every rank makes one at start-up (its gloo group is a collective)."""

    def __init__(self, timeout_s: float, faults: TrainingFaults, on_gpu: bool):
        self.group = distributed.new_gloo_group(timeout_s)
        self.copies = HostCopies(pinned=on_gpu)
        self.faults, self.on_gpu = faults, on_gpu
        self.jobs: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.done.set()
        self.handed_over = threading.Event()  # the training thread queued the whole checkpoint
        self.error: str | None = None
        self.completed: Path | None = None  # the newest checkpoint this writer completed
        self.files_written = 0
        self.copy_s = 0.0  # time the training thread spent copying the current save
        self._thread = threading.Thread(target=self._run, name="umt-checkpoint", daemon=True)
        self._thread.start()

    # --- the training thread --------------------------------------------------------------------
    def attach(self, engine) -> None:
        """DeepSpeed's files of `engine.save_checkpoint` come here from now on."""
        engine.checkpoint_engine = background_engine(self, engine._config)

    def begin(self) -> None:
        """Before a save: the previous one is complete (its failure raised here)."""
        self.wait()
        self.copies.recycle()
        self.done.clear()
        self.handed_over.clear()
        self.files_written, self.copy_s = 0, 0.0

    def save(self, obj: Any, path: Path, zipfile: bool = True) -> None:
        started = time.perf_counter()
        snapshot = self.copies.snapshot(obj)
        ready = None
        if self.on_gpu:  # the copies are queued on the stream: the writer waits for them
            ready = torch.cuda.Event()
            ready.record()
        self.copy_s += time.perf_counter() - started
        self.jobs.put(("file", Path(path), (snapshot, ready, zipfile)))

    def write_text(self, path: Path, text: Callable[[], str]) -> None:
        """`text()` (a YAML or JSON dump of state handed over) runs in the writer thread."""
        self.jobs.put(("text", Path(path), text))

    def finish(self, path: Path, publish: Callable[[], None]) -> None:
        """Every file of checkpoint `path` is queued; `publish` (rank 0's: move `latest`, prune)
        runs once every rank has written all of its files."""
        self.jobs.put(("finish", Path(path), publish))
        self.handed_over.set()

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
        failure: str | None = None
        started = None
        while (job := self.jobs.get()) is not None:
            kind, path, payload = job
            started = started or time.perf_counter()
            if kind == "finish":
                self._finish(path, payload, failure, time.perf_counter() - started)
                failure, started = None, None
                continue
            if failure is not None:
                continue  # the save failed already: its other files are not worth writing
            try:
                self._write(kind, path, payload)
            except Exception as exc:  # noqa: BLE001 - reported by wait() on the training thread
                failure = f"{path}: {type(exc).__name__}: {exc}"

    def _write(self, kind: str, path: Path, payload: Any) -> None:
        from umt.checkpoint import write_text_atomic

        if kind == "text":
            write_text_atomic(path, payload())
        else:
            snapshot, ready, zipfile = payload
            if ready is not None:
                ready.synchronize()
            torch.save(snapshot, path, _use_new_zipfile_serialization=zipfile)
        self.files_written += 1
        if self.files_written == 1 and self.faults.kill_in_checkpoint_write == step_of(path.parent):
            self.handed_over.wait()  # training has gone on: the kill lands mid-write, mid-step
            self.faults.kill_in_write(step_of(path.parent))

    def _finish(self, path: Path, publish, failure: str | None, write_s: float) -> None:
        try:
            ok = torch.tensor([0 if failure else 1], dtype=torch.int32)
            everyone = bool(distributed.all_reduce(ok, "min", self.group).item())
            if everyone:
                publish()
                self.completed = path
                log.info("saved checkpoint %s (written in the background in %.1f s)", path, write_s)
            else:
                self.error = (
                    f"the background write of checkpoint {path} failed "
                    f"({failure or 'on another rank'}); `latest` stays on the previous checkpoint"
                )
        except Exception as exc:  # noqa: BLE001 - a dead peer, a full disk: reported by wait()
            self.error = f"the background write of checkpoint {path} failed: {exc}"
        finally:
            self.done.set()


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
