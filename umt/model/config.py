"""Typed model configuration and the named presets (`tiny`, `small`, `base`, `large`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

log = logging.getLogger("umt.model")


@dataclass
class TextTowerConfig:
    """BERT-family text tower. With `pretrained` set, the architecture fields are ignored."""

    pretrained: str | None = None
    """HF name or local folder for `BertModel.from_pretrained` (and its tokenizer)."""
    architecture: dict | None = None
    """The whole HF config (`config.json`) of a `pretrained` tower, recorded when it is built:
    exports and evaluation rebuild the tower from it (activation, norms, embeddings, ...)."""
    vocab_size: int = 30522
    """Vocabulary size; 30522 matches bert-base-uncased WordPiece tokenizers."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    pad_token_id: int = 0
    mask_token_id: int = 103
    """Id of `[MASK]` for MLM (103 in bert-base-uncased vocabularies)."""


@dataclass
class ImageTowerConfig:
    """ViT image tower. With `pretrained` set, the architecture fields are ignored."""

    pretrained: str | None = None
    """HF name or local folder for `ViTModel.from_pretrained`."""
    architecture: dict | None = None
    """The whole HF config (`config.json`) of a `pretrained` tower, recorded when it is built:
    exports and evaluation rebuild the tower from it (activation, norms, patching, ...)."""
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.0
    position_init: str = "normal"
    """Initial patch-position embeddings when built from scratch (still trained): `normal` (HF's
    N(0, 0.02)) or `sincos` (the 2-D sine-cosine table of MAE: where a patch is, from step 0)."""


@dataclass
class FusionConfig:
    """Fusion transformer over concat(text tokens, image tokens)."""

    num_layers: int = 6
    hidden_size: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    activation_checkpointing: bool = False
    """Recompute each block in backward: less activation memory, ~1/3 more fusion compute."""
    type: str = "single_stream"
    """`single_stream`: one FFN per block for every token (ViLT). `multiway`: shared attention,
    a feed-forward expert per modality chosen by each token's modality (VLMo, BEiT-3)."""
    vl_expert_layers: int = 0
    """With `multiway`: the top K blocks route every token of a fused (text + image) pass to a
    vision-language expert; modality-only passes keep their modality's expert."""


@dataclass
class ModelConfig:
    """The unified multimodal transformer: two towers, a fusion transformer and the heads."""

    preset: str | None = None
    """Name of the preset these values started from (informational once resolved)."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 256
    """Shared embedding size of the contrastive projections."""
    logit_scale_init: float = 2.6592600369327779
    """ln(1/0.07), as in CLIP."""
    logit_scale_max: float = 4.605170185988092
    """The logit scale is clamped at ln(100)."""
    itc_from: str = "towers"
    """ITC embeddings from the `towers` (CLS of each tower), or from `fusion`: text-only and
    image-only passes through the shared multiway blocks (VLMo's dual-encoder mode)."""
    logit_bias_init: float | None = None
    """Build the learnable bias of `objectives.itc_loss: sigmoid` with this initial value
    (SigLIP: -10, with logit_scale_init ln 10 = 2.302585)."""
    mlm: bool = False
    """Build the MLM head (tied to the word embeddings)."""
    compile: bool = False
    """Training compiles each transformer block of the towers and the fusion with
    `torch.compile` (inductor), in place (torchtitan's per-block compile): checkpoints stay
    those of the eager model. The first steps pay the compile."""


def _preset(text: dict, image: dict, fusion: dict, embed_dim: int, name: str) -> ModelConfig:
    return ModelConfig(
        preset=name,
        text=TextTowerConfig(**text),
        image=ImageTowerConfig(**image),
        fusion=FusionConfig(**fusion),
        embed_dim=embed_dim,
    )


def _tiny() -> ModelConfig:
    return _preset(
        dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, dropout=0.0),
        dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
        ),
        dict(num_layers=2, hidden_size=64, num_heads=2),
        32,
        "tiny",
    )


def _small() -> ModelConfig:
    return _preset(
        dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, dropout=0.0),
        dict(
            image_size=96,
            patch_size=16,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            intermediate_size=1024,
        ),
        dict(num_layers=2, hidden_size=256, num_heads=4),
        128,
        "small",
    )


def _base() -> ModelConfig:
    # ViT-B/16 + BERT-base + 6 fusion layers, 768 wide (ALBEF/BLIP-base proportions).
    return _preset(
        dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
        ),
        dict(num_layers=6, hidden_size=768, num_heads=12),
        256,
        "base",
    )


def _large() -> ModelConfig:
    # ViT-L/16 + BERT-large + 12 fusion layers, 1024 wide.
    return _preset(
        dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
        dict(
            image_size=224,
            patch_size=16,
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=4096,
        ),
        dict(num_layers=12, hidden_size=1024, num_heads=16),
        512,
        "large",
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}


def list_presets() -> list[str]:
    return list(PRESETS)


def preset_config(name: str) -> ModelConfig:
    """A fresh `ModelConfig` of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {list_presets()}")
    return PRESETS[name]()


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `model_config_to_dict` (used by exports, which carry their config); shares no
    mutable part with `d`."""
    d = copy.deepcopy(d)
    return ModelConfig(
        text=TextTowerConfig(**d.pop("text", {})),
        image=ImageTowerConfig(**d.pop("image", {})),
        fusion=FusionConfig(**d.pop("fusion", {})),
        **d,
    )


def for_saved_weights(cfg: ModelConfig, source: str) -> ModelConfig:
    """`cfg` to build a model whose weights come from `source` (an export or a checkpoint):
    towers from their recorded architecture, never fetched again. A pretrained tower recorded
    before whole architectures were (sizes only) is rebuilt with default settings otherwise:
    that is said, since its outputs may differ from the trained model's."""
    for name, tower in (("text", cfg.text), ("image", cfg.image)):
        if tower.pretrained and not tower.architecture:
            log.warning(
                "%s: the %s tower came from %s and only its sizes were recorded; it is rebuilt "
                "with default settings (activation, norms, ...), which may not be its own",
                source,
                name,
                tower.pretrained,
            )
        tower.pretrained = None
    return cfg


def check_fusion(cfg: ModelConfig) -> None:
    """ValueError naming the key for a fusion/ITC combination that cannot be built."""
    fusion = cfg.fusion
    if fusion.type not in ("single_stream", "multiway"):
        raise ValueError(
            f"model.fusion.type must be single_stream or multiway (got {fusion.type!r})"
        )
    if not 0 <= fusion.vl_expert_layers <= fusion.num_layers or (
        fusion.vl_expert_layers and fusion.type != "multiway"
    ):
        raise ValueError(
            "model.fusion.vl_expert_layers must be in [0, model.fusion.num_layers] and needs "
            f"model.fusion.type: multiway (got {fusion.vl_expert_layers} with {fusion.type})"
        )
    if cfg.itc_from not in ("towers", "fusion") or (
        cfg.itc_from == "fusion" and fusion.type != "multiway"
    ):
        raise ValueError(
            "model.itc_from must be towers, or fusion with model.fusion.type: multiway "
            f"(got {cfg.itc_from} with {fusion.type})"
        )
