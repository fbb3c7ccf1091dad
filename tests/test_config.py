"""Typed config: layering, errors that name the key, shipped YAMLs, the DeepSpeed config built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from umt.config import Config, ConfigError, config_reference, load_config, save_config
from umt.engine import deepspeed_config

SYNTH = ["data.train.synthetic=true"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    # tiny_cpu is for one's own data: it names no shards or tokenizer, and says so.
    given = ["data.train.shards=/x", "data.tokenizer=/t"] if path.stem == "tiny_cpu" else []
    if given:
        with pytest.raises(ConfigError, match="data.train.shards is required"):
            load_config(path)
    cfg = load_config(path, given)
    assert cfg.model.preset in ("tiny", "small", "base", "large")
    ds = deepspeed_config(cfg, world_size=8, device=torch.device("cuda"), load_universal=False)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8


def test_pretrain_configs_are_what_their_names_say():
    base = load_config(REPO / "configs" / "pretrain_base.yaml")
    large = load_config(REPO / "configs" / "pretrain_large.yaml")
    assert (base.model.fusion.num_layers, base.model.fusion.hidden_size, base.zero.stage) == (
        6,
        768,
        2,
    )
    assert (large.zero.stage, large.model.fusion.activation_checkpointing) == (2, False)
    assert large.zero.communication_dtype == "fp32"
    ds = deepspeed_config(base, 8, torch.device("cuda"), False)
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0


def test_layers_defaults_preset_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  embed_dim: 48\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(path, [*SYNTH, "train.lr=5e-4", "model.fusion.num_layers=3"])
    assert cfg.model.text.hidden_size == 64  # from the preset
    assert cfg.model.embed_dim == 48  # YAML over preset
    assert cfg.train.lr == 5e-4  # command line over YAML ("5e-4": YAML 1.1 reads it as text)
    assert cfg.model.fusion.num_layers == 3
    assert cfg.train.steps == Config().train.steps  # default


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz; did you mean train.steps?"),
        ("train.steps=abc", "train.steps must be int (got 'abc')"),
        ("train.steps=0", "train.steps must be > 0 (got 0)"),
        ("zero.stage=4", "zero.stage must be 0, 1, 2 or 3 (got 4)"),
        ("model.preset=huge", "model.preset: unknown preset 'huge'"),
        ("train.precision=fp8", "train.precision must be auto, fp32, bf16 or fp16"),
        ("objectives.mlm_weight=1", "objectives.mlm_weight > 0 needs model.mlm: true"),
        ("train.betas=[0.9]", "train.betas must be a list of 2 values"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*SYNTH, override])
    assert message in str(info.value)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  micro_batch_size: many\n")
    with pytest.raises(ConfigError, match=f"train.micro_batch_size must be int .* in {path}"):
        load_config(path)


def test_missing_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.train.shards is required"):
        load_config(None, [])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, [*SYNTH, "model.preset=small", "train.betas=[0.9,0.95]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_a_recorded_tower_architecture_round_trips_and_must_be_a_mapping(tmp_path):
    cfg = load_config(None, SYNTH)
    cfg.model.text.architecture = {"model_type": "bert", "hidden_act": "relu", "id2label": {0: "A"}}
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError, match="model.image.architecture must be dict"):
        load_config(None, [*SYNTH, "model.image.architecture=relu"])


def test_a_resume_does_not_compare_what_a_pretrained_tower_wrote_into_the_config():
    """The saved config holds a pretrained tower's sizes and architecture, recorded when it was
    built; the config given to resume does not yet: not a change of the run. Other keys are."""
    from umt.config import to_dict
    from umt.run_config import run_changes

    given = load_config(None, [*SYNTH, "model.text.pretrained=/towers/bert"])
    saved = to_dict(given)
    saved["model"]["text"] |= {"hidden_size": 384, "architecture": {"hidden_act": "relu"}}
    assert run_changes(saved, given) == []
    saved["model"]["fusion"]["num_layers"] = 3
    assert run_changes(saved, given) == ["model.fusion.num_layers (3 -> 6)"]
    given.model.text.pretrained = None  # a tower from its fields: its sizes are the run's shape
    assert "model.text.hidden_size (384 -> 768)" in run_changes(saved, given)


def test_deepspeed_config_on_cpu_is_fp32_with_explicit_clipping():
    cfg = load_config(None, [*SYNTH, "zero.stage=3", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, 2, torch.device("cpu"), load_universal=True)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["checkpoint"]["load_universal"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is True  # torch's AdamW on a CPU-only run
    assert "fused" not in ds["optimizer"]["params"]


def test_the_optimizer_is_chosen_per_device_and_offload():
    """auto: torch's fused AdamW on GPUs, DeepSpeed's CPU Adam with offload, torch AdamW on CPU."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = load_config(None, SYNTH)
    params = deepspeed_config(cfg, 8, gpu, False)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    offload = load_config(None, [*SYNTH, "zero.offload_optimizer=cpu"])
    for device in (gpu, cpu):
        params = deepspeed_config(offload, 8, device, False)["optimizer"]["params"]
        assert params["torch_adam"] is False and "fused" not in params  # DeepSpeedCPUAdam
    explicit = load_config(None, [*SYNTH, "zero.offload_optimizer=cpu", "train.optimizer=adamw"])
    assert deepspeed_config(explicit, 8, gpu, False)["optimizer"]["params"]["torch_adam"] is True
    fused = load_config(None, [*SYNTH, "train.optimizer=fused_adamw"])
    with pytest.raises(ConfigError, match="fused_adamw needs a CUDA device"):
        deepspeed_config(fused, 1, cpu, False)
    with pytest.raises(ConfigError, match="cpu_adam needs zero.offload_optimizer: cpu"):
        load_config(None, [*SYNTH, "train.optimizer=cpu_adam"])
    with pytest.raises(ConfigError, match="train.optimizer must be one of"):
        load_config(None, [*SYNTH, "train.optimizer=sgd"])


def test_communication_dtype_reaches_deepspeed():
    cfg = load_config(None, [*SYNTH, "zero.communication_dtype=fp32"])
    assert (
        deepspeed_config(cfg, 64, torch.device("cuda"), False)["communication_data_type"] == "fp32"
    )
    assert "communication_data_type" not in deepspeed_config(
        load_config(None, SYNTH), 64, torch.device("cuda"), False
    )
    with pytest.raises(ConfigError, match="zero.communication_dtype"):
        load_config(None, [*SYNTH, "zero.communication_dtype=int8"])


def test_config_reference_lists_every_stable_key():
    table = config_reference()
    for key in (
        "output_dir",
        "model.preset",
        "model.text.pretrained",
        "model.image.pretrained",
        "data.train.shards",
        "data.eval.shards",
        "train.steps",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.lr",
        "train.seed",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "zero.stage",
        "eval.every_steps",
        "log.every_steps",
    ):
        assert f"| `{key}` |" in table


def test_configs_folder_has_the_three_documented_files():
    names = {p.name for p in Path(REPO / "configs").glob("*.yaml")}
    assert {"demo_cpu.yaml", "pretrain_base.yaml", "pretrain_large.yaml"} <= names


def test_resume_plan_takes_the_runs_saved_config_unless_one_is_given(tmp_path):
    """`--resume RUN_DIR`: the run's config.yaml (or the --config given, which check_resume then
    compares with it), output_dir the run, `auto` in it; a checkpoint path stays as given."""
    from umt.checkpoint import CheckpointError
    from umt.run_config import resume_plan

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: somewhere\n")
    assert resume_plan(str(run), None, ["train.steps=3"]) == (
        str(run / "config.yaml"),
        ["train.steps=3", f"output_dir={run}"],
        "auto",
        run,
    )
    assert resume_plan(str(run), "mine.yaml", []) == (
        "mine.yaml",
        [f"output_dir={run}"],
        "auto",
        None,
    )
    with pytest.raises(CheckpointError, match="checkpoints: no such file or folder"):
        resume_plan(str(run / "checkpoints"), None, [])  # named, not taken for a fresh start
    assert resume_plan("auto", None, [f"output_dir={run}"]) == (
        str(run / "config.yaml"),
        [f"output_dir={run}"],
        "auto",
        run,
    )
    assert resume_plan("auto", "mine.yaml", []) == ("mine.yaml", [], "auto", None)
    assert resume_plan("none", None, [f"output_dir={run}"]) == (  # check_resume decides
        str(run / "config.yaml"),
        [f"output_dir={run}"],
        "none",
        run,
    )


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_itm_mining_sharpness_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="objectives.itm_mining_sharpness must be finite and > 0"):
        load_config(None, ["data.train.synthetic=true", f"objectives.itm_mining_sharpness={value}"])


def test_the_sigmoid_loss_goes_with_a_logit_bias_and_the_softmax_without():
    base = ["data.train.synthetic=true"]
    with pytest.raises(ConfigError, match="itc_loss: sigmoid goes with model.logit_bias_init"):
        load_config(None, [*base, "objectives.itc_loss=sigmoid"])
    with pytest.raises(ConfigError, match="itc_loss: sigmoid goes with model.logit_bias_init"):
        load_config(None, [*base, "model.logit_bias_init=-10"])
    cfg = load_config(None, [*base, "objectives.itc_loss=sigmoid", "model.logit_bias_init=-10"])
    assert cfg.model.logit_bias_init == -10.0
    with pytest.raises(ConfigError, match="objectives.itc_impl must be gather or ring"):
        load_config(None, [*base, "objectives.itc_impl=allgather"])


def test_contrastive_batch_is_micro_or_step_and_step_needs_itc_or_itm():
    base = ["data.train.synthetic=true"]
    with pytest.raises(ConfigError) as wrong:
        load_config(None, [*base, "objectives.contrastive_batch=big"])
    assert str(wrong.value) == (
        "objectives.contrastive_batch must be micro or step (got 'big') "
        "(override 'objectives.contrastive_batch=big')"
    )
    nothing = [*base, "objectives.contrastive_batch=step", "objectives.itc_weight=0"]
    nothing += ["objectives.itm_weight=0", "objectives.mlm_weight=1", "model.mlm=true"]
    with pytest.raises(ConfigError, match="itc_weight and objectives.itm_weight are both 0"):
        load_config(None, nothing)
    assert (
        load_config(None, [*base, "objectives.contrastive_batch=step"]).objectives.contrastive_batch
        == "step"
    )
