"""Readable logs: rank-tagged lines (INFO on rank 0), a rank-0 progress bar, and the libraries'
chatter kept out of them unless --debug (UMT_DEBUG=1) asks for it."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

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
