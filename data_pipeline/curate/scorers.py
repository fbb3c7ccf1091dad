"""Image-text scorers behind one small interface: the cosine similarity of each pair's image and
caption embeddings (DataComp's CLIP score).

    scorer = load_scorer("exports/umt-base")            # a UMT export (umt.load)
    scorer = load_scorer("open_clip:ViT-L-14:ckpt.pt")   # open_clip, when it is installed
    scores = scorer.score(images, captions)              # (n,) float32 in [-1, 1]

Model code is imported inside these functions only: the data side imports no model at module
level, and `scorer_identity` (what cached scores are keyed by: the weights' sha256) reads files
without building a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from data_pipeline.curate.options import CurateError
from data_pipeline.shard.manifest import file_sha256

OPEN_CLIP = "open_clip:"


class PairScorer(Protocol):
    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        """(n,) cosine similarity of each image with its caption."""


def parse_open_clip(spec: str) -> tuple[str, Path]:
    """`open_clip:ARCH:CHECKPOINT` -> (ARCH, CHECKPOINT), checked to name a file."""
    arch, _, checkpoint = spec[len(OPEN_CLIP) :].partition(":")
    if not arch or not checkpoint:
        raise CurateError(f"--model {spec}: write open_clip:ARCH:CHECKPOINT (a local weights file)")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CurateError(f"--model {spec}: {path} is not a file")
    return arch, path


def scorer_identity(spec: str) -> str:
    """What a scorer's outputs depend on, as a short hash (cached scores are keyed by it); checks
    that `spec` names a scorer at all, in one line."""
    if spec.startswith(OPEN_CLIP):
        arch, path = parse_open_clip(spec)
        return hashlib.sha256(f"open_clip/{arch}/{file_sha256(path)}".encode()).hexdigest()[:16]
    folder = Path(spec).expanduser()
    manifest = folder / "umt_export.json"
    if not manifest.is_file():
        what = "no such folder" if not folder.exists() else "no umt_export.json in it"
        raise CurateError(
            f"--model {spec}: not a UMT export ({what}); give an export folder (umt export) "
            "or open_clip:ARCH:CHECKPOINT"
        )
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CurateError(f"--model {spec}: the export has no model.safetensors")
    try:
        exported = json.loads(manifest.read_text())
    except ValueError as exc:
        raise CurateError(f"--model {spec}: {manifest} is not JSON ({exc})") from None
    text = json.dumps({"umt": exported, "weights": file_sha256(weights)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scorer_device(device: str) -> str:
    """`cpu`; `cuda` or `auto` with a GPU: this rank's (LOCAL_RANK, else SLURM_LOCALID)."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise CurateError("--device cuda: no GPU is visible here")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return f"cuda:{local % torch.cuda.device_count()}"


def load_scorer(spec: str, device: str = "auto") -> PairScorer:
    device = scorer_device(device)
    if spec.startswith(OPEN_CLIP):
        return OpenClipScorer(*parse_open_clip(spec), device=device)
    return UMTScorer(spec, device)


class UMTScorer:
    """A UMT export: `encode_image` and `encode_text` (both L2-normalised), their dot product."""

    def __init__(self, folder: str, device: str = "cpu"):
        import torch

        from umt.export import ExportError, load

        try:
            self.model, self.processor = load(folder, device)
        except ExportError as exc:
            raise CurateError(f"--model {folder}: {exc}") from None
        if self.processor.tokenizer is None:
            raise CurateError(f"--model {folder}: the export has no tokenizer to read captions")
        self.device, self.torch = device, torch

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        inputs = self.processor(images=list(images), text=list(captions))
        with self.torch.inference_mode():
            image = self.model.encode_image(inputs["pixel_values"].to(self.device))
            text = self.model.encode_text(
                inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
            )
        return (image * text).sum(-1).float().cpu().numpy()


class OpenClipScorer:
    """open_clip's model and preprocessing for ARCH, weights from a local file (loaded as
    tensors only: a checkpoint runs no code), `encode_image` / `encode_text` normalised."""

    def __init__(self, arch: str, checkpoint: Path, device: str = "cpu"):
        import torch

        try:
            import open_clip
        except ImportError as exc:
            raise CurateError(
                f"--model open_clip:{arch}:{checkpoint}: open_clip cannot be imported ({exc}); "
                "pip install open_clip_torch"
            ) from None
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(arch)
        except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError, OSError ...
            raise CurateError(f"--model open_clip:{arch}:...: {arch}: {exc}") from None
        state = load_weights(checkpoint, torch)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CurateError(f"--model open_clip:{arch}:{checkpoint}: {first}") from None
        self.model = model.to(device).eval()
        self.preprocess, self.device, self.torch = preprocess, device, torch

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        torch = self.torch
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens = self.tokenizer(list(captions)).to(self.device)
        with torch.inference_mode():
            image = self.model.encode_image(pixels, normalize=True)
            text = self.model.encode_text(tokens, normalize=True)
        return (image * text).sum(-1).float().cpu().numpy()


def load_weights(path: Path, torch) -> dict:
    """A state dict from safetensors or a torch file (weights only), open_clip's training
    checkpoints ({"state_dict": ...}, "module." prefixes) included."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safetensors errors alike
        raise CurateError(f"--model ...:{path}: not a weights file ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CurateError(f"--model ...:{path}: holds no state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
