"""Readable logs (rank-tagged, INFO on rank 0), TensorBoard scalars and a rank-0 progress bar."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """One line per record with time and rank; ranks other than 0 only report warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger("umt")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def debugging() -> bool:
    """--debug (or UMT_DEBUG=1): tracebacks and the libraries' own chatter."""
    return os.environ.get("UMT_DEBUG", "") not in ("", "0")


def quiet_deepspeed() -> None:
    """Call before DeepSpeed is first imported: its accelerator guess, scheduler warnings and
    checkpoint prints stay out of UMT's logs (they show with --debug). On a machine without
    CUDA, DeepSpeed is told it runs on the CPU instead of warning that it guessed so."""
    if debugging():
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    for handler in logger.handlers:
        handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_prints():
    """Within: what a library prints to stdout is dropped (kept with --debug)."""
    if debugging():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class MetricsWriter:
    """TensorBoard scalars from rank 0 (other ranks write nothing)."""

    def __init__(self, log_dir: Path | None):
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress(total: int, initial: int, rank: int, desc: str) -> tqdm:
    """A progress bar on rank 0; a disabled one elsewhere."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=rank != 0,
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
    )
