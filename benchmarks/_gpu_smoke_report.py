"""The table of `benchmarks/gpu_smoke.sh`: samples/s, MFU, peak memory, data wait, host syncs per
run; the `umt eval` and resume figures below it.

Reads each run's TensorBoard scalars and resolved config.yaml; the first logged window (start-up,
allocator warm-up, cuDNN/kernel selection) is left out. MFU is the logged `throughput/mfu` where
the trainer knew the GPU's peak (at the text length fed), else computed here at max_text_len
against the data-sheet bf16 peak, or, on CPU, against an fp32 matmul measured now. Host syncs
per step are logged by runs started with UMT_SYNC_DEBUG=1 on a GPU.

    python benchmarks/_gpu_smoke_report.py RUN_DIR [RUN_DIR ...] [--eval REPORT.json
        --eval-seconds S] [--resume-seconds S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umt.config import load_config  # noqa: E402
from umt.flops import StepShape, gpu_peak_flops, train_step_flops  # noqa: E402


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def after_warmup(values: list[tuple[int, float]]) -> list[float]:
    values = sorted(values)
    return [v for _, v in (values[1:] if len(values) > 1 else values)]


def cpu_matmul_peak(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def report(run: Path) -> dict:
    cfg = load_config(run / "config.yaml")
    s = scalars(run)
    mean = lambda tag: statistics.mean(after_warmup(s[tag])) if tag in s else float("nan")  # noqa: E731
    per_rank = mean("throughput/samples_per_s_per_rank")
    gpu = torch.cuda.is_available()
    if "throughput/mfu" in s:
        mfu, peak_from = mean("throughput/mfu"), "logged by the trainer"
    else:
        t, o = cfg.train, cfg.objectives
        world = round(mean("throughput/samples_per_s") / per_rank) if per_rank else 1
        shape = StepShape(
            t.micro_batch_size,
            cfg.data.train.max_text_len,
            world,
            itm=o.itm_weight > 0,
            mlm=o.mlm_weight > 0,
        )
        flops = train_step_flops(cfg.model, shape) / t.micro_batch_size
        peak = gpu_peak_flops(torch.cuda.get_device_name()) if gpu else cpu_matmul_peak()
        peak_from = "bf16 data sheet" if gpu else f"fp32 matmul measured {peak / 1e9:.0f} GFLOP/s"
        mfu = per_rank * flops / peak if peak else float("nan")
    memory_tag = (
        "memory/allocated_peak_gib" if "memory/allocated_peak_gib" in s else "memory/rss_peak_gib"
    )
    return {
        "run": run.name.removeprefix("run-"),
        "samples_per_s": mean("throughput/samples_per_s"),
        "samples_per_s_per_rank": per_rank,
        "mfu": mfu,
        "peak_memory_gib": max(v for _, v in s.get(memory_tag, [(0, float("nan"))])),
        "memory_kind": "CUDA allocated" if memory_tag.endswith("allocated_peak_gib") else "RSS",
        "data_wait": mean("time/data_wait_fraction"),
        "step_s": mean("time/step_s"),
        "mfu_peak": peak_from,
        "loss": sorted(s.get("loss/total", [(0, float("nan"))]))[-1][1],
        "host_syncs": mean("debug/host_syncs_per_step"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--eval", help="the JSON report of `umt eval`")
    parser.add_argument("--eval-seconds", type=float)
    parser.add_argument("--resume-seconds", type=float)
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (shrunk mode)"
    rows = [report(Path(r)) for r in args.runs]
    print(f"device: {device}")
    print(
        f"{'run':<12}{'samples/s':>11}{'per rank':>10}{'MFU %':>8}{'peak GiB':>10}"
        f"{'data wait':>11}{'step s':>8}{'syncs':>7}{'loss':>8}  memory / MFU peak"
    )
    for r in rows:
        syncs = "-" if r["host_syncs"] != r["host_syncs"] else f"{r['host_syncs']:.1f}"
        print(
            f"{r['run']:<12}{r['samples_per_s']:>11.1f}{r['samples_per_s_per_rank']:>10.1f}"
            f"{100 * r['mfu']:>8.1f}{r['peak_memory_gib']:>10.2f}{100 * r['data_wait']:>10.1f}%"
            f"{r['step_s']:>8.3f}{syncs:>7}{r['loss']:>8.3f}  {r['memory_kind']} / {r['mfu_peak']}"
        )
    summary = [f"device={device.replace(' ', '_')}"]
    for r in rows:
        summary += [
            f"{r['run']}_samples_per_s={r['samples_per_s']:.1f}",
            f"{r['run']}_mfu={r['mfu']:.3f}",
            f"{r['run']}_peak_gib={r['peak_memory_gib']:.2f}",
            f"{r['run']}_data_wait={r['data_wait']:.3f}",
        ]
        if r["host_syncs"] == r["host_syncs"]:
            summary.append(f"{r['run']}_host_syncs_per_step={r['host_syncs']:.1f}")
    by_name = {r["run"]: r for r in rows}
    if "synthetic" in by_name and "shards" in by_name and by_name["synthetic"]["samples_per_s"]:
        ratio = by_name["shards"]["samples_per_s"] / by_name["synthetic"]["samples_per_s"]
        summary.append(f"shards_vs_synthetic={ratio:.2f}")
    if "compiled" in by_name and by_name.get("synthetic", {}).get("samples_per_s"):
        ratio = by_name["compiled"]["samples_per_s"] / by_name["synthetic"]["samples_per_s"]
        summary.append(f"compiled_vs_eager={ratio:.2f}")  # > 1: compiled steps are faster
    if args.eval:
        ev = json.loads(Path(args.eval).read_text())
        itm = ev.get("itm", {})
        print(
            f"umt eval: {ev['images']} images, {ev['texts']} texts in {args.eval_seconds} s; "
            f"ITC R@1 {ev['itc']['i2t_r1']:.1f}/{ev['itc']['t2i_r1']:.1f}, "
            f"ITM re-ranked R@1 {itm.get('i2t_r1', float('nan')):.1f}/"
            f"{itm.get('t2i_r1', float('nan')):.1f} (chance {ev['chance']['i2t_r1']:.1f})"
        )
        summary += [
            f"eval_seconds={args.eval_seconds}",
            f"eval_itc_i2t_r1={ev['itc']['i2t_r1']:.2f}",
        ]
    if args.resume_seconds is not None:
        print(f"resume: checkpoint loaded and steps trained in {args.resume_seconds} s")
        summary.append(f"resume_seconds={args.resume_seconds}")
    print("SUMMARY " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
