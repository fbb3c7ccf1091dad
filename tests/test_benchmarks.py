"""Benchmarks stay runnable: each quick mode ends with its SUMMARY line; the FLOP count is right."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from umt.flops import StepShape, forward_flops, layer_flops, train_step_flops
from umt.model import build_model, preset_config
from umt.objectives import ObjectiveConfig, mix_seed
from umt.objectives.mlm import IGNORE, mask_tokens


def run(*cmd: str, timeout_s: int = 300, env: dict | None = None) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def summary(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"no SUMMARY line in:\n{stdout[-3000:]}"
    assert stdout.rstrip().splitlines()[-1] == lines[-1] or "gpu_smoke: finished" in stdout
    return dict(pair.split("=", 1) for pair in lines[-1].split()[1:])


def test_layer_flops_match_a_hand_count():
    # One fusion layer of `tiny` (D=64, F=256) on 10 text + 17 image tokens.
    length, d, f = 27, 64, 256
    qkv = 2 * length * d * (3 * d)
    out = 2 * length * d * d
    mlp = 2 * length * d * f + 2 * length * f * d
    scores, weighted = 2 * length * length * d, 2 * length * length * d
    assert layer_flops(length, d, f) == qkv + out + mlp + scores + weighted == 2_840_832


def test_step_flops_of_tiny_match_a_hand_count():
    cfg = preset_config("tiny")  # text/image/fusion width 64, MLP 128/128/256, 2 layers each
    b, t, n, e, v = 2, 6, 17, 32, 30522
    text = b * 2 * layer_flops(t, 64, 128)
    image = b * (2 * 16 * (3 * 8 * 8) * 64 + 2 * layer_flops(n, 64, 128))
    itc = 2 * b * (64 + 64) * e + 4 * b * (3 * b) * e  # world of 3
    itm = 3 * b * (2 * layer_flops(t + n, 64, 256) + 2 * 64 * 2)
    mlm = (
        text + 2 * b * 64 * e + b * 2 * layer_flops(t + n, 64, 256) + 5 * (2 * 64 * 64 + 2 * 64 * v)
    )
    shape = StepShape(b, t, world_size=3, mlm=True, mlm_tokens=5)
    assert train_step_flops(cfg, shape) == pytest.approx(3 * (text + image + itc + itm + mlm))


@pytest.mark.parametrize("fusion", ["single_stream", "multiway"])
def test_forward_flops_equal_torch_flop_counter_on_tiny(fusion):
    """The formula against torch's own matmul count of a real forward (math attention); the
    multiway model with ITC from its one-modality passes and a vision-language top block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset_config("tiny")
    cfg.mlm = True
    if fusion == "multiway":
        cfg.fusion.type, cfg.fusion.vl_expert_layers, cfg.itc_from = "multiway", 1, "fusion"
    torch.manual_seed(0)
    model = build_model(cfg, log_table=False)
    b, t, seed = 4, 10, 3
    ids = torch.randint(5, 1000, (b, t))
    mask = torch.ones_like(ids)
    pixels = torch.randn(b, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixels, ids, mask, None, seed=seed, objectives=ObjectiveConfig(mlm_weight=1.0))
    # The masked-token count the objective drew: replay its generator (the negatives' noise is
    # hashed, it draws nothing from it).
    g = torch.Generator(pixels.device).manual_seed(mix_seed(seed, 0))
    _, labels = mask_tokens(ids, mask, cfg.text.mask_token_id, cfg.text.vocab_size, g)
    shape = StepShape(b, t, mlm=True, mlm_tokens=int((labels != IGNORE).sum()))
    assert counter.get_total_flops() == pytest.approx(sum(forward_flops(cfg, shape).values()))


@pytest.mark.slow
def test_train_step_quick_prints_summary():
    out = run(
        sys.executable, "benchmarks/train_step.py", "--quick", "--presets", "tiny",
        "--ablate", "tiny", "--batch", "4", "--rounds", "1", "--warmup", "1", "--no-profile",
    )  # fmt: skip
    values = summary(out)
    assert float(values["tiny_ours_spread"]) >= 0 and float(values["tiny_cpu_speedup"]) > 0
    assert "tiny_ours_again_time_ratio" in values and "tiny_ours_again_cpu_ratio" in values
    assert float(values["tiny_speedup"]) > 0 and float(values["tiny_mfu"]) > 0
    assert "tiny_three_fusion_passes_time_ratio" in values
    losses = re.findall(r"^(\w+)\s.*\s(\d\.\de[+-]\d\d)\s", out, re.M)
    assert losses and all(
        float(d) < 1e-4 for name, d in losses if name not in ("bf16_autocast", "padded_text")
    )


@pytest.mark.slow
def test_objective_scaling_quick_prints_summary_and_matches_formulas():
    out = run(
        sys.executable, "benchmarks/objective_scaling.py", "--quick", "--worlds", "2",
        "--batch", "4", "--text-len", "8", "--image-size", "32",
    )  # fmt: skip
    values = summary(out)
    assert float(values["max_formula_error"]) < 1e-3
    assert float(values["w2_itm_bytes_ratio"]) > 1


@pytest.mark.slow
def test_objective_scaling_itc_mode_compares_gather_ring_and_sigmoid():
    out = run(
        sys.executable, "benchmarks/objective_scaling.py", "--itc", "--world", "2",
        "--local", "64,256", "--dim", "32", "--tile", "32", "--gather-up-to", "64",
        "--no-open-clip",
    )  # fmt: skip
    values = summary(out)  # tiny sizes: the RSS may not move, a ratio may be nan
    assert values["global"] == "128" and "ring_mem_vs_gather" in values
    assert "ring_mem_growth_64_to_256" in values and float(values["ring_time_vs_gather"]) > 0
    # gather and its copy left out at 256; the ring and the sigmoid copies ran
    assert re.search(r"^\s+256\s+512\s+-\s+-\s+-\s+-\s+[\d.]+", out, re.M)
    assert "sigmoid_again_vs_sigmoid" in values and "gather_again_vs_gather" in values


@pytest.mark.slow
def test_gpu_smoke_cpu_mode_runs_to_completion(tmp_path):
    out = run(
        "bash",
        "benchmarks/gpu_smoke.sh",
        "--cpu",
        timeout_s=600,
        env={"UMT_SMOKE_OUT": str(tmp_path)},
    )
    values = summary(out)
    assert float(values["synthetic_samples_per_s"]) > 0
    assert float(values["shards_samples_per_s"]) > 0
    assert 0 <= float(values["shards_data_wait"]) <= 1
    assert float(values["zero3_samples_per_s"]) > 0  # ZeRO-3 steps with evaluation inside
    assert 0 <= float(values["eval_itc_i2t_r1"]) <= 100 and float(values["eval_seconds"]) > 0
    assert float(values["resume_seconds"]) > 0
    assert "umt eval: 20 images" in out


def test_forward_flops_with_data_negatives_equal_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, log_table=False)
    b, t = 4, 10
    ids, neg_ids = torch.randint(5, 1000, (b, t)), torch.randint(5, 1000, (b, t))
    mask = torch.ones_like(ids)
    negatives = (neg_ids, mask, torch.ones(b, dtype=torch.bool))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(b, 3, 32, 32), ids, mask, None, seed=1, negative_texts=negatives)
    shape = StepShape(b, t, data_negatives=True)
    assert counter.get_total_flops() == pytest.approx(sum(forward_flops(cfg, shape).values()))


@pytest.mark.parametrize("flags", [["--warmup", "-1"], ["--rounds", "-2"]])
def test_loader_throughput_refuses_negative_rounds_in_one_line(flags):
    proc = subprocess.run(
        [sys.executable, "benchmarks/loader_throughput.py", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--rounds must be >= 1 and --warmup >= 0 (got {3 if flags[0] == '--warmup' else -2} "
            f"and {-1 if flags[0] == '--warmup' else 1})"
        )
    )


@pytest.mark.slow
def test_loader_throughput_quick_compares_every_contender_on_the_same_samples():
    """Without nginx (pointed at a missing binary), http is left out with one line and the rest
    is still measured (it died with pytest's Skipped traceback)."""
    out = run(
        sys.executable, "benchmarks/loader_throughput.py", "--quick", "--samples", "128",
        "--batch-size", "16", "--rounds", "1", timeout_s=600,
        env={"UMT_NGINX": "/nonexistent/nginx"},
    )  # fmt: skip
    assert "from http left out: nginx is not installed at /nonexistent/nginx" in out
    assert "\nfrom local:" in out and "\nfrom s3:" in out and "\nfrom http:" not in out
    values = summary(out)
    assert float(values["s3_ours_first_batch_s"]) > 0 and "http_ours_samples_per_s" not in values
    assert float(values["ours_samples_per_s"]) > 0 and float(values["ours_first_batch_s"]) > 0
    for contender in ("webdataset", "open_clip"):
        assert float(values[f"vs_{contender}"]) > 0
        low, high = map(float, values[f"vs_{contender}_range"].split("-"))
        assert 0 < low <= high
    # the noise floor: a second copy of ours, paired round by round, from local disk and S3
    assert float(values["ours_again_vs_ours"]) > 0 and float(values["s3_ours_again_vs_ours"]) > 0
    assert "after 1 warm-up, order rotated" in out
    assert float(values["mix3_vs_single"]) > 0  # a 3-source mixture of the same samples
    # mosaic streaming is installed by the benchmark itself; without it, the reason is printed
    assert "vs_mosaic" in values or "mosaic streaming left out:" in out


@pytest.mark.slow
def test_curation_benchmarks_quick_print_their_summaries():
    out = run(sys.executable, "benchmarks/curate_throughput.py", "--quick", "--images", "60")
    values = summary(out)
    assert float(values["hash_ips_per_core"]) > 0 and float(values["shard_ips_per_core"]) > 0
    assert float(values["hash_over_shard_time"]) > 0
    for preset in ("tiny", "small"):
        assert float(values[f"score_{preset}_sps"]) > 0 and float(values[f"model_{preset}_sps"]) > 0
    values = summary(run(sys.executable, "benchmarks/curate_quality.py", "--seeds", "0"))
    assert float(values["near_precision"]) >= 0.98 and float(values["near_recall"]) >= 0.95
    assert float(values["decontaminate_recall"]) >= 0.95
