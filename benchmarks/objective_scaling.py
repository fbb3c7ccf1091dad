"""Objective memory and traffic per rank at 2, 4 and 8 gloo ranks: UMT's fetch against BLIP's all-gather.

Each world size is one torchrun launch of `benchmarks/_objective_ranks.py` on a `tiny` model
(64 px images: 65 image tokens; 32 text tokens; local batch b fixed, so the global batch grows
with the world). Per rank and phase (ITC alone, ITC + ITM; forward + backward) it records the bytes
received through torch.distributed and the peak RSS above the RSS before the phase (glibc's mmap
threshold pinned at 64 KiB so freed tensors leave the RSS). ITM's share is full minus ITC.
Contenders share the model and the stacked fusion pass; only how the negatives travel differs:
- ours: `fetch_rows`, only the 2b chosen rows and their gradients;
- blip: all-gather (with grad) of every rank's text tokens, masks and image tokens.
Measured bytes are checked against the formulas of docs/scaling.md (printed beside them).

    python benchmarks/objective_scaling.py [--quick] [--worlds 2,4,8] [--batch 32]

With `--itc`: the contrastive loss alone (forward + backward) at `--world` gloo ranks, embed dim
512, local batch 1k -> 8k: peak memory of the loss and time for UMT's `gather`, `ring` and
`sigmoid`, and open_clip's `ClipLoss` / `SigLipLoss` from its wheel's own `loss.py` (fetched with
`pip download open_clip_torch` when it can be; else left out) (`benchmarks/_itc_ranks.py`).

    python benchmarks/objective_scaling.py --itc [--world 4] [--local 1024,2048,4096,8192]

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = REPO / "benchmarks" / "_objective_ranks.py"
TINY_WIDTH, TINY_EMBED = 64, 32
# --itc contenders in table order (`benchmarks/_itc_ranks.py`): ours, the noise floors, the peers.
CONTENDERS = ["gather", "gather_again", "ring", "sigmoid", "sigmoid_again", "sigmoid_logged",
              "open_clip", "open_clip_siglip"]  # fmt: skip  # the tiny preset's tower/fusion width and ITC embedding size


def predicted_bytes(w: int, b: int, t: int, n: int, d: int = TINY_WIDTH, e: int = TINY_EMBED):
    """Received bytes per rank per step (forward + backward, fp32 activations, int64 ids/masks).

    ITC: all-gather of image and text embeddings (b, E) with grad, their backward all-to-all,
    and the int64 image ids:                  4 (W-1) b E x 4 B + (W-1) b x 8 B
    ITM, all-gather: text + image tokens with grad, masks:
                                              (W-1) b [2 (T + N) D x 4 B + T x 8 B]
    ITM, fetch: 2b rows (and their gradients); a negative is remote with probability
    (W-1) b / (W b - 1) if drawn uniformly from the non-positives (hard ones deviate a little):
                                              (W-1) b / (W b - 1) x b [2 (T + N) D x 4 B + T x 8 B]
    (plus a few hundred bytes of counts, indices and the length all-reduce, not modelled).
    """
    itc = 4 * (w - 1) * b * e * 4 + (w - 1) * b * 8
    per_sample = 2 * (t + n) * d * 4 + t * 8
    return {
        "itc": itc,
        "itm_blip": (w - 1) * b * per_sample,
        "itm_ours": (w - 1) * b / (w * b - 1) * b * per_sample,
    }


# --- the scaling model of docs/scaling.md ------------------------------------------------------

H100_BF16_PEAK = 989e12
LINKS = {  # achieved bus bandwidth per GPU (bytes/s) and latency per ring step (s)
    "nvlink": (360e9, 3e-6),  # within a node of 8 H100 SXM (NVLink 4, 450 GB/s per direction)
    "ib": (40e9, 5e-6),  # across nodes: one 400 Gb/s NDR NIC per GPU, rail-optimised
}


def predict(preset: str, b: int, w: int, mfu: float, text_len: int = 40) -> dict:
    """Step time (s) by term for `preset` at local batch b on w GPUs (docs/scaling.md)."""
    import torch

    from umt.flops import StepShape, image_tokens, train_step_flops
    from umt.model import build_model, preset_config

    cfg = preset_config(preset)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg, log_table=False).parameters())
    t, n, d, e = text_len, image_tokens(cfg), cfg.fusion.hidden_size, cfg.embed_dim
    compute = train_step_flops(cfg, StepShape(b, t, w)) / (mfu * H100_BF16_PEAK)
    bw, alpha = LINKS["nvlink" if w <= 8 else "ib"]

    def ring(nbytes: float) -> float:  # all-gather / reduce-scatter of nbytes in total
        return 0.0 if w == 1 else (w - 1) / w * nbytes / bw + (w - 1) * alpha

    def all_to_all(nbytes: float) -> float:  # peers served concurrently
        return 0.0 if w == 1 else nbytes / bw + alpha + (w - 1) * 0.5e-6

    rho = 0.0 if w == 1 else (w - 1) * b / (w * b - 1)  # remote share of the negatives
    terms = {
        "compute": compute,
        "zero1_2": 2 * ring(2 * params),  # bf16 grads reduce-scattered + params all-gathered
        "zero3": 3 * ring(2 * params),  # + params all-gathered again for backward
        "itc": 4 * ring(w * b * e * 4),  # 2 tensors x (forward gather + backward), fp32
        # 9 all-to-alls forward (counts, indices, rows x 3 fetches) and 2 backward (token grads)
        "itm": all_to_all(rho * b * (2 * (t + n) * d * 2 + 8 * t)) + 10 * all_to_all(0),
        "itm_allgather": 2 * ring(w * b * (t + n) * d * 2) + ring(w * b * t * 8),
        "allgather_gib": w * b * (t + n) * d * 2 * 2 / 2**30,  # gathered tokens + their grads
        "params": params,
    }
    forward, backward = compute / 3, 2 * compute / 3
    for stage in ("zero1_2", "zero3"):  # ZeRO traffic overlaps backward; objectives do not
        step = forward + max(backward, terms[stage]) + terms["itc"] + terms["itm"]
        terms[f"step_{stage}"], terms[f"eff_{stage}"] = step, compute / step
    blip = forward + max(backward, terms["zero1_2"]) + terms["itc"] + terms["itm_allgather"]
    terms["eff_blip_zero1_2"] = compute / blip
    return terms


def print_predictions(mfu: float) -> None:
    print(
        f"predicted step on H100 SXM at a single-GPU MFU of {100 * mfu:.0f}% (bf16 peak 989 TF);"
        " NVLink 360 GB/s, 3 us within 8 GPUs; IB 40 GB/s per GPU, 5 us per ring step beyond"
    )
    print(
        f"{'model':<6}{'b':>4}{'W':>5}{'compute ms':>11}{'ZeRO-2 ms':>10}{'ZeRO-3 ms':>10}"
        f"{'ITC ms':>8}{'ITM ms':>8}{'step Z2':>9}{'eff Z2':>8}{'eff Z3':>8}"
        f"{'BLIP ITM ms':>12}{'BLIP GiB':>9}{'BLIP eff':>9}"
    )
    for preset, b in (("base", 64), ("large", 32)):
        for w in (1, 8, 64, 512):
            p = predict(preset, b, w, mfu)
            ms = {k: 1e3 * v for k, v in p.items()}
            print(
                f"{preset:<6}{b:>4}{w:>5}{ms['compute']:>11.1f}{ms['zero1_2']:>10.1f}"
                f"{ms['zero3']:>10.1f}{ms['itc']:>8.2f}{ms['itm']:>8.2f}{ms['step_zero1_2']:>9.1f}"
                f"{p['eff_zero1_2']:>8.2f}{p['eff_zero3']:>8.2f}{ms['itm_allgather']:>12.1f}"
                f"{p['allgather_gib']:>9.2f}{p['eff_blip_zero1_2']:>9.2f}"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(w: int, args, tmp: Path) -> dict:
    out = tmp / f"world{w}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={w}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(RANKS),
        f"--batch={args.batch}", f"--text-len={args.text_len}",
        f"--image-size={args.image_size}", f"--out={out}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{w} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def open_clip_loss_py(tmp: Path) -> Path | None:
    """open_clip's `loss.py`, from its wheel (it imports without torchvision), or None."""
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp),
         "open_clip_torch"],
        capture_output=True, text=True,
    )  # fmt: skip
    wheels = sorted(tmp.glob("open_clip_torch-*.whl"))
    if proc.returncode != 0 or not wheels:
        print(f"open_clip could not be downloaded: left out ({proc.stderr.strip()[-200:]})")
        return None
    path = tmp / "open_clip_loss.py"
    path.write_bytes(zipfile.ZipFile(wheels[-1]).read("open_clip/loss.py"))
    print(f"open_clip: {wheels[-1].name}")
    return path


def itc_main(args) -> int:
    """The contrastive loss alone: memory and time against the global batch."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="umt-itc-scaling-") as tmp:
        loss_py = None if args.no_open_clip else open_clip_loss_py(Path(tmp))
        out = Path(tmp) / "itc.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(REPO / "benchmarks" / "_itc_ranks.py"), f"--batches={args.local}",
            f"--dim={args.dim}", f"--tile={args.tile}", f"--out={out}",
            f"--repeats={args.repeats}", f"--gather-up-to={args.gather_up_to}",
            *([f"--only={args.only}"] if args.only else []),
            *([f"--open-clip-loss={loss_py}"] if loss_py else []),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        records = json.loads(out.read_text())
    table: dict = {}
    for r in records:
        row = table.setdefault((r["local"], r["contender"]), {"peak": 0, "seconds": 0, "loss": []})
        row["peak"] = max(row["peak"], r["peak_bytes"])
        row["seconds"] = max(row["seconds"], r["seconds"])
        row["loss"].append(r["loss"])
    contenders = sorted(
        {c for _, c in table},
        key=CONTENDERS.index,
    )
    print(
        f"loss forward + backward at {args.world} gloo ranks, dim {args.dim}, ring tile "
        f"{args.tile}; peak RSS above the start of a call of its own, mmap threshold pinned "
        f"(max over ranks); seconds (slowest rank, median of {args.repeats}, glibc's heap as "
        "in training)"
    )
    print(f"{'local':>6} {'global':>7} " + "".join(f"{c + ' MiB':>22}{'s':>7}" for c in contenders))
    locals_ = sorted({b for b, _ in table})
    for b in locals_:
        cells = "".join(
            f"{table[b, c]['peak'] / 2**20:>22.1f}{table[b, c]['seconds']:>7.2f}"
            if (b, c) in table
            else f"{'-':>22}{'-':>7}"  # left out: its logits would not fit
            for c in contenders
        )
        print(f"{b:>6} {b * args.world:>7} {cells}")
    for b in locals_:
        for a, c in (("gather", "open_clip"), ("sigmoid", "open_clip_siglip")):
            if (b, c) in table:
                diff = max(abs(x - y) for x, y in zip(table[b, a]["loss"], table[b, c]["loss"]))
                print(f"    local {b}: |loss {a} - loss {c}| = {diff:.1e}")
    lo, top = locals_[0], locals_[-1]
    base = "open_clip" if any(c == "open_clip" for _, c in table) else "gather"
    hi = max(b for b, c in table if c == base)  # the largest batch both ran

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")  # an RSS can stay flat at tiny sizes

    def peak(b: int, c: str) -> int:
        return table[b, c]["peak"]

    def secs(b: int, c: str) -> float:
        return table[b, c]["seconds"]

    ran = {c for _, c in table}
    summary = [f"world={args.world}", f"global={hi * args.world}"]
    if "ring" in ran:
        summary.append(f"ring_mem_vs_{base}={ratio(peak(hi, 'ring'), peak(hi, base)):.3f}")
    for name in ("ring", "sigmoid", "gather"):
        if name in ran and name != base:
            summary.append(f"{name}_time_vs_{base}={ratio(secs(hi, name), secs(hi, base)):.2f}")
    if "ring" in ran:
        summary.append(
            f"ring_mem_growth_{lo}_to_{top}={ratio(peak(top, 'ring'), peak(lo, 'ring')):.2f}"
        )
    summary.append(f"{base}_mem_growth_{lo}_to_{hi}={ratio(peak(hi, base), peak(lo, base)):.2f}")
    # The noise floors (a second copy of ours), and a step that logs its accuracies.
    for name, of in (("gather_again", "gather"), ("sigmoid_again", "sigmoid"),
                     ("sigmoid_logged", "sigmoid")):  # fmt: skip
        if (hi, name) in table and (hi, of) in table:
            summary.append(f"{name}_vs_{of}={ratio(secs(hi, name), secs(hi, of)):.2f}")
    if (hi, "open_clip_siglip") in table:
        summary.append(
            "sigmoid_time_vs_open_clip_siglip="
            f"{ratio(secs(hi, 'sigmoid'), secs(hi, 'open_clip_siglip')):.2f}"
        )
    print(f"{time.perf_counter() - start:.0f} s, load average {os.getloadavg()}")
    print("SUMMARY " + " ".join(summary))
    return 0


def summarise(result: dict) -> dict:
    """Mean over ranks (bytes) and max over ranks (memory) per contender and phase."""
    out: dict = {}
    for contender in ("ours", "blip"):
        rows = {
            phase: [
                r for r in result["records"] if r["contender"] == contender and r["phase"] == phase
            ]
            for phase in ("itc", "full")
        }
        itc_bytes = statistics.mean(r["received_bytes"] for r in rows["itc"])
        full_bytes = statistics.mean(r["received_bytes"] for r in rows["full"])
        itm_mem = [
            f["peak_bytes"] - i["peak_bytes"]
            for i, f in zip(
                sorted(rows["itc"], key=lambda r: r["rank"]),
                sorted(rows["full"], key=lambda r: r["rank"]),
            )
        ]
        out[contender] = {
            "itc_bytes": itc_bytes,
            "itm_bytes": full_bytes - itc_bytes,
            "peak_itc": max(r["peak_bytes"] for r in rows["itc"]),
            "peak_full": max(r["peak_bytes"] for r in rows["full"]),
            "itm_mem": statistics.median(itm_mem),
            "loss": rows["full"][0]["loss"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="b=16, T=16: under two minutes")
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--batch", type=int, help="local batch b per rank (32; 16 with --quick)")
    parser.add_argument("--text-len", type=int, help="text tokens (32; 16 with --quick)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--predict", action="store_true", help="print the docs/scaling.md predictions and exit"
    )
    parser.add_argument("--mfu", type=float, default=0.40, help="single-GPU MFU for --predict")
    parser.add_argument("--itc", action="store_true", help="the contrastive loss alone")
    parser.add_argument("--world", type=int, default=4, help="ranks for --itc")
    parser.add_argument("--local", default="1024,2048,4096,8192", help="local batches for --itc")
    parser.add_argument("--dim", type=int, default=512, help="embedding width for --itc")
    parser.add_argument("--tile", type=int, default=1024, help="ring tile for --itc")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after a warm-up")
    parser.add_argument("--no-open-clip", action="store_true", help="--itc without open_clip")
    parser.add_argument(
        "--only", default="", help="--itc: comma-separated contenders (default: all of them)"
    )
    parser.add_argument(
        "--gather-up-to",
        type=int,
        default=4096,
        help="--itc: larger local batches run only the contenders without (b, W*b) logits "
        "(gather and ClipLoss need ~6 GiB per rank at local 8192, world 4)",
    )
    args = parser.parse_args(argv)
    if args.itc:
        return itc_main(args)
    if args.predict:
        print_predictions(args.mfu)
        return 0
    args.batch = args.batch or (16 if args.quick else 32)
    args.text_len = args.text_len or (16 if args.quick else 32)
    worlds = [int(w) for w in args.worlds.split(",")]
    n_tokens = (args.image_size // 8) ** 2 + 1  # tiny: patch 8
    start = time.perf_counter()
    print(
        f"tiny model, b={args.batch} per rank, T={args.text_len} text + N={n_tokens} image tokens,"
        f" width {TINY_WIDTH}, fp32; load {os.getloadavg()}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="umt-objective-scaling-") as tmp:
        for w in worlds:
            results[w] = summarise(run_world(w, args, Path(tmp)))
    mib, kib = 2**20, 2**10
    print(
        "bytes received per rank per step (mean over ranks; predicted by docs/scaling.md) and\n"
        "peak RSS per rank above the RSS before the step (max over ranks; ITM = full - ITC)"
    )
    print(
        f"{'W':>3} {'contender':<9}{'ITC KiB':>9}{'pred':>8}{'ITM KiB':>10}{'pred':>9}"
        f"{'peak ITC MiB':>14}{'peak full MiB':>15}{'ITM MiB':>9}"
    )
    for w, r in results.items():
        pred = predicted_bytes(w, args.batch, args.text_len, n_tokens)
        for contender in ("ours", "blip"):
            c = r[contender]
            print(
                f"{w:>3} {contender:<9}{c['itc_bytes'] / kib:>9.1f}{pred['itc'] / kib:>8.1f}"
                f"{c['itm_bytes'] / kib:>10.1f}{pred['itm_' + contender] / kib:>9.1f}"
                f"{c['peak_itc'] / mib:>14.1f}{c['peak_full'] / mib:>15.1f}"
                f"{c['itm_mem'] / mib:>9.1f}"
            )
        dloss = abs(r["ours"]["loss"] - r["blip"]["loss"])
        print(f"    |loss ours - loss blip| = {dloss:.1e} (same negatives, same work)")
    lo, hi = worlds[0], worlds[-1]
    summary = [f"batch={args.batch}", f"worlds={args.worlds}"]
    for w, r in results.items():
        ours, blip = r["ours"], r["blip"]
        summary += [
            f"w{w}_itm_bytes_ratio={blip['itm_bytes'] / max(ours['itm_bytes'], 1):.2f}",
            f"w{w}_itm_mem_ratio={blip['itm_mem'] / max(ours['itm_mem'], 1):.2f}",
        ]
    for contender in ("ours", "blip"):
        growth = results[hi][contender]["itm_bytes"] / max(results[lo][contender]["itm_bytes"], 1)
        mem = results[hi][contender]["itm_mem"] / max(results[lo][contender]["itm_mem"], 1)
        summary += [
            f"{contender}_itm_bytes_growth_w{lo}_to_w{hi}={growth:.2f}",
            f"{contender}_itm_mem_growth_w{lo}_to_w{hi}={mem:.2f}",
        ]
    worst = max(
        abs(r[c][k] / p - 1)
        for w, r in results.items()
        for c, k, p in (
            ("ours", "itc_bytes", predicted_bytes(w, args.batch, args.text_len, n_tokens)["itc"]),
            (
                "blip",
                "itm_bytes",
                predicted_bytes(w, args.batch, args.text_len, n_tokens)["itm_blip"],
            ),  # fmt: skip
        )
    )
    summary.append(f"max_formula_error={worst:.3f}")
    print(f"load average at the end: {os.getloadavg()}; {time.perf_counter() - start:.0f} s")
    print("SUMMARY " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
