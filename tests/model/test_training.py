"""`model.compile`: which blocks are compiled, and compiled steps under DeepSpeed ZeRO 2 and 3
against eager ones (inductor on CPU), checkpoints crossing between the two."""

from __future__ import annotations

import json

import pytest
import torch

from umt.config import ConfigError, load_config
from umt.model import build_model, preset_config
from umt.model.training import compile_blocks, transformer_blocks

TINY_BLOCKS = [
    "text_tower.encoder.layer.0", "text_tower.encoder.layer.1",
    "image_tower.layers.0", "image_tower.layers.1",
    "fusion.blocks.0", "fusion.blocks.1",
]  # fmt: skip


def tiny(fusion_type: str = "single_stream"):
    cfg = preset_config("tiny")
    cfg.text.vocab_size = 512
    cfg.fusion.type = fusion_type
    torch.manual_seed(0)
    return build_model(cfg, log_table=False)


def is_compiled(module: torch.nn.Module) -> bool:
    return hasattr(module.forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("fusion_type", ["single_stream", "multiway"])
def test_compile_blocks_compiles_each_transformer_block_in_place(fusion_type):
    model = tiny(fusion_type)
    before = model.state_dict()
    assert compile_blocks(model) == TINY_BLOCKS
    blocks = dict(transformer_blocks(model))
    assert all(is_compiled(block) for block in blocks.values())
    # The glue stays eager: embeddings, norms, heads, the model itself.
    others = [m for m in model.modules() if m not in blocks.values()]
    assert not any(is_compiled(m) for m in others)
    after = model.state_dict()  # same names (no `_orig_mod.`), same tensors
    assert list(after) == list(before) and all(
        after[k].data_ptr() == before[k].data_ptr() for k in before
    )


def test_model_compile_is_off_by_default_and_set_by_an_override():
    base = ["model.preset=tiny", "data.train.synthetic=true"]
    assert load_config(None, base).model.compile is False
    assert load_config(None, [*base, "model.compile=true"]).model.compile is True
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(None, [*base, "model.compile=sometimes"])


@pytest.mark.slow
def test_compiled_steps_match_eager_at_zero_2_and_3_and_checkpoints_cross(tmp_path):
    """Inductor on CPU, 2 gloo ranks (`_ranks_compiled_steps.py`): the same losses and gradients
    within float rounding; each run goes back to the other's checkpoint with its exact weights
    (no `_orig_mod.` keys) and repeats the step it took from its own."""
    from tests.conftest import REPO, run_torchrun

    out = tmp_path / "results.json"
    script = REPO / "tests" / "model" / "_ranks_compiled_steps.py"
    run_torchrun(script, str(tmp_path / "checkpoints"), str(out), nproc=2)
    for stage, r in json.loads(out.read_text()).items():
        assert r["compiled_blocks"] == {"eager": [], "compiled": TINY_BLOCKS}, stage
        assert r["state_dict_keys_equal"], stage
        eager, compiled = r["losses"]["eager"], r["losses"]["compiled"]
        assert len(eager) == len(compiled) == 4  # steps 1, 2, 3, and 3 again after the load
        assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6), f"ZeRO-{stage}"
        assert max(r["grad_difference"]) < 1e-4, f"ZeRO-{stage}: {r['grad_difference']}"
        # Each loaded the other's step-2 weights exactly (step 3 had moved its own) and
        # repeated step 3 as it went the first time.
        assert r["moved"] == r["loaded_equal"] == {"eager": True, "compiled": True}, stage
        assert eager[3] == pytest.approx(eager[2], rel=1e-5), stage
        assert compiled[3] == pytest.approx(compiled[2], rel=1e-5), stage
