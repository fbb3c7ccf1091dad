"""Export: consolidate a ZeRO checkpoint into safetensors + config + tokenizer, and load it back
without DeepSpeed (`umt.load(dir) -> (model, processor)`).

An export folder is a Hugging Face `save_pretrained` folder of `umt.model.hf_model.UMTModel`:
    config.json         `UMTConfig`: model type `umt`, the model config, image and text
                        preprocessing, `auto_map` naming the code below
    model.safetensors   fp32 weights, keys `umt.<name in UnifiedMultimodalTransformer>` (tied
                        weights stored once)
    *.py                the model and processor code, copied from `umt/model/` as it is: what
                        `trust_remote_code=True` runs where UMT is not installed
    preprocessor_config.json   `UMTImageProcessor`, for `AutoImageProcessor`
    processor_config.json      `UMTProcessor` (images + text), for `AutoProcessor`
    tokenizer files     tokenizer.json, vocab.txt, ... (when the run's tokenizer could be loaded)
    umt_export.json     format version, model config, preprocessing, source checkpoint and step
    README.md           the model card: sizes, training data, steps and samples, last evaluation
Exports of format 1 (weights without the `umt.` prefix, tokenizer in `tokenizer/`) still load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from umt import checkpoint
from umt.model import UnifiedMultimodalTransformer, build_model, model_config_from_dict
from umt.model.config import for_saved_weights

log = logging.getLogger("umt.export")
EXPORT_VERSION = 2
PREFIX = "umt."  # `UMTModel.base_model_prefix`
WEIGHTS = "model.safetensors"
MANIFEST = "umt_export.json"


class ExportError(RuntimeError):
    """An export that cannot be written or read, naming the path."""


def consolidate(ref: checkpoint.CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 weights of every ZeRO stage, through DeepSpeed's own zero_to_fp32 consolidation."""
    from umt.logs import quiet_deepspeed, quiet_prints

    quiet_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's files run no code when loaded; its "Processing zero checkpoint" prints go.
    with checkpoint.weights_only_loads(), quiet_prints():
        return get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write an export folder from a checkpoint root (its `latest`) or one `step{N}` folder."""
    from safetensors.torch import save_file

    from umt.model.hf_config import UMTConfig
    from umt.model.hf_processing import UMTImageProcessor, UMTProcessor
    from umt.model_card import model_card

    ref = checkpoint.resolve(str(ckpt), Path(ckpt), flag="checkpoint")
    if ref is None:
        raise ExportError(f"{ckpt}: no checkpoint found")
    meta = checkpoint.read_meta(ref)
    cfg = meta.get("config") or {}
    if "model" not in cfg:
        raise ExportError(f"{ref.path}: the checkpoint carries no model config")
    data = cfg.get("data", {})
    tokenizer_name = data.get("tokenizer") or cfg["model"]["text"].get("pretrained")
    # Before the (long) consolidation: an export must carry its tokenizer.
    tokenizer = checkpoint_tokenizer(ref, tokenizer_name) if tokenizer_name else None
    state = {k: v.contiguous() for k, v in consolidate(ref).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # `UMTModel` holds the network as `.umt`: these are the keys `save_pretrained` writes.
    save_file({PREFIX + k: v for k, v in state.items()}, str(out / WEIGHTS), {"format": "pt"})
    image = {
        "image_size": cfg["model"]["image"]["image_size"],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "transform": "resize shorter side + center crop, bicubic",
    }
    max_length = data.get("train", {}).get("max_text_len", 64)
    hf_config = UMTConfig(
        umt_model=cfg["model"], image_processing=image, text_max_length=max_length
    )
    hf_config.architectures = ["UMTModel"]
    write_model_code(out, hf_config)
    hf_config.save_pretrained(str(out))  # with `auto_map`, and the config's own code
    image_processor = UMTImageProcessor(image["image_size"], image["mean"], image["std"])
    image_processor.save_pretrained(str(out))
    manifest = {
        "format_version": EXPORT_VERSION,
        "source": {"checkpoint": str(ref.path), "step": ref.step},
        "model": cfg["model"],
        "image": image,
        "text": {"max_length": max_length, "tokenizer": None},
    }
    if tokenizer is not None:  # beside config.json: AutoTokenizer and AutoProcessor find it
        UMTProcessor(image_processor, tokenizer, max_length).save_pretrained(str(out))
        manifest["text"]["tokenizer"] = "."
    else:
        log.warning("%s names no tokenizer (a synthetic-data run): the export has none", ref.path)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    evaluation = last_eval_report(ref, cfg)
    card = model_card(cfg, meta, ref, parameter_counts(state), evaluation, out.name)
    (out / "README.md").write_text(card)
    readable_by_all(out)
    log.info("exported %s (step %d) to %s", ref.path, ref.step, out)
    return out


def write_model_code(out: Path, hf_config) -> None:
    """`hf_model.py` and every module it imports (relative imports: the closure transformers
    itself follows), copied from `umt/model/` as they are, and `auto_map` for `AutoModel`: the
    Hub's convention for custom models. The config's and the processors' code is written by
    their own `save_pretrained` (their `_auto_class`)."""
    import shutil

    from transformers.dynamic_module_utils import get_relative_import_files

    from umt.model import hf_model

    for source in [hf_model.__file__, *get_relative_import_files(hf_model.__file__)]:
        shutil.copyfile(source, out / Path(source).name)
    auto_map = getattr(hf_config, "auto_map", None) or {}
    hf_config.auto_map = {**auto_map, "AutoModel": f"hf_model.{hf_model.UMTModel.__name__}"}


def parameter_counts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameters by part, as `UnifiedMultimodalTransformer.num_parameters` counts them."""
    counts = dict.fromkeys(("text_tower", "image_tower", "fusion", "heads"), 0)
    for key, value in state.items():
        part = key.split(".", 1)[0]
        counts[part if part in counts else "heads"] += value.numel()
    counts["total"] = sum(counts.values())
    return counts


def last_eval_report(ref: checkpoint.CheckpointRef, cfg: dict) -> dict | None:
    """The newest `eval/step{N}.json` of the run with N <= the checkpoint's step, or None."""
    folders = [ref.root.parent / "eval"]
    if cfg.get("output_dir"):
        folders.append(Path(cfg["output_dir"]) / "eval")
    best = None
    for folder in folders:
        for path in folder.glob("step*.json") if folder.is_dir() else ():
            try:
                record = json.loads(path.read_text())
                step = int(record["step"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s: not an evaluation record, left out of the model card", path)
                continue
            if step <= ref.step and (best is None or step > best["step"]):
                best = record
    return best


def checkpoint_tokenizer(ref: checkpoint.CheckpointRef, name: str):
    """The tokenizer a checkpoint's config names, or ExportError in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"{ref.path}: cannot load the tokenizer its config names ({name!r}): {first}"
        ) from None


def readable_by_all(folder: Path) -> None:
    """Files 0644 (folders 0755) under the umask: safetensors writes its file 0600, and an
    export is made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@dataclass
class Processor:
    """Turns PIL images and strings into model-ready tensors, as evaluation does (through the
    functions an export's `UMTProcessor` calls: the same tensors)."""

    tokenizer: object | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_length: int

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        from data_pipeline.pixels import eval_pixels

        return eval_pixels(images, self.image_size, self.mean, self.std)

    def text(self, text: list[str]) -> dict[str, torch.Tensor]:
        from umt.model.hf_processing import tokenize

        if self.tokenizer is None:
            raise ExportError("this export has no tokenizer; pass input ids yourself")
        return tokenize(self.tokenizer, text, self.max_length)

    def __call__(
        self, images: list[Image.Image] | None = None, text: list[str] | None = None
    ) -> dict:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            out |= self.text(text)
        return out


def load(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[UnifiedMultimodalTransformer, Processor]:
    """`(model, processor)` from an export folder; no DeepSpeed involved. The model is for
    inference: eval mode, parameters without gradients (outputs are plain tensors; to fine-tune,
    `model.train().requires_grad_(True)`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.exists():
        raise ExportError(f"{path}: no such folder")
    if not manifest_path.is_file():
        raise ExportError(f"{path} is not a UMT export (no {MANIFEST}); run `umt export` first")
    try:
        manifest = json.loads(manifest_path.read_text())
        model_cfg = model_config_from_dict(manifest["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{manifest_path}: not a UMT export manifest ({exc})") from None
    model = build_model(for_saved_weights(model_cfg, str(path)), log_table=False)
    try:
        state = load_file(str(path / WEIGHTS))
    except FileNotFoundError:
        raise ExportError(f"{path / WEIGHTS}: missing; export the checkpoint again") from None
    except (SafetensorError, OSError) as exc:  # cut short by a full disk or a broken copy
        raise ExportError(
            f"{path / WEIGHTS}: not a readable safetensors file ({exc}); copy or export it again"
        ) from None
    if manifest.get("format_version", 1) >= 2:
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval().requires_grad_(False)  # for inference: outputs carry no graph
    tokenizer = None
    tok = manifest["text"].get("tokenizer")
    if tok:
        from transformers import AutoTokenizer

        tok_path = path / tok
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path) if tok_path.is_dir() else tok)
    img = manifest["image"]
    processor = Processor(
        tokenizer,
        img["image_size"],
        tuple(img["mean"]),
        tuple(img["std"]),
        manifest["text"]["max_length"],
    )
    return model, processor


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[UnifiedMultimodalTransformer, Processor]:
    """`(model, processor)` from an export folder or straight from a DeepSpeed checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return load(path, device)
    if not path.exists():
        raise ExportError(f"--model {path}: no such file or folder")
    # A run folder, its checkpoint root or one step folder; else one line saying what it is.
    ref = checkpoint.locate(path, "--model", "an export, or a run, checkpoint or step folder")
    cfg = checkpoint.read_meta(ref).get("config") or {}
    if "model" not in cfg:
        raise ExportError(f"{ref.path}: the checkpoint carries no model config")
    model_cfg = for_saved_weights(model_config_from_dict(cfg["model"]), str(ref.path))
    model = build_model(model_cfg, log_table=False)
    model.load_state_dict(consolidate(ref), strict=True)
    model.to(device).eval().requires_grad_(False)  # for inference: outputs carry no graph
    data = cfg.get("data", {})
    name = data.get("tokenizer") or cfg["model"]["text"].get("pretrained")
    tokenizer = checkpoint_tokenizer(ref, name) if name else None
    processor = Processor(
        tokenizer,
        model_cfg.image.image_size,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        data.get("train", {}).get("max_text_len", 64),
    )
    return model, processor
