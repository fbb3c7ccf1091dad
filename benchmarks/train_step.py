"""Training-step throughput, memory and MFU: UMT's step against the common design, one run, fp32 CPU.

A step is forward + backward + gradient clipping + AdamW over all objectives (ITC, ITM on hard
negatives, MLM) on one rank. Contenders start from the same weights and see the same batch and
seeds, so their first losses agree to float rounding (printed as a check):
- ours: `UnifiedMultimodalTransformer.forward` (SDPA everywhere, fused QKV, one stacked fusion
  pass over positives and both negatives, text trimmed to the longest caption by the loader);
- baseline: `benchmarks/_baseline.py` (eager attention, separate Q/K/V, three fusion passes,
  negatives by all-gather; in one process the gather moves nothing, see objective_scaling.py);
- ablations (on `small`): each of our choices undone alone, plus activation checkpointing and
  bf16 autocast;
- with --compile, on every preset: `compiled`, ours with `model.compile` (each transformer block
  of the towers and the fusion compiled by inductor, `umt.model.training.compile_blocks`); its
  first step (the compile) is reported apart (SUMMARY `*_compiled_first_step_s`) and its step
  time against ours as `*_compiled_time_ratio` (below 1: compiled is faster).
Every contender first runs `--warmup` untimed rounds; then steps run in rounds that interleave
the contenders (order rotated each round), so load from other processes hits all alike. The median step and its min-max are reported (SUMMARY: `*_spread`, (max - min)
/ median), and `ours_again` (a second copy of ours) shows the noise floor: its ratio to ours
should sit within a few percent of 1. Each step's CPU seconds of this process (`cpu s`, `cpu x`,
SUMMARY `*_cpu_*`) are reported beside the wall time: on a machine shared with other work the
wall time includes time spent waiting for a core, the CPU time much less so. Memory: the step's peak RSS above the resident RSS before it
(VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold is pinned at 64 KiB so freed
tensors leave the RSS), plus the bytes autograd saves for backward (deterministic). MFU: the
analytic FLOPs of `umt.flops` over the step time, divided by the fp32 matmul peak of this machine
measured in the same process before and after each preset's rounds.

    python benchmarks/train_step.py [--quick] [--presets tiny,small] [--compile]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # must be set before the allocator starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _baseline import configure, reference_losses  # noqa: E402

from umt.flops import FORMULA, StepShape, forward_flops, train_step_flops  # noqa: E402
from umt.model import build_model, preset_config  # noqa: E402
from umt.model.training import compile_blocks  # noqa: E402
from umt.objectives import ObjectiveConfig  # noqa: E402

OBJECTIVES = ObjectiveConfig(itc_weight=1.0, itm_weight=1.0, mlm_weight=1.0)


# --- memory --------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark; returns the resident bytes now."""
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


@contextlib.contextmanager
def saved_bytes_counter(model: torch.nn.Module, out: dict):
    """Count the bytes autograd saves for backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["saved_bytes"] = sum(storages.values())


# --- the batch and the contenders --------------------------------------------------------------


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (b, 3, S, S)
    input_ids: torch.Tensor  # (b, T)
    attention_mask: torch.Tensor  # (b, T)
    image_ids: torch.Tensor  # (b,)


def make_batch(cfg, b: int, max_len: int, seed: int) -> tuple[Batch, Batch]:
    """Caption-like lengths (8 .. 3/4 of max_len tokens): (trimmed to the longest, padded to max_len)."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.image.image_size
    pixels = torch.randn(b, 3, size, size, generator=g)
    lengths = torch.randint(8, max(9, 3 * max_len // 4) + 1, (b,), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, cfg.text.vocab_size, (b, max_len), generator=g) * mask
    longest = int(lengths.max())
    padded = Batch(pixels, ids, mask, torch.arange(b))
    trimmed = Batch(pixels, ids[:, :longest].clone(), mask[:, :longest].clone(), torch.arange(b))
    return trimmed, padded


def ours_loss(model, batch: Batch, seed: int):
    return model(
        batch.pixel_values,
        batch.input_ids,
        batch.attention_mask,
        batch.image_ids,
        seed=seed,
        objectives=OBJECTIVES,
    )


def reference_loss(*, all_gather: bool, stacked: bool):
    def loss(model, batch: Batch, seed: int):
        return reference_losses(
            model,
            batch.pixel_values,
            batch.input_ids,
            batch.attention_mask,
            batch.image_ids,
            OBJECTIVES,
            seed,
            all_gather=all_gather,
            stacked=stacked,
        )

    return loss


@dataclass
class Contender:
    name: str
    what: str
    model: torch.nn.Module
    loss_fn: object
    batch: Batch
    bf16: bool = False
    max_rounds: int = 1 << 30  # bf16 on a CPU without bf16 matmuls: one timed step is plenty
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds per step
    phases: list[tuple[float, float, float]] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    saved_bytes: int = 0
    first_loss: float = float("nan")
    first_step_s: float = float("nan")  # the warm-up step: with compiled blocks, the compile

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6
        )

    def step(self, seed: int, record: bool = True) -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        rss = reset_peak_rss()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        with autocast:
            out = self.loss_fn(self.model, self.batch, seed)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if record:
            self.times.append(t3 - t0)
            self.cpu_times.append(time.process_time() - cpu0)
            self.phases.append((t1 - t0, t2 - t1, t3 - t2))
            self.peaks.append(_status_bytes("VmHWM") - rss)
        return float(out.loss)

    def warmup(self, seed: int) -> None:
        """One untimed step: allocates optimizer state, counts saved bytes, records the loss."""
        counted: dict = {}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        t0 = time.perf_counter()
        with saved_bytes_counter(self.model, counted), autocast:
            out = self.loss_fn(self.model, self.batch, seed)
        self.first_loss = float(out.loss)
        self.saved_bytes = counted["saved_bytes"]
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.first_step_s = time.perf_counter() - t0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def peak(self) -> int:
        return max(self.peaks)


def contenders_for(
    preset: str,
    b: int,
    max_len: int,
    ablations: bool,
    compiled: bool = False,
    bf16: bool = True,
) -> tuple[list[Contender], object, Batch]:
    cfg = preset_config(preset)
    cfg.mlm = True
    torch.manual_seed(0)
    model = build_model(cfg, log_table=False)
    trimmed, padded = make_batch(cfg, b, max_len, seed=1)
    copy = configure  # a deep copy: same weights, chosen attention
    out = [
        Contender(
            "ours", "SDPA, fused QKV, stacked fusion, trimmed", copy(model), ours_loss, trimmed
        ),
        Contender(
            "baseline",
            "eager, separate QKV, 3 fusion passes, all-gather",
            copy(model, sdpa=False, fused_qkv=False),
            reference_loss(all_gather=True, stacked=False),
            trimmed,
        ),
    ]
    if compiled:
        model_compiled = copy(model)
        compile_blocks(model_compiled)
        what = "model.compile: every transformer block compiled"
        out.append(Contender("compiled", what, model_compiled, ours_loss, trimmed))
    if not ablations:
        return out, cfg, trimmed
    ckpt = copy(model)
    ckpt.fusion.activation_checkpointing = True
    three_passes = reference_loss(all_gather=False, stacked=False)
    out += [
        Contender("ours_again", "a second copy of ours: the noise floor", copy(model), ours_loss, trimmed),
        Contender("eager_attention", "towers + fusion eager", copy(model, sdpa=False), ours_loss, trimmed),
        Contender("separate_qkv", "fusion Q, K, V apart", copy(model, fused_qkv=False), ours_loss, trimmed),
        Contender("three_fusion_passes", "positives, neg texts, neg images apart", copy(model), three_passes, trimmed),
        Contender("padded_text", f"text padded to {max_len}", copy(model), ours_loss, padded),
        Contender("act_checkpointing", "fusion blocks recomputed", ckpt, ours_loss, trimmed),
    ]  # fmt: skip
    if bf16:
        bf16_model = copy(model)
        out.append(Contender("bf16_autocast", "CPU autocast bf16 (1 timed step)", bf16_model, ours_loss, trimmed, bf16=True, max_rounds=1))  # fmt: skip
    return out, cfg, trimmed


# --- machine peak and profile ------------------------------------------------------------------


def matmul_peak_flops(n: int = 1536, repeats: int = 4) -> float:
    """fp32 FLOP/s of the best of `repeats` n x n matmuls with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


CATEGORIES = [
    (
        "matmul",
        ("addmm", "aten::mm", "bmm", "baddbmm", "addbmm", "convolution", "aten::linear_backward"),
    ),  # fmt: skip
    ("attention kernels", ("scaled_dot_product", "flash_attention")),
    ("softmax / CE", ("softmax", "nll_loss", "cross_entropy")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("embedding / index", ("embedding", "index_select", "index", "gather", "scatter")),
    ("copy / cat / pad", ("copy_", "cat", "clone", "contiguous", "pad", "to_copy", "transpose")),
    (
        "elementwise / reduce",
        (
            "add",
            "mul",
            "div",
            "sub",
            "sum",
            "mean",
            "fill",
            "zero",
            "where",
            "masked",
            "exp",
            "log",
            "neg",
            "clamp",
        ),
    ),  # fmt: skip
]


def profile_step(contender: Contender, seed: int) -> list[tuple[str, float]]:
    """Self CPU ms by op category over forward + backward (the optimizer is timed apart)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = contender.loss_fn(contender.model, contender.batch, seed)
        out.loss.backward()
    contender.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        label = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[label] = totals.get(label, 0.0) + event.self_cpu_time_total / 1e3
    return sorted(totals.items(), key=lambda kv: -kv[1])


# --- the run -------------------------------------------------------------------------------------


def spread(times: list[float]) -> float:
    """(max - min) / median of a contender's timed steps."""
    return (max(times) - min(times)) / statistics.median(times)


def round_order(contenders: list[Contender], r: int) -> list[Contender]:
    """Round r's order, rotated by r: each contender runs first once every len(contenders) rounds."""
    k = r % len(contenders)
    return contenders[k:] + contenders[:k]


def run_preset(preset: str, args, ablations: bool, peaks: list[float]) -> dict:
    contenders, cfg, batch = contenders_for(
        preset, args.batch, args.text_len, ablations, args.compile, bf16=not args.quick
    )
    text_len = batch.input_ids.shape[1]
    mlm_tokens = None  # expected count; the real one varies by a few tokens per seed
    shape = StepShape(args.batch, text_len, itm=True, mlm=True, mlm_tokens=mlm_tokens)
    flops = train_step_flops(cfg, shape)
    # Warm-up rounds, interleaved as the timed ones: the first step allocates the optimizer
    # state and counts saved bytes; the next ones run in the steady state the timed ones see.
    for w in range(args.warmup):
        for c in round_order(contenders, w):
            if w == 0:
                c.warmup(seed=0)
            elif c.max_rounds > 1:
                c.step(seed=0, record=False)
    # The machine's peak is measured before and after the rounds, not between them: the step
    # right after a large matmul ran slower (in CPU time too), and whoever came first paid it.
    peaks.append(matmul_peak_flops())
    for r in range(args.rounds):
        for c in round_order(contenders, r):
            if len(c.times) < c.max_rounds:
                c.step(seed=r + 1)
    peaks.append(matmul_peak_flops())
    peak = statistics.median(peaks)
    ours, base = contenders[0], contenders[1]
    print(
        f"\n== {preset}: batch {args.batch}, text {text_len} (longest caption; max {args.text_len}),"
        f" image {cfg.image.image_size}px, {args.rounds} rounds, median step"
    )
    print(
        f"{'contender':<20}{'samples/s':>10}{'step s':>8}{'min-max s':>12}{'cpu s':>7}"
        f"{'fwd/bwd/opt s':>17}{'x ours':>8}{'cpu x':>7}"
        f"{'peak MiB':>10}{'saved MiB':>10}{'MFU %':>7}{'|dloss|':>9}  what"
    )
    for c in contenders:
        fwd, bwd, opt = (statistics.median(p[i] for p in c.phases) for i in range(3))
        print(
            f"{c.name:<20}{args.batch / c.median_s:>10.1f}{c.median_s:>8.3f}"
            f"{min(c.times):>6.2f}-{max(c.times):.2f}{c.median_cpu_s:>7.3f}"
            f"{fwd:>7.2f}/{bwd:.2f}/{opt:.2f}{c.median_s / ours.median_s:>8.2f}"
            f"{c.median_cpu_s / ours.median_cpu_s:>7.2f}"
            f"{c.peak / 2**20:>10.0f}{c.saved_bytes / 2**20:>10.1f}"
            f"{100 * flops / c.median_s / peak:>7.1f}{abs(c.first_loss - ours.first_loss):>9.1e}"
            f"  {c.what}"
        )
    params = sum(p.numel() for p in ours.model.parameters())
    resident = 16 * params  # fp32 weights + grads + AdamW's two moments
    parts = forward_flops(cfg, shape)
    print(
        f"step FLOPs {flops / 1e9:.2f} G (forward by part, G: "
        + ", ".join(f"{k} {3 * v / 1e9:.2f}" for k, v in parts.items() if v)
        + f"); matmul peak {peak / 1e9:.1f} GFLOP/s (median of {len(peaks)})"
    )
    print(
        "|dloss|: first loss against ours (same weights, batch, seeds); padded_text draws its MLM"
        " mask over the padded shape and bf16 rounds, so those two differ by more than rounding"
    )
    print(
        f"memory: 'peak' = step's RSS high-water mark above the RSS before it; model + AdamW "
        f"state resident besides: {params / 1e6:.1f} M params x 16 B = {resident / 2**20:.0f} MiB"
    )
    result = {
        "preset": preset,
        "ours": ours,
        "base": base,
        "flops": flops,
        "peak": peak,
        "contenders": contenders,
        "resident": resident,
    }
    if args.profile:
        table = profile_step(ours, seed=99)
        total = sum(ms for _, ms in table)
        fwd, bwd, opt = (statistics.median(p[i] for p in ours.phases) for i in range(3))
        print(
            f"where ours' step goes ({preset}, profiler self CPU time of forward + backward; "
            f"the optimizer + clipping take {100 * opt / ours.median_s:.0f}% of the step apart):"
        )
        for label, ms in table:
            print(f"  {label:<22}{ms:>9.1f} ms {100 * ms / total:>5.1f}%")
        matmul_ms = dict(table).get("matmul", 0.0) + dict(table).get("attention kernels", 0.0)
        result["matmul_share"] = matmul_ms / total
        # Counted FLOPs over the time spent in matmul kernels alone: how fast the GEMMs run.
        result["matmul_efficiency"] = flops / (matmul_ms / 1e3) / peak
        print(
            f"  counted FLOPs / matmul-kernel time = {100 * result['matmul_efficiency']:.0f}% of "
            f"peak; non-matmul ops take {100 * (1 - result['matmul_share']):.0f}% of fwd+bwd"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5 rounds, batch 16, no bf16 (12x slower on CPUs without bf16 matmuls): ~3 min",
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--ablate", default="small", help="preset for the ablations ('' none)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (16 with --quick)")
    parser.add_argument("--text-len", type=int, default=32, help="max_text_len (padded)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 quick, 7 full")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed rounds before the timed ones (>= 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, OpenMP threads stall on barriers "
        "whenever another process holds one of their cores)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also ours with model.compile (inductor) on every preset; its first step compiles",
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 7)
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (got {args.warmup})")
    args.batch = args.batch or (16 if args.quick else 32)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, load {os.getloadavg()}")
    print(FORMULA)
    peaks: list[float] = []
    results = []
    for preset in args.presets.split(","):
        results.append(run_preset(preset, args, preset == args.ablate, peaks))
    print(f"load average at the end: {os.getloadavg()}")

    summary = [f"batch={args.batch}", f"rounds={args.rounds}", f"threads={args.threads}"]
    for r in results:
        p, ours, base = r["preset"], r["ours"], r["base"]
        summary += [
            f"{p}_ours_sps={args.batch / ours.median_s:.1f}",
            f"{p}_baseline_sps={args.batch / base.median_s:.1f}",
            f"{p}_speedup={base.median_s / ours.median_s:.2f}",
            f"{p}_cpu_speedup={base.median_cpu_s / ours.median_cpu_s:.2f}",
            f"{p}_ours_spread={spread(ours.times):.3f}",
            f"{p}_baseline_spread={spread(base.times):.3f}",
            f"{p}_peak_mem_ratio={base.peak / max(ours.peak, 1):.2f}",
            f"{p}_saved_mem_ratio={base.saved_bytes / max(ours.saved_bytes, 1):.2f}",
            f"{p}_mfu={r['flops'] / ours.median_s / r['peak']:.3f}",
            f"{p}_baseline_mfu={r['flops'] / base.median_s / r['peak']:.3f}",
        ]
        if "matmul_share" in r:
            summary.append(f"{p}_matmul_time_share={r['matmul_share']:.2f}")
            summary.append(f"{p}_matmul_kernel_efficiency={r['matmul_efficiency']:.2f}")
        for c in r["contenders"][2:]:
            summary.append(f"{p}_{c.name}_time_ratio={c.median_s / ours.median_s:.2f}")
            summary.append(f"{p}_{c.name}_cpu_ratio={c.median_cpu_s / ours.median_cpu_s:.2f}")
        for c in r["contenders"]:
            if c.name == "compiled":
                summary.append(f"{p}_compiled_sps={args.batch / c.median_s:.1f}")
                summary.append(f"{p}_compiled_first_step_s={c.first_step_s:.1f}")
            if c.name == "act_checkpointing":
                summary.append(
                    f"{p}_act_ckpt_saved_mem_ratio={c.saved_bytes / ours.saved_bytes:.2f}"
                )
    summary.append(f"matmul_peak_gflops={statistics.median(peaks) / 1e9:.1f}")
    print("SUMMARY " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
