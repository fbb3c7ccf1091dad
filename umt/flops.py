"""Analytic FLOP count of one training step, for throughput benchmarks and MFU logging.

Only matrix products are counted (2 FLOPs per multiply-add), as in the usual MFU convention
(PaLM, Megatron): layer norms, GELU, softmax, embeddings and the optimizer are left out, and
activation-checkpointing recompute is not counted (it is overhead, not model work). Backward
costs twice the forward (gradients of activations and of weights), so a step is 3x forward.

Per transformer layer over one sequence of L tokens, width D, MLP width F:
    2·L·(3D·D + D·D + 2·D·F)   QKV, output and MLP projections
  + 4·L²·D                     attention scores QKᵀ and the weighted sum AV
"""

from __future__ import annotations

from dataclasses import dataclass

from umt.model.config import ModelConfig

FORMULA = """\
step FLOPs = 3 x forward (backward = 2 x forward); matmuls only, 2 FLOPs per multiply-add
layer(L, D, F)  = 2L(4D^2 + 2DF) + 4L^2 D          one transformer layer on one sequence
N               = (image_size / patch)^2 + 1       image tokens (patches + CLS)
forward = b * Lt * layer(T, Dt, Ft)                text tower
        + b * [2 (N-1) 3p^2 Dv + Lv * layer(N, Dv, Fv)]   image tower (patch conv + layers)
        + 2b (Dt + Dv) E + 4 b (W b) E             ITC projections + both similarity blocks
        + 3b * [in_proj + Lf * layer(T+N, D, 4D) + 4D]    ITM: positives + 2 negatives, head
        + data negatives: b * Lt * layer(T, Dt, Ft) + b * [in_proj + Lf * layer(T+N, D, 4D) + 4D]
        + MLM: b * [Lt * layer(T, Dt, Ft) + 2 Dt E] + b * [in_proj + Lf * layer(T+N, D, 4D)]
               + m (2 D Dt + 2 Dt V)               masked text pass, fusion pass, head on m tokens
in_proj = 2 T Dt D [Dt != D] + 2 N Dv D [Dv != D];  m = masked tokens (default 0.15 b (T-2))
multiway fusion: the same counts (each token goes through one expert FFN); with
model.itc_from: fusion every text pass adds b * [2 T Dt D [Dt != D] + Lf * layer(T, D, 4D)], the
image pass b * [2 N Dv D [Dv != D] + Lf * layer(N, D, 4D)], and the ITC projections are D -> E."""


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch looks like to the FLOP count."""

    batch: int
    """b: samples per rank per micro-batch."""
    text_len: int
    """T: the text length the step runs at (the longest caption of the batch once trimmed)."""
    world_size: int = 1
    """W: ranks, for the (b, W*b) contrastive similarity blocks."""
    itm: bool = True
    data_negatives: bool = False
    """ITM also scores one negative caption per image from the data (data.train.negatives)."""
    mlm: bool = False
    mlm_tokens: float | None = None
    """m: masked positions per micro-batch; None: the expected 0.15 * b * (T - 2)."""


def layer_flops(length: int, width: int, mlp: int) -> float:
    """Forward FLOPs of one pre-norm transformer layer on one sequence of `length` tokens."""
    return 2.0 * length * (4 * width * width + 2 * width * mlp) + 4.0 * length**2 * width


def image_tokens(cfg: ModelConfig) -> int:
    return (cfg.image.image_size // cfg.image.patch_size) ** 2 + 1


def forward_flops(cfg: ModelConfig, shape: StepShape) -> dict[str, float]:
    """Forward FLOPs of one micro-batch by part (see `FORMULA`)."""
    t, v, f = cfg.text, cfg.image, cfg.fusion
    b, seq, n = shape.batch, shape.text_len, image_tokens(cfg)
    d, e = f.hidden_size, cfg.embed_dim
    fused_mlp = int(d * f.mlp_ratio)
    text = b * t.num_layers * layer_flops(seq, t.hidden_size, t.intermediate_size)
    patches = 2.0 * (n - 1) * 3 * v.patch_size**2 * v.hidden_size
    image = b * (patches + v.num_layers * layer_flops(n, v.hidden_size, v.intermediate_size))
    text_in = 2.0 * seq * t.hidden_size * d * (t.hidden_size != d)
    image_in = 2.0 * n * v.hidden_size * d * (v.hidden_size != d)
    if cfg.itc_from == "fusion":  # one-modality passes through the multiway blocks (VLMo)
        text += b * (text_in + f.num_layers * layer_flops(seq, d, fused_mlp))
        image += b * (image_in + f.num_layers * layer_flops(n, d, fused_mlp))
        itc = 2.0 * b * (2 * d) * e + 4.0 * b * shape.world_size * b * e
    else:
        itc = 2.0 * b * (t.hidden_size + v.hidden_size) * e + 4.0 * b * shape.world_size * b * e
    in_proj = text_in + image_in
    fusion_seq = in_proj + f.num_layers * layer_flops(seq + n, d, fused_mlp)
    parts = {"text_tower": text, "image_tower": image, "itc": itc, "itm": 0.0, "mlm": 0.0}
    if shape.itm:
        groups = 4 if shape.data_negatives else 3
        parts["itm"] = groups * b * (fusion_seq + 2.0 * d * 2)
        if shape.data_negatives:  # their text pass (CLS projection included, unused)
            parts["itm"] += text + 2.0 * b * _text_embed_width(cfg) * e
    if shape.mlm:
        m = shape.mlm_tokens if shape.mlm_tokens is not None else 0.15 * b * max(seq - 2, 0)
        head = m * (2.0 * d * t.hidden_size + 2.0 * t.hidden_size * t.vocab_size)
        # The masked pass re-embeds the text, CLS projection included (unused, but computed).
        parts["mlm"] = text + 2.0 * b * _text_embed_width(cfg) * e + b * fusion_seq + head
    return parts


def _text_embed_width(cfg: ModelConfig) -> int:
    return cfg.fusion.hidden_size if cfg.itc_from == "fusion" else cfg.text.hidden_size


def train_step_flops(cfg: ModelConfig, shape: StepShape) -> float:
    """FLOPs of forward + backward of one micro-batch on one rank (3 x forward)."""
    return 3.0 * sum(forward_flops(cfg, shape).values())


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
GPU_BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]


def gpu_peak_flops(device_name: str) -> float | None:
    """Data-sheet dense bf16 peak of a GPU by name (`torch.cuda.get_device_name()`); None if unknown."""
    for key, peak in GPU_BF16_PEAK:
        if key.lower() in device_name.lower():
            return peak
    return None
