"""The unified model on CPU: shapes, masks, heads, presets and the pretrained text tower."""

from __future__ import annotations

import json
import math

import pytest
import torch

from umt.model import build_model, list_presets, preset_config
from umt.objectives import ObjectiveConfig


def tiny(**changes):
    cfg = preset_config("tiny")
    cfg.text.vocab_size = 300
    for key, value in changes.items():
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    torch.manual_seed(0)
    return build_model(cfg, log_table=False)


def batch(n=4, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(5, 300, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 3 :] = 0
    ids[0, t - 3 :] = 0
    return pixels, ids, mask


def test_forward_backward_reaches_every_parameter():
    model = tiny()
    pixels, ids, mask = batch()
    out = model(pixels, ids, mask, torch.tensor([0, 1, 2, 2]), seed=3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert {"loss/itc", "loss/itm", "itc/accuracy_i2t", "itm/accuracy", "logit_scale"} <= set(
        out.logs
    )


def test_embeddings_are_normalised_with_the_configured_size():
    model = tiny()
    pixels, ids, mask = batch()
    img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
    assert img.shape == txt.shape == (4, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))


def test_extra_padding_changes_nothing():
    model = tiny().eval()
    pixels, ids, mask = batch()
    padded_ids = torch.cat([ids, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(ids, mask),
            model.encode_text(padded_ids, padded_mask),
            atol=1e-6,
            rtol=0,
        )
        torch.testing.assert_close(
            model.score_pairs(ids, mask, pixels),
            model.score_pairs(padded_ids, padded_mask, pixels),
            atol=1e-6,
            rtol=0,
        )


def test_padded_token_values_are_ignored_by_fusion():
    model = tiny().eval()
    pixels, ids, mask = batch()
    other = ids.clone()
    other[0, -3:] = 77  # garbage under the mask
    with torch.no_grad():
        torch.testing.assert_close(
            model.score_pairs(ids, mask, pixels),
            model.score_pairs(other, mask, pixels),
            atol=1e-6,
            rtol=0,
        )


def test_score_pairs_with_unequal_counts_is_a_clear_error():
    model = tiny().eval()
    pixels, ids, mask = batch()
    with pytest.raises(ValueError, match="got 4 texts and 1 images"):
        model.score_pairs(ids, mask, pixels[:1])


def test_logit_scale_starts_at_one_over_0_07():
    assert tiny().scale().item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_no_weight_decay_on_norms_biases_modality_embeddings_vit_tokens_and_logit_scale():
    model = tiny()
    decay, no_decay = model.optimizer_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale.log_scale" in exempt and "fusion.modality_embed" in exempt
    # timm's rule for ViTs: the class token and the position embeddings (3-D) are not decayed.
    assert "image_tower.embeddings.cls_token" in exempt
    assert "image_tower.embeddings.position_embeddings" in exempt
    decayed = {names[id(p)] for p in decay["params"]}
    assert "text_tower.embeddings.word_embeddings.weight" in decayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "fusion.blocks.0.attn.qkv.weight" not in exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_activation_checkpointing_gives_the_same_gradients():
    pixels, ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny(**{"fusion.activation_checkpointing": ckpt})
        model(pixels, ids, mask, seed=1).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_mlm_head_is_tied_to_the_word_embeddings_and_trains():
    model = tiny(mlm=True)
    assert model.mlm_head.word_embeddings[0] is model.text_tower.get_input_embeddings()
    pixels, ids, mask = batch(t=16)
    out = model(
        pixels, ids, mask, seed=5, objectives=ObjectiveConfig(mlm_weight=1.0, mlm_probability=0.5)
    )
    assert torch.isfinite(out.logs["loss/mlm"]) and out.logs["loss/mlm"] > 0
    out.loss.backward()
    assert model.mlm_head.bias.grad is not None


def test_mlm_without_head_is_a_clear_error():
    model = tiny()
    pixels, ids, mask = batch()
    with pytest.raises(ValueError, match="model.mlm"):
        model(pixels, ids, mask, objectives=ObjectiveConfig(mlm_weight=1.0))


def test_itm_off_skips_the_fusion_pass():
    model = tiny()
    pixels, ids, mask = batch()
    out = model(pixels, ids, mask, objectives=ObjectiveConfig(itm_weight=0.0))
    out.loss.backward()
    assert "loss/itm" not in out.logs
    assert model.fusion.blocks[0].attn.qkv.weight.grad is None


def test_presets_are_listed_and_sized():
    assert list_presets() == ["tiny", "small", "base", "large"]
    counts = {}
    for name in list_presets():
        with torch.device("meta"):
            counts[name] = build_model(name, log_table=False).num_parameters()
    # base: BERT-base (no pooler) 108.9M + ViT-B/16 85.8M + 6 fusion layers of width 768.
    assert counts["base"]["text_tower"] == 108_891_648
    assert counts["base"]["image_tower"] == 85_798_656
    assert counts["base"]["fusion"] == 6 * (12 * 768 * 768 + 13 * 768) + 2 * 768 + 2 * 768
    assert (
        counts["tiny"]["total"]
        < counts["small"]["total"]
        < counts["base"]["total"]
        < counts["large"]["total"]
    )
    assert all(c["total"] == sum(v for k, v in c.items() if k != "total") for c in counts.values())


def test_unknown_preset_names_the_key():
    with pytest.raises(ValueError, match="model.preset"):
        preset_config("huge")


def test_text_tower_loads_pretrained_minilm_and_matches_its_bert(minilm_dir):
    from transformers import BertModel, BertTokenizerFast

    cfg = preset_config("tiny")
    cfg.text.pretrained = minilm_dir
    model = build_model(cfg, log_table=False).eval()
    assert model.text_tower.config.hidden_size == 384
    tok = BertTokenizerFast.from_pretrained(minilm_dir)
    enc = tok(
        ["a small red circle above a large blue square", "a dog"], padding=True, return_tensors="pt"
    )
    reference = BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ours = model.embed_text(enc["input_ids"], enc["attention_mask"]).tokens
        theirs = reference(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert model.text_proj.in_features == 384 and not math.isnan(ours.sum().item())


def test_data_negatives_add_a_fourth_itm_group_scored_against_the_own_image():
    """ITM with the data's negative captions = cross-entropy over the 4 groups, label 0 for them."""
    model = tiny()
    pixels, ids, mask = batch()
    g = torch.Generator().manual_seed(5)
    neg_ids = torch.randint(5, 300, (4, 11), generator=g)  # longer than the captions: padding
    neg_mask = torch.ones(4, 11, dtype=torch.long)
    valid = torch.tensor([True, True, False, True])
    keys = torch.tensor([0, 1, 2, 3])
    plain = model(pixels, ids, mask, keys, seed=3)
    out = model(pixels, ids, mask, keys, seed=3, negative_texts=(neg_ids, neg_mask, valid))
    # The data negatives, scored alone, with the same fused model the objective used:
    text = model.embed_text(neg_ids, neg_mask)
    image = model.embed_image(pixels)
    data_logits = model.itm_logits(text.tokens, text.mask, image.tokens).float()
    data_ce = torch.nn.functional.cross_entropy(
        data_logits[valid], torch.zeros(3).long(), reduction="sum"
    )
    # Plain ITM averaged over 12 counted pairs (4 positives + 8 mined); the data adds 3 more.
    want = (plain.logs["loss/itm"] * 12 + data_ce) / 15
    torch.testing.assert_close(out.logs["loss/itm"], want, rtol=1e-5, atol=1e-6)
    right = (data_logits[valid].argmax(1) == 0).float().mean()
    torch.testing.assert_close(out.logs["itm/accuracy_data_negatives"], right)
    out.loss.backward()
    assert model.text_tower.embeddings.word_embeddings.weight.grad[neg_ids[3]].abs().sum() > 0


def test_sincos_position_init_gives_each_patch_its_row_and_column():
    from umt.model.towers import sincos_2d

    model = tiny(**{"image.position_init": "sincos", "image.image_size": 32, "image.patch_size": 8})
    table = model.image_tower.embeddings.position_embeddings[0].detach()
    assert table.shape == (17, 64) and table[0].abs().sum() == 0  # CLS slot: no position
    torch.testing.assert_close(table[1:], sincos_2d(4, 64))
    # Row channels (first half) are equal along a row, column channels along a column.
    grid = table[1:].view(4, 4, 64)
    assert torch.equal(grid[2, 0, :32], grid[2, 3, :32]) and torch.equal(
        grid[0, 1, 32:], grid[3, 1, 32:]
    )
    assert len({tuple(row.tolist()) for row in table[1:]}) == 16  # every patch distinct
    assert (
        table.requires_grad is False
        and model.image_tower.embeddings.position_embeddings.requires_grad
    )
    with pytest.raises(ValueError, match="model.image.position_init must be one of normal, sincos"):
        tiny(**{"image.position_init": "fourier"})


def logit_scale_reference(forward_clamp: bool) -> list[float]:
    """The toy of `_ranks_logit_scale.py` in plain torch: open_clip's rule (clamp the parameter
    after each step) or a clamp inside the forward (whose gradient is 0 past the bound); the
    gradient norm clipped at 1, DeepSpeed's default `gradient_clipping`."""
    from tests.model._ranks_logit_scale import LR, TARGETS

    log_scale = torch.nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
    optimizer = torch.optim.Adam([log_scale], lr=LR)
    scales = []
    for target in TARGETS:
        used = log_scale.clamp(max=math.log(100)) if forward_clamp else log_scale
        loss = (used.exp()[0] - target) ** 2 / 1e4
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([log_scale], 1.0)
        optimizer.step()
        if not forward_clamp:
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
        scales.append(float(log_scale.detach().clamp(max=math.log(100)).exp()))
    return scales


@pytest.mark.slow
def test_a_logit_scale_past_the_bound_comes_back_at_every_zero_stage(tmp_path):
    """Adam pushes the scale to the bound (target 200), then the target drops to 30: clamping the
    parameter in DeepSpeed's fp32 master lets it come back, as open_clip's rule does; a clamp in
    the forward would hold it at 100 for good (gradient 0)."""
    from tests.conftest import REPO, run_torchrun

    stuck = logit_scale_reference(forward_clamp=True)
    expected = logit_scale_reference(forward_clamp=False)
    assert stuck[-1] == pytest.approx(100.0) and expected[-1] < 60  # the bug, and the fix
    out = tmp_path / "scales.json"
    run_torchrun(REPO / "tests" / "model" / "_ranks_logit_scale.py", str(out), nproc=2)
    for run, scales in json.loads(out.read_text()).items():
        first_forward, *after_steps, next_forward = scales
        # bf16 too: the forward reads the fp32 value (a bf16 parameter would give 14.25).
        assert first_forward == pytest.approx(1 / 0.07, rel=1e-6), run
        assert max(after_steps) <= 100.0 * (1 + 1e-6), run
        assert next_forward == pytest.approx(after_steps[-1], rel=1e-6), run
        if run.endswith("bf16"):  # bf16 gradients: the same path within their rounding
            assert after_steps == pytest.approx(expected, rel=2e-3), run
        else:
            assert after_steps == pytest.approx(expected, rel=1e-5), f"ZeRO stage {run}"


def test_the_logit_scale_is_clamped_to_0_ln100_in_evaluation_and_by_clamp():
    from umt.engine import clamp_logit_scale

    model = tiny()
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(10.0)
    model.eval()
    assert model.scale().item() == pytest.approx(100.0, rel=1e-6)
    model.train()
    assert model.scale().item() == pytest.approx(math.exp(10.0), rel=1e-6)  # gradient flows
    clamp_logit_scale(model.logit_scale)
    assert model.logit_scale.log_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(-3.0)
    clamp_logit_scale(model.logit_scale)
    assert model.logit_scale.log_scale.item() == 0.0


def test_a_pretrained_tower_recorded_without_its_architecture_is_rebuilt_with_a_warning(caplog):
    """Checkpoints and exports made before whole tower configs were recorded: the tower can only
    be rebuilt from its sizes, which is said, naming the artifact and the tower."""
    import logging

    from umt.model.config import for_saved_weights

    cfg = preset_config("tiny")
    cfg.text.pretrained = "/gone/bert"
    cfg.image.pretrained, cfg.image.architecture = "/gone/vit", {"model_type": "vit"}
    with caplog.at_level(logging.WARNING, logger="umt.model"):
        for_saved_weights(cfg, "old-export")
    assert cfg.text.pretrained is None and cfg.image.pretrained is None
    assert "old-export: the text tower came from /gone/bert and only its sizes" in caplog.text
    assert "image tower" not in caplog.text  # its architecture was recorded
