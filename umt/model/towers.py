"""The two encoders: a BERT-family text tower and a ViT image tower (HF models, SDPA attention)."""

from __future__ import annotations

from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from umt.model.config import ImageTowerConfig, TextTowerConfig


def build_text_tower(cfg: TextTowerConfig) -> BertModel:
    """`BertModel` from `cfg.pretrained` (HF name or folder) or from the architecture fields."""
    if cfg.pretrained:
        model = BertModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
        _record_text_architecture(cfg, model.config)
        return model
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
    """`ViTModel` from `cfg.pretrained` (HF name or folder) or from the architecture fields."""
    if cfg.pretrained:
        model = ViTModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
        _record_image_architecture(cfg, model.config)
        return model
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
    return ViTModel(config, add_pooling_layer=False)


def _record_text_architecture(cfg: TextTowerConfig, hf: BertConfig) -> None:
    """Write a pretrained tower's real sizes into the config, so checkpoints and exports rebuild it."""
    cfg.vocab_size, cfg.hidden_size = hf.vocab_size, hf.hidden_size
    cfg.num_layers, cfg.num_heads = hf.num_hidden_layers, hf.num_attention_heads
    cfg.intermediate_size = hf.intermediate_size
    cfg.max_position_embeddings = hf.max_position_embeddings
    cfg.pad_token_id = hf.pad_token_id if hf.pad_token_id is not None else cfg.pad_token_id


def _record_image_architecture(cfg: ImageTowerConfig, hf: ViTConfig) -> None:
    cfg.image_size, cfg.patch_size, cfg.hidden_size = hf.image_size, hf.patch_size, hf.hidden_size
    cfg.num_layers, cfg.num_heads = hf.num_hidden_layers, hf.num_attention_heads
    cfg.intermediate_size = hf.intermediate_size
