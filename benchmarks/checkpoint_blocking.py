"""How long a checkpoint blocks training: synchronous saves against `checkpoint.async_save`, on
the same state, 2 gloo ranks.

One Trainer (the `small` preset, ZeRO-2, AdamW with its moments: 16 M parameters, about 250 MiB
of checkpoint over the two ranks) saves in rounds that alternate the two modes (the order flipped
each round, so load from other processes hits both alike). Measured per save, on each rank:
- blocked: the time `Trainer.save_checkpoint` keeps the training thread, plus, asynchronously,
  the next optimizer step's wait for the copy to host memory (the figure to cut; max over ranks,
  median over rounds);
- next step: the optimizer step right after the save, during the background copy and write;
- then waited: what is left of the background write after that step.
Also: each rank's checkpoint files and the host buffers the asynchronous writer keeps.

    python benchmarks/checkpoint_blocking.py [--quick] [--rounds 5] [--preset small]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = Path(__file__).with_name("_checkpoint_ranks.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 2 rounds")
    parser.add_argument("--rounds", type=int, help="saves per mode (default 5)")
    parser.add_argument("--preset", help="model preset (default small)")
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.quick else "small")
    rounds = args.rounds or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="umt-ckpt-bench-") as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(RANKS),
            "--preset", preset, "--rounds", str(rounds), "--out", tmp,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the ranks failed:\n{proc.stderr[-4000:]}")
        ranks = json.loads((Path(tmp) / "ranks.json").read_text())

    def per_save(mode: str, key: str) -> list[float]:
        """Each save's figure, max over ranks."""
        return [max(r[mode][i][key] for r in ranks) for i in range(rounds)]

    print(f"preset {preset}, 2 ranks, ZeRO-2 with AdamW moments, {rounds} saves per mode")
    print(f"{'':>8} {'blocked s':>10} {'next step s':>12} {'then waited s':>14}")
    copy_waits = per_save("async", "copy_wait_s")
    figures = {}
    for mode in ("sync", "async"):
        blocked = per_save(mode, "blocked_s")
        step = per_save(mode, "next_step_s")
        waited = per_save(mode, "then_waited_s")
        figures[mode] = statistics.median(blocked)
        print(
            f"{mode:>8} {statistics.median(blocked):>10.3f} {statistics.median(step):>12.3f} "
            f"{statistics.median(waited):>14.3f}   (blocked per save: "
            + ", ".join(f"{b:.3f}" for b in blocked)
            + ")"
        )
    print(
        f"of which the next optimizer step waited for the copy: {statistics.median(copy_waits):.3f} s"
    )
    plain = max(r["plain_step_s"] for r in ranks)
    print(f"a step with no save in flight: {plain:.3f} s")
    for r in ranks:
        print(
            f"rank {r['rank']}: checkpoint files {r['sync'][0]['mib']:.1f} MiB, asynchronous "
            f"writer's host buffers {r['host_buffers_mib']:.1f} MiB, peak RSS "
            f"{r['rss_peak_mib']:.0f} MiB"
        )
    ratio = figures["async"] / figures["sync"]
    print(f"async blocks {100 * ratio:.0f}% of the sync save's time (goal: <= 25%)")
    buffers = max(r["host_buffers_mib"] for r in ranks)
    print(
        f"SUMMARY preset={preset} sync_blocked_s={figures['sync']:.3f} "
        f"async_blocked_s={figures['async']:.3f} ratio={ratio:.3f} "
        f"host_buffers_mib_max={buffers:.1f}"
    )


if __name__ == "__main__":
    main()
