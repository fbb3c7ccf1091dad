"""The host copies of `checkpoint.async_save`: what torch.save writes from them is what it writes
from the live state at the moment of the copy. (Saves, kills and resumes on 2 ranks:
tests/test_train.py and tests/test_slurm.py.)"""

from __future__ import annotations

import io
from collections import OrderedDict, namedtuple

import torch

from umt.async_checkpoint import HostCopies

Address = namedtuple("Address", "start numel")


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)  # as DeepSpeed's flat buffer and its views
    return {
        "module": OrderedDict(weight=flat[:8].view(2, 4), bias=flat[8:]),
        "optimizer": {"exp_avg": [torch.ones(3)], "step": torch.tensor(7), "lr": 1e-3},
        "address": Address(0, 8),
        "names": ("weight", "bias"),
        "dtype": torch.bfloat16,
    }


def snapshot(copies: HostCopies, live: dict) -> dict:
    copy = copies.snapshot(live)  # the structure now...
    copies.fill()  # ...the bytes later (in the writer thread, before the next optimizer step)
    return copy


def test_a_copy_saves_to_the_same_bytes_and_keeps_views_of_one_storage():
    live = state()
    copy = snapshot(HostCopies(pinned=False), live)
    assert saved_bytes(copy) == saved_bytes(live)
    weight, bias = copy["module"]["weight"], copy["module"]["bias"]
    assert weight.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    assert type(copy["module"]) is OrderedDict and type(copy["address"]) is Address


def test_training_on_after_the_copy_does_not_reach_it():
    live = state()
    before = saved_bytes(live)
    copy = snapshot(HostCopies(pinned=False), live)
    live["module"]["weight"].add_(1.0)  # the next optimizer step, in place
    live["optimizer"]["exp_avg"][0].mul_(3.0)
    assert saved_bytes(copy) == before


def test_the_next_save_reuses_the_buffers_of_the_last():
    copies = HostCopies(pinned=False)
    first = snapshot(copies, state())
    held = copies.bytes_held
    pointers = {first["module"]["weight"].untyped_storage().data_ptr()}
    copies.recycle()  # the previous save is written
    second = snapshot(copies, state())
    assert copies.bytes_held == held  # one checkpoint's worth, not two
    assert second["module"]["weight"].untyped_storage().data_ptr() in pointers
