"""Modality experts (`model.fusion.type: multiway`, VLMo / BEiT-3): shared attention, an FFN
expert per modality, a vision-language expert in the top blocks, and one-modality passes."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.objective_cases import global_batch, tiny_model
from umt.model import build_model, preset_config
from umt.model.fusion import FusionTransformer
from umt.objectives import ObjectiveConfig, key_ids


def fusions(vl_expert_layers: int = 0, modality_passes: bool = True):
    cfg = preset_config("tiny").fusion
    torch.manual_seed(0)
    single = FusionTransformer(cfg, 64, 64).double()
    cfg.type, cfg.vl_expert_layers = "multiway", vl_expert_layers
    multiway = FusionTransformer(cfg, 64, 64, modality_passes=modality_passes).double()
    return single, multiway


def copy_single_into_multiway(single: FusionTransformer, multiway: FusionTransformer) -> None:
    """Every expert of a block gets the block's one FFN; everything else is shared as it is."""
    state = {}
    for key, value in single.state_dict().items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("ln_mlp", "mlp"):
            block = multiway.blocks[int(parts[1])]
            for name in block.experts:
                suffix = ".".join(parts[3:])
                where = "ln" if parts[2] == "ln_mlp" else f"mlp.{suffix.split('.')[0]}"
                tail = suffix if parts[2] == "ln_mlp" else ".".join(suffix.split(".")[1:])
                state[f"blocks.{parts[1]}.experts.{name}.{where}.{tail}"] = value
        else:
            state[key] = value
    multiway.load_state_dict(state, strict=True)


def tokens(b: int = 3, t: int = 7, p: int = 5):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(b, t, 64, generator=g, dtype=torch.float64)
    image = torch.randn(b, p, 64, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return text, mask, image


@pytest.mark.parametrize("vl_expert_layers", [0, 1, 2])
def test_multiway_with_every_expert_a_copy_of_one_ffn_equals_single_stream(vl_expert_layers):
    """Equal to float64 rounding (1e-15 measured: the experts' matmuls run on fewer rows)."""
    single, multiway = fusions(vl_expert_layers)
    copy_single_into_multiway(single, multiway)
    text, mask, image = tokens()
    got, want = multiway(text, mask, image), single(text, mask, image)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_experts_are_per_modality_and_the_top_blocks_have_a_vision_language_one():
    _, multiway = fusions(vl_expert_layers=1, modality_passes=False)
    assert [sorted(b.experts) for b in multiway.blocks] == [["image", "text"], ["vl"]]
    _, with_passes = fusions(vl_expert_layers=1, modality_passes=True)
    assert sorted(with_passes.blocks[1].experts) == ["image", "text", "vl"]
    text, mask, image = tokens()
    # An expert only ever sees its own modality's tokens: changing the image expert leaves the
    # text positions of a pass below the vision-language blocks unchanged... until attention
    # mixes them in the next block, so look at a one-block fusion.
    single, one = fusions(vl_expert_layers=0)
    one.blocks = one.blocks[:1]
    before = one(text, mask, image)
    with torch.no_grad():
        one.blocks[0].experts["image"].mlp[2].bias.add_(1.0)
    after = one(text, mask, image)
    t = text.shape[1]
    assert torch.equal(before[:, :t], after[:, :t]) and not torch.equal(before[:, t:], after[:, t:])


def test_one_modality_passes_equal_the_fused_pass_restricted_to_that_modality():
    """Text alone = the fused pass where no token may attend to the image (and the reverse),
    with modality experts throughout (vl_expert_layers 0)."""
    _, multiway = fusions(vl_expert_layers=0)
    text, mask, image = tokens()
    t, p = text.shape[1], image.shape[1]
    x = torch.cat(
        [
            multiway.text_in(text) + multiway.modality_embed[0],
            multiway.image_in(image) + multiway.modality_embed[1],
        ],
        dim=1,
    )
    routes = [("text", t), ("image", p)]
    text_keys = torch.cat([mask.bool(), torch.zeros(3, p, dtype=torch.bool)], dim=1)
    fused = multiway._run(x, text_keys[:, None, None, :], routes, routes)
    alone = multiway.encode_text_only(text, mask)
    real = mask.bool()
    assert torch.allclose(fused[:, :t][real], alone[real], atol=1e-12, rtol=0)
    image_keys = torch.cat(
        [torch.zeros(3, t, dtype=torch.bool), torch.ones(3, p, dtype=torch.bool)], 1
    )
    fused = multiway._run(x, image_keys[:, None, None, :], routes, routes)
    assert torch.allclose(fused[:, t:], multiway.encode_image_only(image), atol=1e-12, rtol=0)


def test_itc_from_the_fusion_uses_the_one_modality_passes_and_trains_every_expert():
    model = tiny_model(multiway=True)
    pixels, ids, mask = global_batch()
    text = model.embed_text(ids, mask)
    fused_cls = model.fusion.encode_text_only(text.tokens, mask)[:, 0]
    expected = torch.nn.functional.normalize(model.text_proj(fused_cls), dim=-1)
    assert torch.equal(text.embeds, expected)
    out = model(pixels, ids, mask, key_ids(["a", "b", "a", "c", "d", "e"]), 3, ObjectiveConfig())
    out.loss.backward()
    untrained = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not untrained, untrained  # text, image and vision-language experts all learn


def test_multiway_configs_that_cannot_be_built_are_refused_naming_the_key():
    cfg = preset_config("tiny")
    cfg.itc_from = "fusion"
    with pytest.raises(ValueError, match="model.itc_from must be towers, or fusion with"):
        build_model(cfg, log_table=False)
    cfg = preset_config("tiny")
    cfg.fusion.vl_expert_layers = 1
    with pytest.raises(ValueError, match="model.fusion.vl_expert_layers .* needs"):
        build_model(cfg, log_table=False)


def test_a_multiway_model_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModel

    import umt  # noqa: F401 - registers the umt model type
    from umt.model import model_config_to_dict
    from umt.model.hf_config import UMTConfig
    from umt.model.hf_model import UMTModel

    cfg = preset_config("tiny")
    cfg.fusion.type, cfg.fusion.vl_expert_layers, cfg.itc_from = "multiway", 1, "fusion"
    torch.manual_seed(0)
    model = UMTModel(UMTConfig(umt_model=model_config_to_dict(cfg))).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels, ids, mask = global_batch(torch.float32)
    with torch.no_grad():
        for a, b in (
            (model.get_text_features(ids, mask), loaded.get_text_features(ids, mask)),
            (model.get_image_features(pixels), loaded.get_image_features(pixels)),
            (model.score_pairs(ids, mask, pixels), loaded.score_pairs(ids, mask, pixels)),
        ):
            assert torch.equal(a, b)
    assert any(".experts.vl." in k for k in loaded.state_dict())
