"""The two encoders: a BERT-family text tower and a ViT image tower (HF models, SDPA attention)."""

from __future__ import annotations

import json

import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from .config import ImageTowerConfig, TextTowerConfig


def build_text_tower(cfg: TextTowerConfig) -> BertModel:
    """`BertModel` from `cfg.pretrained` (HF name or folder), else from the recorded
    `cfg.architecture` of one, else from the architecture fields."""
    if cfg.pretrained:
        model = BertModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
        _record_text_architecture(cfg, model.config)
        return model
    if cfg.architecture:
        config = BertConfig.from_dict(cfg.architecture, attn_implementation="sdpa")
        return BertModel(config, add_pooling_layer=False)
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False)


def build_image_tower(cfg: ImageTowerConfig) -> ViTModel:
    """`ViTModel` from `cfg.pretrained` (HF name or folder), else from the recorded
    `cfg.architecture` of one, else from the architecture fields."""
    if cfg.pretrained:
        model = ViTModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
        _record_image_architecture(cfg, model.config)
        return model
    if cfg.architecture:
        config = ViTConfig.from_dict(cfg.architecture, attn_implementation="sdpa")
        return ViTModel(config, add_pooling_layer=False)
    config = ViTConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa",
    )
    if cfg.position_init not in POSITION_INITS:
        raise ValueError(
            f"model.image.position_init must be one of {', '.join(POSITION_INITS)} "
            f"(got {cfg.position_init!r})"
        )
    model = ViTModel(config, add_pooling_layer=False)
    if cfg.position_init == "sincos":
        table = model.embeddings.position_embeddings  # (1, 1 + g*g, D); slot 0 is the CLS token
        grid = cfg.image_size // cfg.patch_size
        with torch.no_grad():
            table[0, 0].zero_()
            table[0, 1:].copy_(sincos_2d(grid, cfg.hidden_size))
    return model


POSITION_INITS = ("normal", "sincos")


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) MAE position table, row-major: half the channels encode the row, half
    the column, each as sin and cos of the index at geometric frequencies 1 .. 1/10000."""
    if width % 4:
        raise ValueError(f"model.image.hidden_size {width} must be divisible by 4 for sincos")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(index: torch.Tensor) -> torch.Tensor:
        angles = index.reshape(-1, 1).double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def recorded_architecture(hf: BertConfig | ViTConfig) -> dict:
    """The whole config of a built tower as JSON values, less the folder it came from."""
    recorded = json.loads(hf.to_json_string(use_diff=False))
    recorded.pop("_name_or_path", None)
    return recorded


def _record_text_architecture(cfg: TextTowerConfig, hf: BertConfig) -> None:
    """Write a pretrained tower's whole config (and its sizes, which the FLOP count and the
    parameter table read) into the model config: checkpoints and exports rebuild it from that."""
    cfg.architecture = recorded_architecture(hf)
    cfg.vocab_size, cfg.hidden_size = hf.vocab_size, hf.hidden_size
    cfg.num_layers, cfg.num_heads = hf.num_hidden_layers, hf.num_attention_heads
    cfg.intermediate_size = hf.intermediate_size
    cfg.max_position_embeddings = hf.max_position_embeddings
    cfg.pad_token_id = hf.pad_token_id if hf.pad_token_id is not None else cfg.pad_token_id


def _record_image_architecture(cfg: ImageTowerConfig, hf: ViTConfig) -> None:
    cfg.architecture = recorded_architecture(hf)
    cfg.image_size, cfg.patch_size, cfg.hidden_size = hf.image_size, hf.patch_size, hf.hidden_size
    cfg.num_layers, cfg.num_heads = hf.num_hidden_layers, hf.num_attention_heads
    cfg.intermediate_size = hf.intermediate_size
