"""One contrastive batch per optimizer step against one per micro-batch: memory and time, 2 ranks.

For a contrastive batch of C samples on 2 gloo ranks (ITC + ITM, the `tiny` preset with 64 px
images in 8 px patches and 32-token captions, so the towers' activations dominate), each rank's
peak RSS above its RSS before the measured steps, and the median time per optimizer step:
- plain: `contrastive_batch: micro` with one micro-batch of C / 2 per rank (all of it at once);
- step: `contrastive_batch: step` with micro-batches of 128 and grad_accum C / 256;
- step_again: a copy of step, the noise floor.
Each contender runs in fresh processes (its own peak), the contenders interleaved round by round
with the order rotated; ITC all-gathered (open_clip's ClipLoss) in both. Then step mode alone at
contrastive batches of 1k, 4k and 16k with the micro-batch fixed and ITC by the ring in tiles of
1024 columns (the all-gathered logits of A * b rows against C columns grow with C squared): its
memory should stay flat.

    python benchmarks/contrastive_batch.py [--quick] [--contrastive 4096] [--rounds 2]

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
RANKS = Path(__file__).with_name("_contrastive_batch_ranks.py")
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(
    mode: str, contrastive: int, micro: int, steps: int, out: Path, impl: str = "gather"
) -> dict:
    """(max over ranks of the peak above baseline MiB, max of the median step seconds)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(RANKS),
        "--mode", mode, "--contrastive", str(contrastive), "--micro", str(micro),
        "--steps", str(steps), "--out", str(out), "--itc-impl", impl, "--tile", "1024",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} at {contrastive} failed:\n{proc.stderr[-3000:]}")
    records = json.loads(out.read_text())
    return {
        "mib": max(r["peak_above_mib"] for r in records),
        "s": max(r["step_s"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 512, micro-batch 32, one round")
    parser.add_argument("--contrastive", type=int, help="samples per step (default 4096)")
    parser.add_argument("--micro", type=int, help="step mode's micro-batch per rank (default 128)")
    parser.add_argument("--rounds", type=int, help="rounds of the three contenders (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run")
    parser.add_argument("--scan-only", action="store_true", help="only the memory scan")
    args = parser.parse_args()
    contrastive = args.contrastive or (512 if args.quick else 4096)
    micro = args.micro or (32 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)
    scan = [contrastive // 4, contrastive, contrastive * 4]
    if not args.quick:
        scan = [1024, 4096, 16384]
    contenders = {"plain": "micro", "step": "step", "step_again": "step"}
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="umt-contrastive-") as tmp:
        names = list(contenders)
        for r in range(0 if args.scan_only else rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                got = measure(
                    contenders[name], contrastive, micro, args.steps, Path(tmp) / "r.json"
                )
                results[name].append(got)
                print(
                    f"round {r + 1}/{rounds} {name:<11} {got['mib']:9.1f} MiB {got['s']:8.2f} s",
                    flush=True,
                )
        flat = {c: measure("step", c, micro, 1, Path(tmp) / "r.json", "ring") for c in scan}
        for c, got in flat.items():
            print(
                f"step mode, contrastive batch {c:>6}: {got['mib']:9.1f} MiB {got['s']:8.2f} s",
                flush=True,
            )

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name]) if results[name] else float("nan")

    print(f"\ncontrastive batch {contrastive} on {WORLD} ranks (ITC + ITM, tiny, 64 px, 32 tokens)")
    print(f"{'contender':<12} {'micro-batch':>11} {'grad_accum':>10} {'peak MiB':>9} {'s/step':>8}")
    for name in contenders:
        b = contrastive // WORLD if name == "plain" else micro
        accum = 1 if name == "plain" else contrastive // (WORLD * micro)
        print(f"{name:<12} {b:>11} {accum:>10} {med(name, 'mib'):>9.1f} {med(name, 's'):>8.2f}")
    print(f"\nstep mode, micro-batch {micro}, ring ITC: peak MiB by contrastive batch")
    for c, got in flat.items():
        print(f"{c:>8} {got['mib']:>9.1f}")
    mem = med("step", "mib") / med("plain", "mib")
    time_ratio = med("step", "s") / med("plain", "s")
    growth = flat[scan[-1]]["mib"] / flat[scan[0]]["mib"]
    print(
        "SUMMARY "
        f"contrastive={contrastive} micro={micro} step_mem_vs_plain={mem:.3f} "
        f"step_time_vs_plain={time_ratio:.2f} "
        f"step_again_vs_step={med('step_again', 's') / med('step', 's'):.2f} "
        f"step_mem_growth_{scan[0]}_to_{scan[-1]}={growth:.2f}"
    )


if __name__ == "__main__":
    main()
