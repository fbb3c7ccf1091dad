"""Planted cases for curation, made from real photos (scikit-learn's two sample photos) and the
built-in scenes, written as shards (each image's bytes as planted), with the truth of each sample.

Originals ("bases"), pairwise distinct:
* photo crops, 128 px, on a grid of stride 72: neighbours overlap 44% of their area (distinct
  images that look alike); crops with too little texture (flat sky, blurred background) are left
  out, since two of those are the same picture;
* built-in scenes (96 px) with pairwise different captions.
Planted copies of a base, each in its own row:
* `exact`: the same file; `same_pixels`: its decoded pixels saved as PNG;
* `jpeg`: re-encoded at quality 50-70; `resize`: scaled to 50-80%; `crop`: up to 10% of the width
  and of the height cut away, split at random between the two borders;
* evaluation: other bases (mirrored photo crops and other scenes), some of which have a planted
  copy (jpeg, resize or crop) in the training table.
Samples are shuffled, so a copy comes before its original as often as not.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tests.data_pipeline.loader_fixtures import write_manifest, write_tar

PHOTO_SIDE, PHOTO_STRIDE, MIN_EDGES = 128, 72, 12.0
SCENE_SIDE = 96
KINDS = ("exact", "same_pixels", "jpeg", "resize", "crop")
NEAR_KINDS = ("jpeg", "resize", "crop")


def photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def textured(image: Image.Image) -> bool:
    edges = np.asarray(image.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    return float(edges[2:-2, 2:-2].mean()) >= MIN_EDGES


def photo_crops(sources: list[Image.Image], offset: int = 0) -> list[Image.Image]:
    crops = []
    for photo in sources:
        w, h = photo.size
        for y in range(offset, h - PHOTO_SIDE + 1, PHOTO_STRIDE):
            for x in range(offset, w - PHOTO_SIDE + 1, PHOTO_STRIDE):
                crop = photo.crop((x, y, x + PHOTO_SIDE, y + PHOTO_SIDE))
                if textured(crop):
                    crops.append(crop)
    return crops


def scenes(count: int, seed: int, avoid: set[str]) -> list[tuple[Image.Image, str]]:
    from data_pipeline import builtin

    rng = random.Random(seed)
    out = []
    while len(out) < count:
        scene = builtin.sample_scene(rng)
        caption = builtin.captions(scene)[0]
        image = builtin.render(scene, SCENE_SIDE, rng)
        if caption not in avoid:
            avoid.add(caption)
            out.append((image, caption))
    return out


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def planted_copy(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """(bytes, file extension) of a copy of an encoded original."""
    image = decoded(data)
    if kind == "exact":
        return data, "jpg"
    if kind == "same_pixels":
        return encode(image, "PNG"), "png"
    if kind == "jpeg":
        return encode(image, quality=rng.randint(50, 70)), "jpg"
    if kind == "resize":
        f = rng.uniform(0.5, 0.8)
        size = (round(image.width * f), round(image.height * f))
        return encode(image.resize(size, Image.Resampling.BICUBIC)), "jpg"
    f = rng.uniform(0.02, 0.10)  # crop: up to 10% of each side's length, split at random
    dx, dy = round(image.width * f), round(image.height * f)
    left, top = rng.randint(0, dx), rng.randint(0, dy)
    box = (left, top, image.width - (dx - left), image.height - (dy - top))
    return encode(image.crop(box)), "jpg"


@dataclass
class Planted:
    """What was planted: each training sample's truth by key (base and kind, or the evaluation
    image it copies), and the two shard folders."""

    train: Path
    eval: Path
    truth: dict[str, dict] = field(default_factory=dict)  # key -> {"base", "kind"[, "eval"]}
    eval_copies: int = 0


def write_shards(folder: Path, samples: list[tuple[bytes, str, str, dict]], per_shard: int) -> None:
    """Samples (image bytes, extension, caption, extra json) as tars + manifest, keys in order."""
    folder.mkdir(parents=True)
    counts = {}
    for s in range(0, len(samples), per_shard):
        members = []
        for i, (data, ext, caption, extra) in enumerate(samples[s : s + per_shard], start=s):
            key = f"{folder.name}-{i:05d}"
            meta = {"key": key, "image_key": key, "caption": caption, "captions": [caption]}
            members += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode())]
            members.append((f"{key}.json", json.dumps(meta | extra).encode()))
        name = f"data-{s // per_shard:06d}.tar"
        write_tar(folder / name, members)
        counts[name] = len(members) // 3
    write_manifest(folder, counts)


def plant(root: Path, scene_count: int = 40, eval_scene_count: int = 24, seed: int = 0) -> Planted:
    """Write the planted training and evaluation shards under `root` (module docstring)."""
    rng = random.Random(seed)
    captions: set[str] = set()
    photo_set = photos()
    bases = [(crop, f"crop {i} of a sample photo") for i, crop in enumerate(photo_crops(photo_set))]
    bases += scenes(scene_count, seed, captions)
    mirrored = [p.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for p in photo_set]
    eval_bases = [(c, f"mirrored crop {i}") for i, c in enumerate(photo_crops(mirrored, 36))]
    eval_bases += scenes(eval_scene_count, seed + 1, captions)

    train: list[tuple[bytes, str, str, dict]] = []
    for b, (image, caption) in enumerate(bases):
        original = encode(image)
        train.append((original, "jpg", caption, {"base": b, "kind": "original"}))
        for kind in KINDS:
            data, ext = planted_copy(original, kind, rng)
            train.append((data, ext, caption, {"base": b, "kind": kind}))
    evaluation, copies = [], 0
    for e, (image, caption) in enumerate(eval_bases):
        original = encode(image)
        evaluation.append((original, "jpg", caption, {}))
        if e % 2 == 0:  # every other evaluation image has a copy among the training samples
            kind = NEAR_KINDS[(e // 2) % len(NEAR_KINDS)]
            data, ext = planted_copy(original, kind, rng)
            train.append((data, ext, f"copy {e}", {"base": None, "kind": kind, "eval": e}))
            copies += 1
    rng.shuffle(train)  # a copy comes before its original as often as not
    planted = Planted(root / "train", root / "eval", eval_copies=copies)
    write_shards(planted.train, train, per_shard=64)
    write_shards(planted.eval, evaluation, per_shard=64)
    for i, (_, _, _, extra) in enumerate(train):
        planted.truth[f"train-{i:05d}"] = extra
    return planted


def write_random_export(
    folder: Path, preset: str, tokenizer: Path, image_size: int | None = None, seed: int = 0
) -> Path:
    """An export folder (what `umt export` writes and `umt.load` reads) of a randomly initialised
    `preset` model with the given tokenizer: a scorer to test and benchmark with, no training."""
    from dataclasses import asdict

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from umt.model import build_model, preset_config

    cfg = preset_config(preset)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg.text.vocab_size = len(tok)
    if image_size:
        cfg.image.image_size = image_size
    torch.manual_seed(seed)
    model = build_model(cfg, log_table=False)
    folder.mkdir(parents=True)
    state = {f"umt.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    tok.save_pretrained(str(folder))
    image = {"image_size": cfg.image.image_size, "mean": [0.5] * 3, "std": [0.5] * 3}
    manifest = {
        "format_version": 2,
        "model": asdict(cfg),
        "image": image,
        "text": {"max_length": 24, "tokenizer": "."},
    }
    (folder / "umt_export.json").write_text(json.dumps(manifest, indent=2))
    return folder


def plant_swapped(
    folder: Path, count: int = 200, swapped: int = 20, side: int = 64, seed: int = 5
) -> set[str]:
    """Built-in scenes drawn at `side` px with their first caption, where `swapped` of them (in
    pairs) carry each other's caption instead; returns the keys of those."""
    rng = random.Random(seed)
    drawn = scenes_at(count, side, seed)
    order = list(range(count))
    rng.shuffle(order)
    captions = [caption for _, caption in drawn]
    for a, b in zip(order[:swapped:2], order[1:swapped:2]):
        captions[a], captions[b] = captions[b], captions[a]
    samples = [(encode(image, "PNG"), "png", captions[i], {}) for i, (image, _) in enumerate(drawn)]
    write_shards(folder, samples, per_shard=50)
    return {f"{folder.name}-{i:05d}" for i in order[:swapped]}


def scenes_at(count: int, side: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`count` built-in scenes drawn at `side` px (captions may repeat, as in the demo's data)."""
    from data_pipeline import builtin

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = builtin.sample_scene(rng)
        out.append((builtin.render(scene, side, rng), builtin.captions(scene)[0]))
    return out


# --- scoring a curation against the truth ------------------------------------------------------

PIXEL_COPIES = ("original", "exact", "same_pixels")  # the same decoded pixels


def read_removed(subset: Path) -> list[dict]:
    return [json.loads(line) for line in (subset / "removed.jsonl").read_text().splitlines()]


def dedup_report(planted: Planted, removed: list[dict], reason: str) -> dict:
    """Precision, recall and per-kind recall of one dedup rule (`exact_duplicate` or
    `near_duplicate`) run alone. A removal is right when the sample it names as kept copies the
    same original (for exact: the same pixels); recall counts the removals a perfect rule makes
    (all but one of each group). Per kind: the share of copies not left beside their original."""
    truth = planted.truth
    exact = reason == "exact_duplicate"

    def group(key: str):
        t = truth[key]
        if t.get("base") is None or (exact and t["kind"] not in PIXEL_COPIES):
            return None
        return t["base"]

    mine = [r for r in removed if r["reason"] == reason]
    right = sum(1 for r in mine if group(r["key"]) is not None and group(r["key"]) == group(r["evidence"]["kept"]["key"]))  # fmt: skip
    sizes: dict = {}
    for key in truth:
        if (g := group(key)) is not None:
            sizes[g] = sizes.get(g, 0) + 1
    expected = sum(n - 1 for n in sizes.values())
    gone = {r["key"] for r in mine}
    original = {t["base"]: k for k, t in truth.items() if t.get("kind") == "original"}
    per_kind = {}
    for kind in PIXEL_COPIES[1:] if exact else KINDS:
        copies = [k for k, t in truth.items() if t["kind"] == kind and t.get("base") is not None]
        caught = [k for k in copies if k in gone or original[truth[k]["base"]] in gone]
        per_kind[kind] = len(caught) / len(copies)
    return {
        "removed": len(mine),
        "right": right,
        "expected": expected,
        "precision": right / len(mine) if mine else 1.0,
        "recall": right / expected,
        "per_kind": per_kind,
    }


def decontamination_report(planted: Planted, removed: list[dict]) -> dict:
    """Precision and recall of eval_duplicate: right when the evaluation image named is the one
    the sample copies."""
    mine = [r for r in removed if r["reason"] == "eval_duplicate"]
    right = [
        r for r in mine
        if planted.truth[r["key"]].get("eval") == int(r["evidence"]["eval"]["key"].rsplit("-", 1)[1])
    ]  # fmt: skip
    per_kind = {}
    for kind in NEAR_KINDS:
        copies = [k for k, t in planted.truth.items() if t.get("eval") is not None and t["kind"] == kind]  # fmt: skip
        per_kind[kind] = sum(1 for r in right if r["key"] in copies) / len(copies)
    return {
        "removed": len(mine),
        "right": len(right),
        "expected": planted.eval_copies,
        "precision": len(right) / len(mine) if mine else 1.0,
        "recall": len(right) / planted.eval_copies,
        "per_kind": per_kind,
    }
