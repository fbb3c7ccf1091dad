"""The two encoders: a BERT-family text tower and a ViT image tower (HF models, SDPA attention)."""

from __future__ import annotations

from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

from umt.model.config import ImageTowerConfig, TextTowerConfig


def build_text_tower(cfg: TextTowerConfig) -> BertModel:
    """`BertModel` from `cfg.pretrained` (HF name or folder) or from the architecture fields."""
    if cfg.pretrained:
        return BertModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
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
        return ViTModel.from_pretrained(
            cfg.pretrained, add_pooling_layer=False, attn_implementation="sdpa"
        )
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


def load_tokenizer(name_or_dir: str) -> BertTokenizerFast:
    """The fast WordPiece tokenizer that goes with a text tower (same name or folder)."""
    return BertTokenizerFast.from_pretrained(name_or_dir)
