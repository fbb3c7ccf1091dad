"""The model card (`README.md`) of an export: what the model is, what it was trained on and for
how long, and how it scored at its last evaluation; all read from the checkpoint and its run."""

from __future__ import annotations

from umt.checkpoint import CheckpointRef

RECALL_COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"]


def model_card(
    cfg: dict,
    meta: dict,
    ref: CheckpointRef,
    counts: dict[str, int],
    evaluation: dict | None,
    name: str,
) -> str:
    """Markdown with a Hub metadata header; every figure comes from the arguments."""
    sections = [
        "---\nlibrary_name: umt\npipeline_tag: zero-shot-image-classification\ntags:\n"
        "- umt\n- vision-language\n- image-text-retrieval\n- contrastive\n---",
        f"# {name}\n\nA unified multimodal (image + text) transformer trained with UMT, exported "
        f"from `{ref.path}` (step {ref.step:,}).",
        _model_section(cfg.get("model", {}), counts),
        _training_section(cfg, meta, ref),
        _data_section(meta.get("data"), cfg),
        _eval_section(evaluation),
        _use_section(name),
    ]
    return "\n\n".join(sections) + "\n"


def _model_section(model: dict, counts: dict[str, int]) -> str:
    text, image, fusion = model.get("text", {}), model.get("image", {}), model.get("fusion", {})
    rows = [
        ("text tower", counts.get("text_tower", 0), _tower(text), text.get("pretrained")),
        ("image tower", counts.get("image_tower", 0), _tower(image), image.get("pretrained")),
        ("fusion", counts.get("fusion", 0), _tower(fusion), None),
        ("heads", counts.get("heads", 0), f"embed dim {model.get('embed_dim')}", None),
        ("total", counts.get("total", 0), "", ""),
    ]
    lines = [
        "## Model",
        "",
        f"Preset: `{model.get('preset') or 'custom'}`; images {image.get('image_size')} px in "
        f"{image.get('patch_size')} px patches; MLM head: {'yes' if model.get('mlm') else 'no'}.",
        "",
        "| part | parameters | shape | started from |",
        "| --- | ---: | --- | --- |",
    ]
    for part, n, shape, start in rows:
        start = "scratch" if start is None else start
        lines.append(f"| {part} | {n:,} ({n / 1e6:.1f} M) | {shape} | {start} |")
    return "\n".join(lines)


def _tower(section: dict) -> str:
    if not section.get("num_layers"):
        return ""
    return f"{section['num_layers']} layers × {section['hidden_size']} wide, {section['num_heads']} heads"


def _training_section(cfg: dict, meta: dict, ref: CheckpointRef) -> str:
    train, obj = cfg.get("train", {}), cfg.get("objectives", {})
    global_batch = train.get("micro_batch_size", 0) * train.get("grad_accum", 1) * ref.world_size
    samples = meta.get("samples")
    weights = ", ".join(
        f"{k} {obj[f'{k}_weight']:g}" for k in ("itc", "itm", "mlm") if obj.get(f"{k}_weight")
    )
    return "\n".join(
        [
            "## Training",
            "",
            f"- steps: {ref.step:,} of {train.get('steps', 0):,} configured",
            f"- samples seen: {samples:,}"
            if samples is not None
            else "- samples seen: not recorded",
            f"- global batch: {global_batch:,} ({ref.world_size} ranks × micro-batch "
            f"{train.get('micro_batch_size')} × grad_accum {train.get('grad_accum')})",
            f"- objectives: {weights or 'none'}",
            f"- optimizer: lr {train.get('lr')}, weight decay {train.get('weight_decay')}, "
            f"precision {train.get('precision')}, ZeRO stage {ref.zero_stage}",
        ]
    )


def _data_section(data: dict | None, cfg: dict) -> str:
    shards = cfg.get("data", {}).get("train", {}).get("shards")
    lines = ["## Training data", ""]
    if not data:
        lines.append(f"Shards: `{shards}` (the checkpoint records no data summary).")
        return "\n".join(lines)
    if data.get("synthetic"):
        lines.append("Synthetic batches (a benchmark or test run): no real data.")
        return "\n".join(lines)
    lines += [
        f"Shards: `{shards}`",
        "",
        f"- dataset digest (shard names and sample counts): `{data['digest']}`",
        f"- samples per epoch: {_per_epoch(data):,} in {data['shards']:,} shards",
        "",
        "| source | samples | shards | mixture | per epoch | seen |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for source in data.get("sources", []):
        share = source.get("per_epoch")
        per_epoch = (
            "" if share is None else f"{share:,.0f}" if share == int(share) else f"{share:,.2f}"
        )
        seen = f"{source['seen']:,}" if "seen" in source else ""
        lines.append(
            f"| {source['name']} | {source['samples']:,} | {source['shards']:,} | "
            f"{_mixture(source, data.get('mode'))} | {per_epoch} | {seen} |"
        )
    phases = data.get("phases") or []
    if len(phases) > 1:
        lines += ["", "The mixture changed during training (`umt train --new-mixture`):", ""]
        lines += [_phase_line(phase) for phase in phases]
        gone = {n: c for n, c in (data.get("seen") or {}).items()
                if n not in {s["name"] for s in data.get("sources", [])}}  # fmt: skip
        if gone:
            lines += ["", "Seen from sources no longer in the mixture: "
                      + ", ".join(f"{n} {c:,}" for n, c in gone.items())]  # fmt: skip
    for source in data.get("sources", []):
        if source.get("subset"):
            lines += ["", _subset_lines(source["name"], source["subset"])]
    return "\n".join(lines)


def _per_epoch(data: dict) -> int:
    """Samples an epoch takes (with repeats or proportions, on average): the data's own without."""
    shares = [s["per_epoch"] for s in data.get("sources", []) if "per_epoch" in s]
    return round(sum(shares)) if shares else data["samples"]


def _mixture(source: dict, mode: str | None) -> str:
    """How a source was mixed: `x2`, `proportion 0.3`, `weight 4` (resampled)."""
    if "proportion" in source:
        return f"proportion {source['proportion']:g}"
    if mode == "resampled" or (mode is None and source.get("weight") not in (None, 1.0)):
        return f"weight {source['weight']:g}" if source.get("weight") is not None else "by size"
    return f"x{source.get('repeat', 1):g}"


def _phase_line(phase: dict) -> str:
    """`- from sample 112 (step 14): a x0.1, c x3`."""
    start, batch = phase.get("start", 0), phase.get("global_batch")
    step = f" (step {start // batch:,})" if batch and start % batch == 0 else ""
    sources = ", ".join(
        f"{s['name']} {_mixture(s, 'resampled' if 'weight' in s else 'epoch')}"
        for s in phase.get("sources", [])
    )
    return f"- from sample {start:,}{step}: {sources or phase.get('digest', '')}"


def _subset_lines(name: str, subset: dict) -> str:
    """A curated source: where its subset is, what it was made from and by which rules."""
    rules = subset.get("rules", {})
    named = [f"`{k}`: {v}" for k, v in rules.items() if v not in (None, [], False, "")]
    removed = ", ".join(f"{reason} {n:,}" for reason, n in subset.get("removed", {}).items())
    return "\n".join(
        [
            f"Source `{name}` is the subset `{subset.get('subset')}` (`umt data curate`) of "
            f"{', '.join(f'`{s}`' for s in subset.get('sources', []))}: "
            f"{subset.get('kept', 0):,} of {subset.get('samples', 0):,} samples kept.",
            "",
            f"- rules: {'; '.join(named) or 'none'}",
            f"- removed: {removed or 'none'}",
        ]
    )


def _eval_section(evaluation: dict | None) -> str:
    if evaluation is None:
        return "## Evaluation\n\nNo evaluation ran at or before this step (`eval.every_steps`)."
    report = evaluation["report"]
    lines = [
        "## Evaluation",
        "",
        f"Retrieval at step {evaluation['step']:,} on `{evaluation.get('shards')}`: "
        f"{report.get('images', '?')} images, {report.get('texts', '?')} texts; recall in %.",
        "",
        "| scorer | " + " | ".join(RECALL_COLUMNS) + " |",
        "| --- |" + " ---: |" * len(RECALL_COLUMNS),
    ]
    for scorer in ("chance", "itc", "itm"):
        if scorer in report:
            row = report[scorer]
            cells = " | ".join(f"{row[c]:.2f}" if c in row else "" for c in RECALL_COLUMNS)
            lines.append(f"| {scorer} | {cells} |")
    return "\n".join(lines)


def _use_section(name: str) -> str:
    return f"""## Use

```python
import umt  # also registers the `umt` model type with transformers' Auto classes

model, processor = umt.load("{name}")  # UnifiedMultimodalTransformer, eval mode
inputs = processor(images=[image], text=["a photo of a dog"])
image_embeds = model.encode_image(inputs["pixel_values"])
text_embeds = model.encode_text(inputs["input_ids"], inputs["attention_mask"])

from transformers import AutoModel, AutoProcessor
hf_model = AutoModel.from_pretrained("{name}")  # umt.model.hf_model.UMTModel, a PreTrainedModel
hf_processor = AutoProcessor.from_pretrained("{name}")  # pixel_values, input_ids, attention_mask
```

Without UMT installed (torch, transformers, safetensors, Pillow), the code this folder carries
loads it: `AutoModel.from_pretrained("{name}", trust_remote_code=True)`, and the same for
`AutoProcessor`.

Evaluate it with `umt eval --model {name} --shards ...`."""
